"""Wall-clock of whole training runs from process start: ``awr fit`` variants against the plain loop.

    python benchmarks/end_to_end.py --config configs/halfcheetah.yaml --iterations 25 50 --rounds 2 \\
        --variant "awr fit as shipped=" \\
        --variant "awr fit, sync collection + evaluation=--model.data.init_args.asynchronous=false \\
            --model.evaluator=awr_modules.evaluators.InProcess"

Each ``--variant NAME=OVERRIDES`` is ``awr fit -c CONFIG`` with those command-line overrides
(space-separated), run for each ``--iterations`` count in a fresh process: start-up, compilation,
evaluation every ``check_val_every_n_epoch`` iterations and the config's checkpoints included,
as a user runs it. Beside them, ``benchmarks/plain_loop.py`` with the config's env, frames and envs
(``model.data``), actor step size (``model.actor_optimizer``), action std (the recipe's), evaluation episodes
(``model.evaluator``) and schedule (``trainer.check_val_every_n_epoch``). The runs alternate (each round starts
one run later), so that drift of the machine's speed hits all alike; the median over rounds is
reported. From two iteration counts, the seconds per further iteration (slope) and a projection to
``--budget`` env steps: seconds at the larger count plus the remaining iterations at that slope. From one
count (e.g. 489 HalfCheetah iterations: 1M env steps), the whole runs compared as they are.

``--variant-checkout NAME=DIR`` runs the variant NAME from another checkout of this repository (e.g. the
last commit before a change, ``git worktree add DIR COMMIT``): ``awr fit`` with DIR first on ``PYTHONPATH``
(its ``awr_modules``, and its ``recipes/`` as ``awr_recipes``, which the installed package would otherwise map
to this checkout's), in DIR, with DIR's own copy of ``--config``; the variant's overrides are in that
checkout's config shape. ``--no-plain`` leaves the plain loop out (the ratios are then to the first variant).

Writes ``<out>/end_to_end_<task>[_<tag>].csv`` (every run, with the commit each ran; ``--out`` defaults to
``benchmarks/results``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from markdown_table import print_table

HERE = Path(__file__).resolve().parent
PLAIN = "plain loop (benchmarks/plain_loop.py)"


def plain_settings(config: Path) -> dict[str, str | int | float]:
    """The plain loop's settings from the module and trainer that ``config`` builds (its parts, with their
    defaults and any ``-c`` it stacks): env, frames and envs per iteration, the actor's step size, the action std,
    the evaluation schedule and episodes, and the seed."""
    from awr_modules.cli import cli_main  # Lightning, for this once: the runs themselves are subprocesses

    cli = cli_main(["-c", str(config), "--trainer.logger=false"], run=False)
    module, data = cli.model, cli.model.awr.data
    if not data.collects:
        raise ValueError(f"{config}: model.data ({type(data).__name__}) collects no env steps; the plain loop "
                         "collects online (use an online config).")
    (actor_optimizer, _), _ = module.configure_optimizers()
    return {"env": module.recipe.env_id, "frames": data.frames_per_iteration, "envs": data.num_envs,
            "actor_lr": actor_optimizer.param_groups[0]["lr"], "action_std": module.recipe.action_std,
            "eval_every": cli.trainer.check_val_every_n_epoch, "eval_episodes": module.evaluator.episodes,
            "seed": module.seed or 0}


def plain_command(settings: dict[str, str | int | float], iterations: int) -> list[str]:
    """``benchmarks/plain_loop.py`` for ``iterations`` iterations with the config's settings
    (:func:`plain_settings`)."""
    return [sys.executable, str(HERE / "plain_loop.py"), "--env", str(settings["env"]), "--iterations", str(iterations),
            "--frames", str(settings["frames"]), "--envs", str(settings["envs"]),
            "--actor-lr", str(settings["actor_lr"]), "--action-std", str(settings["action_std"]),
            "--eval-every", str(settings["eval_every"]), "--eval-episodes", str(settings["eval_episodes"]),
            "--seed", str(settings["seed"])]


def fit_command(config: Path, iterations: int, overrides: list[str], out: str) -> list[str]:
    """``awr fit -c config`` for ``iterations`` iterations with ``overrides``, logging and checkpointing to ``out``."""
    return [sys.executable, "-m", "awr_modules.cli", "fit", "-c", str(config), f"--trainer.max_epochs={iterations}",
            "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={out}",
            f"--trainer.default_root_dir={out}", f"--checkpoint.dirpath={out}/checkpoints",
            "--model.max_env_steps=null", *overrides]


def commit_of(checkout: Path) -> str:
    """The short commit of ``checkout`` (with ``+changes`` when its tracked files differ from it)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(checkout), *args], check=True, capture_output=True,
                              text=True).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "-uno") else "")


def checkout_env(checkout: Path, shim: Path) -> dict[str, str]:
    """The environment of an ``awr fit`` of ``checkout``: the checkout, then ``shim`` (its ``awr_recipes``, a link
    to the checkout's ``recipes/``) first on ``PYTHONPATH``, ahead of the installed package's mapping."""
    (shim / "awr_recipes").symlink_to(checkout / "recipes", target_is_directory=True)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout), str(shim),
                                                                      os.environ.get("PYTHONPATH")]))}


