"""The examples: the AWR loop without Lightning, and the AWR actor loss inside TorchRL's IQL (offline) and after
TorchRL's GAE (on-policy).

Pinned: with IQL's advantages, ``temperature = 1 / beta`` and ``max_weight = 100``, ``AWRLoss.actor_loss`` is
``IQLLoss.actor_loss`` on the same batch; each example's update equals the same update worked out by hand from
the same seed, starting networks and batch: the targets and losses written out (TD(lambda) and GAE's recursions,
smooth-L1 Q regression, expectile V regression, standardised advantages and clipped weights) and Adam's steps
written out.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import td_lambda_reference
from tensordict import TensorDict
from torchrl.envs import ExplorationType, set_exploration_type
from torchrl.objectives import SoftUpdate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from gae_awr import OnPolicySettings, make_loss, train_on_batch  # examples/ is a folder of scripts
from iql_awr import IQLSettings, iql_advantage, make_losses, q_network, update
from pendulum_loop import DemoSettings, train

from awr_modules.collector import make_collector
from awr_recipes.classic_control import ClassicControl

ACTION_STD = 0.4  # the recipe's fixed std in the actor's units
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults


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


class HandAdam:
    """Adam written out: ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``p -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``."""

    def __init__(self, parameters: list[torch.Tensor], lr: float) -> None:
        self.parameters, self.lr, self.t = parameters, lr, 0
        self.m = [torch.zeros_like(p) for p in parameters]
        self.v = [torch.zeros_like(p) for p in parameters]

    @torch.no_grad()
    def step(self, gradients: list[torch.Tensor]) -> None:
        (b1, b2), self.t = ADAM_BETAS, self.t + 1
        for p, g, m, v in zip(self.parameters, gradients, self.m, self.v, strict=True):
            m.mul_(b1).add_((1 - b1) * g)
            v.mul_(b2).add_((1 - b2) * g * g)
            p.sub_(self.lr * (m / (1 - b1**self.t)) / ((v / (1 - b2**self.t)).sqrt() + ADAM_EPS))


def _assert_same_adam_result(got: torch.Tensor, expected: torch.Tensor, gradients: list[torch.Tensor], lr: float,
                             name: str) -> None:
    """Parameters after the same Adam steps: everywhere within ``lr`` per step (Adam's bound), and to float rounding
    where a step's gradient is clear of ``eps`` (where ``|g|`` is near ``eps``, ``g / (|g| + eps)`` turns on the
    rounding of ``g``)."""
    torch.testing.assert_close(got, expected, rtol=0, atol=lr * len(gradients), msg=name)
    settled = torch.stack([g.abs() for g in gradients]).amax(0) > 1e-5
    torch.testing.assert_close(got[settled], expected[settled], rtol=1e-5, atol=1e-6, msg=name)


def _gaussian_log_prob(action: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
    """``log N(a; loc, 0.4^2)`` summed over the action's dimensions."""
    return (-0.5 * ((action - loc) / ACTION_STD) ** 2 - torch.log(torch.tensor(ACTION_STD))
            - 0.5 * torch.log(torch.tensor(2 * torch.pi))).sum(-1)


def _loc(actor, observation: torch.Tensor) -> torch.Tensor:
    return actor.module[0](TensorDict({"observation": observation}, observation.shape[:-1]))["loc"]


def _value(critic, observation: torch.Tensor) -> torch.Tensor:
    return critic(TensorDict({"observation": observation}, observation.shape[:-1]))["state_value"].squeeze(-1)


