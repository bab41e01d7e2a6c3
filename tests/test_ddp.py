"""DDP on CPU: two gloo processes collect different data yet end an iteration with identical parameters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent


def test_two_ranks_collect_different_data_and_keep_identical_parameters(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{TESTS.parent}{os.pathsep}{TESTS}"}
    result = subprocess.run([sys.executable, str(TESTS / "ddp_probe.py"), str(tmp_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(rank0["observations"], rank1["observations"])  # each rank has its own seed
    for p0, p1 in zip(rank0["parameters"], rank1["parameters"], strict=True):
        torch.testing.assert_close(p0, p1, rtol=0, atol=1e-6)
    for key, value in rank0["normalizer"].items():  # observation statistics were merged across ranks
        torch.testing.assert_close(value, rank1["normalizer"][key])
