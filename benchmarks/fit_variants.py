"""Seconds per phase of `awr fit` iterations, for variants of one config run side by side.

Each ``--variant NAME=OVERRIDES`` is the config with those command-line overrides (space-separated), in the
config's shape: parts by ``class_path`` and their ``init_args`` (``--model.data.init_args.asynchronous=true``,
``--model.execution=awr_modules.execution.Eager``, ``--model.policy_phase.steps=500``, ...).
The variants run in this process, alternating, ``--rounds`` times each; the median over iterations
after ``--skip`` (compile and the recompile for the grown buffer happen in the first two) of each
phase's logged wall-clock is reported, with the whole iteration (collect + refresh + value phase +
policy phase; with ``model.data.init_args.asynchronous: true``, collect is the wait for the worker's batch).

    # direct optimizer steps against Lightning's per-step calls (a no-op step hook brings them back)
    python benchmarks/fit_variants.py --config configs/halfcheetah.yaml --iterations 8 --rounds 2 \\
        --variant "direct steps=" --variant "Lightning's per-step calls=--trainer.callbacks+=fit_variants.StepHook"
    # asynchronous collection against the reference's order
    python benchmarks/fit_variants.py --config configs/halfcheetah.yaml --iterations 8 --rounds 2 \\
        --variant "sync=--model.data.init_args.asynchronous=false" \\
        --variant "async=--model.data.init_args.asynchronous=true"
    # compiled phases against eager ones
    python benchmarks/fit_variants.py --config configs/halfcheetah.yaml --iterations 8 --rounds 2 \\
        --variant "eager=--model.execution=awr_modules.execution.Eager" \\
        --variant "compiled=--model.execution=awr_modules.execution.Compiled"
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from markdown_table import print_table

from awr_modules.cli import cli_main

PHASES = ("collect", "refresh", "value_phase", "policy_phase")


class StepHook(pl.Callback):
    """A no-op ``on_before_optimizer_step``: its presence makes the module take Lightning's per-step calls."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        pass


def phase_seconds(config: Path, iterations: int, skip: int, overrides: list[str]) -> dict[str, float]:
    """Median seconds of each phase, and of the whole iteration, over the iterations after ``skip`` of one run."""
    with tempfile.TemporaryDirectory() as tmp:
        cli_main(["fit", "-c", str(config), f"--trainer.max_epochs={iterations}", "--trainer.enable_progress_bar=false",
                  f"--trainer.check_val_every_n_epoch={iterations + 1}", f"--trainer.logger.init_args.save_dir={tmp}",
                  f"--trainer.default_root_dir={tmp}", "--model.max_env_steps=null", *overrides])
        with next(Path(tmp).rglob("metrics.csv")).open() as f:
            rows = [row for row in csv.DictReader(f) if row.get("time/policy_phase")][skip:]
    seconds = {phase: statistics.median(float(row[f"time/{phase}"]) for row in rows) for phase in PHASES}
    seconds["iteration"] = statistics.median(sum(float(row[f"time/{phase}"]) for phase in PHASES) for row in rows)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--variant", action="append", required=True, help="NAME=OVERRIDES (space-separated)")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    variants = {name: overrides.split() for name, overrides in (v.split("=", 1) for v in args.variant)}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, overrides in variants.items():
            runs[name].append(phase_seconds(args.config, args.iterations, args.skip, overrides))
    columns = [*PHASES, "iteration"]
    medians = {name: {c: statistics.median(run[c] for run in results) for c in columns} for name, results in runs.items()}
    base = next(iter(medians.values()))["iteration"]
    print_table([f"{args.config.stem}, 1 torch thread, s", *columns, "iteration ratio"],
                [[name, *(f"{m[c]:.3f}" for c in columns), f"{m['iteration'] / base:.2f}"]
                 for name, m in medians.items()])


if __name__ == "__main__":
    main()
