"""MuJoCo locomotion tasks (gymnasium ``-v5``: HalfCheetah, Hopper, Walker2d, Ant, Humanoid, ...).

The reference's continuous-control setting: actions normalised to ``[-1, 1]``, a diagonal Gaussian
with a fixed std in those units, observation statistics frozen after 300,000 samples. Episodes that
end by failure (Hopper falling, say) are ``terminated`` and get ``V = 0``; the 1,000-step time limit
is ``truncated`` and bootstraps from ``V`` (AWR.md, step 2).
"""

from __future__ import annotations

from awr_recipes.gym_recipe import GymRecipe


class MuJoCo(GymRecipe):
    """Gymnasium MuJoCo tasks, e.g. ``HalfCheetah-v5`` (needs ``gymnasium[mujoco]``, a dependency)."""

    families = ("HalfCheetah", "Hopper", "Walker2d", "Ant", "Humanoid", "HumanoidStandup", "Swimmer",
                "InvertedPendulum", "InvertedDoublePendulum", "Reacher", "Pusher")
