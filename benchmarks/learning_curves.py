"""Learning curves of `awr fit` over seeds: CSV, PNG plot, and a markdown summary for the README.

    python benchmarks/learning_curves.py --config configs/pendulum.yaml --seeds 0 1 2 \
        --out benchmarks/results/pendulum --target -200 --budget 200000 --jobs 2

Arguments this script does not know go to every ``awr fit`` as overrides of the config, in its shape: parts
by ``class_path`` and their ``init_args``, e.g. ``--model.data.init_args.asynchronous=true`` or
``--model.temperature=awr_modules.temperature.TunedToESS --model.temperature.init_args.target=0.35``.

Each seed trains in its own process (``torch`` with one thread each). The runs are
resumable: a seed whose run finished is skipped, and an interrupted seed resumes
from its last checkpoint (``--ckpt_path last``). ``--summarize-only`` rebuilds the
CSV, plot and summary from whatever the runs have logged so far.

Outputs under ``--out``: ``curves.csv`` (seed, env_steps, eval_return),
``timing.csv`` (mean wall-clock seconds per phase of an iteration),
``curve.png`` and ``summary.md``; ``seedN/diverged`` for a seed whose run stopped on the module's nan-loss guard
(its message, from the ignored ``train.log``; :mod:`aggregate` counts such seeds as diverged instead of leaving
them out as runs still going). With ``--milestones``, the summary also tabulates each seed's eval return
there and, for runs that log them, the AWR weights' effective sample size over the whole buffer and the
temperature, averaged between milestones (how much of the buffer the policy phase learns from).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

PHASES = ("collect", "refresh", "value_phase", "policy_phase")


def seed_dir(out: Path, seed: int) -> Path:
    return out / f"seed{seed}"


def fit_command(config: Path, out: Path, seed: int, overrides: list[str]) -> list[str]:
    run = seed_dir(out, seed)
    command = [
        sys.executable, "-m", "awr_modules.cli", "fit", "-c", str(config),
        f"--seed_everything={seed}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={out}", f"--trainer.logger.init_args.name=seed{seed}",
        f"--checkpoint.dirpath={run / 'checkpoints'}",
        *overrides,
    ]
    if (run / "checkpoints" / "last.ckpt").exists():
        command.append("--ckpt_path=last")
    return command


DIVERGED = "diverged"  # a seed's marker file; its text is the module's message
DIVERGENCE = "FloatingPointError: "  # how the module's nan-loss guard (``check_finite_losses``) ends a run's log


def mark_divergence(run: Path) -> str | None:
    """Write ``run/diverged`` when the seed's ``train.log`` ends on the module's nan-loss guard, and return its message
    (``None`` for a run that did not diverge). A diverged run logs no evaluation after the last finite one, so
    without the marker it reads as a run stopped short of its budget."""
    log = run / "train.log"
    errors = [line for line in log.read_text().splitlines() if line.startswith(DIVERGENCE)] if log.exists() else []
    if not errors or (run / "finished").exists():
        return None
    message = errors[-1][len(DIVERGENCE):]
    (run / DIVERGED).write_text(message + "\n")
    return message


def run_seeds(config: Path, out: Path, seeds: list[int], jobs: int, overrides: list[str]) -> None:
    """Train the seeds that have not finished, ``jobs`` processes at a time."""
    pending = [s for s in seeds if not (seed_dir(out, s) / "finished").exists()]
    running: dict[int, subprocess.Popen] = {}
    while pending or running:
        while pending and len(running) < jobs:
            seed = pending.pop(0)
            seed_dir(out, seed).mkdir(parents=True, exist_ok=True)
            log = open(seed_dir(out, seed) / "train.log", "a")  # noqa: SIM115 - closed with the process
            running[seed] = subprocess.Popen(fit_command(config, out, seed, overrides), stdout=log, stderr=log)
            print(f"seed {seed}: started", flush=True)
        for seed, process in list(running.items()):
            if process.poll() is not None:
                del running[seed]
                if process.returncode == 0:
                    (seed_dir(out, seed) / "finished").touch()
                print(f"seed {seed}: exit {process.returncode}", flush=True)
        time.sleep(5)


def run_versions(run: Path) -> list[Path]:
    """The ``version_N`` folders under ``run`` that logged metrics, in version order (a resumed run logs into a new
    version folder)."""
    return sorted((path.parent for path in run.glob("version_*/metrics.csv")), key=lambda p: int(p.name[8:]))


def read_run_metrics(run: Path) -> list[dict[str, str]]:
    """All rows one seed's runs logged under ``run`` (a resumed run logs into a new version folder), in order."""
    rows = []
    for version in run_versions(run):
        with (version / "metrics.csv").open() as f:
            rows.extend(csv.DictReader(f))
    return rows


