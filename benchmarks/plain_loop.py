"""A plain single-file AWR loop in PyTorch + gymnasium: the script a researcher would write instead of ``awr fit``.

    python benchmarks/plain_loop.py --env HalfCheetah-v5 --iterations 30

No TensorDict, TorchRL or Lightning: the reference's order and settings (``configs/halfcheetah.yaml``)
in one process with one torch thread, for wall-clock comparisons with ``awr fit``
(``benchmarks/end_to_end.py``). Per iteration: collect ``--frames`` steps with the stochastic
policy in a gymnasium ``SyncVectorEnv`` of ``--envs`` envs (one batched policy forward per step);
store them in a FIFO buffer of 50,000 transitions; TD(lambda) returns over the stored trajectories
(no bootstrap after a termination, bootstrap after a truncation and at the newest stored step);
200 critic SGD steps; returns again with the new critic; standardised advantages, weights
``min(exp(A / beta), 20)``; 1,000 actor SGD steps on ``-mean(w log pi(a|s))`` plus the action-bound
penalty. States are normalised by their running mean and std over the first 300,000 collected
states. Every ``--eval-every`` iterations, ``--eval-episodes`` deterministic episodes side by side
in a vector env (each env's first episode). Continuous action spaces only (a fixed-std Gaussian).

Prints one line per evaluation and, at the end, ``wall-clock seconds from process start: ...``.
"""

from __future__ import annotations

import time

START = time.time()  # before the imports: the wall-clock from process start is what a user waits for

import argparse

import gymnasium as gym
import numpy as np
import torch
from torch import nn


