"""Recipes: assemble environments, networks and the AWR iteration for an environment family."""
