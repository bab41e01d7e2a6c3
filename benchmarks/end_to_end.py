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

Writes ``<out>/end_to_end_<task>.csv`` (every run; ``--out`` defaults to ``benchmarks/results``) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import csv
import math
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


def seconds_of(command: list[str]) -> float:
    """Wall-clock of ``command`` from its start to its exit; its output goes to a log that is shown on failure."""
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False)
        seconds = time.perf_counter() - start
        if finished.returncode:
            log.seek(0)
            raise RuntimeError(f"{command} exited with {finished.returncode}:\n{log.read()[-4000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--variant", action="append", default=[], help="NAME=OVERRIDES (space-separated)")
    parser.add_argument("--iterations", type=int, nargs="+", default=[25, 50],
                        help="one count (whole runs, compared as they are) or two (a slope and a projection)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--budget", type=float, default=1e6, help="env steps of the projection")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="folder of the CSV of every run")
    args = parser.parse_args()
    settings = plain_settings(args.config)
    variants = {PLAIN: None}
    for spec in args.variant or ["awr fit as shipped="]:
        name, _, overrides = spec.partition("=")
        variants[name] = overrides.split()
    task = args.config.stem
    out_csv = args.out / f"end_to_end_{task}.csv"
    out_csv.parent.mkdir(parents=True, exist_ok=True)

    runs = [(name, iterations) for iterations in args.iterations for name in variants]
    seconds: dict[tuple[str, int], list[float]] = {run: [] for run in runs}
    with out_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["round", "variant", "iterations", "seconds"])
        for round_index in range(args.rounds):
            shift = round_index % len(runs)
            for name, iterations in runs[shift:] + runs[:shift]:
                with tempfile.TemporaryDirectory() as out:
                    command = (plain_command(settings, iterations) if variants[name] is None
                               else fit_command(args.config, iterations, variants[name], out))
                    taken = seconds_of(command)
                seconds[name, iterations].append(taken)
                writer.writerow([round_index, name, iterations, f"{taken:.2f}"])
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
                 "projected minutes", "of the plain loop"], rows)


def print_whole_runs(task: str, args: argparse.Namespace, variants: dict, seconds: dict) -> None:
    """One iteration count: each variant's median wall-clock and its ratio to the plain loop's, no projection."""
    (iterations,) = args.iterations
    median = {name: statistics.median(seconds[name, iterations]) for name in variants}
    rows = [[name, f"{median[name]:.1f}", f"{median[name] / 60:.2f}", f"{median[name] / median[PLAIN]:.2f}x"]
            for name in variants]
    print(f"\n{task}: {iterations} iterations, median of {args.rounds} rounds, wall-clock from process start\n")
    print_table(["run", "seconds", "minutes", "of the plain loop"], rows)


if __name__ == "__main__":
    main()
