"""first_episodes: episodes stepped side by side equal the same episodes run one by one."""

import pytest
import torch
from tensordict.nn import TensorDictModule
from torchrl.envs import ExplorationType, set_exploration_type

from awr_modules.evaluation import TorchRLEvaluator, first_episodes
from awr_recipes.classic_control import ClassicControl


def test_side_by_side_episodes_equal_one_by_one_rollouts_of_the_same_seeds() -> None:
    """CartPole episodes of different lengths: each sub-env's first episode, none of its steps after the reset."""
    torch.manual_seed(0)
    recipe = ClassicControl("CartPole-v1", hidden_sizes=[8])
    batched = recipe.make_env(seed=7, num_envs=4)  # gymnasium seeds sub-env i with 7 + i
    actor, _ = recipe.make_networks(batched)
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        episodes = first_episodes(batched, actor, max_steps=10_000)
        one_by_one = [recipe.make_env(seed=7 + i).rollout(10_000, actor, break_when_any_done=True) for i in range(4)]
    assert len({episode.shape[-1] for episode in episodes}) > 1  # the test covers unequal lengths
    for episode, rollout in zip(episodes, one_by_one, strict=True):
        assert episode.shape == rollout.shape
        torch.testing.assert_close(episode["observation"], rollout["observation"])
        torch.testing.assert_close(episode["next", "reward"], rollout["next", "reward"])
        assert episode["next", "done"][-1].all() and not episode["next", "done"][:-1].any()


def test_an_unfinished_episode_is_returned_as_far_as_it_got() -> None:
    recipe = ClassicControl("Pendulum-v1", hidden_sizes=[8])
    env = recipe.make_env(seed=0)  # one env, no batch dimension
    actor, _ = recipe.make_networks(env)
    with torch.no_grad():
        (episode,) = first_episodes(env, actor, max_steps=5)
    assert episode.shape == (5,)
    assert not episode["next", "done"].any()


def test_a_policy_without_parameters_runs_and_max_steps_must_be_positive() -> None:
    env = ClassicControl("Pendulum-v1").make_env(seed=0)
    push_right = TensorDictModule(lambda observation: torch.ones(*observation.shape[:-1], 1),
                                  in_keys=["observation"], out_keys=["action"])
    (episode,) = first_episodes(env, push_right, max_steps=3)
    assert episode.shape == (3,)
    assert (episode["action"] == 1).all()
    with pytest.raises(ValueError, match="max_steps"):
        first_episodes(env, push_right, max_steps=0)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_the_gymnasium_evaluator_runs_the_episodes_of_torchrl_evaluation(env_id: str) -> None:
    """Stepping gymnasium directly with the exported policy gives TorchRL's episodes: the same returns and lengths,
    evaluation after evaluation (the sub-envs' random streams advance alike), for discrete and box actions."""
    torch.manual_seed(0)
    recipe = ClassicControl(env_id, hidden_sizes=[8])
    torchrl_evaluator, gymnasium_evaluator = TorchRLEvaluator(recipe.make_env(7, 4)), recipe.make_evaluator(7, 4)
    actor, _ = recipe.make_networks(recipe.make_env(0))
    observation_dim = recipe.make_env(0).observation_spec["observation"].shape[-1]
    actor.module[0].module[0].load_statistics(torch.randn(observation_dim), torch.rand(observation_dim) + 0.5)
    for _ in range(2):
        expected_returns, expected_lengths = torchrl_evaluator(actor)
        returns, lengths = gymnasium_evaluator(actor)
        assert lengths == expected_lengths
        torch.testing.assert_close(torch.tensor(returns, dtype=torch.float64), torch.tensor(expected_returns, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-4)
    if env_id == "CartPole-v1":
        assert len(set(lengths)) > 1  # unequal episodes: partial resets happen mid-evaluation
