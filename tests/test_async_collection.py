"""``model.data: awr_modules.data.Collected`` with ``asynchronous: true``: a worker process collects the next batch
while the phases run.

Pinned: the first batch was collected by the initial policy (its stored log-probs are that policy's),
each later one with a snapshot the learner published after an iteration, a worker that dies stops training with a
message naming it, and the run resumes from its last checkpoint without losing a stored transition.
"""

from __future__ import annotations

import copy
import gc
import os
import pickle
from functools import partial
from pathlib import Path
from typing import ClassVar

import lightning.pytorch as pl
import pytest
import torch
from jsonargparse import Namespace
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning_helpers import FRAMES, checkpoint_dir, load_checkpoint, tiny_args

from awr_modules import AWRModule
from awr_modules.cli import cli_main
from awr_modules.cpu_worker import CpuWorkerEnv, trains_on_cpu_only
from awr_recipes.classic_control import ClassicControl

ASYNC = ["--model.data.init_args.asynchronous=true"]
ENVS = 8  # configs/pendulum.yaml's num_envs: a batch's rows are env-major [envs, T]


class RecordPolicies(pl.Callback):
    """The actor at the start of every iteration, and each iteration's batch as the module stored it."""

    def __init__(self) -> None:
        self.policies: list[torch.nn.Module] = []
        self.batches = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.policies.append(copy.deepcopy(module.actor))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        buffer = module.awr.data.fifo
        self.batches.append(buffer.storage.get(torch.arange(len(buffer) - FRAMES, len(buffer))).clone())


class KillWorkerAfterFirstIteration(pl.Callback):
    def on_train_epoch_end(self, trainer, module) -> None:
        if module.iteration == 1:
            for process in module.awr.data._collector.procs:
                process.kill()
                process.join()


class FailAfterFirstIteration(pl.Callback):
    """Raises after the first iteration and keeps the collection worker processes it saw."""

    processes: ClassVar[list] = []

    def on_train_epoch_end(self, trainer, module) -> None:
        FailAfterFirstIteration.processes = list(module.awr.data._collector.procs)
        raise FloatingPointError("a failure in training, not in collection")


def _log_prob(policy: torch.nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        return policy.get_dist(batch.select("observation")).log_prob(batch["action"])


def _acted_with(policy: torch.nn.Module, batch) -> torch.Tensor:
    """Per row: whether ``policy`` gives the row's stored log-prob (the row was collected with it)."""
    return torch.isclose(batch["action_log_prob"], _log_prob(policy, batch), rtol=1e-5, atol=1e-5)


def test_async_batches_are_collected_with_published_snapshots_of_the_policy(tmp_path):
    """Batch ``i`` is collected while iteration ``i - 1`` runs: every row acted with the weights published
    before that iteration or after it (a batch may straddle one publication), never with weights halfway
    through a phase, and the learner's weights do reach the worker."""
    recorder = RecordPolicies()
    cli = cli_main(tiny_args(tmp_path, epochs=4, extra=ASYNC), run=False)
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model)
    assert cli.model.env_steps == 4 * FRAMES
    policies, batches = recorder.policies, recorder.batches
    assert _acted_with(policies[0], batches[0]).all()  # the first batch: the initial policy
    for i in range(1, len(batches)):
        # per env, in time order: rows of the snapshot published before, then rows of the one published after
        # iteration i - 1; between them, only the steps taken while the publication overwrote the shared weights
        # may match neither (publish_weights says so), and no row of the older snapshot follows a newer one
        before = _acted_with(policies[i - 1], batches[i]).reshape(ENVS, -1)
        after = _acted_with(policies[i], batches[i]).reshape(ENVS, -1)
        # 0 old, 1 during the publication, 2 new; a row that both snapshots explain (close weights) may be either
        earliest = torch.where(before, 0, torch.where(after, 2, 1))
        latest = torch.where(after, 2, torch.where(before, 0, 1))
        assert (earliest.cummax(dim=1).values <= latest).all(), (i, earliest.tolist())
    assert after.any()  # the learner's weights did reach the worker
    for i in range(2, len(batches)):  # collected after the first publication
        assert not _acted_with(policies[0], batches[i]).any(), i


