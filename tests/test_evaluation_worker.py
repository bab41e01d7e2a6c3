"""``model.evaluator: awr_modules.evaluators.InWorker``: a worker process evaluates snapshots of the policy while
training goes on.

Pinned: a snapshot's result equals evaluating that snapshot in the process (same episodes, same
returns), weights changed after ``submit`` do not reach it, results come back in order tagged with
their snapshot's steps, ``fit`` logs one result per validation at its snapshot's env steps, and a
worker that dies stops training with a message naming it, after which the run resumes.
"""

from __future__ import annotations

import csv
import os
import signal
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning_helpers import FRAMES, checkpoint_dir, load_checkpoint, tiny_args

from awr_modules.cli import cli_main
from awr_modules.evaluation_worker import EvaluationWorker
from awr_recipes.classic_control import ClassicControl

ASYNC_EVAL = ["--model.evaluator=awr_modules.evaluators.InWorker"]


def _kill_worker(worker: EvaluationWorker) -> None:
    pid = worker._executor.submit(os.getpid).result(timeout=60)
    os.kill(pid, signal.SIGKILL)


def test_a_snapshot_is_evaluated_as_in_the_process_and_later_weights_do_not_reach_it() -> None:
    torch.manual_seed(0)
    recipe = ClassicControl("CartPole-v1", hidden_sizes=[8])
    make_evaluator = partial(recipe.make_evaluator, 11, 3)
    actor, _ = recipe.make_networks(recipe.make_env(11))
    worker = EvaluationWorker(make_evaluator, actor)  # its copy of the actor has the identity normaliser
    actor.module[0].module[0].load_statistics(torch.randn(4) * 0.1, torch.rand(4) + 0.5)  # snapshots carry these
    try:
        expected, in_process = [], make_evaluator()  # one evaluator each, as the worker keeps its own
        for env_steps in (100, 200):
            expected.append(in_process(actor)[0])
            worker.submit(actor, env_steps=env_steps, global_step=env_steps // 10)
            with torch.no_grad():  # changed after submit: the queued snapshot keeps the old weights
                for parameter in actor.parameters():
                    parameter.add_(torch.randn_like(parameter))
        first, second = worker.finished(wait=True)
    finally:
        worker.shutdown()
    assert (first.env_steps, first.global_step, second.env_steps, second.global_step) == (100, 10, 200, 20)
    assert first.returns == expected[0] and second.returns == expected[1]
    assert expected[0] != expected[1]  # the two snapshots differ, so the comparison tells them apart
    assert len(first.lengths) == 3 and worker.pending == 0


def test_a_dead_evaluation_worker_is_reported_by_name() -> None:
    recipe = ClassicControl("Pendulum-v1", hidden_sizes=[8])
    actor, _ = recipe.make_networks(recipe.make_env(0))
    worker = EvaluationWorker(partial(recipe.make_evaluator, 0, 1), actor)
    try:
        _kill_worker(worker)
        worker.submit(actor, env_steps=5, global_step=1)
        with pytest.raises(RuntimeError, match="evaluation worker process (failed|died).* env step 5"):
            worker.finished(wait=True)
    finally:
        worker.shutdown()


def _eval_rows(save_dir) -> list[dict[str, str]]:
    rows = []
    for path in sorted((save_dir / "test").glob("version_*/metrics.csv")):
        with path.open() as f:
            rows.extend(row for row in csv.DictReader(f) if row.get("eval/return"))
    return rows


def test_fit_logs_each_snapshot_at_its_env_steps(tmp_path):
    model = cli_main(["fit", *tiny_args(tmp_path, epochs=3, extra=ASYNC_EVAL)]).model
    assert model.env_steps == 3 * FRAMES
    rows = _eval_rows(tmp_path)
    assert [float(row["env_steps"]) for row in rows] == [FRAMES, 2 * FRAMES, 3 * FRAMES]
    assert all(float(row["eval/episode_length"]) == 200 for row in rows)  # Pendulum's time limit


class KillEvaluationWorkerAfterFirstIteration(pl.Callback):
    def on_train_epoch_end(self, trainer, module) -> None:
        if module.iteration == 1:
            _kill_worker(module.evaluator._worker)


def test_a_dead_evaluation_worker_stops_training_and_the_run_resumes(tmp_path):
    """The worker dies after the first iteration; the second iteration's evaluation (or, should the pool notice the
    death late, the end of training's wait) finds it dead. The resumed run then trains one more iteration with a new
    worker."""
    killer = [f"--trainer.callbacks+={__name__}.KillEvaluationWorkerAfterFirstIteration"]
    with pytest.raises(RuntimeError, match=r"InWorker: the evaluation worker process (failed|died).*--ckpt_path last"):
        cli_main(["fit", *tiny_args(tmp_path, epochs=2, extra=[*ASYNC_EVAL, *killer])])
    saved = load_checkpoint(checkpoint_dir(tmp_path) / "last.ckpt")["awr"]
    assert saved["iteration"] in (1, 2) and saved["env_steps"] == saved["iteration"] * FRAMES  # written before it
    epochs = saved["iteration"] + 1
    resumed = cli_main(["fit", *tiny_args(tmp_path, epochs=epochs, extra=ASYNC_EVAL), "--ckpt_path=last"])
    assert (resumed.model.iteration, resumed.model.env_steps) == (epochs, epochs * FRAMES)
    assert [float(row["env_steps"]) for row in _eval_rows(tmp_path)][-1] == epochs * FRAMES  # the new worker's


@pytest.mark.parametrize("evaluator", ["threads", "awr_modules.data.Collected"])  # no class; a class, no evaluator
def test_the_evaluator_must_be_in_process_or_in_a_worker(capsys, evaluator):
    """The CLI refuses an evaluator that is neither part, before building anything, naming the field."""
    with pytest.raises(SystemExit):
        cli_main(["fit", *tiny_args(Path("unused"), extra=[f"--model.evaluator={evaluator}"])])
    assert "model.evaluator" in capsys.readouterr().err