def read_metrics(out: Path, seed: int) -> list[dict[str, str]]:
    """All rows the seed's runs logged."""
    return read_run_metrics(seed_dir(out, seed))


def eval_curve(rows: list[dict[str, str]]) -> list[tuple[float, float]]:
    """(env_steps, eval_return) points; a resumed run's later point for the same env_steps wins."""
    points = {float(r["env_steps"]): float(r["eval/return"]) for r in rows if r.get("eval/return")}
    return sorted(points.items())


def milestone_table(curves: dict[int, list[tuple[float, float]]], milestones: list[float]) -> list[str]:
    """Markdown rows: each seed's last eval return at or before each milestone, then mean +- std over seeds."""
    header = " | ".join(f"{m / 1000:g}k" if m < 1e6 else f"{m / 1e6:g}M" for m in milestones)
    lines = [f"| eval return at env steps | {header} |", "|---" * (len(milestones) + 1) + "|"]
    columns: list[list[float]] = [[] for _ in milestones]
    for seed, points in curves.items():
        cells = []
        for column, milestone in zip(columns, milestones, strict=True):
            before = [(s, r) for s, r in points if s <= milestone]
            if before:
                column.append(before[-1][1])
                cells.append(f"{before[-1][1]:.1f} (at {int(before[-1][0]):,})")
            else:
                cells.append("-")
        lines.append(f"| seed {seed} | " + " | ".join(cells) + " |")
    stats = [f"{np.mean(c):.1f} +- {np.std(c):.1f}" if c else "-" for c in columns]
    lines.append(f"| mean +- std ({len(curves)} seeds) | " + " | ".join(stats) + " |")
    return lines


WEIGHT_METRICS = {"train/buffer_weight_ess": "buffer weights' ESS (normalised)", "train/temperature": "temperature beta"}


def weights_table(logged: dict[int, list[dict[str, str]]], milestones: list[float]) -> list[str]:
    """Markdown rows: the AWR weights' effective sample size over the whole buffer and the temperature, each
    averaged over the iterations between consecutive milestones, then mean +- std over seeds (empty for runs
    that did not log them). ``logged``: each seed's metric rows (:func:`read_metrics`)."""
    edges = [0.0, *milestones]
    windows = [f"{a / 1000:g}k-{b / 1000:g}k" if b < 1e6 else f"{a / 1000:g}k-{b / 1e6:g}M"
               for a, b in itertools.pairwise(edges)]
    lines = []
    for metric, name in WEIGHT_METRICS.items():
        per_window: list[list[float]] = [[] for _ in milestones]
        for rows in logged.values():
            points = [(float(r["env_steps"]), float(r[metric])) for r in rows if r.get(metric) and r.get("env_steps")]
            for column, (low, high) in zip(per_window, itertools.pairwise(edges), strict=True):
                inside = [value for steps, value in points if low < steps <= high]
                if inside:
                    column.append(float(np.mean(inside)))
        if any(per_window):
            lines.append(f"| {name} | " + " | ".join(
                f"{np.mean(c):.3f} +- {np.std(c):.3f} ({len(c)})" if c else "-" for c in per_window) + " |")
    if not lines:
        return []
    return [f"| mean over iterations in env steps, mean +- std over seeds (seeds) | {' | '.join(windows)} |",
            "|---" * (len(milestones) + 1) + "|", *lines]


def late_mean(points: list[tuple[float, float]], budget: float | None) -> float:
    """Mean eval return over the evaluations in the last 10% of ``budget`` (of the run, without one): a seed
    whose returns swing between evaluations is read by its level, not by where its last evaluation fell."""
    end = budget if budget is not None else points[-1][0]
    late = [r for s, r in points if s > 0.9 * end]
    return float(np.mean(late)) if late else float("nan")