class Normalizer(nn.Module):
    """Running mean and std of the states recorded so far, frozen after ``limit`` states."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("std", torch.ones(size))
        self.limit, self.count = limit, 0
        self.total, self.total_sq = np.zeros(size), np.zeros(size)

    def record(self, states: np.ndarray) -> None:
        if self.count >= self.limit:
            return
        self.count += len(states)
        self.total += states.sum(0)
        self.total_sq += (states**2).sum(0)
        mean = self.total / self.count
        std = np.sqrt(np.maximum(self.total_sq / self.count - mean**2, 0.0))
        self.mean.copy_(torch.as_tensor(mean))
        self.std.copy_(torch.as_tensor(np.maximum(std, 1e-5)))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return (states - self.mean) / self.std


def mlp(normalizer: Normalizer, inputs: int, outputs: int, hidden: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = [normalizer]
    for size in hidden:
        layers += [nn.Linear(inputs, size), nn.ReLU()]
        inputs = size
    return nn.Sequential(*layers, nn.Linear(inputs, outputs))


class Buffer:
    """FIFO storage of ``capacity`` rows, each one step of every env (``[rows, envs, ...]``)."""

    def __init__(self, capacity: int, envs: int, obs_size: int, act_size: int) -> None:
        self.obs = np.zeros((capacity, envs, obs_size), np.float32)
        self.next_obs = np.zeros((capacity, envs, obs_size), np.float32)
        self.action = np.zeros((capacity, envs, act_size), np.float32)
        self.reward = np.zeros((capacity, envs), np.float32)
        self.terminated = np.zeros((capacity, envs), bool)
        self.done = np.zeros((capacity, envs), bool)
        self.capacity, self.size, self.next = capacity, 0, 0

    def add(self, obs, next_obs, action, reward, terminated, done) -> None:
        row = self.next
        self.obs[row], self.next_obs[row], self.action[row] = obs, next_obs, action
        self.reward[row], self.terminated[row], self.done[row] = reward, terminated, done
        self.next = (row + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def ordered(self, array: np.ndarray) -> np.ndarray:
        """The stored rows, oldest first."""
        if self.size < self.capacity:
            return array[: self.size]
        return np.concatenate([array[self.next:], array[: self.next]])


def td_lambda_returns(buffer: Buffer, critic: nn.Module, value_scale: float, gamma: float, lam: float) -> tuple:
    """(states, actions, returns, values) of the stored steps, flattened; returns over stored trajectories."""
    obs, next_obs = buffer.ordered(buffer.obs), buffer.ordered(buffer.next_obs)
    with torch.no_grad():
        value = value_scale * critic(torch.from_numpy(obs.reshape(-1, obs.shape[-1]))).squeeze(-1)
        next_value = value_scale * critic(torch.from_numpy(next_obs.reshape(-1, obs.shape[-1]))).squeeze(-1)
    rows, envs = obs.shape[:2]
    value, next_value = value.numpy().reshape(rows, envs), next_value.numpy().reshape(rows, envs)
    reward, terminated, done = (buffer.ordered(a) for a in (buffer.reward, buffer.terminated, buffer.done))
    returns = np.zeros((rows, envs), np.float32)
    following = next_value[-1]  # the newest step bootstraps
    for t in range(rows - 1, -1, -1):
        bootstrap = np.where(done[t] | (t == rows - 1), next_value[t], (1 - lam) * next_value[t] + lam * following)
        returns[t] = reward[t] + gamma * (~terminated[t]) * bootstrap
        following = returns[t]
    action = buffer.ordered(buffer.action)
    return (torch.from_numpy(obs.reshape(rows * envs, -1)), torch.from_numpy(action.reshape(rows * envs, -1)),
            torch.from_numpy(returns.reshape(-1)), torch.from_numpy(value.reshape(-1)))


def evaluate(env_id: str, actor: nn.Module, episodes: int, seed: int) -> float:
    """Mean return of each env's first deterministic episode, ``episodes`` envs side by side."""
    envs = gym.vector.SyncVectorEnv([lambda: gym.make(env_id) for _ in range(episodes)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    obs, _ = envs.reset(seed=seed)
    returns, finished = np.zeros(episodes), np.zeros(episodes, bool)
    while not finished.all():
        with torch.no_grad():
            action = actor(torch.as_tensor(obs, dtype=torch.float32)).numpy()
        obs, reward, terminated, truncated, _ = envs.step(action)
        returns += reward * ~finished
        finished |= terminated | truncated
    envs.close()
    return float(returns.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--frames", type=int, default=2048, help="env steps per iteration")
    parser.add_argument("--envs", type=int, default=8)
    parser.add_argument("--actor-lr", type=float, default=5e-5)
    parser.add_argument("--action-std", type=float, default=0.4)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    gamma, lam, value_scale, temperature, max_weight, bound_penalty = 0.99, 0.95, 100.0, 1.0, 20.0, 10.0

    envs = gym.vector.SyncVectorEnv([lambda: gym.make(args.env) for _ in range(args.envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    obs_size, act_size = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    normalizer = Normalizer(obs_size, 300_000)
    actor, critic = mlp(normalizer, obs_size, act_size, [128, 64]), mlp(normalizer, obs_size, 1, [128, 64])
    nn.init.uniform_(actor[-1].weight, -0.01, 0.01)
    nn.init.zeros_(actor[-1].bias)
    actor_optimizer = torch.optim.SGD(actor.parameters(), lr=args.actor_lr, momentum=0.9)
    critic_optimizer = torch.optim.SGD(critic.parameters(), lr=0.01, momentum=0.9)
    buffer = Buffer(50_000 // args.envs, args.envs, obs_size, act_size)
    obs, _ = envs.reset(seed=args.seed)
    env_steps = 0

    for iteration in range(1, args.iterations + 1):
        collected = []
        for _ in range(args.frames // args.envs):  # 1. collect with the stochastic policy
            with torch.no_grad():
                mean = actor(torch.as_tensor(obs, dtype=torch.float32))
                action = (mean + args.action_std * torch.randn_like(mean)).numpy()
            next_obs, reward, terminated, truncated, info = envs.step(action)
            done = terminated | truncated
            true_next = next_obs.copy()
            if done.any():
                true_next[done] = np.stack(info["final_obs"][done])
            buffer.add(obs, true_next, action, reward, terminated, done)
            collected.append(obs)
            obs = next_obs
        env_steps += args.frames
        normalizer.record(np.concatenate(collected).astype(np.float64))

        states, actions, returns, _ = td_lambda_returns(buffer, critic, value_scale, gamma, lam)  # 2. returns
        for _ in range(200):  # 3. value phase
            index = torch.randint(len(states), (256,))
            loss = 0.5 * (critic(states[index]).squeeze(-1) - returns[index] / value_scale).pow(2).mean()
            critic_optimizer.zero_grad()
            loss.backward()
            critic_optimizer.step()

        states, actions, returns, values = td_lambda_returns(buffer, critic, value_scale, gamma, lam)  # 4. weights
        advantage = returns - values
        advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-5)
        weight = torch.exp(advantage / temperature).clamp(max=max_weight)
        for _ in range(1000):  # 5. policy phase
            index = torch.randint(len(states), (256,))
            mean = actor(states[index])
            log_prob = torch.distributions.Normal(mean, args.action_std).log_prob(actions[index]).sum(-1)
            excursion = mean - mean.clamp(-1.0, 1.0)
            loss = -(weight[index] * log_prob).mean() + bound_penalty * (0.5 * excursion.pow(2).sum(-1)).mean()
            actor_optimizer.zero_grad()
            loss.backward()
            actor_optimizer.step()

        if iteration % args.eval_every == 0:  # 6. evaluate the deterministic policy
            eval_return = evaluate(args.env, actor, args.eval_episodes, args.seed + 500)
            print(f"iteration {iteration}  env steps {env_steps}  eval return {eval_return:.1f}  "
                  f"wall-clock {time.time() - START:.1f} s", flush=True)
    envs.close()
    print(f"wall-clock seconds from process start: {time.time() - START:.2f}", flush=True)


if __name__ == "__main__":
    main()
