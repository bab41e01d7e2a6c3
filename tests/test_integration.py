"""End-to-end smoke run of the Pendulum demo: stock TorchRL collector, env, actor and critic with awr_modules.

``recipes.demo_pendulum.train`` collects with ``Collector`` on ``GymEnv("Pendulum-v1")`` +
``DoubleToFloat``, extends the FIFO buffer, refreshes TD(lambda) targets over the stored
trajectories, fits the critic, refreshes normalised advantages and takes AWR actor steps.
Three short iterations must return one record each with finite losses and diagnostics.
"""

from __future__ import annotations

import math

from recipes.demo_pendulum import DemoSettings, train


def test_demo_pendulum_runs_three_iterations() -> None:
    settings = DemoSettings(iterations=3, frames_per_batch=256, critic_steps=5, actor_steps=5, batch_size=64)
    history = train(settings)
    assert [record["iteration"] for record in history] == [0, 1, 2]
    for record in history:
        for key in ("loss_actor", "loss_value", "weight_ess"):
            assert math.isfinite(record[key]), (key, record)
        assert 0 < record["weight_ess"] <= 1
    # Pendulum-v1 episodes last 200 steps: 768 frames finish at least three of them.
    assert any(math.isfinite(record["train_return"]) for record in history)