def _q_by_hand(params: TensorDict, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """The example's Q network, ``Linear(4, 64) - ReLU - Linear(64, 64) - ReLU - Linear(64, 1)`` on ``[s, a]``,
    with one of IQL's parameter sets."""
    def layer(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ params["module", name, "weight"].T + params["module", name, "bias"]

    hidden = torch.relu(layer(torch.cat([observation, action], -1), "0"))
    return layer(torch.relu(layer(hidden, "2")), "4").squeeze(-1)


def _smooth_l1(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.abs() < 1, 0.5 * x**2, x.abs() - 0.5)


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


def test_an_iql_step_with_the_awr_policy_step_is_the_step_worked_out_by_hand():
    """``update``: Q by IQL's smooth-L1 regression on ``r + gamma V(s')`` (two Q networks), V by the expectile
    regression on the target Qs' minimum, the actor by AWR on ``A = min Q_target - V`` with weights
    ``min(exp(beta A), 100)``; one Adam step each; then the target Qs move ``tau`` of the way."""
    _, actor, critic = _pendulum_networks()
    settings = IQLSettings(batch_size=64)
    iql, awr = make_losses(actor, critic, q_network(3, 1), settings)
    lr = 1e-2
    optimizers = {"q": torch.optim.Adam(iql.qvalue_network_params.values(True, True), lr=lr),
                  "value": torch.optim.Adam(iql.value_network_params.values(True, True), lr=lr),
                  "actor": torch.optim.Adam(actor.parameters(), lr=lr)}
    batch = _offline_batch()
    shared = {tensor.data_ptr() for tensor in iql.actor_network_params.values(True, True)}
    assert all(p.data_ptr() in shared for p in actor.parameters())  # IQL reads the actor the AWR step trains

    # by hand, from copies of the starting networks
    q_start = iql.qvalue_network_params.data.clone()  # [2, ...]: IQL's two Q networks
    q_target_start = iql.target_qvalue_network_params.data.clone()
    hand_actor, hand_critic = copy.deepcopy(actor), copy.deepcopy(critic)
    actor_start, critic_start = ([p.detach().clone() for p in net.parameters()] for net in (actor, critic))
    observation, action = batch["observation"], batch["action"]
    reward, next_observation = batch["next", "reward"].squeeze(-1), batch["next", "observation"]
    with torch.no_grad():
        q_target = reward + settings.gamma * _value(hand_critic, next_observation)  # not terminated
        min_q_target = torch.minimum(*(_q_by_hand(q_target_start[i], observation, action) for i in range(2)))
        advantage = min_q_target - _value(hand_critic, observation)
        weight = torch.exp(settings.beta * advantage).clamp(max=100.0)

    q_leaves = q_start.clone().apply(lambda x: x.requires_grad_())
    q_loss = sum(_smooth_l1(_q_by_hand(q_leaves[i], observation, action) - q_target) for i in range(2)).mean()
    q_gradients = torch.autograd.grad(q_loss, list(q_leaves.values(True, True)))
    diff = min_q_target - _value(hand_critic, observation)
    value_loss = (torch.where(diff > 0, settings.expectile, 1 - settings.expectile) * diff**2).mean()
    value_gradients = torch.autograd.grad(value_loss, list(hand_critic.parameters()))
    actor_loss = -(weight * _gaussian_log_prob(action, _loc(hand_actor, observation))).mean()
    actor_gradients = torch.autograd.grad(actor_loss, list(hand_actor.parameters()))
    q_leaves = q_leaves.detach()
    for leaves, gradients in ((list(q_leaves.values(True, True)), q_gradients),
                              (list(hand_critic.parameters()), value_gradients),
                              (list(hand_actor.parameters()), actor_gradients)):
        HandAdam(leaves, lr).step(gradients)

    losses = update(iql, awr, batch, optimizers, SoftUpdate(iql, tau=settings.tau))
    assert losses.keys() == {"q", "value", "actor"}
    for name, expected in (("q", q_loss), ("value", value_loss), ("actor", actor_loss)):
        torch.testing.assert_close(torch.tensor(losses[name]), expected.detach(), rtol=1e-5, atol=1e-6, msg=name)
    q_keys = list(q_start.keys(True, True))
    for network_name, named, hand, gradients in (
            ("q", [(key, iql.qvalue_network_params[key]) for key in q_keys], [q_leaves[key] for key in q_keys],
             q_gradients),
            ("value", list(critic.named_parameters()), list(hand_critic.parameters()), value_gradients),
            ("actor", list(actor.named_parameters()), list(hand_actor.parameters()), actor_gradients)):
        for (name, got), expected, gradient in zip(named, hand, gradients, strict=True):
            torch.testing.assert_close(got.grad, gradient, rtol=1e-4, atol=1e-7, msg=f"{network_name} {name}")
            _assert_same_adam_result(got.data, expected, [gradient], lr, f"{network_name} {name}")
    for key in q_keys:  # the target Qs moved tau of the way to the stepped Qs
        moved = iql.target_qvalue_network_params[key].data - q_target_start[key]
        torch.testing.assert_close(moved, settings.tau * (iql.qvalue_network_params[key].data - q_target_start[key]),
                                   rtol=1e-3, atol=1e-8, msg=str(key))
    moved = [not torch.equal(got, before) for got, before in zip(
        [*critic.parameters(), *actor.parameters(), *q_leaves.values(True, True)],
        [*critic_start, *actor_start, *q_start.values(True, True)], strict=True)]
    assert all(moved)


def test_awr_steps_on_a_gae_batch_are_the_steps_worked_out_by_hand():
    """``train_on_batch``: GAE's ``A_t = delta_t + gamma lambda A_{t+1}`` along each env's 32 steps (the batch's end
    bootstraps), then two shuffled minibatches of 32, each one Adam step on ``loss_actor + loss_value`` with
    advantages standardised over the minibatch and weights ``min(exp(A / 0.25), 20)``."""
    settings = OnPolicySettings(frames_per_batch=64, envs=2, epochs=1, minibatch=32, temperature=0.25)
    env, actor, critic = _pendulum_networks(settings.envs)
    loss, gae = make_loss(actor, critic, settings)
    optimizer = torch.optim.Adam([*actor.parameters(), *critic.parameters()], lr=settings.lr)
    collector = make_collector(env, actor, frames_per_batch=settings.frames_per_batch, total_frames=-1)
    batch = next(iter(collector))
    collector.shutdown()
    assert batch.shape == (2, 32) and not batch["next", "done"].any()  # Pendulum's episodes last 200 steps

    hand_actor, hand_critic = copy.deepcopy(actor), copy.deepcopy(critic)
    with torch.no_grad():
        value, next_value = _value(hand_critic, batch["observation"]), _value(hand_critic, batch["next", "observation"])
    delta = batch["next", "reward"].squeeze(-1) + settings.gamma * next_value - value
    advantage = torch.zeros_like(delta)
    following = torch.zeros(2)
    for t in reversed(range(32)):
        following = delta[:, t] + settings.gamma * settings.lmbda * following
        advantage[:, t] = following
    value_target = advantage + value

    torch.manual_seed(7)
    minibatches = torch.randperm(64).split(32)
    parameters = [*hand_actor.parameters(), *hand_critic.parameters()]
    adam = HandAdam(parameters, settings.lr)
    flat = {"observation": batch["observation"].reshape(64, 3), "action": batch["action"].reshape(64, 1),
            "advantage": advantage.reshape(64), "value_target": value_target.reshape(64)}
    step_gradients, clipped = [], 0
    for index in minibatches:
        a = flat["advantage"][index]
        weight = torch.exp((a - a.mean()) / (a.std() + 1e-5) / settings.temperature).clamp(max=20.0)
        actor_loss = -(weight * _gaussian_log_prob(flat["action"][index],
                                                   _loc(hand_actor, flat["observation"][index]))).mean()
        value_error = (_value(hand_critic, flat["observation"][index]) - flat["value_target"][index])
        value_loss = (0.5 * (value_error / settings.value_scale) ** 2).mean()
        step_gradients.append(torch.autograd.grad(actor_loss + value_loss, parameters))
        adam.step(step_gradients[-1])
        clipped += int((weight == 20.0).sum())

    assert 0 < clipped < 64  # the weight clip is exercised, and not on every sample

    torch.manual_seed(7)
    losses = train_on_batch(batch, loss, gae, optimizer, settings)
    torch.testing.assert_close(batch["advantage"].squeeze(-1), advantage, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch["value_target"].squeeze(-1), value_target, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(losses["loss_actor"]), actor_loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(losses["loss_value"]), value_loss.detach(), rtol=1e-5, atol=1e-7)
    named = [*actor.named_parameters(), *critic.named_parameters()]
    for (name, got), expected, *gradients in zip(named, parameters, *step_gradients, strict=True):
        torch.testing.assert_close(got.grad, gradients[-1], rtol=1e-4, atol=1e-7, msg=name)  # the last minibatch's
        _assert_same_adam_result(got.data, expected, gradients, settings.lr, name)


def test_the_example_loop_is_one_awr_iteration_worked_out_by_hand():
    """``examples/pendulum_loop.py``'s ``train``, one iteration of 64 steps with the buffer sampled whole: collect
    with the stochastic policy, normalise states with the batch's moments, TD(lambda) over the one path (cut at the
    newest row), two critic steps, advantages from the new critic standardised over the buffer, two actor steps.
    Its record is the second step's losses and the weights' ESS, worked out here by hand from the same seed."""
    settings = DemoSettings(iterations=1, frames_per_batch=64, buffer_size=64, critic_steps=2, actor_steps=2,
                            batch_size=64)
    (record,) = train(settings)

    torch.manual_seed(settings.seed)
    recipe = ClassicControl("Pendulum-v1")
    env = recipe.make_env(settings.seed)
    value_scale = 1.0 / (1.0 - settings.gamma)
    actor, critic = recipe.make_networks(env, value_scale)  # the same starting weights as the loop's
    with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
        batch = env.rollout(settings.frames_per_batch, actor, break_when_any_done=False)  # the collector's steps
    assert not batch["next", "done"].any()
    observation, action = batch["observation"], batch["action"]
    loc, second_moment = observation.mean(0), (observation**2).mean(0)
    critic.module[0].load_statistics(loc, (second_moment - loc**2).sqrt())  # the normaliser both networks share
    reward = batch["next", "reward"].squeeze(-1).tolist()

    def returns() -> torch.Tensor:
        with torch.no_grad():
            next_value = _value(critic, batch["next", "observation"]).tolist()
        ends = [False] * (len(reward) - 1) + [True]  # one path, cut at the newest row: it bootstraps there
        return torch.tensor(td_lambda_reference(reward, next_value, ends, [False] * len(reward), settings.gamma,
                                                settings.lmbda))

    value_target = returns()
    critic_parameters = list(critic.parameters())
    adam = HandAdam(critic_parameters, settings.critic_lr)
    for _ in range(settings.critic_steps):
        value_loss = (0.5 * ((_value(critic, observation) - value_target) / value_scale) ** 2).mean()
        adam.step(torch.autograd.grad(value_loss, critic_parameters))

    value_target = returns()  # the refresh after the value phase, with the new critic
    with torch.no_grad():
        advantage = value_target - _value(critic, observation)
    advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-5)
    weight = torch.exp(advantage / settings.temperature).clamp(max=settings.max_weight)
    actor_parameters = list(actor.parameters())
    adam = HandAdam(actor_parameters, settings.actor_lr)
    for _ in range(settings.actor_steps):
        mean = _loc(actor, observation)
        outside = (mean - mean.clamp(-1.0, 1.0)).pow(2).sum(-1)  # the action bound penalty
        actor_loss = (-weight * _gaussian_log_prob(action, mean) + settings.action_bound_penalty * 0.5 * outside).mean()
        adam.step(torch.autograd.grad(actor_loss, actor_parameters))

    assert record["iteration"] == 0 and math.isnan(record["train_return"])  # no episode ended in 64 steps
    assert record["loss_value"] == pytest.approx(value_loss.item(), rel=1e-4)
    assert record["loss_actor"] == pytest.approx(actor_loss.item(), rel=1e-4)
    assert record["weight_ess"] == pytest.approx((weight.mean() ** 2 / (weight**2).mean()).item(), rel=1e-4)