def summarize(out: Path, seeds: list[int], target: float | None, budget: float | None, title: str,
              reference: float | None, milestones: list[float] | None = None) -> str:
    logged = {s: read_metrics(out, s) for s in seeds}  # each seed's rows, read once
    curves = {s: eval_curve(rows) for s, rows in logged.items()}
    with (out / "curves.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["seed", "env_steps", "eval_return"])
        for seed, points in curves.items():
            writer.writerows((seed, int(steps), ret) for steps, ret in points)

    timing = defaultdict(list)
    for rows in logged.values():
        for row in rows:
            for phase in PHASES:
                if row.get(f"time/{phase}"):
                    timing[phase].append(float(row[f"time/{phase}"]))
    with (out / "timing.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["phase", "mean_seconds_per_iteration", "iterations"])
        writer.writerows((p, f"{np.mean(timing[p]):.3f}", len(timing[p])) for p in PHASES if timing[p])

    lines = [f"### {title}", "", ("| seed | env steps | final eval return | best eval return | "
             "mean eval return, last 10% of the budget | first env steps at target |"), "|---|---|---|---|---|---|"]
    finals, lasts = [], []
    for seed, points in curves.items():
        if not points:
            lines.append(f"| {seed} | - | - | - | - | - |")
            continue
        within = [(s, r) for s, r in points if budget is None or s <= budget]
        final = within[-1][1] if within else float("nan")
        finals.append(final)
        last = late_mean(within, budget)
        lasts.append(last)
        hit = next((int(s) for s, r in points if target is not None and r >= target), None)
        lines.append(f"| {seed} | {int(points[-1][0])} | {final:.1f} | {max(r for _, r in within):.1f} | "
                     f"{last:.1f} | {hit if hit is not None else 'not reached'} |")
    diverged = {seed: (seed_dir(out, seed) / DIVERGED).read_text().strip() for seed in curves
                if (seed_dir(out, seed) / DIVERGED).exists()}
    if diverged:
        lines += ["", *(f"Seed {seed} diverged after its last evaluation: {message}" for seed, message in diverged.items())]
    if finals:
        lines += ["", (f"Final eval return within the budget: {np.mean(finals):.1f} +- {np.std(finals):.1f} "
                       f"(mean +- std over {len(finals)} seeds); mean over the evaluations in the budget's last "
                       f"10%: {np.mean(lasts):.1f} +- {np.std(lasts):.1f}.")]
    if milestones:
        lines += ["", *milestone_table(curves, milestones)]
        weights = weights_table(logged, milestones)
        if weights:
            lines += ["", *weights]
    if timing:
        per_phase = ", ".join(f"{p} {np.mean(timing[p]):.2f} s" for p in PHASES if timing[p])
        lines += ["", f"Wall-clock per iteration: {per_phase}."]
    summary = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(summary)
    plot(curves, out / "curve.png", title, target, reference)
    return summary


def plot(curves: dict[int, list[tuple[float, float]]], path: Path, title: str, target: float | None,
         reference: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for seed, points in curves.items():
        if points:
            steps, returns = zip(*points)
            ax.plot(steps, returns, label=f"seed {seed}", alpha=0.8)
    if target is not None:
        ax.axhline(target, color="k", linestyle="--", linewidth=1, label="target")
    if reference is not None:
        ax.axhline(reference, color="r", linestyle=":", linewidth=1, label="reference implementation")
    ax.set_xlabel("env steps")
    ax.set_ylabel("eval return (deterministic policy)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="seeds trained at once (one core each)")
    parser.add_argument("--target", type=float, default=None, help="eval return to reach")
    parser.add_argument("--budget", type=float, default=None, help="env-step budget the target applies to")
    parser.add_argument("--reference", type=float, default=None, help="the reference implementation's return at the budget, drawn on the plot")
    parser.add_argument("--title", default=None)
    parser.add_argument("--milestones", type=float, nargs="+", default=None,
                        help="env steps at which to tabulate each seed's last eval return (e.g. 250000 500000 1000000)")
    parser.add_argument("--summarize-only", action="store_true")
    args, overrides = parser.parse_known_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summarize_only:
        run_seeds(args.config, args.out, args.seeds, args.jobs, overrides)
    for seed in args.seeds:  # the runs just trained, and those that stopped before (``--summarize-only``)
        mark_divergence(seed_dir(args.out, seed))
    print(summarize(args.out, args.seeds, args.target, args.budget, args.title or args.config.stem, args.reference,
                    args.milestones))


if __name__ == "__main__":
    main()
