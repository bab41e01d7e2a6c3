"""One deterministic Pendulum-v1 episode of a plain ``observation -> action`` policy, with torch and gymnasium only.

Shared by the export tests in this process and in a fresh interpreter that cannot import this package.
"""

from __future__ import annotations

import gymnasium as gym
import torch


def episode_return(policy: torch.nn.Module, seed: int) -> float:
    """The return of the episode TorchRL's env seeded with ``seed`` evaluates: ``set_seed`` resets once with the
    seed, and the evaluated episode starts at the next reset."""
    env = gym.make("Pendulum-v1")
    env.reset(seed=seed)
    observation, _ = env.reset()
    total, done = 0.0, False
    while not done:
        with torch.no_grad():
            action = policy(torch.as_tensor(observation, dtype=torch.float32)[None])[0].numpy()
        observation, reward, terminated, truncated, _ = env.step(action)
        total, done = total + float(reward), terminated or truncated
    return total
