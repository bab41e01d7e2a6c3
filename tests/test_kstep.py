"""Pins :class:`awr_modules.KStepReturnEstimator` to the paper's k-step return, and the loss's estimator hook.

    R_t = sum_{i<k} gamma^i r_{t+i} + gamma^k V(s_{t+k}),    A_t = R_t - V(s_t)

cut at episode ends: bootstrap ``gamma^{j+1} V(s'_{t+j})`` at a truncation and at the end of
the time axis, nothing after a termination. Expected numbers come from a plain-Python loop
over a hand-made trajectory with a linear critic ``V(s) = s . w``. Also pins ``horizon=1`` to
TorchRL's ``TD0Estimator`` and checks that ``AWRLoss.make_value_estimator`` computes the
targets of trajectory-shaped batches that lack ``advantage``, for k-step and TorchRL estimators.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_actor, make_linear_critic, td_lambda_reference
from tensordict import TensorDict
from torchrl.objectives.utils import ValueEstimators
from torchrl.objectives.value import TD0Estimator

from awr_modules import AWRLoss, KStepReturnEstimator

GAMMA = 0.9
WEIGHT = [2.0, 0.5, -1.0]  # V(s) = 2 s0 + 0.5 s1 - s2

# One time axis of 10 steps: episode A (t=0..3) terminates at t=3, episode B (t=4..6) is
# truncated at t=6, episode C (t=7..9) is cut by the end of the time axis.
X = [0.1, 0.4, -0.3, 0.6, 1.0, 0.5, -0.2, 0.7, 0.3, -0.4]
REWARD = [1.0, -0.5, 2.0, 0.4, 0.3, 1.5, -1.0, 0.8, 0.2, -0.6]
DONE = [False, False, False, True, False, False, True, False, False, False]
TERMINATED = [False, False, False, True, False, False, False, False, False, False]
END_NEXT_X = {3: 2.0, 6: -1.5, 9: 0.9}  # s' at the last step of each episode (not the next row's s)


def _obs(x: float, t: int) -> list[float]:
    return [x, 1.0, 0.1 * t]


def _value(s: list[float]) -> float:
    return sum(si * wi for si, wi in zip(s, WEIGHT, strict=True))


def _trajectory(sign: float = 1.0) -> tuple[TensorDict, list[list[float]], list[list[float]], list[float]]:
    """The hand-made trajectory as a TensorDict [T]; ``sign`` flips rewards and x for a second row."""
    obs = [_obs(sign * x, t) for t, x in enumerate(X)]
    next_obs = [obs[t + 1] if t not in END_NEXT_X else _obs(sign * END_NEXT_X[t], t + 1) for t in range(len(X))]
    reward = [sign * r for r in REWARD]
    td = TensorDict(
        {
            "observation": torch.tensor(obs),
            "next": {
                "observation": torch.tensor(next_obs),
                "reward": torch.tensor(reward).unsqueeze(-1),
                "done": torch.tensor(DONE).unsqueeze(-1),
                "terminated": torch.tensor(TERMINATED).unsqueeze(-1),
            },
        },
        [len(X)],
    )
    return td, obs, next_obs, reward


def kstep_reference(obs: list[list[float]], next_obs: list[list[float]], reward: list[float], k: int) -> list[float]:
    """R_t = sum_{i<k} gamma^i r_{t+i} + gamma^k V(s_{t+k}), stopped at the first end of episode."""
    horizon = len(reward)
    returns = []
    for t in range(horizon):
        total = 0.0
        for i in range(k):
            s = t + i
            total += GAMMA**i * reward[s]
            if TERMINATED[s]:
                break
            if DONE[s] or s == horizon - 1:
                total += GAMMA ** (i + 1) * _value(next_obs[s])
                break
            if i == k - 1:
                total += GAMMA**k * _value(obs[t + k])
        returns.append(total)
    return returns


Row = tuple[TensorDict, list[list[float]], list[list[float]], list[float]]


def _rows(batched: bool) -> list[Row]:
    """The trajectory, or two (the second with flipped rewards and x) for a [2, T] batch."""
    return [_trajectory(1.0), _trajectory(-1.0)] if batched else [_trajectory(1.0)]


def _stack(rows: list[Row]) -> TensorDict:
    return torch.stack([row[0] for row in rows]) if len(rows) > 1 else rows[0][0]


@pytest.mark.parametrize("batched", [False, True], ids=["T", "BxT"])
@pytest.mark.parametrize("k", [1, 3, 100])
def test_kstep_return_matches_formula(k: int, batched: bool) -> None:
    rows = _rows(batched)
    td = _stack(rows)
    estimator = KStepReturnEstimator(gamma=GAMMA, horizon=k, value_network=make_linear_critic(WEIGHT))
    estimator(td)
    expected_target = torch.tensor([kstep_reference(*row[1:], k=k) for row in rows]).reshape(td.shape + (1,))
    expected_value = torch.tensor([[_value(s) for s in row[1]] for row in rows]).reshape(td.shape + (1,))
    torch.testing.assert_close(td["value_target"], expected_target, atol=1e-5, rtol=0)
    torch.testing.assert_close(td["state_value"], expected_value, atol=1e-5, rtol=0)
    torch.testing.assert_close(td["advantage"], expected_target - expected_value, atol=1e-5, rtol=0)


# k-step returns worked out by hand on the trajectory above: (k, t, R_t).
HAND_RETURNS = [
    # t=0, k=3: bootstrap from s_3 = [0.6, 1, 0.3], V = 1.2 + 0.5 - 0.3.
    (3, 0, 1.0 + 0.9 * -0.5 + 0.81 * 2.0 + 0.729 * 1.4),
    # t=0, k=100: stops at the termination at t=3, no bootstrap.
    (100, 0, 1.0 + 0.9 * -0.5 + 0.81 * 2.0 + 0.729 * 0.4),
    # t=2, k=3: only the two steps 2, 3 before the termination, no bootstrap.
    (3, 2, 2.0 + 0.9 * 0.4),
    # t=4, k=3: runs 4, 5, 6 and bootstraps from the truncated s'_6 = [-1.5, 1, 0.7], V = -3 + 0.5 - 0.7.
    (3, 4, 0.3 + 0.9 * 1.5 + 0.81 * -1.0 + 0.729 * -3.2),
    # t=6, k=100: the truncation at t=6 bootstraps from s'_6 although the horizon is longer.
    (100, 6, -1.0 + 0.9 * -3.2),
    # t=7, k=3: runs 7, 8, 9 and bootstraps from the end-of-axis s'_9 = [0.9, 1, 1.0], V = 1.8 + 0.5 - 1.0.
    (3, 7, 0.8 + 0.9 * 0.2 + 0.81 * -0.6 + 0.729 * 1.3),
    # t=9, k=1: the end of the time axis bootstraps from s'_9.
    (1, 9, -0.6 + 0.9 * 1.3),
]


def _estimator_targets(k: int) -> list[float]:
    td = KStepReturnEstimator(gamma=GAMMA, horizon=k, value_network=make_linear_critic(WEIGHT))(_trajectory()[0])
    return td["value_target"].squeeze(-1).tolist()


def _reference_targets(k: int) -> list[float]:
    _, obs, next_obs, reward = _trajectory()
    return kstep_reference(obs, next_obs, reward, k)


@pytest.mark.parametrize("targets", [_estimator_targets, _reference_targets], ids=["estimator", "reference"])
def test_hand_computed_returns(targets) -> None:
    """The estimator's own ``value_target`` (and the plain-Python reference) equal returns worked out by hand."""
    for k, t, expected in HAND_RETURNS:
        assert targets(k)[t] == pytest.approx(expected, abs=1e-5), f"k={k}, t={t}"


