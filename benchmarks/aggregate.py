"""Per-task scores over seeds: mean +- std beside the interquartile mean (IQM) with a 95% stratified-bootstrap
interval from ``rliable`` (Agarwal et al., 2021), and whether two variants' intervals overlap.

    python benchmarks/aggregate.py --budget 1000000 \
        --runs async=benchmarks/results/halfcheetah_collection/async sync=benchmarks/results/halfcheetah_collection/sync

Each ``name=directory`` is a ``benchmarks/learning_curves.py`` output, or several joined by commas (each one's
``curves.csv``: seed, env_steps, eval_return). A seed's score is its last evaluation at or below ``--budget`` env
steps (the README's "final eval return") and, beside it, its late mean: the mean of its last ``--late``
evaluations within the budget, steadier than one evaluation of 10 episodes. Seeds that have not reached ``--budget`` minus one evaluation interval are
left out and counted (a run still going). Beside the returns, the stability of each variant (AWR's claim that its
V critic keeps the actor's update steadier than Q-values do): a seed **diverged** when any evaluation within the
budget is not finite (a NaN policy) or its run stopped on the module's nan-loss guard (``learning_curves.py`` marks
it ``seedN/diverged``; such a seed is scored by the evaluations it logged before, the policy its last checkpoint
holds, and is never left out as short of the budget), and it **collapsed** when its late mean fell back below half of what it had
gained: ``late mean < first + 0.5 (best - first)``, with ``first`` its first evaluation and ``best`` the best mean
of ``--late`` consecutive evaluations within the budget (learned, then lost it; a window, so that one lucky
evaluation does not count as a level reached). The IQM is the mean of the middle 50% of the seeds' scores (with 3
seeds, their mean); its interval is ``rliable``'s stratified bootstrap (``--reps`` resamples of the seeds).
Prints a markdown table; ``--out`` also writes it to a file.

Needs the ``bench`` extra (``pip install -e ".[bench]"``: rliable).
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np


def outputs(directory: Path | str) -> list[tuple[Path, list[str]]]:
    """Each ``learning_curves.py`` output that ``directory`` names (comma-joined), with the seeds chosen after its
    ``:`` (``results/b:3:4``; an empty list: all of them)."""
    return [(Path(path), chosen) for path, *chosen in (part.split(":") for part in str(directory).split(","))]


def seed_curves(directory: Path | str) -> dict[int, list[tuple[int, float]]]:
    """Each seed's ``(env_steps, eval_return)`` evaluations from ``directory/curves.csv``, in order.

    ``directory`` may name several outputs joined by commas (seeds run in separate batches, e.g. seeds 0-2 and
    3-5); a seed found in two of them is refused rather than merged. An output followed by ``:N:M...`` contributes
    those seeds alone (``results/a,results/b:3:4``: a's seeds and b's seeds 3 and 4, where b also ran others)."""
    curves: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for path, chosen in outputs(directory):
        with open(path / "curves.csv") as f:
            found: dict[int, list[tuple[int, float]]] = defaultdict(list)
            for row in csv.DictReader(f):
                if not chosen or row["seed"] in chosen:
                    found[int(row["seed"])].append((int(float(row["env_steps"])), float(row["eval_return"])))
        if clash := set(found) & set(curves):
            raise ValueError(f"seeds {sorted(clash)} appear in two of {directory}")
        curves.update(found)
    return {seed: sorted(points) for seed, points in sorted(curves.items())}


def diverged_seeds(directory: Path | str) -> set[int]:
    """The seeds whose runs stopped on the module's nan-loss guard: ``seedN/diverged`` in any of ``directory``'s
    comma-joined outputs (written by ``learning_curves.py``)."""
    seeds = set()
    for path, chosen in outputs(directory):
        seeds |= {int(marker.parent.name.removeprefix("seed")) for marker in path.glob("seed*/diverged")
                  if not chosen or marker.parent.name.removeprefix("seed") in chosen}
    return seeds


def within(points: list[tuple[int, float]], budget: int) -> list[tuple[int, float]]:
    """The evaluations of one seed at or before ``budget`` env steps."""
    return [(steps, value) for steps, value in points if steps <= budget]


def late_mean_of(values: list[float], late: int) -> float:
    """The mean of the last ``late`` of ``values``."""
    return float(np.mean(values[-late:]))


def seed_scores(curves: dict[int, list[tuple[int, float]]], budget: int, late: int,
                diverged: set[int] = frozenset()) -> tuple[dict[int, float], dict[int, float], list[int]]:
    """Per seed, the last evaluation within ``budget`` and the mean of the last ``late`` ones; and the seeds whose
    runs stop short of the budget (by more than their own evaluation interval), left out of both. A seed in
    ``diverged`` stopped for good: it is scored by what it logged, not left out."""
    final, late_mean, short = {}, {}, []
    for seed, points in curves.items():
        evaluations = within(points, budget)
        interval = evaluations[-1][0] - evaluations[-2][0] if len(evaluations) > 1 else budget
        if not evaluations or (evaluations[-1][0] < budget - interval and seed not in diverged):
            short.append(seed)
            continue
        final[seed] = evaluations[-1][1]
        late_mean[seed] = late_mean_of([value for _, value in evaluations], late)
    return final, late_mean, short


def stability(curves: dict[int, list[tuple[int, float]]], budget: int, late: int,
              stopped: set[int] = frozenset()) -> tuple[list[int], list[int]]:
    """The seeds that diverged (a non-finite evaluation within ``budget``, or in ``stopped``: runs the nan-loss guard
    ended) and those that collapsed (their late
    mean, over the last ``late`` evaluations, below ``first + 0.5 (best - first)``, with ``best`` the best mean of
    ``late`` consecutive evaluations), among ``curves``."""
    diverged, collapsed = [], []
    for seed, points in curves.items():
        values = [value for _, value in within(points, budget)]
        if not values:
            continue
        if not all(np.isfinite(values)) or seed in stopped:
            diverged.append(seed)
            continue
        window = min(late, len(values))
        best = float(np.convolve(values, np.ones(window) / window, mode="valid").max())
        first, late_mean = values[0], late_mean_of(values, late)
        if best > first and late_mean < first + 0.5 * (best - first):
            collapsed.append(seed)
    return diverged, collapsed


def iqm_interval(scores: list[float], reps: int, seed: int = 0) -> tuple[float, float, float]:
    """The IQM of ``scores`` (one task, one score per run) and its 95% stratified-bootstrap interval (rliable)."""
    from rliable import library as rly
    from rliable import metrics

    np.random.seed(seed)  # rliable's bootstrap draws from numpy's global generator
    matrix = {"run": np.asarray(scores, dtype=float).reshape(-1, 1)}  # runs x tasks
    points, intervals = rly.get_interval_estimates(matrix, lambda x: np.array([metrics.aggregate_iqm(x)]),
                                                   reps=reps)
    low, high = intervals["run"][:, 0]
    return float(points["run"][0]), float(low), float(high)


def summary_rows(runs: dict[str, Path | str], budget: int, late: int, reps: int) -> list[dict[str, str]]:
    rows = []
    for name, directory in runs.items():
        curves = seed_curves(directory)
        stopped = diverged_seeds(directory)
        final, late_mean, short = seed_scores(curves, budget, late, stopped)
        diverged, collapsed = stability(curves, budget, late, stopped)
        row = {"variant": name, "seeds": str(len(final)),
               "diverged / collapsed": f"{len(diverged)} / {len(collapsed)}"
                                       + (f" (seeds {diverged} / {collapsed})" if diverged or collapsed else "")}
        for label, scores in (("final", final), ("late mean", late_mean)):
            values = list(scores.values())
            if not values:
                row[label] = row[f"{label} IQM [95% CI]"] = "—"
                continue
            iqm, low, high = iqm_interval(values, reps)
            row[label] = f"{np.mean(values):.1f} +- {np.std(values):.1f}"
            row[f"{label} IQM [95% CI]"] = f"{iqm:.1f} [{low:.1f}, {high:.1f}]"
            row[f"_{label}"] = (low, high)  # for the overlap column
        row["per seed (final)"] = " / ".join(f"{final[s]:.0f}" for s in sorted(final))
        if short:
            row["per seed (final)"] += f" (seeds {short} short of the budget, left out)"
        rows.append(row)
    return rows


def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def markdown(rows: list[dict[str, str]]) -> str:
    columns = ["variant", "seeds", "final", "final IQM [95% CI]", "late mean", "late mean IQM [95% CI]",
               "per seed (final)", "diverged / collapsed"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row.get(c, "—") for c in columns) + " |" for row in rows]
    if len(rows) == 2 and all("_final" in row and int(row["seeds"]) > 1 for row in rows):
        for label in ("final", "late mean"):
            verdict = "overlap" if overlap(rows[0][f"_{label}"], rows[1][f"_{label}"]) else "do not overlap"
            lines.append(f"\nThe two variants' IQM intervals of the {label} score {verdict}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="name=directory of a learning_curves.py output")
    parser.add_argument("--budget", type=int, required=True, help="env steps the scores are read at")
    parser.add_argument("--late", type=int, default=10, help="evaluations averaged for the late mean")
    parser.add_argument("--reps", type=int, default=50000, help="bootstrap resamples")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    runs = dict(item.split("=", 1) for item in args.runs)
    table = markdown(summary_rows(dict(runs), args.budget, args.late,
                                  args.reps))
    print(table)
    if args.out is not None:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
