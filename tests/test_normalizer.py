"""The networks' state normaliser: ``(x - mean) / max(std, 0.01)``, as the reference's normaliser (nan std: 0.01)."""

import torch

from awr_modules.normalizer import MIN_STD, ObservationNormalizer


def test_normalizes_with_the_loaded_mean_and_std():
    normalizer = ObservationNormalizer(2)
    normalizer.load_statistics(torch.tensor([1.0, -2.0]), torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(normalizer(torch.tensor([[3.0, -1.0]])), torch.tensor([[1.0, 2.0]]))


def test_a_dimension_constant_while_recording_is_scaled_by_the_floor():
    """A contact force that was 0 in every recorded state and then reads 1 maps to 100, not 10,000."""
    normalizer = ObservationNormalizer(2)
    normalizer.load_statistics(torch.zeros(2), torch.tensor([1e-4, 1.0]))  # VecNormV2's own floor is 1e-4
    assert MIN_STD == 0.01
    torch.testing.assert_close(normalizer(torch.tensor([[1.0, 1.0]])), torch.tensor([[100.0, 1.0]]))


def test_a_nan_std_from_a_constant_dimension_is_scaled_by_the_floor():
    """``sqrt(E[x^2] - E[x]^2)`` of a constant dimension can be nan after rounding; inputs must stay finite."""
    normalizer = ObservationNormalizer(2)
    normalizer.load_statistics(torch.tensor([5.0, 0.0]), torch.tensor([float("nan"), 2.0]))
    torch.testing.assert_close(normalizer(torch.tensor([[5.5, 1.0]])), torch.tensor([[50.0, 0.5]]))


def test_observation_statistics_record_the_collected_states_and_freeze():
    """The normaliser gets the mean and (population) std of every state of the collected batches, until frozen."""
    from tensordict import TensorDict

    from awr_recipes.classic_control import ClassicControl

    recipe = ClassicControl("Pendulum-v1", hidden_sizes=[8], normalizer_samples=300)
    env = recipe.make_env(0)
    actor, critic = recipe.make_networks(env)
    statistics = recipe.observation_statistics(actor, critic)
    normalizer = critic.module[0]
    first, second = torch.randn(4, 50, 3) * 2 + 1, torch.randn(200, 3) - 3  # [envs, steps] and flat batches
    statistics.update(TensorDict({"observation": first}, [4, 50]), env_steps=200)
    torch.testing.assert_close(normalizer.loc, first.reshape(-1, 3).mean(0))
    assert not statistics.frozen
    statistics.update(TensorDict({"observation": second}, [200]), env_steps=400)
    states = torch.cat([first.reshape(-1, 3), second])
    torch.testing.assert_close(normalizer.loc, states.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(normalizer.scale, states.std(0, unbiased=False), rtol=1e-4, atol=1e-4)
    assert statistics.frozen  # 400 env steps >= normalizer_samples
    statistics.update(TensorDict({"observation": second + 100}, [200]), env_steps=600)
    torch.testing.assert_close(normalizer.loc, states.mean(0), rtol=1e-5, atol=1e-5)  # frozen: unchanged
    assert "observation_vecnorm" not in env.reset()  # the env itself keeps raw observations only


def test_restored_statistics_go_on_from_the_saved_moments_before_they_freeze():
    """A run resumed before ``normalizer_samples`` keeps the moments it saved: its next batch is pooled with them, as
    in a run straight through (``VecNormV2.set_extra_state`` alone would restart them from that batch)."""
    from tensordict import TensorDict

    from awr_recipes.classic_control import ClassicControl

    recipe = ClassicControl("Pendulum-v1", hidden_sizes=[8], normalizer_samples=1000)
    env = recipe.make_env(0)
    first, second = torch.randn(200, 3) * 2 + 1, torch.randn(200, 3) - 3
    straight = recipe.observation_statistics(*recipe.make_networks(env))
    straight.update(TensorDict({"observation": first}, [200]), env_steps=200)
    saved = {name: value.clone() for name, value in straight.state_dict().items()}
    straight.update(TensorDict({"observation": second}, [200]), env_steps=400)

    actor, critic = recipe.make_networks(env)
    resumed = recipe.observation_statistics(actor, critic)
    resumed.load_state_dict(saved, env_steps=200)
    assert not resumed.frozen
    resumed.update(TensorDict({"observation": second}, [200]), env_steps=400)
    states = torch.cat([first, second])
    torch.testing.assert_close(critic.module[0].loc, states.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(critic.module[0].scale, states.std(0, unbiased=False), rtol=1e-4, atol=1e-4)
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value)
