"""What the logged diagnostics of stuck and healthy seeds show, window by window of env steps.

    python benchmarks/stuck_seeds.py \
        "Hopper 1 (stuck)=benchmarks/results/hopper_shipped/seed1" "Hopper 0=benchmarks/results/hopper_shipped/seed0"

Each ``label=directory`` is one seed's run of ``benchmarks/learning_curves.py`` (its ``version_*/metrics.csv``, the
CSVLogger's; a resumed run's versions are read in turn). For each window of env steps (``--windows``, default
0-250k, 250k-500k, 500k-1M) it prints the mean of the per-iteration diagnostics that ``AWRLoss`` and the iteration
log: the policy phase's last minibatch's weight ESS (``train/weight_ess``, the share of the minibatch the weights
keep), the share of weights clipped at ``max_weight``, the KL from the behaviour policy, the policy's entropy
(constant for a fixed-std actor), the buffer-wide weight ESS, the temperature and a tuned entropy coefficient where
logged, a Q critic's mean ``min_i Q_i(s, a)`` where logged, the training episodes' length and return, and the
evaluation return. Prints a markdown table per diagnostic.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
from learning_curves import read_run_metrics  # the CSVLogger versions of one seed's run, in order

DIAGNOSTICS = ("eval/return", "train/return", "train/episode_length", "train/weight_ess", "train/weight_clip_fraction",
               "train/weight_max", "train/kl_behaviour", "train/entropy", "train/buffer_weight_ess",
               "train/temperature", "train/entropy_coeff", "train/loss_value", "train/q_value")


def read_run(directory: Path) -> list[dict[str, float]]:
    """Every logged row of a seed's run that has its env steps, as numbers."""
    return [{key: float(value) for key, value in row.items() if value not in ("", None)}
            for row in read_run_metrics(directory) if row.get("env_steps")]


def window_means(rows: list[dict[str, float]], windows: list[tuple[int, int]]) -> dict[str, list[float | None]]:
    """Per diagnostic, its mean over the rows in each window of env steps (``None`` where never logged)."""
    means: dict[str, list[float | None]] = {}
    for name in DIAGNOSTICS:
        column = []
        for low, high in windows:
            values = [row[name] for row in rows if name in row and low <= row["env_steps"] < high]
            column.append(float(np.mean(values)) if values else None)
        means[name] = column
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="label=directory of one seed's run")
    parser.add_argument("--windows", type=float, nargs="+", default=[0, 250_000, 500_000, 1_000_001],
                        help="window edges in env steps")
    args = parser.parse_args()
    edges = [int(x) for x in args.windows]
    windows = list(itertools.pairwise(edges))
    header = " | ".join(f"{low // 1000}k-{high // 1000}k" for low, high in windows)
    runs = {label: window_means(read_run(Path(path)), windows)
            for label, path in (item.split("=", 1) for item in args.runs)}
    for name in DIAGNOSTICS:
        if all(all(v is None for v in means[name]) for means in runs.values()):
            continue
        print(f"\n**{name}**\n\n| seed | {header} |\n|---|" + "---|" * len(windows))
        for label, means in runs.items():
            print(f"| {label} | " + " | ".join("—" if v is None else f"{v:.3g}" for v in means[name]) + " |")


if __name__ == "__main__":
    main()
