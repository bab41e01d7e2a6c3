"""Box2D tasks: ``LunarLander-v3`` (discrete, the paper's), continuous via ``env_kwargs: {continuous: true}``."""

from __future__ import annotations

from awr_recipes.gym_recipe import GymRecipe


class Box2D(GymRecipe):
    """Gymnasium Box2D: LunarLander (discrete or continuous) and BipedalWalker."""

    families = ("LunarLander", "BipedalWalker")
