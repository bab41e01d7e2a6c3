"""The AWR actor loss inside other algorithms: TorchRL's IQL (offline) and TorchRL's GAE (on-policy).

Pinned: with IQL's advantages, ``temperature = 1 / beta`` and ``max_weight = 100``, ``AWRLoss.actor_loss`` is
``IQLLoss.actor_loss`` on the same batch; the examples' update steps train their networks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tensordict import TensorDict
from torchrl.objectives import SoftUpdate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from gae_awr import OnPolicySettings, make_loss, train_on_batch  # examples/ is a folder of scripts
from iql_awr import IQLSettings, iql_advantage, make_losses, q_network, update

from awr_modules.collector import make_collector
from awr_recipes.classic_control import ClassicControl


def _pendulum_networks(envs: int = 1):
    env = ClassicControl("Pendulum-v1").make_env(0, envs)
    actor, critic = ClassicControl("Pendulum-v1").make_networks(env)
    return env, actor, critic


def _offline_batch(size: int = 64) -> TensorDict:
    observation = torch.randn(size, 3)
    return TensorDict({"observation": observation, "action": torch.rand(size, 1) * 2 - 1,
                       "next": {"observation": observation + 0.1 * torch.randn(size, 3), "reward": torch.randn(size, 1),
                                "done": torch.zeros(size, 1, dtype=torch.bool),
                                "terminated": torch.zeros(size, 1, dtype=torch.bool)}}, [size])


def test_awr_actor_loss_on_iql_advantages_is_iqls_own_actor_loss():
    _, actor, critic = _pendulum_networks()
    iql, awr = make_losses(actor, critic, q_network(3, 1), IQLSettings(beta=3.0))
    batch = _offline_batch()
    advantage, min_q = iql_advantage(iql, batch)
    assert advantage.abs().max() > 0
    expected, _ = iql.actor_loss(batch.clone())
    ours = awr.actor_loss(batch.clone().set("advantage", advantage.unsqueeze(-1))
                          .set("value_target", min_q.unsqueeze(-1)))["loss_actor"]
    torch.testing.assert_close(ours, expected)


def test_an_iql_step_with_the_awr_policy_step_trains_q_v_and_the_actor():
    _, actor, critic = _pendulum_networks()
    settings = IQLSettings(batch_size=64)
    q_value = q_network(3, 1)
    iql, awr = make_losses(actor, critic, q_value, settings)
    optimizers = {"q": torch.optim.Adam(iql.qvalue_network_params.values(True, True), lr=1e-2),
                  "value": torch.optim.Adam(iql.value_network_params.values(True, True), lr=1e-2),
                  "actor": torch.optim.Adam(actor.parameters(), lr=1e-2)}
    before = {name: [p.detach().clone() for p in params] for name, params in (
        ("q", iql.qvalue_network_params.values(True, True)), ("value", iql.value_network_params.values(True, True)),
        ("actor", actor.parameters()))}
    losses = update(iql, awr, _offline_batch(), optimizers, SoftUpdate(iql, tau=0.005))
    assert all(torch.isfinite(torch.tensor(value)) for value in losses.values())
    after = {"q": iql.qvalue_network_params.values(True, True), "value": iql.value_network_params.values(True, True),
             "actor": actor.parameters()}
    for name, params in after.items():
        assert any(not torch.equal(old, new) for old, new in zip(before[name], params)), name
    shared = {tensor.data_ptr() for tensor in iql.actor_network_params.values(True, True)}
    assert all(p.data_ptr() in shared for p in actor.parameters())  # IQL reads the actor the AWR step trained


def test_awr_steps_on_a_gae_batch_train_actor_and_critic():
    settings = OnPolicySettings(frames_per_batch=64, envs=2, epochs=1, minibatch=32)
    env, actor, critic = _pendulum_networks(settings.envs)
    loss, gae = make_loss(actor, critic, settings)
    optimizer = torch.optim.Adam([*actor.parameters(), *critic.parameters()], lr=1e-2)
    collector = make_collector(env, actor, frames_per_batch=settings.frames_per_batch, total_frames=-1)
    batch = next(iter(collector))
    collector.shutdown()
    before = [p.detach().clone() for p in [*actor.parameters(), *critic.parameters()]]
    losses = train_on_batch(batch, loss, gae, optimizer, settings)
    assert batch.shape == (2, 32) and "advantage" in batch and "value_target" in batch
    assert all(torch.isfinite(torch.tensor(value)) for value in losses.values())
    assert all(not torch.equal(old, new) for old, new in zip(before, [*actor.parameters(), *critic.parameters()]))
