"""Evaluation episodes stepped side by side: one episode in each sub-env of a batched env.

Evaluating ``eval_episodes`` episodes one after another pays TorchRL's per-step cost (transforms,
policy call, TensorDict bookkeeping) once per env step; a MuJoCo evaluation of 10 episodes of
1,000 steps is then 10,000 such steps. Stepping the episodes side by side in one batched env pays
it once per step of the longest episode. Each sub-env contributes its first episode: the env
resets a finished sub-env (TorchRL's partial reset) and its later steps are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torchrl.envs import EnvBase, ExplorationType, set_exploration_type

EVAL_MAX_STEPS = 100_000  # a safety bound only: evaluation episodes end at the env's own time limit


@dataclass
class Evaluation:
    """The episodes of one evaluation, with their undiscounted returns and lengths."""

    episodes: list[TensorDictBase]

    @property
    def returns(self) -> list[float]:
        return [episode["next", "reward"].sum().item() for episode in self.episodes]

    @property
    def lengths(self) -> list[int]:
        return [episode.shape[-1] for episode in self.episodes]


def evaluation_metrics(prefix: str, returns: list[float], lengths: list[int]) -> dict[str, float]:
    """What an evaluation logs: ``{prefix}/return`` (mean over episodes), its std, and the mean episode length."""
    return {f"{prefix}/return": float(np.mean(returns)), f"{prefix}/return_std": float(np.std(returns)),
            f"{prefix}/episode_length": float(np.mean(lengths))}


def evaluate(env: EnvBase, policy: TensorDictModuleBase, max_steps: int = EVAL_MAX_STEPS) -> Evaluation:
    """One episode of the deterministic (mean / mode) ``policy`` in each sub-env of ``env``, side by side."""
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        return Evaluation(first_episodes(env, policy, max_steps))


def first_episodes(env: EnvBase, policy: TensorDictModuleBase, max_steps: int) -> list[TensorDictBase]:
    """Run ``policy`` in every sub-env of ``env`` until each has finished one episode.

    Returns one TensorDict per sub-env (in sub-env order), shaped ``[episode_length]`` with the
    keys of ``env.rollout`` (``"next"`` included), on the env's device. Observations move to
    the device of the policy's parameters and actions back to the env's device (each where there
    is one); an episode still running after ``max_steps`` steps is returned as far as it got.
    Sub-envs that have finished keep stepping until the last one does, and every step is kept
    until then: memory grows with ``envs x longest episode``, which the envs' own time limits bound.
    """
    if max_steps < 1:
        raise ValueError(f"first_episodes: max_steps must be >= 1, got {max_steps}.")
    envs = max(env.batch_size.numel(), 1)
    parameter = next(policy.parameters(), None)
    policy_device = None if parameter is None else parameter.device
    lengths = torch.full((envs,), max_steps, dtype=torch.long)
    finished = torch.zeros(envs, dtype=torch.bool)
    steps = []
    tensordict = env.reset()
    for step in range(max_steps):
        if policy_device is not None:
            tensordict = tensordict.to(policy_device)
        tensordict = policy(tensordict)
        if env.device is not None:
            tensordict = tensordict.to(env.device)
        tensordict, next_tensordict = env.step_and_maybe_reset(tensordict)
        steps.append(tensordict.reshape(envs).clone())
        done = tensordict["next", "done"].reshape(envs).cpu()
        lengths[done & ~finished] = step + 1
        finished |= done
        if finished.all():
            break
        tensordict = next_tensordict
    stacked = torch.stack(steps, dim=-1)  # [envs, steps]
    return [stacked[index, : int(lengths[index])] for index in range(envs)]


class EpisodeEvaluator(Protocol):
    """Runs the deterministic policy of an actor for one evaluation's episodes: their returns and lengths.

    It keeps its env between calls, so successive evaluations continue the env's seeded random stream.
    """

    def __call__(self, actor: TensorDictModuleBase) -> tuple[list[float], list[int]]: ...


class TorchRLEvaluator:
    """:func:`evaluate` on a TorchRL env it keeps: one episode per sub-env, any recipe's env and actor."""

    def __init__(self, env: EnvBase) -> None:
        self.env = env

    def __call__(self, actor: TensorDictModuleBase) -> tuple[list[float], list[int]]:
        evaluation = evaluate(self.env, actor)
        return evaluation.returns, evaluation.lengths
