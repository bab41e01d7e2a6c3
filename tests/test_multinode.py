"""Two nodes simulated on localhost: the README's ``torchrun`` command, once per node, fits and resumes.

Each "node" is its own ``torchrun`` agent with one CPU process; they meet through the c10d
rendezvous (without it every node would take rank 0) and train with Lightning's DDP over gloo.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from lightning_helpers import FRAMES, checkpoint_dir, load_checkpoint, subprocess_env, tiny_args

REPO = Path(__file__).resolve().parent.parent
NODES = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_command(port: int, awr_args: list[str]) -> list[str]:
    """The README's multi-node launch for one node (``torchrun`` is ``python -m torch.distributed.run``)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={NODES}", "--nproc_per_node=1",
            "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=awr-test",
            "-m", "awr_modules.cli", "fit", *awr_args,
            f"--trainer.num_nodes={NODES}", "--trainer.devices=1", "--trainer.accelerator=cpu",
            "--trainer.strategy=ddp"]


def _launch_nodes(out_dir: Path, awr_args: list[str]) -> None:
    port = _free_port()
    env = subprocess_env(REPO)
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


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("multinode")
    _launch_nodes(out_dir, tiny_args(out_dir, epochs=1))
    return out_dir


def test_two_nodes_fit_with_two_ranks(two_node_run):
    state = load_checkpoint(checkpoint_dir(two_node_run) / "last.ckpt")["awr"]
    assert state["iteration"] == 1
    assert state["env_steps"] == NODES * FRAMES  # every rank collected FRAMES steps
    assert len(state["ranks"]) == NODES  # one replay buffer per rank
    first, second = (rank["buffer"]["_storage"]["_storage"]["observation"][:FRAMES] for rank in state["ranks"])
    assert not (first == second).all()  # the nodes' ranks collected with seeds of their own


def test_two_nodes_resume(two_node_run):
    _launch_nodes(two_node_run, [*tiny_args(two_node_run, epochs=2), "--ckpt_path=last"])
    state = load_checkpoint(checkpoint_dir(two_node_run) / "last.ckpt")["awr"]
    assert (state["iteration"], state["env_steps"]) == (2, 2 * NODES * FRAMES)
    for rank in state["ranks"]:
        assert rank["buffer"]["_storage"]["_len"] == 2 * FRAMES  # each rank kept its first iteration's data
