"""Classic-control tasks (Pendulum, CartPole, MountainCar, Acrobot) with the reference's networks."""

from __future__ import annotations

from awr_recipes.gym_recipe import GymRecipe


class ClassicControl(GymRecipe):
    """Gymnasium classic control: ``Pendulum-v1`` (continuous), ``CartPole-v1`` (discrete), ..."""

    families = ("Pendulum", "CartPole", "MountainCar", "MountainCarContinuous", "Acrobot")