def test_a_dead_collection_worker_stops_training_and_the_run_resumes(tmp_path):
    """Two iterations are enough: the worker dies after the first, the second fails, and the resumed run
    collects the second batch on top of the first."""
    killer = [f"--trainer.callbacks+={__name__}.KillWorkerAfterFirstIteration"]
    with pytest.raises(RuntimeError, match=r"Collected: the collection worker process failed in iteration 2"
                                           r".*--ckpt_path last"):
        cli_main(["fit", *tiny_args(tmp_path, epochs=2, extra=[*ASYNC, *killer])])
    saved = load_checkpoint(checkpoint_dir(tmp_path) / "last.ckpt")["awr"]
    assert (saved["iteration"], saved["env_steps"]) == (1, FRAMES)  # the last checkpoint is intact
    assert saved["ranks"][0]["buffer"]["_storage"]["_len"] == FRAMES
    resumed = cli_main(["fit", *tiny_args(tmp_path, epochs=2, extra=ASYNC), "--ckpt_path=last"])
    assert (resumed.model.iteration, resumed.model.env_steps) == (2, 2 * FRAMES)
    stored = load_checkpoint(checkpoint_dir(tmp_path) / "last.ckpt")["awr"]["ranks"][0]["buffer"]["_storage"]
    assert stored["_len"] == 2 * FRAMES  # no stored transition lost across the failure and the resume


def test_a_failed_run_stops_its_collection_worker(tmp_path):
    """Lightning skips ``teardown`` when training raises: the worker must not outlive the run anyway."""
    failing = [f"--trainer.callbacks+={__name__}.FailAfterFirstIteration"]
    with pytest.raises(FloatingPointError, match="a failure in training"):
        cli_main(["fit", *tiny_args(tmp_path, epochs=3, extra=[*ASYNC, *failing])])
    (worker,) = FailAfterFirstIteration.processes
    worker.join(timeout=10)
    alive = worker.is_alive()
    if alive:  # do not leave it running past the test either
        worker.kill()
    assert not alive


@pytest.mark.parametrize(("extra", "fields"), [
    (["--model.data.init_args.asynchronous=threads"], ("model.data", "asynchronous")),
    (["--model.data=threads"], ("model.data",)),
    (["--model.data=awr_modules.evaluators.InWorker"], ("model.data",)),  # a class, but no data source
])
def test_collection_must_be_a_data_source_sync_or_async(capsys, extra, fields):
    """The CLI refuses a collection that is neither ``asynchronous`` true nor false, and a data source that is not
    one, before building anything, naming the field."""
    with pytest.raises(SystemExit):
        cli_main(["fit", *tiny_args(Path("unused"), extra=extra)])
    err = capsys.readouterr().err
    assert all(field in err for field in fields), err


def test_a_run_keeps_the_processes_torch_threads(tmp_path):
    """TorchRL's collector raises the process's thread count on shutdown and again when it is collected;
    the module restores the count the run was started with (the CLI's ``--num_threads``)."""
    torch.set_num_threads(1)
    cli_main(["fit", *tiny_args(tmp_path, epochs=1, extra=ASYNC)])
    gc.collect()
    assert torch.get_num_threads() == 1


def test_a_cpu_learners_collection_worker_builds_its_env_with_gpus_hidden(monkeypatch):
    """The worker's env factory hides GPUs before it builds (cheaper per-step device checks) and survives pickling."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # restored after the test
    factory = pickle.loads(pickle.dumps(CpuWorkerEnv(partial(ClassicControl("Pendulum-v1").make_env, 0))))
    env = factory()
    assert env.batch_size == torch.Size([]) and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    env.close()


def test_a_cpu_run_hides_gpus_from_its_training_process_while_the_cli_runs(tmp_path, monkeypatch):
    """Synchronous collection steps envs in the training process: a CPU run hides GPUs there too (cheaper device
    checks), and the CLI restores the process's setting on return, so a later run in the process sees its GPUs."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # restored after the test
    seen_in_fit = []
    on_fit_start = AWRModule.on_fit_start
    monkeypatch.setattr(AWRModule, "on_fit_start", lambda module: (
        seen_in_fit.append(os.environ.get("CUDA_VISIBLE_DEVICES")), on_fit_start(module))[-1])
    cli_main(["fit", *tiny_args(tmp_path, epochs=1, extra=["--model.data.init_args.asynchronous=false"])])
    assert seen_in_fit == [""] and os.environ["CUDA_VISIBLE_DEVICES"] == "0"


@pytest.mark.parametrize(("accelerator", "cpu_only"), [
    ("cpu", True), ("gpu", False), ("cuda", False), ("mps", False),
    ("auto", not torch.cuda.is_available()),
    (Namespace(class_path="lightning.pytorch.accelerators.CPUAccelerator"), True),
    (Namespace(class_path="lightning.pytorch.accelerators.CUDAAccelerator"), False),
    (CPUAccelerator(), True), (CUDAAccelerator(), False),
])
def test_only_runs_on_the_cpu_have_their_gpus_hidden(accelerator, cpu_only):
    """A run that may use a GPU keeps it: ``"auto"`` counts as CPU-only only where no GPU is visible."""
    assert trains_on_cpu_only(accelerator) is cpu_only
