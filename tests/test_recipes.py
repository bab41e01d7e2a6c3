"""The recipes: envs that state their device; the MuJoCo recipe's action normalisation, and falls as terminations."""

import math

import pytest
import torch
from tensordict import TensorDict

from awr_recipes.box2d import Box2D
from awr_recipes.classic_control import ClassicControl
from awr_recipes.gym_recipe import BoundedStd
from awr_recipes.mujoco import MuJoCo

CPU = torch.device("cpu")


@pytest.mark.parametrize("num_envs", [1, 2])
@pytest.mark.parametrize(("recipe_class", "env_id"), [(ClassicControl, "Pendulum-v1"), (ClassicControl, "CartPole-v1"),
                                                      (Box2D, "LunarLander-v3"), (MuJoCo, "Hopper-v5")])
def test_recipe_envs_state_their_device(recipe_class, env_id: str, num_envs: int) -> None:
    """A GPU policy's actions reach a CPU env only if the env says it is on the CPU (collectors and rollouts cast to
    ``env.device``). TorchRL's ``GymEnv`` without a device has ``device None`` and returns tensordicts without one."""
    recipe = recipe_class(env_id, hidden_sizes=[8])
    env = recipe.make_env(0, num_envs)
    assert env.device == CPU and env.base_env.device == CPU
    specs = {"observation": env.full_observation_spec, "action": env.full_action_spec, "reward": env.full_reward_spec,
             "done": env.full_done_spec}
    for name, spec in specs.items():
        assert spec.device == CPU, name
        assert {leaf.device for leaf in spec.values(True, True)} == {CPU}, name
    actor, _ = recipe.make_networks(env)
    rollout = env.rollout(3, actor, break_when_any_done=False)
    assert env.reset().device == CPU and rollout.device == CPU and rollout["next"].device == CPU
    assert rollout.shape == ((3,) if num_envs == 1 else (num_envs, 3))
    assert {value.device for value in rollout.values(True, True)} == {CPU}
    env.close()


def test_mujoco_recipe_acts_in_the_normalised_box_and_maps_it_to_the_env_bounds() -> None:
    """Humanoid-v5's actions lie in [-0.4, 0.4]: the policy's [-1, 1] must reach the env scaled by 0.4."""
    recipe = MuJoCo("Humanoid-v5", hidden_sizes=[8])
    env = recipe.make_env(seed=0)
    assert torch.equal(env.base_env.action_spec.space.high, torch.full((17,), 0.4))
    assert torch.equal(env.action_spec.space.low, -torch.ones(17))
    assert torch.equal(env.action_spec.space.high, torch.ones(17))
    policy_actions = torch.linspace(-1.0, 1.0, 17)
    env_actions = env.transform.inv(TensorDict({"action": policy_actions}, []))["action"]
    torch.testing.assert_close(env_actions, 0.4 * policy_actions)
    actor, _ = recipe.make_networks(env)
    rollout = env.rollout(3, actor)
    assert rollout["observation"].dtype == torch.float32  # DoubleToFloat
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


def test_a_bounded_std_is_a_sigmoid_between_its_floor_and_the_action_box_half_width() -> None:
    """``std = 0.01 + 0.99 sigmoid(u + b)``: ``std_0`` at ``u = 0``, hand values elsewhere, and never outside
    ``[0.01, 1]``, however large the head's output (where a softplus std grows without end, and a bare sigmoid
    reaches 0, which makes ``log pi`` infinite)."""
    bounded = BoundedStd(0.2)
    share = 0.19 / 0.99  # sigmoid(b): b = logit(share); u = -b gives sigmoid(0) = 0.5
    loc = torch.tensor([[0.3, -2.0, 5.0, 0.0]])
    u = torch.tensor([[0.0, -math.log(share / (1 - share)), 1e4, -1e4]])
    out_loc, std = bounded(torch.cat([loc, u], dim=-1))
    torch.testing.assert_close(out_loc, loc)
    torch.testing.assert_close(std, torch.tensor([[0.2, 0.01 + 0.99 * 0.5, 1.0, 0.01]]), rtol=0, atol=1e-6)
    assert bool((std <= 1).all()) and bool((std >= 0.01).all())
    log_prob = torch.distributions.Normal(out_loc, std).log_prob(torch.full_like(loc, 3.0))
    assert bool(torch.isfinite(log_prob).all())
    recipe = ClassicControl("Pendulum-v1", policy="bounded_std", action_std=0.2, hidden_sizes=[8])
    env = recipe.make_env(0)
    actor, _ = recipe.make_networks(env)
    with torch.no_grad():  # a state far outside what the normaliser saw, through a head with large weights
        for layer in actor.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.fill_(50.0)
        scale = actor(env.reset().apply(lambda x: x * 1e3 if x.is_floating_point() else x))["scale"]
    assert bool((scale <= 1).all()), scale
    env.close()


@pytest.mark.parametrize("action_std", [0.01, 1.0, 1.5])
def test_a_bounded_std_refuses_to_start_outside_its_bounds(action_std: float) -> None:
    with pytest.raises(ValueError, match="bounded_std"):
        ClassicControl("Pendulum-v1", policy="bounded_std", action_std=action_std)


def test_mujoco_recipe_refuses_another_family() -> None:
    with pytest.raises(ValueError, match="family"):
        MuJoCo("LunarLander-v3")


@pytest.mark.parametrize("policy", ["learned_std", "bounded_std", "tanh_normal"])
def test_a_learned_std_starts_at_action_std(policy: str) -> None:
    """The scale head's output is ``action_std`` where the network outputs 0 (its last layer starts near 0), so a
    learned std starts where the reference's fixed one stays; another ``action_std``, another start."""
    for action_std in (0.4, 0.15):
        recipe = ClassicControl("Pendulum-v1", policy=policy, action_std=action_std)
        env = recipe.make_env(0)
        actor, _ = recipe.make_networks(env)
        scale = actor(env.reset())["scale"]
        torch.testing.assert_close(scale, torch.full_like(scale, action_std), rtol=0, atol=0.02)
        env.close()
