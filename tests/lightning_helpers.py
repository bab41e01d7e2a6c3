"""Tiny ``awr`` CLI arguments and checkpoint readers shared by the Lightning tests."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import lightning.pytorch as pl
import torch

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "pendulum.yaml"
FRAMES = 128


def tiny_args(save_dir: Path, *, epochs: int = 2, extra: list[str] | None = None) -> list[str]:
    """CLI arguments for a few-second Pendulum run: small batches, few steps, one eval episode.

    Checkpoints go where ``awr`` puts them by default: :func:`checkpoint_dir`.
    """
    return [
        "-c", str(CONFIG),
        f"--trainer.max_epochs={epochs}",
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        "--trainer.logger.init_args.name=test",
        f"--trainer.default_root_dir={save_dir}",
        f"--model.data.init_args.frames_per_iteration={FRAMES}",
        "--model.value_phase={steps: 3, batch_size: 32}",
        "--model.policy_phase={steps: 3, batch_size: 32}",
        "--model.evaluator.init_args.episodes=1",
        "--model.recipe.init_args.hidden_sizes=[16, 16]",
        "--model.recipe.init_args.normalizer_samples=256",
        *(extra or []),
    ]


def checkpoint_dir(save_dir: Path) -> Path:
    """The checkpoint folder of a :func:`tiny_args` run: ``<save_dir>/<logger name>/checkpoints``, for every version."""
    return save_dir / "test" / "checkpoints"


def subprocess_env(*paths: Path) -> dict[str, str]:
    """This process's environment with ``paths`` put in front of ``PYTHONPATH`` (kept: it may hold installed wheels),
    and one torch thread unless ``OMP_NUM_THREADS`` says otherwise: the suite's two workers already fill two cores,
    and a child on torch's default threads competes with them (several times slower)."""
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "PYTHONPATH": os.pathsep.join(filter(None, [*map(str, paths), os.environ.get("PYTHONPATH")]))}


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint the way Lightning does by default (``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


class RecordPriorities(pl.Callback):
    """Record a run's replay buffer, its sampler's priorities and stored advantages over the stored slots.

    ``"start"``: right after setup and any checkpoint restore (``on_train_start``); ``"end"``: after the
    last iteration (``on_train_end``). Add with ``--trainer.callbacks+=lightning_helpers.RecordPriorities``.
    """

    def __init__(self) -> None:
        self.records: dict[str, dict] = {}

    def _record(self, stage: str, module: pl.LightningModule) -> None:
        buffer = module.awr.data.fifo
        index = torch.arange(len(buffer))
        self.records[stage] = {
            "buffer": buffer,
            "priority": torch.as_tensor(buffer.sampler._sum_tree[index]).clone(),  # (p + eps) ** alpha per slot
            "advantage": buffer.storage.get(index)["advantage"].reshape(-1).clone() if len(buffer) else None,
        }

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._record("start", module)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._record("end", module)


class CountOptimizerSteps(pl.Callback):
    """Counts ``on_before_optimizer_step`` calls: a callback with a step hook, so Lightning's per-step calls run.

    Add with ``--trainer.callbacks+=lightning_helpers.CountOptimizerSteps``.
    """

    def __init__(self) -> None:
        self.steps = 0

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule, optimizer) -> None:
        self.steps += 1


def metric_rows(save_dir: Path, key: str) -> list[float]:
    """Every logged value of ``key``, in order, from the CSV logs ``tiny_args`` writes under ``save_dir``."""
    rows = []
    for path in sorted((save_dir / "test").glob("version_*/metrics.csv")):
        with path.open() as stream:
            rows += [float(row[key]) for row in csv.DictReader(stream) if row.get(key)]
    return rows