def test_the_three_horizons_give_different_targets() -> None:
    """So that each horizon of the formula test pins something of its own."""
    assert len({tuple(_estimator_targets(k)) for k in (1, 3, 100)}) == 3


def test_horizon_one_equals_torchrl_td0() -> None:
    critic = make_linear_critic(WEIGHT)
    td = _stack(_rows(batched=True))
    kstep = KStepReturnEstimator(gamma=GAMMA, horizon=1, value_network=critic)(td.clone())
    td0 = TD0Estimator(gamma=GAMMA, value_network=critic)(td.clone())
    torch.testing.assert_close(kstep["value_target"], td0["value_target"])
    torch.testing.assert_close(kstep["advantage"], td0["advantage"])


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"horizon": 0}, "horizon"), ({"gamma": 1.5}, "gamma")], ids=["horizon", "gamma"]
)
def test_invalid_hyperparameters_raise(kwargs: dict, match: str) -> None:
    settings = {"gamma": GAMMA, "horizon": 3, "value_network": make_linear_critic(WEIGHT)} | kwargs
    with pytest.raises(ValueError, match=match):
        KStepReturnEstimator(**settings)


def _loss_batch(rows: list[Row]) -> TensorDict:
    """Trajectory-shaped [2, T] batch without advantage/value_target, with actions for a Gaussian actor."""
    td = _stack(rows)
    td.set("action", torch.randn(*td.shape, 2))
    return td


