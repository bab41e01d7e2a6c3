"""Wall-clock per AWR iteration of a task's config with config overlays layered over it, beside the config as
shipped, in alternation on one machine: the cost side of a variant (a Q critic takes many more critic steps).

    python benchmarks/variant_cost.py --config configs/halfcheetah.yaml --iterations 8 --timed 4 \
        --variant vtrace=configs/reference/vtrace_targets.yaml --variant q_critic=configs/reference/q_critic.yaml

For each round (``--rounds``) every variant and the shipped config train ``--iterations`` iterations in an
``awr fit`` process of their own (one torch thread, no evaluation; checkpoints to a temporary folder), one after another in turn,
so that drift of the machine's speed hits all alike. A run's time is the median over its last ``--timed``
iterations of the ``time/*`` phases the module logs, summed; a variant's ratio is that over the shipped run's
of the same round, and the table gives the median over rounds. Early iterations see a buffer that is still
filling (``iterations * frames_per_iteration`` rows), so refreshes that scale with the buffer are timed
short of a full one. ``first_iteration`` is the first iteration's time, which includes compiling the phases'
graphs (``model.execution: Compiled``): a cost paid once per run, not in the ratio. Prints a markdown table
and writes ``benchmarks/results/variant_cost_<task>.csv``.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

PHASES = ("time/collect", "time/refresh", "time/value_phase", "time/policy_phase")


def run_variant(config: Path, overlay: Path | None, iterations: int, save_dir: Path) -> list[dict[str, float]]:
    """Per iteration, the logged phase times of ``iterations`` iterations of ``config`` (+ ``overlay``)."""
    command = [sys.executable, "-m", "awr_modules.cli", "fit", "-c", str(config)]
    if overlay is not None:
        command += ["-c", str(overlay)]
    command += [f"--trainer.max_epochs={iterations}", "--trainer.limit_val_batches=0",
                "--trainer.enable_progress_bar=false", f"--checkpoint.dirpath={save_dir / 'checkpoints'}",
                f"--trainer.logger.init_args.save_dir={save_dir}", "--trainer.logger.init_args.name=run",
                "--model.max_env_steps=null", "--num_threads=1"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (metrics,) = save_dir.glob("run/version_*/metrics.csv")
    with open(metrics) as f:
        rows = [row for row in csv.DictReader(f) if row.get("time/policy_phase")]
    return [{phase: float(row[phase]) for phase in PHASES if row.get(phase)} for row in rows]


def iteration_seconds(rows: list[dict[str, float]], timed: int) -> dict[str, float]:
    """Median over the last ``timed`` iterations of each phase, and of their sum."""
    last = rows[-timed:]
    out = {phase: float(np.median([row.get(phase, 0.0) for row in last])) for phase in PHASES}
    out["total"] = float(np.median([sum(row.values()) for row in last]))
    out["first_iteration"] = sum(rows[0].values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--variant", action="append", default=[], help="name=overlay.yaml, repeatable")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--timed", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    variants: dict[str, Path | None] = {"shipped": None}
    variants.update((name, Path(path)) for name, path in (item.split("=", 1) for item in args.variant))
    seconds: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        names = list(variants)
        names = names[round_ % len(names):] + names[:round_ % len(names)]  # each round starts one later
        for name in names:
            with tempfile.TemporaryDirectory() as tmp:
                rows = run_variant(args.config, variants[name], args.iterations, Path(tmp))
            seconds[name].append(iteration_seconds(rows, args.timed))
            print(f"round {round_}: {name} {seconds[name][-1]['total']:.2f} s per iteration", flush=True)
    table = []
    for name in variants:
        ratios = [run["total"] / shipped["total"] for run, shipped in zip(seconds[name], seconds["shipped"],
                                                                            strict=True)]
        row = {"variant": name, "ratio_to_shipped": f"{np.median(ratios):.2f}"}
        row.update((phase.split("/")[-1], f"{np.median([run[phase] for run in seconds[name]]):.2f}")
                   for phase in (*PHASES, "total", "first_iteration"))
        table.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"variant_cost_{args.config.stem}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    columns = list(table[0])
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in table:
        print("| " + " | ".join(row[c] for c in columns) + " |")


if __name__ == "__main__":
    main()
