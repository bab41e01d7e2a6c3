"""make_collector: a TorchRL Collector that keeps the recipe's env as built, without torchrl's 0.15 warning."""

import warnings

from awr_modules.collector import make_collector
from awr_recipes.classic_control import ClassicControl


def test_collector_over_a_recipe_env_warns_nothing_and_collects_the_env_as_built() -> None:
    recipe = ClassicControl("Pendulum-v1")
    env = recipe.make_env(0)
    actor, _ = recipe.make_networks(env, value_scale=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        collector = make_collector(env, actor, frames_per_batch=8, total_frames=8)
        batch = next(iter(collector))
    collector.shutdown()
    assert batch.numel() == 8
    assert set(batch.keys()) >= {"observation", "action", "next"}
    assert "is_init" not in batch  # no InitTracker was appended to the env