def seconds_of(command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> float:
    """Wall-clock of ``command`` from its start to its exit; its output goes to a log that is shown on failure."""
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False, env=env, cwd=cwd)
        seconds = time.perf_counter() - start
        if finished.returncode:
            log.seek(0)
            raise RuntimeError(f"{command} exited with {finished.returncode}:\n{log.read()[-4000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--variant", action="append", default=[], help="NAME=OVERRIDES (space-separated)")
    parser.add_argument("--variant-checkout", action="append", default=[],
                        help="NAME=DIR: the variant NAME runs `awr fit` of the checkout DIR")
    parser.add_argument("--no-plain", action="store_true", help="leave out the plain loop")
    parser.add_argument("--tag", default="", help="suffix of the CSV's name: end_to_end_<task>_<tag>.csv")
    parser.add_argument("--iterations", type=int, nargs="+", default=[25, 50],
                        help="one count (whole runs, compared as they are) or two (a slope and a projection)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--budget", type=float, default=1e6, help="env steps of the projection")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder of the CSV of every run")
    args = parser.parse_args()
    # the plain loop's settings, also the frames per iteration of a projection
    settings = None if args.no_plain and len(args.iterations) == 1 else plain_settings(args.config)
    variants = {} if args.no_plain else {PLAIN: None}
    for spec in args.variant or ["awr fit as shipped="]:
        name, _, overrides = spec.partition("=")
        variants[name] = overrides.split()
    here = Path.cwd()
    checkouts = {name: here for name in variants}
    for spec in args.variant_checkout:
        name, _, directory = spec.partition("=")
        if name not in variants or variants[name] is None:
            raise SystemExit(f"--variant-checkout {spec!r}: no --variant named {name!r}")
        checkouts[name] = Path(directory).resolve()
    commits = {name: commit_of(checkout) for name, checkout in checkouts.items()}
    task = args.config.stem
    out_csv = args.out / f"end_to_end_{task}{'_' + args.tag if args.tag else ''}.csv"
    out_csv.parent.mkdir(parents=True, exist_ok=True)

    runs = [(name, iterations) for iterations in args.iterations for name in variants]
    seconds: dict[tuple[str, int], list[float]] = {run: [] for run in runs}
    with out_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["round", "variant", "commit", "iterations", "seconds"])
        for round_index in range(args.rounds):
            shift = round_index % len(runs)
            for name, iterations in runs[shift:] + runs[:shift]:
                with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as shim:
                    env = cwd = None
                    if variants[name] is None:
                        command = plain_command(settings, iterations)
                    elif checkouts[name] == here:
                        command = fit_command(args.config, iterations, variants[name], out)
                    else:  # the checkout's own config, modules and recipes
                        cwd = checkouts[name]
                        config = args.config if args.config.is_absolute() else cwd / args.config
                        command = fit_command(config, iterations, variants[name], out)
                        env = checkout_env(cwd, Path(shim))
                    taken = seconds_of(command, env=env, cwd=cwd)
                seconds[name, iterations].append(taken)
                writer.writerow([round_index, name, commits[name], iterations, f"{taken:.2f}"])
                f.flush()
                print(f"round {round_index}: {name}, {iterations} iterations: {taken:.1f} s", flush=True)

    if len(args.iterations) == 1:
        print_whole_runs(task, args, variants, seconds)
        return
    low, high = args.iterations
    budget_iterations = math.ceil(args.budget / int(settings["frames"]))
    median = {run: statistics.median(values) for run, values in seconds.items()}
    plain_projection = None
    rows = []
    for name in variants:
        slope = (median[name, high] - median[name, low]) / (high - low)
        projection = median[name, high] + (budget_iterations - high) * slope
        plain_projection = plain_projection or projection
        rows.append([name, f"{median[name, low]:.1f}", f"{median[name, high]:.1f}", f"{slope:.2f}",
                     f"{projection / 60:.1f}", f"{projection / plain_projection:.2f}x"])
    print(f"\n{task}: median of {args.rounds} rounds, wall-clock from process start; projection to "
          f"{args.budget:,.0f} env steps ({budget_iterations} iterations)\n")
    print_table(["run", f"{low} iterations (s)", f"{high} iterations (s)", "s per further iteration",
                 "projected minutes", "of the plain loop" if PLAIN in variants else f"of {next(iter(variants))}"], rows)


def print_whole_runs(task: str, args: argparse.Namespace, variants: dict, seconds: dict) -> None:
    """One iteration count: each variant's median wall-clock and its ratio to the plain loop's, no projection."""
    (iterations,) = args.iterations
    median = {name: statistics.median(seconds[name, iterations]) for name in variants}
    reference = next(iter(variants))  # the plain loop, or with --no-plain the first variant
    rows = [[name, " / ".join(f"{s:.1f}" for s in seconds[name, iterations]), f"{median[name]:.1f}",
             f"{median[name] / 60:.2f}", f"{median[name] / median[reference]:.2f}x"] for name in variants]
    print(f"\n{task}: {iterations} iterations, median of {args.rounds} rounds, wall-clock from process start\n")
    print_table(["run", "seconds, by round", "median seconds", "minutes",
                 "of the plain loop" if reference == PLAIN else f"of {reference}"], rows)


if __name__ == "__main__":
    main()
