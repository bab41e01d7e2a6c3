"""``AWRLoss`` as the policy step of TorchRL's IQL, trained offline on a Minari dataset.

Implicit Q-Learning (Kostrikov et al., 2021) learns ``Q(s, a)`` and an expectile ``V(s)`` from the
dataset alone, then extracts a policy by advantage-weighted regression on ``A = min_i Q_i(s, a) - V(s)``:
exactly AWR's actor objective with IQL's advantages. Here TorchRL's ``IQLLoss`` trains the Q and V
networks (its ``qvalue_loss`` and ``value_loss``, target Q by ``SoftUpdate``), and ``AWRLoss.actor_loss``
takes the policy step on the advantages those networks give. With ``temperature = 1 / beta`` and
``max_weight = 100`` it is IQL's own actor loss, term for term (``tests/test_examples.py`` checks it).

    python examples/iql_awr.py --steps 2000                       # writes a random Pendulum dataset first
    python examples/iql_awr.py --dataset pendulum/medium-v0 --steps 20000
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass

import torch
from tensordict import TensorDictBase
from torch import nn
from torchrl.data import LazyTensorStorage, TensorDictReplayBuffer
from torchrl.modules import MLP, ValueOperator
from torchrl.objectives import IQLLoss, SoftUpdate

from awr_modules import AWRLoss
from awr_modules.offline_data import read_minari_dataset
from awr_recipes.classic_control import ClassicControl


@dataclass
class IQLSettings:
    """IQL's usual MuJoCo settings, scaled to a quick run."""

    gamma: float = 0.99
    expectile: float = 0.7
    beta: float = 3.0  # IQL's inverse temperature: weights exp(beta * A)
    batch_size: int = 256
    lr: float = 3e-4
    tau: float = 0.005  # target Q soft update


def q_network(observation_size: int, action_size: int) -> ValueOperator:
    """``Q(s, a)``: an MLP over the state and the action in the actor's units."""
    mlp = MLP(in_features=observation_size + action_size, out_features=1, num_cells=[64, 64], activation_class=nn.ReLU)
    return ValueOperator(mlp, in_keys=["observation", "action"], out_keys=["state_action_value"])


def make_losses(actor: nn.Module, critic: ValueOperator, q_value: ValueOperator,
                settings: IQLSettings) -> tuple[IQLLoss, AWRLoss]:
    """TorchRL's IQL for the Q and V networks, and the AWR loss that shares its actor and V network."""
    iql = IQLLoss(actor, q_value, critic, expectile=settings.expectile, temperature=settings.beta)
    iql.make_value_estimator(gamma=settings.gamma)
    awr = AWRLoss(actor, critic, temperature=1.0 / settings.beta, max_weight=100.0, action_bound_penalty=0.0,
                  functional=False)
    return iql, awr


@torch.no_grad()
def iql_advantage(iql: IQLLoss, batch: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = min_i Q_i(s, a) - V(s)`` with IQL's target Q networks and current V, and ``min_i Q_i(s, a)``."""
    states = batch.select(*iql.qvalue_network.in_keys).copy()
    q_values = []
    for params in iql.target_qvalue_network_params.unbind(0):
        with params.to_module(iql.qvalue_network):
            q_values.append(iql.qvalue_network(states.copy())["state_action_value"])
    min_q = torch.stack(q_values).min(0).values.squeeze(-1)
    with iql.value_network_params.to_module(iql.value_network):
        value = iql.value_network(batch.select(*iql.value_network.in_keys).copy())["state_value"].squeeze(-1)
    return min_q - value, min_q


def update(iql: IQLLoss, awr: AWRLoss, batch: TensorDictBase, optimizers: dict[str, torch.optim.Optimizer],
           target: SoftUpdate) -> dict[str, float]:
    """One IQL step: Q and V by TorchRL's IQL, the policy by AWR on IQL's advantages."""
    losses = {"q": iql.qvalue_loss(batch)[0], "value": iql.value_loss(batch)[0]}
    advantage, min_q = iql_advantage(iql, batch)
    batch.set("advantage", advantage.unsqueeze(-1))
    batch.set("value_target", min_q.unsqueeze(-1))
    losses["actor"] = awr.actor_loss(batch)["loss_actor"]
    for name, optimizer in optimizers.items():
        optimizer.zero_grad()
        losses[name].backward()
        optimizer.step()
    target.step()
    return {name: loss.item() for name, loss in losses.items()}


def dataset_buffer(dataset_id: str, recipe: ClassicControl, batch_size: int) -> TensorDictReplayBuffer:
    """The dataset's transitions, actions in the actor's units, in a TorchRL buffer sampling minibatches."""
    env = recipe.make_env(0)
    rows, identity = read_minari_dataset(
        dataset_id, env_id=recipe.env_id, observation_shape=tuple(env.observation_spec["observation"].shape),
        action_shape=tuple(env.action_spec.shape))
    env.close()
    rows.set("action", recipe.policy_actions(rows["action"]))
    buffer = TensorDictReplayBuffer(storage=LazyTensorStorage(identity.transitions), batch_size=batch_size)
    buffer.extend(rows)
    return buffer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=None, help="a local Minari dataset of Pendulum-v1 (default: write one)")
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    torch.manual_seed(0)
    recipe = ClassicControl("Pendulum-v1")
    dataset_id = args.dataset
    if dataset_id is None:  # a throwaway random dataset, written where MINARI_DATASETS_PATH points
        import os

        import gymnasium as gym

        from awr_modules.dataset_writer import random_policy, write_policy_dataset

        os.environ.setdefault("MINARI_DATASETS_PATH", tempfile.mkdtemp())
        env = gym.make(recipe.env_id)
        dataset_id = "pendulum/random-v0"
        write_policy_dataset(dataset_id, env, random_policy(env.action_space), episodes=20, overwrite=True)
    settings = IQLSettings()
    env = recipe.make_env(0)
    actor, critic = recipe.make_networks(env)
    q_value = q_network(env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1])
    iql, awr = make_losses(actor, critic, q_value, settings)
    optimizers = {"q": torch.optim.Adam(iql.qvalue_network_params.values(True, True), lr=settings.lr),
                  "value": torch.optim.Adam(iql.value_network_params.values(True, True), lr=settings.lr),
                  "actor": torch.optim.Adam(actor.parameters(), lr=settings.lr)}
    target = SoftUpdate(iql, tau=settings.tau)
    buffer = dataset_buffer(dataset_id, recipe, settings.batch_size)
    for step in range(1, args.steps + 1):
        losses = update(iql, awr, buffer.sample(), optimizers, target)
        if step % max(args.steps // 10, 1) == 0:
            print(f"step {step}: " + ", ".join(f"loss_{name} {value:.3f}" for name, value in losses.items()))


if __name__ == "__main__":
    main()
