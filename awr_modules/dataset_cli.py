"""``awr dataset``: write Minari datasets for offline AWR from a config's task.

    awr dataset policy  -c configs/halfcheetah.yaml --checkpoint runs/halfcheetah/checkpoints/last.ckpt \\
        --mode deterministic --episodes 100 --id halfcheetah/expert-v0
    awr dataset random  -c configs/halfcheetah.yaml --episodes 100 --id halfcheetah/random-v0
    awr dataset history -c configs/halfcheetah.yaml --history runs/halfcheetah/history \\
        --up-to 330000 --id halfcheetah/medium-replay-v0

Datasets go to ``--root`` (default ``MINARI_DATASETS_PATH``, else ``~/.minari/datasets``); an existing
id is replaced only with ``--overwrite``. The config names the task (its recipe); a checkpoint must
come from a run of that config: the ``config.yaml`` a run saves beside its metrics is such a config, and so
are the files it was run with, layered in the same order (``-c configs/hopper.yaml -c configs/reference/q_critic.yaml``).
A refused input (an existing id, a checkpoint of another task, ...) prints its message without a
traceback; ``--traceback`` shows it (see :mod:`awr_modules.cli`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gymnasium as gym

from awr_modules.configured import load_trained_module, module_from_config, run_reporting_refusals
from awr_modules.dataset_writer import (
    checkpoint_policy,
    random_policy,
    write_history_dataset,
    write_policy_dataset,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="awr dataset", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="source", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", type=Path, action="append", required=True,
                        help="the task's awr config (its recipe); repeat it to layer overlays in order, as awr fit")
    common.add_argument("--id", required=True, help="Minari dataset id, e.g. halfcheetah/medium-v0")
    common.add_argument("--root", default=None, help="Minari datasets folder (default MINARI_DATASETS_PATH)")
    common.add_argument("--overwrite", action="store_true", help="replace an existing dataset of that id")
    common.add_argument("--description", default=None)
    amount = argparse.ArgumentParser(add_help=False)
    amount.add_argument("--episodes", type=int, default=None, help="whole episodes to record")
    amount.add_argument("--steps", type=int, default=None, help="transitions to record (instead of --episodes)")
    amount.add_argument("--seed", type=int, default=0)
    policy = commands.add_parser("policy", parents=[common, amount], help="episodes of a checkpoint's policy")
    policy.add_argument("--checkpoint", type=Path, required=True)
    policy.add_argument("--mode", choices=["stochastic", "deterministic", "noisy"], default="stochastic")
    policy.add_argument("--noise-std", type=float, default=0.1, help="noisy mode: std in the actor's units")
    commands.add_parser("random", parents=[common, amount], help="episodes of uniform random actions")
    history = commands.add_parser("history", parents=[common], help="a run's recorded batches (ReplayHistory)")
    history.add_argument("--history", type=Path, required=True, help="the ReplayHistory callback's dirpath")
    history.add_argument("--up-to", type=int, default=None, help="env steps of history to include (default all)")
    return parser


def main(args: list[str] | None = None) -> None:
    """``awr dataset ARGS`` (default ``sys.argv[1:]``); a refused input exits with its message (``SystemExit``)."""
    run_reporting_refusals("awr dataset", run, args)


def run(args: list[str]) -> None:
    """Parse ``args`` and write the dataset they describe; errors propagate (``awr`` reports them)."""
    _write(_parser().parse_args(args))


def _write(options: argparse.Namespace) -> None:
    module = (load_trained_module(options.config, options.checkpoint) if options.source == "policy"
              else module_from_config(options.config))
    recipe = module.recipe
    common = {"root": options.root, "overwrite": options.overwrite, "description": options.description}
    if options.source == "history":
        dataset = write_history_dataset(options.id, options.history, recipe, up_to_env_steps=options.up_to, **common)
    else:
        env = gym.make(recipe.env_id, **getattr(recipe, "env_kwargs", {}))
        if options.source == "policy":
            act = checkpoint_policy(module.actor, recipe, options.mode, options.noise_std, options.seed)
            name = f"AWR {options.mode} policy ({options.checkpoint})"
        else:
            act, name = random_policy(env.action_space), "uniform random"
        dataset = write_policy_dataset(options.id, env, act, episodes=options.episodes, steps=options.steps,
                                       seed=options.seed, algorithm_name=name, **common)
        env.close()
    print(f"awr dataset: wrote {options.id!r}: {dataset.total_episodes} episodes, {dataset.total_steps} steps.")
