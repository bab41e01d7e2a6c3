"""Collection throughput: `AWRModule`'s TorchRL collector against a plain gymnasium vector loop.

Both step ``--envs`` copies of the task in one process (a gymnasium ``SyncVectorEnv``) with the
recipe's actor (the same MLP, one batched forward per step, sampling its Gaussian), one torch
thread. The TorchRL row is what ``awr fit`` collects with: the recipe's env and transforms
(``DoubleToFloat``, ``VecNormV2`` recording, the action map, ``StepCounter``, ``RewardSum``) under
``torchrl.collectors.Collector``. The plain row is a loop over ``vector_env.step`` with the policy
called on a tensor. They alternate, ``--frames`` env steps per timed batch, and the median
steps/s of ``--rounds`` rounds is reported.

GPUs are hidden, as ``awr fit`` hides them from its collection worker and, since e49cf78, from a
CPU run's training process. A third row steps the same collector with them visible: there Lightning's
``PYTORCH_NVML_BASED_CUDA_CHECK=1`` makes each of tensordict's device checks load NVML again on a
CUDA build of torch (``awr_modules/cpu_worker.py``), which synchronous collection in the training
process paid before.

    python benchmarks/collection.py --config configs/halfcheetah.yaml --frames 2048 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from markdown_table import print_table
from torchrl.envs import ExplorationType, set_exploration_type

from awr_modules.cli import cli_main
from awr_modules.collector import make_collector
from awr_modules.cpu_worker import hide_gpus
from awr_modules.environment import environment_variable


def torchrl_collection(model, envs: int, frames: int):
    env = model.recipe.make_env(0, envs)
    collector = make_collector(env, model.actor, frames_per_batch=frames, total_frames=-1)
    batches = iter(collector)

    def collect() -> int:
        return next(batches).numel()

    return collect, collector.shutdown


def plain_collection(model, envs: int, frames: int):
    vector_env = gym.make_vec(model.recipe.env_id, num_envs=envs, vectorization_mode="sync",
                              **model.recipe.env_kwargs)
    low, high = vector_env.single_action_space.low, vector_env.single_action_space.high
    network = model.actor.module[0].module  # observation -> (loc, scale), the recipe's MLP head
    observation, _ = vector_env.reset(seed=0)

    def collect() -> int:
        nonlocal observation
        for _ in range(frames // envs):
            with torch.no_grad():
                loc, scale = network(torch.as_tensor(observation, dtype=torch.float32))
                action = torch.normal(loc, scale).clamp(-1.0, 1.0).numpy()
            observation, _, _, _, _ = vector_env.step(low + (action + 1.0) * (high - low) / 2)
        return frames

    return collect, vector_env.close


def with_gpus_visible(collect: Callable[[], int]) -> Callable[[], int]:
    """``collect`` run with ``CUDA_VISIBLE_DEVICES`` unset (torch reads it on every device check), then hidden again."""

    def collect_with_gpus_visible() -> int:
        with environment_variable("CUDA_VISIBLE_DEVICES", None):
            return collect()

    return collect_with_gpus_visible


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--envs", type=int, default=None,
                        help="envs stepped side by side (default: the config's model.data.init_args.num_envs)")
    parser.add_argument("--frames", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    hide_gpus()  # as awr fit's collection worker does when the learner is on the CPU
    np.random.seed(0)
    model = cli_main(["-c", str(args.config)], run=False).model
    args.envs = args.envs or getattr(model.awr.data, "num_envs", 1)  # an offline data source steps no envs
    collect, shutdown = torchrl_collection(model, args.envs, args.frames)
    ways = {"plain gymnasium vector loop": plain_collection(model, args.envs, args.frames),
            "awr fit's TorchRL collector": (collect, shutdown),
            "the same, GPUs visible (NVML check per device cast)": (with_gpus_visible(collect), lambda: None)}
    rates: dict[str, list[float]] = {name: [] for name in ways}
    with set_exploration_type(ExplorationType.RANDOM):
        for round_index in range(args.rounds + 1):  # the first round warms up
            for name, (collect, _) in ways.items():
                start = time.perf_counter()
                steps = collect()
                if round_index:
                    rates[name].append(steps / (time.perf_counter() - start))
    for _, close in ways.values():
        close()
    medians = {name: statistics.median(values) for name, values in rates.items()}
    base = medians["plain gymnasium vector loop"]
    print_table([f"{args.config.stem}, {args.envs} envs, 1 torch thread", "env steps/s", "ratio to the plain loop"],
                [[name, f"{rate:,.0f}", f"{rate / base:.2f}"] for name, rate in medians.items()])


if __name__ == "__main__":
    main()
