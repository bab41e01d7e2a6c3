"""Evaluation episodes stepped in a gymnasium vector env directly, with the actor's deterministic policy.

An evaluation runs one episode per sub-env of a batched env. Through TorchRL each batched step also
passes the env's transforms, the probabilistic actor and TensorDict bookkeeping: for 10 HalfCheetah
episodes that costs about 3x the simulation itself (``benchmarks/evaluation.py``), paid every few
iterations by the evaluation worker on cores that training shares. :class:`GymnasiumEvaluator` steps the
same gymnasium vector env with the recipe's :meth:`~awr_recipes.gym_recipe.GymRecipe.deterministic_policy`
(the exported policy: raw observations in, env actions out) and resets sub-envs exactly as TorchRL's
partial resets do, so it runs the same episodes as :func:`~awr_modules.evaluation.evaluate` on the
recipe's TorchRL env seeded alike (tested).
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torchrl.modules import ProbabilisticActor

from awr_modules.evaluation import EVAL_MAX_STEPS


class GymnasiumEvaluator:
    """One episode of the deterministic policy in each of ``episodes`` gymnasium sub-envs, per call.

    Args:
        env_id: gymnasium id; ``env_kwargs`` go to ``gymnasium.make_vec``.
        seed: sub-env ``i`` is seeded with ``seed + i`` once; later evaluations continue their random streams.
        episodes: sub-envs, one episode each per evaluation.
        deterministic_policy: maps an actor to its deterministic ``nn.Module`` (raw observations ``[B, obs]`` ->
            env actions), e.g. :meth:`~awr_recipes.gym_recipe.GymRecipe.deterministic_policy`; it shares the
            actor's layers, so weights loaded into the actor reach it.
    """

    def __init__(self, env_id: str, env_kwargs: dict, seed: int, episodes: int,
                 deterministic_policy: Callable[[ProbabilisticActor], nn.Module]) -> None:
        self.env = gym.make_vec(env_id, num_envs=episodes, vectorization_mode="sync",
                                vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.DISABLED}, **env_kwargs)
        self.env.reset(seed=seed)  # as TorchRL's set_seed does: the first evaluation starts from the next reset
        self.deterministic_policy = deterministic_policy
        self._actor: ProbabilisticActor | None = None
        self._policy: nn.Module | None = None

    def __call__(self, actor: ProbabilisticActor) -> tuple[list[float], list[int]]:
        if actor is not self._actor:
            self._actor, self._policy = actor, self.deterministic_policy(actor)
        envs = self.env.num_envs
        returns, lengths = np.zeros(envs), np.zeros(envs, dtype=np.int64)
        running = np.ones(envs, dtype=bool)
        observation, _ = self.env.reset()
        with torch.no_grad():
            for _ in range(EVAL_MAX_STEPS):
                action = self._policy(torch.as_tensor(observation, dtype=torch.float32))
                observation, reward, terminated, truncated, _ = self.env.step(action.numpy())
                returns[running] += reward[running]
                lengths[running] += 1
                done = terminated | truncated
                running &= ~done
                if done.any():  # TorchRL's partial reset of finished sub-envs: their random streams advance alike
                    observation, _ = self.env.reset(options={"reset_mask": done})
                if not running.any():
                    break
        return returns.tolist(), lengths.tolist()
