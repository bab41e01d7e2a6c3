"""make_collector: a TorchRL Collector that keeps the recipe's env as built, without torchrl's 0.15 warning.

The collected batch is checked against the same episode stepped by hand: gymnasium's own Pendulum-v1 seeded as
the recipe's env seeds it, and the actor's Gaussian sampled by hand from the same torch seed.
"""

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import dist_params
from tensordict import TensorDict

from awr_modules.collector import make_collector
from awr_recipes.classic_control import ClassicControl

SEED = 3  # the env's seed: gymnasium's (sub-)env i is reset with SEED + i, then reset again by the collector
POLICY_SEED = 1  # torch's seed for the actor's samples
FRAMES = 8


def _by_hand(actor, envs: int) -> list[dict[str, list]]:
    """Each sub-env's steps: Pendulum-v1 stepped by hand with ``loc(s) + 0.4 z`` in [-1, 1] units, sent to the env
    as ``2 a`` (its box is [-2, 2]); ``z`` is drawn ``envs`` values per step from the policy seed."""
    pendulums = [gym.make("Pendulum-v1") for _ in range(envs)]
    observations = []
    for i, pendulum in enumerate(pendulums):
        pendulum.reset(seed=SEED + i)  # what the recipe's env.set_seed does
        observations.append(pendulum.reset()[0])  # the collector's own reset
    steps = [{"observation": [], "action": [], "reward": [], "next_observation": []} for _ in range(envs)]
    torch.manual_seed(POLICY_SEED)
    for _ in range(FRAMES // envs):
        state = TensorDict({"observation": torch.as_tensor(np.stack(observations))}, [envs])
        with torch.no_grad():
            params = dist_params(actor, state)
        assert torch.equal(params["scale"], torch.full((envs, 1), 0.4))  # the recipe's fixed std
        action = params["loc"] + 0.4 * torch.randn(envs).unsqueeze(-1)
        for i, pendulum in enumerate(pendulums):
            next_observation, reward, terminated, truncated, _ = pendulum.step(2.0 * action[i].numpy())
            assert not (terminated or truncated)
            for key, value in (("observation", observations[i]), ("action", action[i].tolist()),
                               ("reward", [reward]), ("next_observation", next_observation)):
                steps[i][key].append(value)
            observations[i] = next_observation
    return steps


@pytest.mark.parametrize("envs", [1, 2])
def test_collector_over_a_recipe_env_warns_nothing_and_collects_the_env_as_built(envs: int) -> None:
    recipe = ClassicControl("Pendulum-v1", hidden_sizes=[8])
    env = recipe.make_env(SEED, envs)
    actor, _ = recipe.make_networks(env, value_scale=1.0)
    transforms = [type(transform) for transform in env.transform]
    torch.manual_seed(POLICY_SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        collector = make_collector(env, actor, frames_per_batch=FRAMES, total_frames=FRAMES)
        batch = next(iter(collector))
    collector.shutdown()
    assert [type(transform) for transform in env.transform] == transforms  # no InitTracker appended
    assert "is_init" not in batch
    steps = FRAMES // envs
    batch = batch.reshape(envs, steps)  # [envs, T]; one env collects [T]

    for i, expected in enumerate(_by_hand(actor, envs)):
        got = batch[i]
        assert torch.equal(got["observation"], torch.as_tensor(np.stack(expected["observation"])))
        torch.testing.assert_close(got["action"], torch.tensor(expected["action"]))
        torch.testing.assert_close(got["next", "observation"], torch.as_tensor(np.stack(expected["next_observation"])))
        torch.testing.assert_close(got["next", "reward"], torch.tensor(expected["reward"], dtype=torch.float32))
        assert got["next", "step_count"].reshape(-1).tolist() == list(range(1, steps + 1))
        assert got["collector", "traj_ids"].tolist() == [i] * steps
        assert not got["next", "done"].any()
