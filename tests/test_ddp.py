"""DDP on CPU over gloo, launched both ways the README gives, in one fit and one resume shared by every test here.

The fit is two nodes simulated on localhost: the README's ``torchrun`` command once per node, each node its own
agent with one process, meeting through the c10d rendezvous (without it every node would take rank 0). The resume
runs on one node with Lightning's own launcher (``--trainer.devices=2``), from that checkpoint. The two ranks
collect different data yet keep identical parameters, and each resumes its own replay buffer and RNG state.
Every launch starts several interpreters, the suite's most expensive setup, hence one module fixture (``--dist
loadfile`` keeps it on one worker).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning_helpers import FRAMES, checkpoint_dir, load_checkpoint, subprocess_env, tiny_args

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
NODES = 2
CPU_DDP = ["--trainer.accelerator=cpu", "--trainer.strategy=ddp"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(port: int, awr_args: list[str]) -> list[str]:
    """The README's multi-node launch for one node (``torchrun`` is ``python -m torch.distributed.run``)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={NODES}", "--nproc_per_node=1",
            "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=awr-test",
            "-m", "awr_modules.cli", "fit", *awr_args, f"--trainer.num_nodes={NODES}", "--trainer.devices=1", *CPU_DDP]


def _launch_nodes(out_dir: Path, awr_args: list[str]) -> None:
    port = _free_port()
    env = subprocess_env(REPO, TESTS)
    nodes = [subprocess.Popen(torchrun_command(port, awr_args), cwd=out_dir, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True) for _ in range(NODES)]
    outputs = []
    try:
        for node in nodes:
            try:
                outputs.append(node.communicate(timeout=300)[0])
            except subprocess.TimeoutExpired as timeout:
                outputs.append(f"(timed out after 300 s) {timeout.output or ''}")
    finally:
        for node in nodes:  # the agents and the training processes they started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, "\n".join(out[-2000:] for out in outputs)


def _launch_one_node_two_devices(out_dir: Path, awr_args: list[str]) -> None:
    """``awr fit ... --trainer.devices=2``: Lightning starts the second rank by running the command line again."""
    result = subprocess.run([sys.executable, "-m", "awr_modules.cli", "fit", *awr_args, "--trainer.devices=2",
                             *CPU_DDP], cwd=out_dir, env=subprocess_env(REPO, TESTS), capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]


def _probe_args(out_dir: Path, epochs: int, callback: str) -> list[str]:
    """A tiny run whose ranks dump their state (``ddp_probe``); the observation statistics keep updating through
    the first iteration (100000 samples), so that iteration pools them across the ranks."""
    return [*tiny_args(out_dir, epochs=epochs, extra=["--model.recipe.init_args.normalizer_samples=100000"]),
            f"--trainer.callbacks+=ddp_probe.{callback}", f"--trainer.callbacks.out_dir={out_dir}"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """One iteration on two nodes with a checkpoint (``fit.ckpt``), resumed to a second on one node with two devices;
    the resumed ranks dump their state right after the restore."""
    out_dir = tmp_path_factory.mktemp("ddp")
    _launch_nodes(out_dir, _probe_args(out_dir, 1, "DumpRankState"))
    shutil.copy(checkpoint_dir(out_dir) / "last.ckpt", out_dir / "fit.ckpt")  # the resumed run overwrites last.ckpt
    _launch_one_node_two_devices(out_dir, [*_probe_args(out_dir, 2, "DumpRestoredState"), "--ckpt_path=last"])
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


def test_two_nodes_fit_with_two_ranks(ddp_run):
    state = load_checkpoint(ddp_run / "fit.ckpt")["awr"]
    assert state["iteration"] == 1
    assert state["env_steps"] == NODES * FRAMES  # every rank collected FRAMES steps
    assert len(state["ranks"]) == NODES  # one replay buffer per rank
    first, second = (rank["buffer"]["_storage"]["_storage"]["observation"][:FRAMES] for rank in state["ranks"])
    assert not (first == second).all()  # the nodes' ranks collected with seeds of their own


def test_the_two_node_checkpoint_resumes_on_one_node_with_two_devices(ddp_run):
    state = load_checkpoint(checkpoint_dir(ddp_run) / "last.ckpt")["awr"]
    assert (state["iteration"], state["env_steps"]) == (2, 2 * NODES * FRAMES)
    for rank in state["ranks"]:
        assert rank["buffer"]["_storage"]["_len"] == 2 * FRAMES  # each rank kept its first iteration's data
