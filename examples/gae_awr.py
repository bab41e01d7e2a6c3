"""``AWRLoss`` on an on-policy batch with TorchRL's GAE: advantage-weighted regression without a buffer.

Each iteration collects a batch ``[envs, T]`` with TorchRL's collector, lets TorchRL's ``GAE`` write
``advantage`` and ``value_target`` along its trajectories, and takes minibatch steps on ``AWRLoss``: the
actor regresses the batch's actions with weights ``exp(A / beta)`` (advantages standardised per
minibatch), the critic regresses GAE's targets. A drop-in for a PPO-style loop's loss.

    python examples/gae_awr.py --iterations 20
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from tensordict import TensorDictBase
from torchrl.envs import ExplorationType, set_exploration_type
from torchrl.objectives.value import GAE

from awr_modules import AWRLoss
from awr_modules.collector import make_collector
from awr_recipes.classic_control import ClassicControl


@dataclass
class OnPolicySettings:
    frames_per_batch: int = 2048
    envs: int = 8
    epochs: int = 4  # passes over each batch
    minibatch: int = 256
    gamma: float = 0.99
    lmbda: float = 0.95
    temperature: float = 1.0
    lr: float = 3e-4
    value_scale: float = 100.0  # the critic predicts V / 100 and the loss divides the error by 100 (1 / (1 - gamma))


def make_loss(actor: torch.nn.Module, critic: torch.nn.Module, settings: OnPolicySettings) -> tuple[AWRLoss, GAE]:
    """The AWR loss (advantages standardised per minibatch) and TorchRL's GAE over the same critic."""
    loss = AWRLoss(actor, critic, temperature=settings.temperature, normalize_advantage=True,
                   value_scale=settings.value_scale, functional=False)
    gae = GAE(gamma=settings.gamma, lmbda=settings.lmbda, value_network=critic, average_gae=False)
    return loss, gae


def train_on_batch(batch: TensorDictBase, loss: AWRLoss, gae: GAE, optimizer: torch.optim.Optimizer,
                   settings: OnPolicySettings) -> dict[str, float]:
    """GAE over the batch's trajectories, then ``epochs`` passes of shuffled minibatches of AWR steps."""
    with torch.no_grad():
        gae(batch)  # writes advantage and value_target along each env's steps [envs, T]
    flat = batch.reshape(-1)
    for _ in range(settings.epochs):
        for index in torch.randperm(flat.shape[0]).split(settings.minibatch):
            out = loss(flat[index])
            optimizer.zero_grad()
            (out["loss_actor"] + out["loss_value"]).backward()
            optimizer.step()
    return {"loss_actor": out["loss_actor"].item(), "loss_value": out["loss_value"].item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    settings = OnPolicySettings()
    recipe = ClassicControl("Pendulum-v1")
    env = recipe.make_env(0, settings.envs)
    actor, critic = recipe.make_networks(env, value_scale=settings.value_scale)
    statistics = recipe.observation_statistics(actor, critic)
    loss, gae = make_loss(actor, critic, settings)
    optimizer = torch.optim.Adam([*actor.parameters(), *critic.parameters()], lr=settings.lr)
    collector = make_collector(env, actor, frames_per_batch=settings.frames_per_batch, total_frames=-1)
    batches = iter(collector)
    for iteration in range(1, args.iterations + 1):
        with set_exploration_type(ExplorationType.RANDOM):
            batch = next(batches)
        statistics.update(batch, iteration * settings.frames_per_batch)
        losses = train_on_batch(batch, loss, gae, optimizer, settings)
        done = batch["next", "done"]
        returns = batch["next", "episode_reward"][done]
        mean = f"{returns.mean().item():.1f}" if returns.numel() else "-"
        print(f"iteration {iteration}: return {mean}, " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items()))
    collector.shutdown()


if __name__ == "__main__":
    main()
