"""Experiment trackers through YAML alone: MLflow (local file store) and Weights & Biases (offline), no network."""

from __future__ import annotations

import time

import wandb
from lightning_helpers import tiny_args

from awr_modules.cli import cli_main


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
