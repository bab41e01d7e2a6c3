"""Experiment trackers through YAML alone: TensorBoard, MLflow (local file store) and Weights & Biases (offline),
no network."""

from __future__ import annotations

import struct
import time
from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import wandb
from lightning_helpers import tiny_args
from tensorboardX.proto.event_pb2 import Event

from awr_modules.cli import cli_main


class RecordLoggedMetrics(pl.Callback):
    """What the run handed its logger by the end of each iteration (Lightning's ``logged_metrics``)."""

    def __init__(self) -> None:
        self.iterations: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.iterations.append({name: float(value) for name, value in trainer.logged_metrics.items()})


def _tensorboard_scalars(folder: Path) -> dict[str, dict[int, set[float]]]:
    """Every scalar of the event files under ``folder``: tag -> step -> the values written at that step.

    An event file is a sequence of records (uint64 length, uint32 CRC of it, the serialized ``Event``, uint32 CRC
    of it); scalars are ``summary.value`` entries with a ``simple_value``.
    """
    scalars: dict[str, dict[int, set[float]]] = defaultdict(lambda: defaultdict(set))
    (path,) = folder.rglob("events.out.tfevents.*")
    data, offset = path.read_bytes(), 0
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        event = Event.FromString(data[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
        for value in event.summary.value:
            assert value.WhichOneof("value") == "simple_value", value.tag
            scalars[value.tag][event.step].add(value.simple_value)
    assert offset == len(data)  # the last record ends the file
    return scalars


def test_tensorboard_logger_by_config(tmp_path):
    """The logger chosen in the config writes every metric of every iteration, at the iteration's step."""
    cli = cli_main(["fit", *tiny_args(tmp_path, epochs=2, extra=[
        "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'tb'}", "--trainer.logger.init_args.name=test",
        f"--trainer.callbacks+={__name__}.RecordLoggedMetrics"])])
    (recorder,) = [callback for callback in cli.trainer.callbacks if isinstance(callback, RecordLoggedMetrics)]
    scalars = _tensorboard_scalars(tmp_path / "tb")
    logged = recorder.iterations
    assert len(logged) == 2 and {"eval/return", "train/loss_actor", "train/loss_value"} <= set(logged[0])
    assert set(scalars) == set(logged[0]) | {"epoch"}
    for tag in logged[0]:  # iteration k's values at step k, and only those
        assert dict(scalars[tag]) == {0: {logged[0][tag]}, 1: {logged[1][tag]}}, tag
    assert dict(scalars["epoch"]) == {0: {0.0}, 1: {1.0}}
    # by hand: 128 env steps an iteration; the config's temperature; Pendulum-v1's episodes last 200 steps
    assert dict(scalars["env_steps"]) == {0: {128.0}, 1: {256.0}}
    assert dict(scalars["iteration"]) == {0: {1.0}, 1: {2.0}}
    assert dict(scalars["train/temperature"]) == {0: {1.0}, 1: {1.0}}
    assert dict(scalars["eval/episode_length"]) == {0: {200.0}, 1: {200.0}}
    assert logged[1]["eval/return"] == float(cli.trainer.callback_metrics["eval/return"])
    assert logged[0]["train/loss_actor"] != logged[1]["train/loss_actor"]  # two iterations, not one written twice


def test_mlflow_writes_the_runs_metrics_to_a_local_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this switch
    store = tmp_path / "mlruns"
    cli_main(["fit", *tiny_args(tmp_path, epochs=2, extra=[
        "--trainer.logger=lightning.pytorch.loggers.MLFlowLogger", f"--trainer.logger.init_args.tracking_uri=file:{store}",
        "--trainer.logger.init_args.experiment_name=pendulum"])])
    (returns,) = store.rglob("metrics/eval/return")
    assert len(returns.read_text().splitlines()) == 2  # one evaluation per iteration


def test_wandb_writes_the_runs_metrics_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cli_main(["fit", *tiny_args(tmp_path, epochs=2, extra=[
        "--trainer.logger=lightning.pytorch.loggers.WandbLogger", "--trainer.logger.init_args.offline=true",
        "--trainer.logger.init_args.project=awr", f"--trainer.logger.init_args.save_dir={tmp_path / 'wandb'}"])])
    wandb.finish()  # what the end of the `awr` process does: flush the run file
    (run,) = (tmp_path / "wandb").rglob("offline-run-*/run-*.wandb")
    # W&B's service process writes the file; on a loaded machine its records can land after finish()
    # returns (once only the 7-byte header was there), so wait for them before reading
    deadline = time.monotonic() + 120
    while b"train/loss_actor" not in run.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b"eval/return" in run.read_bytes() and b"train/loss_actor" in run.read_bytes()