def _td_lambda_targets(rows: list[Row], lmbda: float) -> torch.Tensor:
    """Plain-Python TD(lambda) returns of each row (lambda=0: TD(0), lambda=1: TD(1)), cut at the episode ends."""
    ends = [done or t == len(X) - 1 for t, done in enumerate(DONE)]
    targets = [
        td_lambda_reference(reward, [_value(s) for s in next_obs], ends, TERMINATED, GAMMA, lmbda)
        for _, _, next_obs, reward in rows
    ]
    return torch.tensor(targets).unsqueeze(-1)


def test_loss_computes_kstep_targets_when_batch_lacks_advantage() -> None:
    loss = AWRLoss(make_actor("normal"), make_linear_critic(WEIGHT))
    loss.make_value_estimator(KStepReturnEstimator, gamma=GAMMA, horizon=3)
    assert isinstance(loss.value_estimator, KStepReturnEstimator)
    assert loss.value_estimator.horizon == 3
    rows = _rows(batched=True)
    batch = _loss_batch(rows)
    out = loss(batch)
    expected = torch.tensor([kstep_reference(*row[1:], k=3) for row in rows])
    torch.testing.assert_close(batch["value_target"], expected.unsqueeze(-1), atol=1e-5, rtol=0)
    value = batch["state_value"].squeeze(-1)
    torch.testing.assert_close(out["loss_value"], 0.5 * (value - expected).pow(2).mean(), atol=1e-5, rtol=1e-6)
    assert torch.isfinite(out["loss_actor"])


@pytest.mark.parametrize("estimator", ["TD0", "TD1", "TDLambda", "GAE"])
def test_loss_computes_torchrl_targets_when_batch_lacks_advantage(estimator: str) -> None:
    lmbda = 0.7
    loss = AWRLoss(make_actor("normal"), make_linear_critic(WEIGHT))
    kwargs = {"gamma": GAMMA} | ({"lmbda": lmbda} if estimator in ("TDLambda", "GAE") else {})
    loss.make_value_estimator(ValueEstimators[estimator], **kwargs)
    rows = _rows(batched=True)
    batch = _loss_batch(rows)
    out = loss(batch)
    expected = _td_lambda_targets(rows, {"TD0": 0.0, "TD1": 1.0}.get(estimator, lmbda))
    torch.testing.assert_close(batch["value_target"], expected, atol=1e-5, rtol=0)
    value = torch.tensor([[_value(s) for s in row[1]] for row in rows]).unsqueeze(-1)
    torch.testing.assert_close(batch["advantage"], expected - value, atol=1e-5, rtol=0)
    assert torch.isfinite(out["loss_actor"]) and torch.isfinite(out["loss_value"])
