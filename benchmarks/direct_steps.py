"""Policy- and value-phase time of `awr fit` with direct steps against Lightning's per-step calls.

With full precision on one device and no step hook, ``AWRModule`` calls ``backward`` and the optimizer's
own ``step`` itself (``awr_modules.distributed.direct_steps_suffice``); a callback that overrides
``on_before_optimizer_step`` (a no-op here) brings Lightning's ``manual_backward`` and
``LightningOptimizer.step`` back. Both run the same config in this process, alternating, and the
median of each phase's logged wall-clock over iterations after ``--skip`` is reported (compile and
the recompile for the grown buffer happen in the first two).

    python benchmarks/direct_steps.py --config configs/halfcheetah.yaml --iterations 8 --rounds 2 --model.compile=true
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


class StepHook(pl.Callback):
    """A no-op ``on_before_optimizer_step``: its presence makes the module take Lightning's per-step calls."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule, optimizer) -> None:
        pass


def phase_seconds(config: Path, iterations: int, skip: int, hooked: bool, overrides: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        args = ["fit", "-c", str(config), f"--trainer.max_epochs={iterations}", "--trainer.enable_progress_bar=false",
                f"--trainer.check_val_every_n_epoch={iterations + 1}", f"--trainer.logger.init_args.save_dir={tmp}",
                f"--trainer.default_root_dir={tmp}", "--model.max_env_steps=null", *overrides]
        if hooked:
            args.append("--trainer.callbacks+=direct_steps.StepHook")
        cli_main(args)
        with next(Path(tmp).rglob("metrics.csv")).open() as f:
            rows = [row for row in csv.DictReader(f) if row.get("time/policy_phase")]
    rows = rows[skip:]
    return {phase: statistics.median(float(row[f"time/{phase}"]) for row in rows)
            for phase in ("value_phase", "policy_phase")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args, overrides = parser.parse_known_args()
    torch.set_num_threads(1)
    results: dict[str, list[dict[str, float]]] = {"direct steps": [], "Lightning's per-step calls": []}
    for _ in range(args.rounds):
        for name, runs in results.items():
            runs.append(phase_seconds(args.config, args.iterations, args.skip, hooked=name != "direct steps",
                                      overrides=overrides))
    medians = {name: {phase: statistics.median(run[phase] for run in runs) for phase in ("value_phase", "policy_phase")}
               for name, runs in results.items()}
    base = medians["Lightning's per-step calls"]["policy_phase"]
    print_table([f"{args.config.stem}, 1 torch thread", "value phase s", "policy phase s", "policy phase ratio"],
                [[name, f"{m['value_phase']:.3f}", f"{m['policy_phase']:.3f}", f"{m['policy_phase'] / base:.2f}"]
                 for name, m in medians.items()])


if __name__ == "__main__":
    main()
