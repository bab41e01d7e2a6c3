"""Time of one target refresh over a full buffer: one critic pass per stored state against two.

``refresh_value_targets`` computes ``V(s)`` of every stored state once and takes ``V(s')`` from the
next row, running the critic on ``s'`` only where the next row does not start from it. The
two-pass row is the same refresh with the estimator calling the critic on ``s`` and on ``s'``
itself (TorchRL's estimators' own path, and this package's before the change). The third row is an
iteration's first refresh once the observation statistics are frozen: the critic has not changed since the
previous refresh, so it runs on the newest collection batch only (``stale_values``). All run on the
same buffer of HalfCheetah-v5 sizes (17-dim states, the reference's [128, 64] critic, episodes of
1,000 steps, collection batches of 2,048 steps from 8 envs), alternating, one torch thread.

    python benchmarks/refresh_targets.py --size 50000 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch
from markdown_table import print_table
from tensordict import TensorDict
from torchrl.data import ReplayBuffer
from torchrl.objectives.value import TDLambdaEstimator

from awr_modules import make_replay_buffer, refresh_value_targets
from awr_modules import value_targets as value_targets_module
from awr_recipes.mujoco import MuJoCo

OBSERVATION = 17
EPISODE = 1000
ENVS, FRAMES = 8, 2048


def filled_buffer(size: int) -> tuple[ReplayBuffer, torch.Tensor]:
    """``size`` transitions laid out as a collector writes them (8 envs' steps per batch, chained states), and
    the storage indices of the newest batch (what ``extend`` returns)."""
    buffer = make_replay_buffer(size, prioritized=False)
    newest = torch.empty(0, dtype=torch.long)
    steps_per_env = FRAMES // ENVS
    for batch in range(size // FRAMES):
        states = torch.randn(ENVS, steps_per_env + 1, OBSERVATION)
        step = batch * steps_per_env + torch.arange(steps_per_env)
        done = ((step + 1) % EPISODE == 0).expand(ENVS, -1).unsqueeze(-1)
        traj_ids = (torch.arange(ENVS) + ENVS * (batch * steps_per_env // EPISODE)).unsqueeze(-1).expand(-1,
                                                                                                     steps_per_env)
        data = TensorDict({
            "observation": states[:, :-1], "collector": {"traj_ids": traj_ids},
            "next": {"observation": states[:, 1:], "reward": torch.randn(ENVS, steps_per_env, 1),
                     "done": done, "terminated": torch.zeros_like(done)},
            "state_value": torch.zeros(ENVS, steps_per_env, 1), "value_target": torch.zeros(ENVS, steps_per_env, 1),
            "advantage": torch.zeros(ENVS, steps_per_env, 1)}, [ENVS, steps_per_env])
        newest = buffer.extend(data.reshape(-1))
    return buffer, newest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = MuJoCo("HalfCheetah-v5")
    env = recipe.make_env(0)
    _, critic = recipe.make_networks(env, value_scale=100.0)
    env.close()
    estimator = TDLambdaEstimator(gamma=0.99, lmbda=0.95, value_network=critic)
    buffer, newest_batch = filled_buffer(args.size)

    def two_passes() -> None:
        with mock.patch.object(value_targets_module, "_takes_next_value", return_value=False):
            refresh_value_targets(buffer, estimator)

    def newest_batch_only() -> None:  # an iteration's first refresh: the critic unchanged since the last one
        refresh_value_targets(buffer, estimator, stale_values=newest_batch)

    ways = {"one critic pass": lambda: refresh_value_targets(buffer, estimator), "two critic passes": two_passes,
            "critic on the newest batch only (stored V reused)": newest_batch_only}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds + 1):  # the first round warms up
        for name, refresh in ways.items():
            start = time.perf_counter()
            refresh()
            seconds[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(times[1:]) for name, times in seconds.items()}
    base = medians["two critic passes"]
    print_table([f"refresh over {len(buffer):,} stored transitions", "median ms", "ratio to two passes"],
                [[name, f"{1e3 * median:.0f}", f"{median / base:.2f}"] for name, median in medians.items()])


if __name__ == "__main__":
    main()
