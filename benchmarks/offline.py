"""Offline AWR against behaviour cloning on Minari datasets made from the project's own runs.

Three steps, each resumable (finished pieces are skipped, an interrupted fit resumes from ``last.ckpt``):

1. ``--make-datasets``: a "medium" run (``--medium-steps`` online env steps of ``--online-config``, one config or
   several layered in order, its batches recorded), then three datasets: ``<task>/medium-v0`` (episodes of that run's final policy,
   stochastic), ``<task>/medium-replay-v0`` (everything the run collected), ``<task>/expert-v0`` (episodes of
   ``--expert-checkpoint``'s policy, stochastic).
2. Offline fits of ``--offline-config`` (its ``model.data`` an ``awr_modules.data.MinariDataset``) on each
   dataset, AWR (``model.loss.init_args.weighting: loss``) and BC (``weighting: uniform``, the same loss with
   weight 1), ``--seeds`` each, ``--jobs`` at a time.
   ``--variant NAME=CONFIG`` adds a method: AWR with ``CONFIG`` layered over the offline config (e.g. the Q
   critic, ``configs/reference/q_critic.yaml``). Fits run dataset by dataset (``--datasets``, in that order),
   seed by seed, every method of a seed before the next seed, so a stopped benchmark leaves whole seeds.
3. ``summary.md`` / ``summary.csv``: per dataset its mean episode return, and the final evaluation return of
   BC, AWR and each variant (mean +- std over seeds), and their late means (each fit's last 5 evaluations).

    python benchmarks/offline.py --task halfcheetah \\
        --online-config configs/halfcheetah.yaml configs/reference/td_lambda_critic.yaml \\
        --offline-config configs/offline_halfcheetah.yaml --medium-steps 350000 \\
        --expert-checkpoint benchmarks/results/halfcheetah_16envs/seed0/checkpoints/last.ckpt \\
        --out benchmarks/results/offline_halfcheetah --make-datasets --seeds 0 1 2 --jobs 2

Datasets go to ``<out>/datasets`` (``MINARI_DATASETS_PATH`` for every command here).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from learning_curves import read_run_metrics  # a seed's CSVLogger versions, in version order

DATASETS = ("medium", "medium-replay", "expert")
METHODS = {"bc": "uniform", "awr": "loss"}
LATE = 5  # evaluations in a fit's late mean (the last 50 of 200 iterations with the offline configs)
SCORES = {"": "Final evaluation (10 deterministic episodes after the last iteration)",
          "_late": f"Late mean (the mean of each fit's last {LATE} evaluations)"}  # column suffix: what it holds


def awr(*args: str) -> list[str]:
    """The ``awr`` command line with ``args``, in this interpreter."""
    return [sys.executable, "-m", "awr_modules.cli", *args]


def run(command: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as stream:
        subprocess.run(command, stdout=stream, stderr=stream, check=True)


def configs(files: list[Path]) -> list[str]:
    """``-c FILE`` for each of ``files``, layered in order."""
    return [arg for file in files for arg in ("-c", str(file))]


def make_datasets(args: argparse.Namespace) -> None:
    medium = args.out / "medium_run"
    if not (medium / "finished").exists():
        command = awr("fit", *configs(args.online_config), f"--model.max_env_steps={args.medium_steps}",
                      "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={medium}",
                      f"--checkpoint.dirpath={medium / 'checkpoints'}",
                      "--trainer.callbacks+=awr_modules.replay_history.ReplayHistory",
                      f"--trainer.callbacks.dirpath={medium / 'history'}")
        if (medium / "checkpoints" / "last.ckpt").exists():
            command.append("--ckpt_path=last")
        run(command, medium / "train.log")
        (medium / "finished").touch()
    sources = {
        "medium": ["policy", "--checkpoint", str(medium / "checkpoints" / "last.ckpt"), "--mode", "stochastic",
                   "--episodes", str(args.episodes)],
        "medium-replay": ["history", "--history", str(medium / "history")],
        "expert": ["policy", "--checkpoint", str(args.expert_checkpoint), "--mode", "stochastic",
                   "--episodes", str(args.episodes)],
    }
    for name, source in sources.items():
        dataset_id = f"{args.task}/{name}-v0"
        if (args.out / "datasets" / dataset_id).exists():
            continue
        run(awr("dataset", source[0], *configs(args.online_config), "--id", dataset_id, *source[1:]),
            args.out / "datasets.log")


def fit_command(args: argparse.Namespace, dataset: str, method: str, seed: int) -> list[str]:
    folder = args.out / dataset / method / f"seed{seed}"
    overlay = [args.variants[method]] if method in args.variants else []
    command = awr("fit", *configs([args.offline_config, *overlay]),
                  f"--model.data.init_args.dataset_id={args.task}/{dataset}-v0",
                  f"--model.loss.init_args.weighting={METHODS.get(method, 'loss')}", f"--seed_everything={seed}",
                  "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={folder}",
                  "--trainer.logger.init_args.name=run", f"--checkpoint.dirpath={folder / 'checkpoints'}")
    if (folder / "checkpoints" / "last.ckpt").exists():
        command.append("--ckpt_path=last")
    return command


def run_fits(args: argparse.Namespace) -> None:
    pending = [(d, m, s) for d in args.datasets for s in args.seeds for m in methods(args)
               if not (args.out / d / m / f"seed{s}" / "finished").exists()]
    running: dict[tuple[str, str, int], subprocess.Popen] = {}
    while pending or running:
        while pending and len(running) < args.jobs:
            key = pending.pop(0)
            folder = args.out / key[0] / key[1] / f"seed{key[2]}"
            folder.mkdir(parents=True, exist_ok=True)
            log = (folder / "train.log").open("a")
            running[key] = subprocess.Popen(fit_command(args, *key), stdout=log, stderr=log)
            print(f"{key}: started", flush=True)
        time.sleep(5)
        for key, process in list(running.items()):
            if process.poll() is not None:
                del running[key]
                if process.returncode == 0:
                    (args.out / key[0] / key[1] / f"seed{key[2]}" / "finished").touch()
                print(f"{key}: exit {process.returncode}", flush=True)


def methods(args: argparse.Namespace) -> list[str]:
    """BC, AWR and the ``--variant`` names, in that order."""
    return [*METHODS, *args.variants]


def fit_scores(folder: Path) -> dict[str, float] | None:
    """A fit's scores from its evaluation returns (a resumed fit's versions read in turn): ``""``, the last
    evaluation; ``"_late"``, the mean of the last ``LATE`` (steadier than one evaluation). ``None``: none yet."""
    returns = [float(row["eval/return"]) for row in read_run_metrics(folder / "run") if row.get("eval/return")]
    return {"": returns[-1], "_late": float(np.mean(returns[-LATE:]))} if returns else None


def dataset_return(args: argparse.Namespace, dataset: str) -> tuple[float, int, int]:
    from awr_modules.offline_data import open_minari_dataset

    data = open_minari_dataset(f"{args.task}/{dataset}-v0", args.out / "datasets")
    returns = [float(np.sum(episode.rewards)) for episode in data.iterate_episodes()]
    return float(np.mean(returns)), data.total_episodes, data.total_steps


def summarize(args: argparse.Namespace) -> None:
    rows = []
    for dataset in args.datasets:
        if not (args.out / "datasets" / f"{args.task}/{dataset}-v0").exists():
            continue
        mean, episodes, steps = dataset_return(args, dataset)
        row = {"dataset": f"{args.task}/{dataset}-v0", "episodes": episodes, "transitions": steps,
               "dataset_mean_return": round(mean, 1)}
        for method in methods(args):
            folders = [args.out / dataset / method / f"seed{s}" for s in args.seeds]
            fits = [fit_scores(folder) for folder in folders if (folder / "finished").exists()]  # not one running
            fits = [scores for scores in fits if scores is not None]
            for suffix in SCORES:
                values = [scores[suffix] for scores in fits]
                row[method + suffix] = (f"{np.mean(values):.1f} +- {np.std(values):.1f} (n={len(values)})"
                                        if values else "-")
                row[f"{method}{suffix}_seeds"] = " / ".join(f"{value:.1f}" for value in values)
        rows.append(row)
    if not rows:
        return
    with (args.out / "summary.csv").open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = ["dataset", "episodes", "transitions", "dataset mean return", "BC (uniform weights)", "AWR",
              *args.variants]
    lines = []
    for suffix, title in SCORES.items():
        lines += [*([""] if lines else []), f"{title}, mean +- std over seeds:", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            cells = [row["dataset"], row["episodes"], row["transitions"], row["dataset_mean_return"],
                     *(row[method + suffix] for method in methods(args))]
            lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True, help="dataset namespace, e.g. halfcheetah")
    parser.add_argument("--online-config", type=Path, nargs="+", required=True,
                        help="the medium run's config (several: layered in order)")
    parser.add_argument("--offline-config", type=Path, required=True)
    parser.add_argument("--expert-checkpoint", type=Path, required=True)
    parser.add_argument("--medium-steps", type=int, default=350_000)
    parser.add_argument("--episodes", type=int, default=200, help="episodes per policy dataset")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS),
                        help="the datasets to fit, in this order")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=CONFIG",
                        help="one more method: AWR with CONFIG layered over --offline-config")
    parser.add_argument("--make-datasets", action="store_true")
    parser.add_argument("--summarize-only", action="store_true")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.variants = dict(variant.split("=", 1) for variant in args.variant)
    if set(args.variants) & set(METHODS):
        parser.error(f"--variant names must differ from {sorted(METHODS)}")
    os.environ["MINARI_DATASETS_PATH"] = str(args.out / "datasets")
    if not args.summarize_only:
        if args.make_datasets:
            make_datasets(args)
        run_fits(args)
    summarize(args)


if __name__ == "__main__":
    main()
