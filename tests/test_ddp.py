"""DDP on CPU: two gloo processes collect different data yet keep identical parameters, and resume
from a checkpoint each with its own replay buffer and RNG state."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning_helpers import load_checkpoint, subprocess_env

TESTS = Path(__file__).resolve().parent


def _probe(out_dir: Path, mode: str) -> None:
    env = subprocess_env(TESTS.parent, TESTS)
    result = subprocess.run([sys.executable, str(TESTS / "ddp_probe.py"), str(out_dir), mode], cwd=out_dir, env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """One DDP iteration with a checkpoint, then a resumed run that stops right after the restore."""
    out_dir = tmp_path_factory.mktemp("ddp")
    _probe(out_dir, "fit")
    shutil.copy(next(out_dir.rglob("last.ckpt")), out_dir / "fit.ckpt")  # the resumed run overwrites last.ckpt
    _probe(out_dir, "resume")
    return out_dir


def _load(out_dir: Path, name: str) -> dict:
    return torch.load(out_dir / f"{name}.pt", weights_only=True)


def test_two_ranks_collect_different_data_and_keep_identical_parameters(ddp_run):
    rank0, rank1 = _load(ddp_run, "rank0"), _load(ddp_run, "rank1")
    assert not torch.equal(rank0["observations"], rank1["observations"])  # each rank has its own seed
    for p0, p1 in zip(rank0["parameters"], rank1["parameters"], strict=True):
        torch.testing.assert_close(p0, p1, rtol=0, atol=1e-6)
    for key, value in rank0["normalizer"].items():  # observation statistics were merged across ranks
        torch.testing.assert_close(value, rank1["normalizer"][key])


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_resumes_with_its_own_buffer(ddp_run, rank):
    saved, resumed = _load(ddp_run, f"rank{rank}"), _load(ddp_run, f"resumed{rank}")
    torch.testing.assert_close(resumed["observations"], saved["observations"], rtol=0, atol=0)
    for p_saved, p_resumed in zip(saved["parameters"], resumed["parameters"], strict=True):
        torch.testing.assert_close(p_resumed, p_saved, rtol=0, atol=0)


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_resumes_with_the_rng_state_it_saved(ddp_run, rank):
    """Right after the restore each rank's generators are those its checkpoint entry holds: a skipped restore
    would leave them at the rank's fresh seed, and rank 0's state on both would fail one rank."""
    ranks = load_checkpoint(ddp_run / "fit.ckpt")["awr"]["ranks"]
    saved = ranks[rank]["rng"]
    resumed = _load(ddp_run, f"resumed{rank}")
    assert torch.equal(resumed["torch_rng"], saved["torch"])
    assert torch.equal(resumed["numpy_rng"], saved["numpy"][1])
    assert not torch.equal(saved["torch"], ranks[1 - rank]["rng"]["torch"])  # the two entries differ: the check tells them apart


def test_merged_statistics_are_the_pooled_moments_of_both_ranks(ddp_run):
    """After pooling, each moment is the count-weighted mean of the two ranks' own moments."""
    rank0, rank1 = _load(ddp_run, "rank0"), _load(ddp_run, "rank1")
    local0, local1 = rank0["local_statistics"], rank1["local_statistics"]
    counts = [key for key in local0 if key.startswith("count")]
    assert counts and all(torch.equal(local0[key], local1[key]) for key in counts)  # equal samples per rank
    for key in local0:
        if key.startswith("count"):
            continue
        assert not torch.allclose(local0[key], local1[key])  # the ranks saw different states
        pooled = (local0[key] + local1[key]) / 2
        torch.testing.assert_close(rank0["normalizer"][key], pooled)
