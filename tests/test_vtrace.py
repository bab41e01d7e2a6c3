"""Pins :class:`awr_modules.targets.VTrace`: V-trace value targets over the stored paths.

- the targets ``v_s`` and the advantages ``q_s - V(s)`` equal a plain-Python V-trace written from the formula, on
  stored paths with chosen ratios ``pi / mu`` (some above ``rho_bar`` / ``c_bar``, some below 1), a termination, a
  time-limit cut and the newest row;
- with ``pi = mu`` and ``rho_bar = c_bar = 1`` they equal TD(lambda=1)'s, also across chunks and buffers;
- a refresh after the actor moved recomputes the ratios but runs the critic on no stored row;
- the loss builds TorchRL's V-trace estimator with its actor, and the refusal without stored log-probs;
- ``awr fit`` with it through the CLI, a resume, and the config overlay.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import make_actor, make_critic, make_linear_critic
from lightning_helpers import FRAMES, checkpoint_dir, load_checkpoint, tiny_args
from tensordict import TensorDict
from torchrl.objectives.utils import ValueEstimators
from torchrl.objectives.value import VTrace as TorchRLVTrace

from awr_modules import AWRLoss, _torchrl_compat, make_replay_buffer
from awr_modules.data import GivenBuffers, MinariDataset
from awr_modules.execution import Eager
from awr_modules.iteration import AWRIteration
from awr_modules.phases import Phase
from awr_modules.targets import TDLambda, VTrace
from awr_modules.temperature import Fixed

REPO = Path(__file__).resolve().parent.parent
GAMMA = 0.9
WEIGHT = [1.5, -0.5, 0.25]
RHO_BAR, C_BAR = 1.2, 0.9
# rows 0-2 terminate, 3-5 are cut by a time limit, 6-7 are the newest (cut where collection stopped)
TERMINATED_AT, TRUNCATED_AT = {2}, {5}
ENDS = {2, 5, 7}
RATIOS = [2.0, 0.5, 1.5, 0.3, 3.0, 1.0, 0.8, 1.1]  # pi / mu of the stored action: truncated, below 1, between bars


def _obs(t: int) -> list[float]:
    return [math.sin(t), 0.5 * math.cos(t), 0.1 * t]


def _next_obs(t: int) -> list[float]:
    return _obs(t + 1) if t not in ENDS else [2.0 - 0.1 * t, 1.0, -0.3]


def _reward(t: int) -> float:
    return math.cos(1.3 * t) + 0.1 * t


def _value(state: list[float]) -> float:
    return sum(s * w for s, w in zip(state, WEIGHT, strict=True))


def _rows(actor, ratios: list[float] | None, steps: int = 8, log_prob: bool = True) -> TensorDict:
    """``steps`` stored transitions whose behaviour log-probs make ``pi / mu`` of each stored action ``ratios``
    (``None``: ``mu = pi``)."""
    generator = torch.Generator().manual_seed(3)
    observation = torch.tensor([_obs(t) for t in range(steps)])
    rows = TensorDict({
        "observation": observation,
        "action": torch.randn(steps, 2, generator=generator).clamp(-0.9, 0.9),
        "next": {
            "observation": torch.tensor([_next_obs(t) for t in range(steps)]),
            "reward": torch.tensor([[_reward(t)] for t in range(steps)]),
            "done": torch.tensor([[t in TERMINATED_AT | TRUNCATED_AT] for t in range(steps)]),
            "terminated": torch.tensor([[t in TERMINATED_AT] for t in range(steps)]),
        },
    }, [steps])
    if log_prob:
        with torch.no_grad():
            log_pi = actor.get_dist(rows.select("observation")).log_prob(rows["action"])
        rows["action_log_prob"] = log_pi if ratios is None else log_pi - torch.tensor(ratios).log()
    return rows


def _buffer(rows: TensorDict):
    buffer = make_replay_buffer(rows.shape[0])
    buffer.extend(rows)
    return buffer


def _loss(actor, critic) -> AWRLoss:
    return AWRLoss(actor, critic, check_inputs=False)


def _vtrace_reference(ratios: list[float], gamma: float, rho_bar: float, c_bar: float) -> tuple[list, list]:
    """``v_s = V(x_s) + sum_{t>=s} gamma^{t-s} (prod_{i=s}^{t-1} c_i) rho_t (r_t + gamma V(x_{t+1}) - V(x_t))`` along
    each path (``V(x_{t+1}) = 0`` after a termination, ``V(s')`` at a cut), and ``q_s - V(x_s)`` with
    ``q_s = r_s + gamma v_{s+1}``, written out step by step."""
    steps = len(ratios)
    value = [_value(_obs(t)) for t in range(steps)]
    following = [0.0 if t in TERMINATED_AT else _value(_next_obs(t)) for t in range(steps)]
    targets = []
    for s in range(steps):
        target, reach, t = value[s], 1.0, s  # reach: gamma^{t-s} prod_{i=s}^{t-1} c_i
        while True:
            rho = min(rho_bar, ratios[t])
            target += reach * rho * (_reward(t) + gamma * following[t] - value[t])
            if t in ENDS or t == steps - 1:
                break
            reach *= gamma * min(c_bar, ratios[t])
            t += 1
        targets.append(target)
    advantages = []
    for s in range(steps):
        if s in TERMINATED_AT:
            next_target = 0.0
        elif s in ENDS or s == steps - 1:
            next_target = _value(_next_obs(s))
        else:
            next_target = targets[s + 1]
        advantages.append(_reward(s) + gamma * next_target - value[s])
    return targets, advantages


def _stored(buffer, key) -> torch.Tensor:
    return buffer.storage.get(slice(0, len(buffer))).get(key).reshape(-1)


@pytest.mark.parametrize("registry", [True, False], ids=["registry", "torchrl_0_12"])
@pytest.mark.parametrize("functional", [True, False], ids=["functional", "plain"])
def test_vtrace_targets_and_advantages_equal_a_hand_computation(functional, registry, monkeypatch):
    if not registry:  # torchrl 0.12 has no estimator registry: the loss builds TorchRL's VTrace itself
        monkeypatch.setattr(_torchrl_compat, "dispatch_value_estimator", None)
    actor, critic = make_actor("normal"), make_linear_critic(WEIGHT)
    buffer = _buffer(_rows(actor, RATIOS))
    loss = AWRLoss(actor, critic, check_inputs=False, functional=functional)
    targets = VTrace(GAMMA, rho_bar=RHO_BAR, c_bar=C_BAR)
    targets.attach(loss)
    estimator = loss.value_estimator
    assert isinstance(estimator, TorchRLVTrace)
    assert (float(estimator.rho_thresh), float(estimator.c_thresh)) == pytest.approx((RHO_BAR, C_BAR))
    estimator_actor = dict(estimator.actor_network.named_parameters())  # the loss's actor parameters, not a copy
    for name, parameter in loss.actor_network.named_parameters() if not functional else ():
        assert estimator_actor[name] is parameter
    if functional:
        assert {id(p) for p in estimator_actor.values()} <= {id(p) for p in loss.actor_network_params.values(True, True)}

    targets.refresh_targets([buffer], loss, [None])
    expected_targets, expected_advantages = _vtrace_reference(RATIOS, GAMMA, RHO_BAR, C_BAR)
    torch.testing.assert_close(_stored(buffer, "value_target"), torch.tensor(expected_targets), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_stored(buffer, "advantage"), torch.tensor(expected_advantages), rtol=1e-5, atol=1e-5)

    targets.refresh_advantages([buffer], loss, critic_moves_in_policy_phase=False)  # standardised over the buffer
    expected = torch.tensor(expected_advantages)
    expected = (expected - expected.mean()) / (expected.std() + 1e-5)
    torch.testing.assert_close(_stored(buffer, "advantage"), expected, rtol=1e-4, atol=1e-4)


def test_the_truncation_levels_matter():
    """Without truncation the targets differ: the bars are applied, not ignored."""
    untruncated, _ = _vtrace_reference(RATIOS, GAMMA, 100.0, 100.0)
    truncated, _ = _vtrace_reference(RATIOS, GAMMA, RHO_BAR, C_BAR)
    actor, critic = make_actor("normal"), make_linear_critic(WEIGHT)
    buffer = _buffer(_rows(actor, RATIOS))
    loss = _loss(actor, critic)
    targets = VTrace(GAMMA, rho_bar=100.0, c_bar=100.0)
    targets.attach(loss)
    targets.refresh_targets([buffer], loss, [None])
    torch.testing.assert_close(_stored(buffer, "value_target"), torch.tensor(untruncated), rtol=1e-5, atol=1e-5)
    assert max(abs(a - b) for a, b in zip(untruncated, truncated, strict=True)) > 0.1


@pytest.mark.parametrize("chunk_size", [None, 3], ids=["whole", "chunks"])
def test_on_policy_vtrace_equals_td_lambda_one(chunk_size):
    """``pi = mu`` and ``rho_bar = c_bar = 1``: every ratio is 1 and V-trace is TD(1) bootstrapped at cuts."""
    actor, critic = make_actor("normal"), make_critic()
    rows = _rows(actor, None, steps=8)
    vtrace_buffers = [_buffer(rows[:5].clone()), _buffer(rows[5:].clone())]
    td_buffers = [_buffer(rows[:5].clone()), _buffer(rows[5:].clone())]
    loss = _loss(actor, critic)
    VTrace(GAMMA, chunk_size=chunk_size).attach(loss)
    VTrace(GAMMA, chunk_size=chunk_size).refresh_targets(vtrace_buffers, loss, [None, None])
    td_loss = _loss(actor, critic)
    TDLambda(GAMMA, lmbda=1.0).attach(td_loss)
    TDLambda(GAMMA, lmbda=1.0).refresh_targets(td_buffers, td_loss, [None, None])
    for vtrace_buffer, td_buffer in zip(vtrace_buffers, td_buffers, strict=True):
        for key in ("value_target", "advantage", "state_value"):
            torch.testing.assert_close(_stored(vtrace_buffer, key), _stored(td_buffer, key), rtol=1e-5, atol=1e-5)


def test_a_refresh_after_the_actor_moved_recomputes_the_ratios_and_reuses_the_stored_values():
    """The stored ``V(s)`` stay (the critic did not move: it runs on the cuts' ``s'`` only); the ratios follow the
    actor, so the targets equal a full recomputation with the moved actor."""
    actor, critic = make_actor("normal"), make_linear_critic(WEIGHT)
    buffer = _buffer(_rows(actor, RATIOS))
    loss = _loss(actor, critic)
    targets = VTrace(GAMMA, rho_bar=RHO_BAR, c_bar=C_BAR)
    targets.attach(loss)
    targets.refresh_targets([buffer], loss, [None])
    targets.refresh_advantages([buffer], loss, critic_moves_in_policy_phase=False)
    before = _stored(buffer, "value_target").clone()

    with torch.no_grad():  # the policy phase moves the actor
        for parameter in loss.actor_network_params.values(True, True):
            parameter.add_(0.3)
    states = []
    hook = loss.critic_network.register_forward_hook(lambda module, args, out: states.append(args[0].shape[0]))
    targets.refresh_targets([buffer], loss, [torch.empty(0, dtype=torch.long)])
    hook.remove()
    assert sum(states) == len(ENDS)  # V(s') of the three cuts; no stored row's V(s)

    fresh = _buffer(buffer.storage.get(slice(0, len(buffer))).exclude("state_value", "value_target", "advantage"))
    VTrace(GAMMA, rho_bar=RHO_BAR, c_bar=C_BAR).refresh_targets([fresh], loss, [None])
    torch.testing.assert_close(_stored(buffer, "value_target"), _stored(fresh, "value_target"))
    assert not torch.allclose(_stored(buffer, "value_target"), before)  # the moved actor changed the ratios


def test_the_loss_builds_torchrls_vtrace_with_its_actor_and_keys():
    actor, critic = make_actor("normal"), make_critic()
    loss = AWRLoss(actor, critic, functional=False)
    loss.make_value_estimator(ValueEstimators.VTrace, gamma=GAMMA, rho_thresh=RHO_BAR, c_thresh=C_BAR)
    estimator = loss.value_estimator
    assert isinstance(estimator, TorchRLVTrace) and estimator.actor_network is actor
    assert (float(estimator.gamma), float(estimator.rho_thresh), float(estimator.c_thresh)) == pytest.approx(
        (GAMMA, RHO_BAR, C_BAR))
    loss.set_keys(sample_log_prob="behaviour_log_prob")
    assert estimator.tensor_keys.sample_log_prob == "behaviour_log_prob"
    TDLambda(GAMMA).attach(loss)  # an estimator without the key: renaming leaves it alone
    loss.set_keys(sample_log_prob="action_log_prob")


@pytest.mark.parametrize(("name", "value"), [("rho_bar", 0.0), ("c_bar", -1.0)])
def test_truncation_levels_must_be_positive(name, value):
    with pytest.raises(ValueError, match=f"VTrace: {name} must be > 0"):
        VTrace(**{name: value})


def _iteration(data, targets) -> AWRIteration:
    actor, critic = make_actor("normal"), make_critic()
    return AWRIteration(_loss(actor, critic), data, targets, Fixed(), Phase(1, 4), Phase(1, 4), Eager())


def test_vtrace_without_stored_behaviour_log_probs_is_refused_before_any_step():
    buffer = _buffer(_rows(make_actor("normal"), None, log_prob=False))
    with pytest.raises(ValueError, match=r"model.targets \(VTrace\).*'action_log_prob'.*GivenBuffers"):
        _iteration(GivenBuffers(buffer), VTrace())
    with pytest.raises(ValueError, match=r"model.targets \(VTrace\).*'action_log_prob'.*MinariDataset.*stores none"):
        _iteration(MinariDataset("pendulum/any-v0"), VTrace())
    _iteration(GivenBuffers(buffer), TDLambda())  # the other targets need none


def test_a_buffer_that_loses_its_log_probs_is_refused_at_the_refresh_naming_the_key():
    actor, critic = make_actor("normal"), make_critic()
    loss = _loss(actor, critic)
    VTrace().attach(loss)
    with pytest.raises(KeyError, match="'action_log_prob'"):
        VTrace().refresh_targets([_buffer(_rows(actor, None, log_prob=False))], loss, [None])


# ------------------------------------------------------------------ the CLI

VTRACE = ["--model.targets=awr_modules.targets.VTrace", "--model.targets.init_args.gamma=0.95",
          "--model.targets.init_args.rho_bar=1.0", "--model.targets.init_args.c_bar=1.0"]


def test_awr_fit_with_vtrace_targets_runs_and_resumes(tmp_path):
    from awr_modules.cli import cli_main

    cli = cli_main(["fit", *tiny_args(tmp_path, epochs=2, extra=VTRACE)])
    module = cli.model
    assert isinstance(module.awr.targets, VTrace) and isinstance(module.loss_module.value_estimator, TorchRLVTrace)
    stored = module.awr.data.buffers[0].storage.get(slice(0, 2 * FRAMES))
    assert stored.get("action_log_prob", None) is not None  # the collector stored the behaviour log-probs
    assert torch.isfinite(stored["value_target"]).all() and torch.isfinite(stored["advantage"]).all()
    assert (module.iteration, module.env_steps) == (2, 2 * FRAMES)

    resumed = cli_main(["fit", *tiny_args(tmp_path, epochs=3, extra=VTRACE), "--ckpt_path=last"])
    assert (resumed.model.iteration, resumed.model.env_steps) == (3, 3 * FRAMES)
    assert load_checkpoint(checkpoint_dir(tmp_path) / "last.ckpt")["awr"]["iteration"] == 3


def test_vtrace_config_overlay_replaces_td_lambda():
    from awr_modules.cli import cli_main

    cli = cli_main(["-c", str(REPO / "configs" / "halfcheetah.yaml"),
                    "-c", str(REPO / "configs" / "reference" / "vtrace_targets.yaml")], run=False)
    targets = cli.model.awr.targets
    assert (type(targets), targets.gamma, targets.rho_bar, targets.c_bar) == (VTrace, 0.99, 1.0, 1.0)
    assert targets.value_scale == pytest.approx(100.0)
    assert isinstance(cli.model.loss_module.value_estimator, TorchRLVTrace)
    critic_optimizer = cli.model.configure_optimizers()[0][1]  # the V critic's, as the reference steps it
    assert cli.model.awr.value_phase.steps == 200 and type(critic_optimizer) is torch.optim.SGD
    assert not critic_optimizer.defaults["fused"] and targets.chunk_size is None  # not the Q critic's, carried over
    assert cli.model.awr.networks["value"] is cli.model.critic

