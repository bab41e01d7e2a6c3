"""The MuJoCo recipe: the reference's action normalisation, and falls end episodes as terminations."""

import pytest
import torch

from recipes.mujoco import MuJoCo


def test_mujoco_recipe_acts_in_the_normalised_box_and_maps_it_to_the_env_bounds() -> None:
    recipe = MuJoCo("HalfCheetah-v5", hidden_sizes=[8])
    env = recipe.make_env(seed=0)
    spec = env.action_spec
    assert torch.equal(spec.space.low, -torch.ones(6)) and torch.equal(spec.space.high, torch.ones(6))
    actor, _ = recipe.make_networks(env)
    rollout = env.rollout(3, actor)
    assert rollout["observation"].dtype == torch.float32  # DoubleToFloat
    assert rollout["action"].abs().max() < 1.5  # the policy's units, std 0.4 around a mean near 0
    env.close()


def test_a_hopper_fall_is_a_termination_not_a_truncation() -> None:
    """Failure states get V = 0 in the targets, time limits bootstrap: the env must tell them apart."""
    recipe = MuJoCo("Hopper-v5", hidden_sizes=[8])
    env = recipe.make_env(seed=0)
    torch.manual_seed(0)
    rollout = env.rollout(1000, break_when_any_done=True)  # random actions: the hopper falls early
    assert rollout.shape[-1] < 1000
    assert rollout["next", "terminated"][-1].all() and not rollout["next", "truncated"][-1].any()
    env.close()


def test_mujoco_recipe_refuses_another_family() -> None:
    with pytest.raises(ValueError, match="family"):
        MuJoCo("LunarLander-v3")
