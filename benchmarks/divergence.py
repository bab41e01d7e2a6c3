"""How far two ways of stepping drift apart in `awr fit`: relative parameter differences after N iterations.

    python benchmarks/divergence.py --config configs/halfcheetah.yaml --iterations 1 \\
        --a="--model.execution.init_args.fused_steps=1" --b="--model.execution.init_args.fused_steps=8"

Trains the config twice from the same seed (synchronous collection, ``--model.data.init_args.asynchronous=false``;
evaluation in the process, never reached), each with its overrides, and prints ``|a - b| / |a|`` for every
parameter. After one iteration both runs saw the same collected data, so the difference is the steps' own
rounding; from the second iteration on, the actions collected with slightly different policies differ and the
env amplifies that, so a pair that differs only by rounding (e.g. ``--model.execution=awr_modules.execution.Eager``
against ``--model.execution=awr_modules.execution.Compiled``) shows how large run-to-run drift is. The config's
data source must collect (``awr_modules.data.Collected`` or one of its dataset variants).
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from awr_modules.cli import cli_main

SYNCHRONOUS = ["--model.data.init_args.asynchronous=false", "--model.evaluator=awr_modules.evaluators.InProcess"]
"""Collection in the training process (a worker's batches depend on timing) and no evaluation worker."""


def trained_parameters(config: str, iterations: int, overrides: list[str]) -> dict[str, torch.Tensor]:
    """The parameters after ``iterations`` iterations of ``config`` with ``overrides``, collected synchronously."""
    with tempfile.TemporaryDirectory() as tmp:
        cli = cli_main(["fit", "-c", config, f"--trainer.max_epochs={iterations}", "--trainer.enable_progress_bar=false",
                        f"--trainer.check_val_every_n_epoch={iterations + 1}", f"--trainer.logger.init_args.save_dir={tmp}",
                        f"--trainer.default_root_dir={tmp}", f"--checkpoint.dirpath={tmp}/checkpoints",
                        *SYNCHRONOUS, *overrides])
        return {name: p.detach().clone() for name, p in cli.model.named_parameters()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--iterations", type=int, default=1)
    parser.add_argument("--a", default="", help="overrides of the first run (space-separated)")
    parser.add_argument("--b", default="", help="overrides of the second run (space-separated)")
    args = parser.parse_args()
    first = trained_parameters(args.config, args.iterations, args.a.split())
    second = trained_parameters(args.config, args.iterations, args.b.split())
    print(f"| parameter | relative difference after {args.iterations} iteration(s) |\n|---|---|")
    for name, value in first.items():
        print(f"| {name} | {((value - second[name]).norm() / value.norm()).item():.1e} |")


if __name__ == "__main__":
    main()
