"""Pins :class:`awr_modules.AWRLoss` with a plain ``torch.distributions.Categorical`` actor (integer actions).

The README promises ``Categorical`` beside ``OneHotCategorical``; here the actions are action
indices, not one-hot vectors. Logits are linear in the state with known weights, so every
number is worked out in plain Python:

    log pi(a|s) = l_a(s) - log sum_j exp l_j(s),    l(s) = W s + b
    w = min(exp(A / T), max_weight)
    loss_actor = -mean(w log pi(a|s)) + c_l2 mean(0.5 sum_j (l_j - mean_j l)^2)
    loss_value = 0.5 mean(((V(s) - R) / value_scale)^2),    V(s) = s . v
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_linear_critic
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.modules import ProbabilisticActor

from awr_modules import AWRLoss

W = [[1.0, -0.5], [0.0, 2.0], [-1.0, 0.5]]  # 3 actions, 2 state dimensions
B = [0.1, -0.2, 0.3]
V_WEIGHT = [0.5, -1.0]
STATES = [[1.0, 0.0], [0.0, 1.0], [-1.0, 2.0], [0.5, -0.5]]
ACTIONS = [0, 1, 2, 1]
ADVANTAGE = [-1.0, 0.0, 1.0, 4.0]
TARGET = [0.2, -1.0, 3.0, 0.0]
TEMPERATURE, MAX_WEIGHT, VALUE_SCALE = 0.5, 20.0, 2.0


def _actor() -> ProbabilisticActor:
    linear = nn.Linear(2, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(W))
        linear.bias.copy_(torch.tensor(B))
    module = TensorDictModule(linear, in_keys=["observation"], out_keys=["logits"])
    return ProbabilisticActor(module, in_keys=["logits"], distribution_class=torch.distributions.Categorical)


def _batch() -> TensorDict:
    return TensorDict(
        {
            "observation": torch.tensor(STATES),
            "action": torch.tensor(ACTIONS),  # integer indices, shape [N]
            "advantage": torch.tensor(ADVANTAGE).unsqueeze(-1),
            "value_target": torch.tensor(TARGET).unsqueeze(-1),
        },
        [len(STATES)],
    )


def _logits(s: list[float]) -> list[float]:
    return [sum(wi * si for wi, si in zip(row, s, strict=True)) + b for row, b in zip(W, B, strict=True)]


def _log_prob(s: list[float], a: int) -> float:
    logits = _logits(s)
    return logits[a] - math.log(sum(math.exp(logit) for logit in logits))


def _entropy(s: list[float]) -> float:
    logits = _logits(s)
    log_z = math.log(sum(math.exp(logit) for logit in logits))
    return -sum(math.exp(logit - log_z) * (logit - log_z) for logit in logits)


def _centred_l2(s: list[float]) -> float:
    logits = _logits(s)
    mean = sum(logits) / len(logits)
    return 0.5 * sum((logit - mean) ** 2 for logit in logits)


LOG_PROB = [_log_prob(s, a) for s, a in zip(STATES, ACTIONS, strict=True)]
WEIGHT = [min(math.exp(a / TEMPERATURE), MAX_WEIGHT) for a in ADVANTAGE]  # e^-2, 1, e^2, 20 (clipped)
VALUE = [sum(v * si for v, si in zip(V_WEIGHT, s, strict=True)) for s in STATES]


def _loss(**kwargs) -> AWRLoss:
    return AWRLoss(_actor(), make_linear_critic(V_WEIGHT), temperature=TEMPERATURE, max_weight=MAX_WEIGHT,
                   value_scale=VALUE_SCALE, **kwargs)


def test_hand_numbers_are_not_degenerate() -> None:
    """The plain-Python numbers the tests below compare with, pinned to values worked out on paper and to torch's
    own distribution, and spread so that a wrong sign, index or clip would show: four distinct log-probs of three
    different actions, weights below, at and above 1 with one clipped, values of both signs."""
    logits = [logit for s in STATES for logit in _logits(s)]
    assert logits == pytest.approx([1.1, -0.2, -0.7, -0.4, 1.8, 0.8, -1.9, 3.8, 2.3, 0.85, -1.2, -0.45])
    assert LOG_PROB == pytest.approx([-0.363135506, -0.391151556, -1.704145119, -2.387376611], rel=1e-8)
    assert LOG_PROB == pytest.approx(torch.distributions.Categorical(  # torch's own, independent of _log_prob
        logits=(torch.tensor(STATES, dtype=torch.float64) @ torch.tensor(W, dtype=torch.float64).T
                + torch.tensor(B, dtype=torch.float64))).log_prob(torch.tensor(ACTIONS)).tolist(), rel=1e-12)
    assert WEIGHT == pytest.approx([math.exp(-2.0), 1.0, math.exp(2.0), 20.0])
    assert math.exp(4.0 / TEMPERATURE) > MAX_WEIGHT > math.exp(1.0 / TEMPERATURE)  # exactly one weight clipped
    assert VALUE == pytest.approx([0.5, -1.0, -2.5, 0.75])
    assert [_entropy(s) for s in STATES] == pytest.approx([0.816477710, 0.804794342, 0.492587133, 0.778547364],
                                                          rel=1e-8)
    assert len(set(LOG_PROB)) == 4 and set(ACTIONS) == {0, 1, 2}


@pytest.mark.parametrize("functional", [True, False], ids=["functional", "stateful"])
def test_categorical_actor_losses_match_hand_computation(functional: bool) -> None:
    out = _loss(functional=functional)(_batch())
    n = len(STATES)
    expected_actor = -sum(w * lp for w, lp in zip(WEIGHT, LOG_PROB, strict=True)) / n
    expected_value = sum(0.5 * ((v - r) / VALUE_SCALE) ** 2 for v, r in zip(VALUE, TARGET, strict=True)) / n
    assert out["loss_actor"].item() == pytest.approx(expected_actor, rel=1e-5)
    assert out["loss_value"].item() == pytest.approx(expected_value, rel=1e-5)
    assert out["log_prob_mean"].item() == pytest.approx(sum(LOG_PROB) / n, rel=1e-5)
    assert out["entropy"].item() == pytest.approx(sum(_entropy(s) for s in STATES) / n, rel=1e-5)
    assert out["weight_clip_fraction"].item() == pytest.approx(0.25)
    assert out["weight_mean"].item() == pytest.approx(sum(WEIGHT) / n, rel=1e-6)


def test_categorical_actor_per_sample_losses_and_td_error() -> None:
    batch = _batch()
    out = _loss(reduction="none")(batch)
    assert out["loss_actor"].shape == (len(STATES),)
    torch.testing.assert_close(out["loss_actor"], torch.tensor([-w * lp for w, lp in zip(WEIGHT, LOG_PROB,
                                                                                          strict=True)]))
    torch.testing.assert_close(out["loss_value"],
                               torch.tensor([0.5 * ((v - r) / VALUE_SCALE) ** 2 for v, r in zip(VALUE, TARGET,
                                                                                                strict=True)]))
    torch.testing.assert_close(batch["td_error"], torch.tensor([abs(v - r) for v, r in zip(VALUE, TARGET,
                                                                                           strict=True)]))


def test_categorical_actor_l2_penalty_on_centred_logits() -> None:
    coeff = 0.01
    out = _loss(action_l2_coeff=coeff)(_batch())
    n = len(STATES)
    expected = (-sum(w * lp for w, lp in zip(WEIGHT, LOG_PROB, strict=True))
                + coeff * sum(_centred_l2(s) for s in STATES)) / n
    assert out["loss_actor"].item() == pytest.approx(expected, rel=1e-5)


def test_categorical_actor_gradient_raises_the_log_prob_of_high_weight_actions() -> None:
    """One SGD step on ``loss_actor``: log pi of the clipped-weight action (w = 20) rises, and by more than that
    of the w = e^-2 action (whose pull is 150 times weaker)."""
    loss = _loss(functional=False)
    batch = _batch()
    loss(batch)["loss_actor"].backward()
    with torch.no_grad():
        for parameter in loss.actor_network.parameters():
            parameter -= 0.05 * parameter.grad
        dist = loss.actor_network.get_dist(batch.select("observation"))
        after = dist.log_prob(batch["action"]).tolist()
    change = [a - b for a, b in zip(after, LOG_PROB, strict=True)]
    assert change[3] > 0
    assert change[3] > abs(change[0])
