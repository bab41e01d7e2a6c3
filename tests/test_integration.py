"""End-to-end run of the example loop without Lightning: stock TorchRL collector, env, actor and critic.

``examples/pendulum_loop.py``'s ``train`` collects with ``Collector`` on ``GymEnv("Pendulum-v1")`` +
``DoubleToFloat``, extends the FIFO buffer, refreshes TD(lambda) targets over the stored
trajectories, fits the critic, refreshes normalised advantages and takes AWR actor steps.
Three short iterations must return one record each with finite losses and diagnostics.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from pendulum_loop import DemoSettings, train  # examples/ is a folder of scripts, not a package


def test_example_loop_runs_three_iterations() -> None:
    settings = DemoSettings(iterations=3, frames_per_batch=256, critic_steps=5, actor_steps=5, batch_size=64)
    history = train(settings)
    assert [record["iteration"] for record in history] == [0, 1, 2]
    for record in history:
        for key in ("loss_actor", "loss_value", "weight_ess"):
            assert math.isfinite(record[key]), (key, record)
        assert 0 < record["weight_ess"] <= 1
    # Pendulum-v1 episodes last 200 steps: 768 frames finish at least three of them.
    assert any(math.isfinite(record["train_return"]) for record in history)
