"""A short AWR run on Pendulum-v1 from stock TorchRL parts and :mod:`awr_modules`, without Lightning.

The env (``GymEnv`` + ``DoubleToFloat`` + normalisation) and networks (``ProbabilisticActor``,
``ValueOperator``) come from the classic-control recipe; the loop is written out.

Each iteration follows the paper: collect with the stochastic policy, extend
the FIFO buffer, refresh TD(lambda) targets over the stored trajectories, fit
the critic, refresh advantages with the new critic, then take advantage-
weighted regression steps on the actor. Prints the mean return of the episodes
finished in each iteration.

    python examples/pendulum_loop.py --iterations 10
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from tensordict import TensorDictBase

from awr_modules import AWRLoss, make_replay_buffer, refresh_value_targets
from awr_modules.collector import make_collector
from awr_recipes.classic_control import ClassicControl


@dataclass
class DemoSettings:
    """Sizes of the demo; defaults are the reference's where they apply (AWR.md)."""

    iterations: int = 10
    frames_per_batch: int = 2048  # samples_per_iter
    buffer_size: int = 50_000
    critic_steps: int = 200
    actor_steps: int = 1000
    batch_size: int = 256
    gamma: float = 0.99
    lmbda: float = 0.95
    temperature: float = 1.0
    max_weight: float = 20.0
    action_bound_penalty: float = 10.0
    actor_lr: float = 1e-4
    critic_lr: float = 1e-3
    seed: int = 0


def train(settings: DemoSettings) -> list[dict[str, float]]:
    """Run ``settings.iterations`` AWR iterations; return per-iteration returns and losses."""
    torch.manual_seed(settings.seed)
    recipe = ClassicControl("Pendulum-v1")
    env = recipe.make_env(settings.seed)
    value_scale = 1.0 / (1.0 - settings.gamma)
    actor, critic = recipe.make_networks(env, value_scale)
    statistics = recipe.observation_statistics(actor, critic)  # the networks' state normaliser, fed below
    loss = AWRLoss(actor, critic, temperature=settings.temperature, max_weight=settings.max_weight,
                   value_scale=value_scale, action_bound_penalty=settings.action_bound_penalty)
    loss.make_value_estimator(gamma=settings.gamma, lmbda=settings.lmbda)
    actor_optim = torch.optim.Adam(loss.actor_network_params.values(True, True), lr=settings.actor_lr)
    critic_optim = torch.optim.Adam(loss.critic_network_params.values(True, True), lr=settings.critic_lr)
    buffer = make_replay_buffer(settings.buffer_size, prioritized=False, batch_size=settings.batch_size)
    collector = make_collector(env, actor, frames_per_batch=settings.frames_per_batch,
                               total_frames=settings.iterations * settings.frames_per_batch)
    history = []
    for iteration, batch in enumerate(collector):
        episode_returns = batch["next", "episode_reward"][batch["next", "done"]]
        statistics.update(batch, env_steps=(iteration + 1) * settings.frames_per_batch)
        buffer.extend(batch.reshape(-1))
        refresh_value_targets(buffer, loss.value_estimator)
        for _ in range(settings.critic_steps):
            value_out = loss.value_loss(buffer.sample())
            _step(critic_optim, value_out["loss_value"])
        refresh_value_targets(buffer, loss.value_estimator, normalize_advantage=True)
        for _ in range(settings.actor_steps):
            out = loss.actor_loss(buffer.sample())
            _step(actor_optim, out["loss_actor"])
        collector.update_policy_weights_()
        record = _record(iteration, episode_returns, out.update(value_out))
        history.append(record)
        print(", ".join(f"{k} {v:.3g}" for k, v in record.items()), flush=True)
    collector.shutdown()
    return history


def _step(optimizer: torch.optim.Optimizer, objective: torch.Tensor) -> None:
    optimizer.zero_grad()
    objective.backward()
    optimizer.step()


def _record(iteration: int, episode_returns: torch.Tensor, out: TensorDictBase) -> dict[str, float]:
    mean_return = episode_returns.mean().item() if episode_returns.numel() else float("nan")
    return {"iteration": iteration, "train_return": mean_return, "loss_actor": out["loss_actor"].item(),
            "loss_value": out["loss_value"].item(), "weight_ess": out["weight_ess"].item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in vars(DemoSettings()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    settings = DemoSettings(**vars(parser.parse_args()))
    torch.set_num_threads(1)
    train(settings)


if __name__ == "__main__":
    main()
