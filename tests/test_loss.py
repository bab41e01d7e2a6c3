"""Pins the math of :class:`awr_modules.AWRLoss` against hand computations.

For a batch of stored ``(s, a, A, R)``, with ``log pi(a|s)`` recomputed here from the actor's
own ``loc``/``scale``/``logits`` with ``torch.distributions``:

    w = min(exp(A / T), max_weight)
    loss_actor = -mean(w log pi(a|s)) + c_bound 0.5 sum_d (mu_d - clip(mu_d, -1, 1))^2 - c_ent H
    loss_value = 0.5 mean(((V(s) - R) / value_scale)^2)

for Gaussian (IndependentNormal with fixed std, plain torch Normal), TanhNormal and
OneHotCategorical actors. Also pinned: the weight clip and diagnostics (clip fraction, max,
ESS, KL to the behaviour policy), batch advantage normalisation, temperature scaling,
reductions, ``weighting="sampling"``, prioritized-replay weights, the ``td_error`` written
back, key renaming (also into the value estimator), error messages, the split into
``actor_loss``/``value_loss`` (each runs only its network), and the direction of one SGD
step (towards high-advantage actions, no gradient crossing between actor and critic).
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from conftest import (
    ACT_DIM,
    ACTOR_KINDS,
    FixedStd,
    dist_params,
    make_actor,
    make_batch,
    make_critic,
    make_linear_critic,
)
from tensordict import TensorDict, TensorDictParams
from tensordict.nn import TensorDictModule, TensorDictSequential, set_skip_existing
from torch import distributions as d
from torch import nn
from torchrl.modules import IndependentNormal, OneHotCategorical, ProbabilisticActor

from awr_modules import AWRLoss, KStepReturnEstimator

ADVANTAGE = [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 3.0]
N = len(ADVANTAGE)


def hand_log_prob(kind: str, actor: ProbabilisticActor, td: TensorDict) -> torch.Tensor:
    """``log pi(a|s)`` of the stored action, from the actor's parameters and ``torch.distributions``."""
    params = dist_params(actor, td)
    action = td["action"]
    if kind == "categorical":
        log_p = torch.log_softmax(params["logits"], -1)
        return log_p.gather(-1, action.argmax(-1, keepdim=True)).squeeze(-1)
    normal = d.Normal(params["loc"], params["scale"])
    if kind == "normal":
        return d.Independent(normal, 1).log_prob(action)
    if kind == "plain_normal":
        return normal.log_prob(action).sum(-1)
    if kind == "tanh_normal":  # a = tanh(u): log pi(a) = log N(atanh a) - log(1 - a^2)
        return (normal.log_prob(torch.atanh(action)) - torch.log1p(-action.pow(2))).sum(-1)
    raise ValueError(kind)


def hand_entropy(kind: str, actor: ProbabilisticActor, td: TensorDict) -> torch.Tensor:
    params = dist_params(actor, td)
    if kind == "categorical":
        log_p = torch.log_softmax(params["logits"], -1)
        return -(log_p.exp() * log_p).sum(-1)
    return (0.5 * torch.log(2 * math.pi * math.e * params["scale"].pow(2))).sum(-1)


def hand_value(critic, td: TensorDict) -> torch.Tensor:
    return critic(td.select("observation").clone())["state_value"].squeeze(-1)


def _batch(kind: str, advantage: list[float] = ADVANTAGE) -> TensorDict:
    batch = make_batch(kind, n=len(advantage))
    batch.set("advantage", torch.tensor(advantage).unsqueeze(-1))
    return batch


def _setup(kind: str, advantage: list[float] = ADVANTAGE, **loss_kwargs):
    actor, critic = make_actor(kind), make_critic()
    batch = _batch(kind, advantage)
    with torch.no_grad():
        log_prob = hand_log_prob(kind, actor, batch)
        value = hand_value(critic, batch)
    return AWRLoss(actor, critic, **loss_kwargs), batch, log_prob, value, actor


@pytest.mark.parametrize("functional", [True, False], ids=["functional", "stateful"])
@pytest.mark.parametrize("kind", ACTOR_KINDS)
def test_losses_match_hand_computation(kind: str, functional: bool) -> None:
    temperature, max_weight, value_scale = 0.8, 5.0, 2.0
    loss, batch, log_prob, value, _ = _setup(kind, temperature=temperature, max_weight=max_weight,
                                            value_scale=value_scale, functional=functional)
    target = batch["value_target"].squeeze(-1)
    out = loss(batch)

    weight = torch.tensor([min(math.exp(a / temperature), max_weight) for a in ADVANTAGE])
    assert (weight == max_weight).sum() == 2  # A = 2 and A = 3 are clipped
    torch.testing.assert_close(out["loss_actor"], -(weight * log_prob).mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss_value"], 0.5 * ((value - target) / value_scale).pow(2).mean(),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["log_prob_mean"], log_prob.mean(), atol=1e-5, rtol=1e-5)


def test_weight_clip_and_diagnostics() -> None:
    advantage = [0.0, math.log(2.0), math.log(50.0), 10.0]  # w = 1, 2, 20 (clipped), 20 (clipped)
    loss, batch, log_prob, _, _ = _setup("normal", advantage, temperature=1.0, max_weight=20.0)
    stored_log_prob = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    batch.set("action_log_prob", stored_log_prob)
    out = loss(batch)

    assert out["weight_max"].item() == pytest.approx(20.0)
    assert out["weight_mean"].item() == pytest.approx(43.0 / 4)
    assert out["weight_clip_fraction"].item() == pytest.approx(0.5)
    assert out["weight_ess"].item() == pytest.approx(43.0**2 / (4 * (1 + 4 + 400 + 400)))
    assert out["advantage_mean"].item() == pytest.approx(sum(advantage) / 4)
    torch.testing.assert_close(out["advantage_std"], torch.tensor(advantage).std())
    torch.testing.assert_close(out["kl_behaviour"], (stored_log_prob - log_prob).mean())
    weight = torch.tensor([1.0, 2.0, 20.0, 20.0])
    torch.testing.assert_close(out["loss_actor"], -(weight * log_prob).mean(), atol=1e-5, rtol=1e-5)


def test_normalize_advantage_standardises_over_the_batch() -> None:
    loss, batch, log_prob, _, _ = _setup("normal", normalize_advantage=True, max_weight=1e6)
    mean, std = statistics.fmean(ADVANTAGE), statistics.stdev(ADVANTAGE)
    weight = torch.tensor([math.exp((a - mean) / (std + 1e-5)) for a in ADVANTAGE])
    torch.testing.assert_close(loss(batch)["loss_actor"], -(weight * log_prob).mean(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_halving_temperature_squares_unclipped_weights(temperature: float) -> None:
    kind = "plain_normal"
    loss, batch, log_prob, _, actor = _setup(kind, temperature=temperature, max_weight=1e6, reduction="none")
    half = AWRLoss(actor, make_critic(), temperature=temperature / 2, max_weight=1e6, reduction="none")
    weight = torch.tensor([math.exp(a / temperature) for a in ADVANTAGE])
    torch.testing.assert_close(loss(batch.clone())["loss_actor"], -weight * log_prob, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(half(batch.clone())["loss_actor"], -weight.pow(2) * log_prob, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ACTOR_KINDS)
def test_reduction_none_is_per_sample(kind: str) -> None:
    loss, batch, log_prob, value, _ = _setup(kind, max_weight=5.0, reduction="none")
    out = loss(batch)
    assert out["loss_actor"].shape == out["loss_value"].shape == torch.Size([N])
    weight = torch.tensor([min(math.exp(a), 5.0) for a in ADVANTAGE])
    torch.testing.assert_close(out["loss_actor"], -weight * log_prob, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss_value"], 0.5 * (value - batch["value_target"].squeeze(-1)).pow(2))


@pytest.mark.parametrize("kind", ACTOR_KINDS)
def test_reduction_sum_is_n_times_mean(kind: str) -> None:
    loss_mean, batch, _, _, actor = _setup(kind)
    critic = loss_mean.critic_network
    loss_sum = AWRLoss(actor, critic, reduction="sum")
    out_mean, out_sum = loss_mean(batch.clone()), loss_sum(batch.clone())
    for key in ("loss_actor", "loss_value"):
        assert out_sum[key].shape == torch.Size([])
        torch.testing.assert_close(out_sum[key], N * out_mean[key], atol=1e-5, rtol=1e-5)


def _linear_gaussian_actor(distribution_class: type) -> ProbabilisticActor:
    """loc = the first two observation entries, std 0.5: Gaussian means we choose by hand."""
    linear = nn.Linear(3, ACT_DIM, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    module = TensorDictModule(nn.Sequential(linear, FixedStd(0.5)), in_keys=["observation"], out_keys=["loc", "scale"])
    return ProbabilisticActor(module, in_keys=["loc", "scale"], distribution_class=distribution_class)


@pytest.mark.parametrize("distribution_class", [IndependentNormal, d.Normal], ids=["independent_normal", "normal"])
def test_action_bound_penalty(distribution_class: type) -> None:
    obs = torch.tensor([[0.5, -0.2, 0.0], [1.5, -2.0, 0.0], [-3.0, 0.9, 0.0], [0.0, 1.2, 0.0]])
    batch = TensorDict({"observation": obs, "action": torch.zeros(4, ACT_DIM), "advantage": torch.zeros(4, 1),
                        "value_target": torch.zeros(4, 1)}, [4])
    actor, critic = _linear_gaussian_actor(distribution_class), make_critic()
    plain = AWRLoss(actor, critic, reduction="none")(batch.clone())["loss_actor"]
    penalised = AWRLoss(actor, critic, action_bound_penalty=10.0, reduction="none")(batch.clone())["loss_actor"]
    # Excursions beyond [-1, 1]: (0, 0), (0.5, -1.0), (-2.0, 0), (0, 0.2); penalty 0.5 * sum of squares, times 10.
    expected = torch.tensor([0.0, 10 * 0.5 * (0.25 + 1.0), 10 * 0.5 * 4.0, 10 * 0.5 * 0.04])
    torch.testing.assert_close(penalised - plain, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["tanh_normal", "categorical"])
def test_action_bound_penalty_needs_a_gaussian_actor(kind: str) -> None:
    """Refused when the loss is built, before any batch: the one place that decides is the constructor."""
    with pytest.raises(ValueError, match="Gaussian"):
        _setup(kind, action_bound_penalty=10.0)


@pytest.mark.parametrize("kind", ["normal", "plain_normal", "categorical"])
def test_entropy_bonus(kind: str) -> None:
    coeff = 0.1
    loss, batch, _, _, actor = _setup(kind, reduction="none")
    with torch.no_grad():
        entropy = hand_entropy(kind, actor, batch)
    if kind == "normal":  # fixed std 0.4 in 2 dims: closed form
        torch.testing.assert_close(entropy, torch.full((N,), math.log(2 * math.pi * math.e * 0.16)))
    bonus = AWRLoss(actor, loss.critic_network, entropy_coeff=coeff, reduction="none")
    out, out_bonus = loss(batch.clone()), bonus(batch.clone())
    torch.testing.assert_close(out_bonus["loss_actor"] - out["loss_actor"], -coeff * entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["entropy"], entropy.mean(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kind", "parameter"), [("normal", "loc"), ("plain_normal", "loc"), ("categorical", "logits")])
def test_action_l2_penalty_is_half_the_squared_action_parameters(kind: str, parameter: str) -> None:
    coeff = 0.1
    loss, batch, _, _, actor = _setup(kind, reduction="none")
    with torch.no_grad():
        theta = dist_params(actor, batch)[parameter]
        theta = theta - theta.mean(-1, keepdim=True) if parameter == "logits" else theta  # policy-relevant part
    penalised = AWRLoss(actor, loss.critic_network, action_l2_coeff=coeff, reduction="none")
    difference = penalised(batch.clone())["loss_actor"] - loss(batch.clone())["loss_actor"]
    torch.testing.assert_close(difference, coeff * 0.5 * theta.pow(2).sum(-1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ACTOR_KINDS)
def test_sampling_weighting_uses_weight_one(kind: str) -> None:
    loss, batch, log_prob, _, _ = _setup(kind, weighting="sampling")
    out = loss(batch)
    torch.testing.assert_close(out["loss_actor"], -log_prob.mean(), atol=1e-5, rtol=1e-5)
    # The diagnostics still describe the AWR weights of the batch.
    assert out["weight_mean"].item() == pytest.approx(sum(min(math.exp(a), 20.0) for a in ADVANTAGE) / N, rel=1e-5)


@pytest.mark.parametrize("kind", ["normal", "categorical"])
def test_uniform_weighting_is_behaviour_cloning_of_the_same_loss(kind: str) -> None:
    """``weighting="uniform"``: the mean negative log-likelihood, uniform sampling (the offline BC baseline)."""
    loss, batch, log_prob, _, _ = _setup(kind, weighting="uniform")
    torch.testing.assert_close(loss(batch)["loss_actor"], -log_prob.mean(), atol=1e-5, rtol=1e-5)
    assert not loss.samples_by_weight


@pytest.mark.parametrize("kind", ["normal", "categorical"])
def test_priority_weight_multiplies_both_losses(kind: str) -> None:
    loss, batch, _, _, _ = _setup(kind, reduction="none")
    priority_weight = torch.linspace(0.25, 2.0, N)
    plain = loss(batch.clone())
    weighted = loss(batch.clone().set("priority_weight", priority_weight))
    for key in ("loss_actor", "loss_value"):
        torch.testing.assert_close(weighted[key], priority_weight * plain[key])


def test_td_error_is_written_into_the_batch() -> None:
    loss, batch, _, value, _ = _setup("normal")
    loss(batch)
    torch.testing.assert_close(batch["td_error"], (batch["value_target"].squeeze(-1) - value).abs())


def _renamed(batch: TensorDict) -> TensorDict:
    renamed = batch.clone()
    for old, new in (("action", "act"), ("advantage", "adv"), ("value_target", "ret"), ("action_log_prob", "mu_lp")):
        renamed.rename_key_(old, new)
    return renamed


@pytest.mark.parametrize("kind", ["normal", "categorical"])
def test_renamed_keys(kind: str) -> None:
    loss, batch, _, _, actor = _setup(kind)
    batch.set("action_log_prob", -torch.ones(N))
    renamed_loss = AWRLoss(actor, loss.critic_network)
    renamed_loss.set_keys(action="act", advantage="adv", value_target="ret", priority="prio",
                          sample_log_prob="mu_lp", priority_weight="pw")
    renamed = _renamed(batch).set("pw", torch.full((N,), 2.0))
    out, out_renamed = loss(batch), renamed_loss(renamed)
    for key in ("loss_actor", "loss_value", "kl_behaviour", "weight_mean"):
        factor = 2.0 if key.startswith("loss") else 1.0  # the renamed priority weight is read too
        torch.testing.assert_close(out_renamed[key], factor * out[key])
    torch.testing.assert_close(renamed["prio"], batch["td_error"])
    assert "td_error" not in renamed


def _trajectory_batch(n_steps: int = 5) -> TensorDict:
    """Trajectory-shaped [2, T] batch without advantage/value_target."""
    shape = (2, n_steps)
    return TensorDict(
        {
            "observation": torch.randn(*shape, 3),
            "action": torch.randn(*shape, ACT_DIM),
            "next": {
                "observation": torch.randn(*shape, 3),
                "reward": torch.randn(*shape, 1),
                "done": torch.zeros(*shape, 1, dtype=torch.bool),
                "terminated": torch.zeros(*shape, 1, dtype=torch.bool),
            },
        },
        list(shape),
    )


RENAME_WEIGHT = [0.5, -1.0, 2.0]  # V(s) = 0.5 s0 - s1 + 2 s2: the critic of the renamed-keys test
RENAME_GAMMA = 0.9
# Row 0 terminates at t=2 (a new episode starts at t=3); row 1 is truncated at t=1.
RENAME_DONE = [[False, False, True, False, False], [False, True, False, False, False]]
RENAME_TERMINATED = [[False, False, True, False, False], [False, False, False, False, False]]


def _episodes_batch() -> TensorDict:
    """[2, 5] trajectories whose ``next`` observation is the next row's, except at an episode's end."""
    obs = torch.randn(2, 5, 3)
    next_obs = torch.cat([obs[:, 1:], torch.randn(2, 1, 3)], 1)
    for row, dones in enumerate(RENAME_DONE):
        for t, done in enumerate(dones):
            if done:
                next_obs[row, t] = torch.randn(3)  # the last state of the episode, not the next one's reset
    return TensorDict(
        {
            "observation": obs,
            "action": torch.randn(2, 5, ACT_DIM),
            "next": {
                "observation": next_obs,
                "reward": torch.randn(2, 5, 1),
                "done": torch.tensor(RENAME_DONE).unsqueeze(-1),
                "terminated": torch.tensor(RENAME_TERMINATED).unsqueeze(-1),
            },
        },
        [2, 5],
    )


def _two_step_returns(batch: TensorDict) -> list[list[float]]:
    """``R_t = r_t + gamma r_{t+1} + gamma^2 V(s'_{t+1})`` by hand, cut at ends (no bootstrap after a termination)."""
    def value(s: list[float]) -> float:
        return sum(si * wi for si, wi in zip(s, RENAME_WEIGHT, strict=True))

    reward = batch["next", "reward"].squeeze(-1).tolist()
    next_obs = batch["next", "observation"].tolist()
    returns = []
    for row in range(2):
        horizon, row_returns = len(reward[row]), []
        for t in range(horizon):
            total = 0.0
            for i in range(2):
                s = t + i
                total += RENAME_GAMMA**i * reward[row][s]
                end = RENAME_DONE[row][s] or s == horizon - 1
                if end or i == 1:
                    if not RENAME_TERMINATED[row][s]:
                        total += RENAME_GAMMA ** (i + 1) * value(next_obs[row][s])
                    break
            row_returns.append(total)
        returns.append(row_returns)
    return returns


@pytest.mark.parametrize("order", ["keys_first", "estimator_first"])
def test_renamed_keys_reach_the_value_estimator(order: str) -> None:
    """The estimator reads the renamed reward/done/terminated and writes the renamed advantage/target:
    the loss's value targets equal two-step returns computed by hand with a critic of known weights."""
    loss = AWRLoss(make_actor("normal"), make_linear_critic(RENAME_WEIGHT))
    rename = {"advantage": "adv", "value_target": "ret", "reward": "rew", "done": "end", "terminated": "fail"}
    if order == "keys_first":
        loss.set_keys(**rename)
    loss.make_value_estimator(KStepReturnEstimator, gamma=RENAME_GAMMA, horizon=2)
    if order == "estimator_first":
        loss.set_keys(**rename)
    batch = _episodes_batch()
    expected_target = torch.tensor(_two_step_returns(batch))
    expected_value = batch["observation"] @ torch.tensor(RENAME_WEIGHT)
    for old, new in (("reward", "rew"), ("done", "end"), ("terminated", "fail")):
        batch.rename_key_(("next", old), ("next", new))
    out = loss(batch)
    assert {"adv", "ret"} <= set(batch.keys()) and "advantage" not in batch and "value_target" not in batch
    torch.testing.assert_close(batch["ret"].squeeze(-1), expected_target, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch["adv"].squeeze(-1), expected_target - expected_value, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["loss_value"], 0.5 * (expected_value - expected_target).pow(2).mean(),
                               atol=1e-5, rtol=1e-5)


def _with(batch: TensorDict, key, value) -> TensorDict:
    batch = batch.clone()
    if value is None:
        del batch[key]
    else:
        batch.set(key, value)
    return batch


INPUT_ERRORS = {
    "missing_action": (lambda b: _with(b, "action", None), KeyError, "action"),
    "missing_observation": (lambda b: _with(b, "observation", None), KeyError, "observation"),
    "missing_advantage": (lambda b: _with(b, "advantage", None), KeyError, "advantage"),
    "advantage_shape": (lambda b: _with(b, "advantage", torch.zeros(N, 2)), ValueError, "'advantage' has shape"),
    "value_target_shape": (lambda b: _with(b, "value_target", torch.zeros(N, 3)), ValueError,
                           "'value_target' has shape"),
    "nan_advantage": (lambda b: _with(b, "advantage", torch.tensor([math.nan] + ADVANTAGE[1:]).unsqueeze(-1)),
                      ValueError, "'advantage' has 1 non-finite"),
    "inf_stored_log_prob": (lambda b: _with(b, "action_log_prob", torch.tensor([-math.inf] + [0.0] * (N - 1))),
                            ValueError, "'action_log_prob' has 1 non-finite"),
    "action_outside_support": (lambda b: _with(b, "action", b["action"].index_fill(0, torch.tensor([3]), math.inf)),
                               ValueError, r"log pi\(a\|s\) of the stored action .* has 1 non-finite"),
}


@pytest.mark.parametrize("case", list(INPUT_ERRORS))
def test_bad_input_raises_naming_the_problem(case: str) -> None:
    corrupt, error, match = INPUT_ERRORS[case]
    loss, batch, _, _, _ = _setup("normal")
    with pytest.raises(error, match=match):
        loss(corrupt(batch))


def test_non_finite_reward_raises_when_the_estimator_runs() -> None:
    loss = AWRLoss(make_actor("normal"), make_critic())
    batch = _trajectory_batch()
    batch["next", "reward"][0, 2] = math.nan
    with pytest.raises(ValueError, match=r"'reward'\) has 1 non-finite"):
        loss(batch)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"max_weight": 0.0}, "max_weight must be > 0"),
        ({"value_scale": 0.0}, "value_scale must be > 0"),
        ({"action_bound_penalty": -1.0}, "action_bound_penalty must be >= 0"),
        ({"entropy_coeff": -0.1}, "entropy_coeff must be >= 0"),
        ({"reduction": "avg"}, "reduction must be one of"),
        ({"weighting": "both"}, "weighting must be one of"),
    ],
    ids=lambda value: "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else "",
)
def test_bad_hyperparameters_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AWRLoss(make_actor("normal"), make_critic(), **kwargs)


# --------------------------------------------------------------------------- gradients
def _linear_categorical_actor() -> ProbabilisticActor:
    """Logits linear in the state: in logit space one SGD step is isotropic, ``J J^T = (|s|^2 + 1) I``."""
    module = TensorDictModule(nn.Linear(3, 4), in_keys=["observation"], out_keys=["logits"])
    return ProbabilisticActor(module, in_keys=["logits"], distribution_class=OneHotCategorical)


def _two_actions_one_state(kind: str, actor: ProbabilisticActor) -> TensorDict:
    """One state twice: action 0 with A = +2, action 1 with A = -2.

    Gaussian actions sit at ``mu(s) +- delta`` (in pre-tanh space for TanhNormal): their
    log-likelihood gradients are mirror images, so the comparison only measures the weighting.
    """
    obs = torch.tensor([[0.3, -0.7, 0.2]]).expand(2, 3)
    td = TensorDict({"observation": obs}, [2])
    if kind == "categorical":
        action = torch.eye(4)[:2]
    else:
        with torch.no_grad():
            loc = dist_params(actor, td)["loc"][0]
        offset = torch.tensor([0.3, -0.2])
        action = torch.stack([loc + offset, loc - offset])
        action = torch.tanh(action) if kind == "tanh_normal" else action
    td.update({"action": action, "advantage": torch.tensor([[2.0], [-2.0]]), "value_target": torch.zeros(2, 1)})
    return td


@pytest.mark.parametrize("kind", ACTOR_KINDS)
def test_sgd_step_raises_log_prob_of_high_advantage_action(kind: str) -> None:
    actor = _linear_categorical_actor() if kind == "categorical" else make_actor(kind)
    loss = AWRLoss(actor, make_critic())
    batch = _two_actions_one_state(kind, actor)
    with torch.no_grad():
        before = hand_log_prob(kind, actor, batch)
    optimizer = torch.optim.SGD(loss.actor_network_params.values(True, True), lr=1e-3)
    loss(batch)["loss_actor"].backward()
    optimizer.step()
    with torch.no_grad():
        change = hand_log_prob(kind, actor, batch) - before
    assert change[0] > 0
    assert change[0] > change[1]


def _grads(params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    return [p.grad for p in params]


def _network_parameters(loss: AWRLoss, network: str) -> list[torch.Tensor]:
    """The parameters the loss optimizes for ``network``: its functional copies, or the network's own."""
    if loss.functional:
        return list(getattr(loss, f"{network}_params").values(True, True))
    return list(getattr(loss, network).parameters())


def _trajectory_batch_with_actions(kind: str) -> TensorDict:
    """A trajectory batch without advantages (the loss's value estimator computes them) and ``kind``'s actions."""
    batch = _trajectory_batch()
    action = make_batch(kind, n=batch.numel())["action"]
    batch.set("action", action.reshape(*batch.shape, -1))
    return batch


@pytest.mark.parametrize("functional", [True, False], ids=["functional", "stateful"])
@pytest.mark.parametrize("source", ["stored_advantage", "estimator"])
@pytest.mark.parametrize("kind", ACTOR_KINDS)
def test_no_gradient_crosses_between_actor_and_critic(kind: str, source: str, functional: bool) -> None:
    loss = AWRLoss(make_actor(kind), make_critic(), functional=functional)
    actor_params, critic_params = _network_parameters(loss, "actor_network"), _network_parameters(loss, "critic_network")
    batch = _batch(kind) if source == "stored_advantage" else _trajectory_batch_with_actions(kind)
    out = loss(batch)

    out["loss_actor"].backward(retain_graph=True)
    assert all(g is None or (g == 0).all() for g in _grads(critic_params))
    assert any(g is not None and (g != 0).any() for g in _grads(actor_params))

    for p in actor_params:
        p.grad = None
    out["loss_value"].backward()
    assert all(g is None or (g == 0).all() for g in _grads(actor_params))
    assert any(g is not None and (g != 0).any() for g in _grads(critic_params))


def test_stateful_loss_calls_the_networks_without_swapping_parameters(monkeypatch) -> None:
    """``functional=False`` holds the networks as submodules and never swaps parameters in."""
    actor, critic = make_actor("normal"), make_critic()
    loss = AWRLoss(actor, critic, functional=False)
    assert not loss.functional and loss.actor_network_params is None and loss.critic_network_params is None
    children = dict(loss.named_children())
    assert children["actor_network"] is actor and children["critic_network"] is critic

    def no_swap(*args, **kwargs):
        raise AssertionError("a stateful loss swapped parameters into a network")

    monkeypatch.setattr(TensorDictParams, "to_module", no_swap)
    out = loss(_trajectory_batch_with_actions("normal"))  # the value estimator runs too
    out["loss_actor"].backward()
    assert all(p.grad is not None for p in actor[0].module.parameters())
    with pytest.raises(AssertionError, match="swapped"):
        AWRLoss(make_actor("normal"), make_critic())(_batch("normal"))  # the functional default does swap


@pytest.mark.parametrize("kind", ["normal", "categorical"])
def test_each_phase_runs_only_its_network(kind: str) -> None:
    """``actor_loss``/``value_loss`` give forward's numbers and call only the actor or the critic."""
    loss, batch, _, _, actor = _setup(kind)
    calls = {"actor": 0, "critic": 0}
    actor[0].module.register_forward_hook(lambda *_: calls.__setitem__("actor", calls["actor"] + 1))
    loss.critic_network.module.register_forward_hook(lambda *_: calls.__setitem__("critic", calls["critic"] + 1))
    full = loss(batch.clone())

    calls.update(actor=0, critic=0)
    actor_out = loss.actor_loss(batch.clone())
    assert calls == {"actor": 1, "critic": 0} and "loss_value" not in actor_out
    torch.testing.assert_close(actor_out["loss_actor"], full["loss_actor"])

    calls.update(actor=0, critic=0)
    value_batch = batch.clone()
    value_out = loss.value_loss(value_batch)
    assert calls == {"actor": 0, "critic": 1} and "loss_actor" not in value_out
    torch.testing.assert_close(value_out["loss_value"], full["loss_value"])
    assert "td_error" in value_batch


# --------------------------------------------------------------------------- direct calls, diagnostics
def _nested_actor() -> ProbabilisticActor:
    """A Gaussian actor whose parameter network is two ``TensorDictModule`` objects in a ``TensorDictSequential``,
    the second reading the first's output (``hidden``) and the input's ``observation``."""
    first = TensorDictModule(nn.Linear(3, 5), in_keys=["observation"], out_keys=["hidden"])
    second = TensorDictModule(_HiddenHead(), in_keys=["hidden", "observation"], out_keys=["loc", "scale"])
    return ProbabilisticActor(TensorDictSequential(first, second), in_keys=["loc", "scale"],
                              distribution_class=IndependentNormal)


class _HiddenHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5 + 3, ACT_DIM)

    def forward(self, hidden: torch.Tensor, observation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc = self.linear(torch.cat([hidden, observation], -1))
        return loc, torch.full_like(loc, 0.5)


def _outputs_and_gradients(loss: AWRLoss, batch: TensorDict) -> tuple[dict, list]:
    torch.manual_seed(7)  # TanhNormal's entropy is a one-sample estimate
    out = loss(batch)
    parameters = [p for p in loss.parameters() if p.requires_grad]
    gradients = torch.autograd.grad(out["loss_actor"] + out["loss_value"], parameters)
    return {key: value.detach() for key, value in out.items()}, list(gradients)


@pytest.mark.parametrize("functional", [True, False], ids=["functional", "stateful"])
@pytest.mark.parametrize("kind", [*ACTOR_KINDS, "nested"])
def test_direct_calls_give_what_the_tensordict_calls_give(kind: str, functional: bool) -> None:
    """The networks called on the batch's tensors give the losses, diagnostics and gradients of the calls through
    TensorDict, to the bit; only the actor's outputs are no longer written into the batch."""
    actor = _nested_actor() if kind == "nested" else make_actor(kind)
    loss = AWRLoss(actor, make_critic(), functional=functional, action_l2_coeff=0.1, entropy_coeff=0.05,
                   **({"action_bound_penalty": 2.0} if kind in ("normal", "plain_normal", "nested") else {}))
    assert loss._direct_actor is not None and loss._direct_critic is not None
    batch = _batch("normal" if kind == "nested" else kind)
    batch.set(("collector", "mask"), torch.tensor([True, False] * (N // 2)))
    direct_batch = batch.clone()
    direct = _outputs_and_gradients(loss, direct_batch)
    loss._direct_actor = loss._direct_critic = None
    wrapped_batch = batch.clone()
    wrapped = _outputs_and_gradients(loss, wrapped_batch)
    assert direct[0].keys() == wrapped[0].keys()
    for key, value in wrapped[0].items():  # kl_behaviour is nan: no behaviour log-prob under the loss's key
        torch.testing.assert_close(direct[0][key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    for direct_gradient, wrapped_gradient in zip(direct[1], wrapped[1], strict=True):
        torch.testing.assert_close(direct_gradient, wrapped_gradient, rtol=0, atol=0)
    written = {"td_error"}
    assert set(direct_batch.keys()) == set(batch.keys()) | written
    assert set(actor[0].out_keys) <= set(wrapped_batch.keys())  # get_dist writes the actor's outputs


def test_wrapper_hooks_and_skip_existing_take_the_tensordict_calls() -> None:
    """A hook on a network's ``TensorDictModule`` runs, and ``set_skip_existing(True)`` reuses the batch's ``loc``:
    the loss then calls the networks through TensorDict, as TorchRL's losses do."""
    actor, critic = make_actor("normal"), make_critic()
    loss = AWRLoss(actor, critic, functional=False)
    calls = []
    handles = [module.register_forward_hook(lambda module, *_: calls.append(type(module).__name__))
               for module in (actor[0], critic)]
    loss(_batch("normal"))
    assert sorted(calls) == ["TensorDictModule", "ValueOperator"]
    for handle in handles:
        handle.remove()

    batch = _batch("normal")
    batch.set("loc", torch.zeros(N, ACT_DIM))
    batch.set("scale", torch.ones(N, ACT_DIM))
    with set_skip_existing(True):
        out = loss.actor_loss(batch.clone())
    log_prob = d.Independent(d.Normal(torch.zeros(N, ACT_DIM), 1.0), 1).log_prob(batch["action"])
    weight = torch.exp(batch["advantage"].squeeze(-1)).clamp(max=20.0)
    torch.testing.assert_close(out["loss_actor"], -(weight * log_prob).mean())


class _CustomForward(TensorDictModule):
    """A ``TensorDictModule`` whose ``forward`` is its own: the loss cannot know what it computes."""

    def forward(self, tensordict: TensorDict, *args, **kwargs) -> TensorDict:
        out = super().forward(tensordict, *args, **kwargs)
        return out.set("loc", out["loc"] + 1.0)


def test_a_network_of_its_own_making_is_called_through_tensordict() -> None:
    net = nn.Sequential(nn.Linear(3, ACT_DIM), FixedStd(0.5))
    actor = ProbabilisticActor(_CustomForward(net, in_keys=["observation"], out_keys=["loc", "scale"]),
                               in_keys=["loc", "scale"], distribution_class=IndependentNormal)
    loss = AWRLoss(actor, make_critic(), weighting="uniform", reduction="none")
    assert loss._direct_actor is None and loss._direct_critic is not None
    batch = _batch("normal")
    with torch.no_grad():
        loc, scale = net(batch["observation"])
    expected = -d.Independent(d.Normal(loc + 1.0, scale), 1).log_prob(batch["action"])
    torch.testing.assert_close(loss(batch)["loss_actor"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["normal", "tanh_normal", "categorical"])
def test_diagnostics_off_computes_the_losses_only(kind: str, monkeypatch) -> None:
    """``diagnostics=False``: the same losses, no diagnostics (nor the entropy, with the bonus off); switching the
    attribute on brings them back for the next call."""
    loss, batch, _, _, _ = _setup(kind)
    torch.manual_seed(3)
    expected = loss(batch.clone())
    loss.diagnostics = False
    assert loss.out_keys == ["loss_actor", "loss_value"]

    def refused(*args, **kwargs):
        raise AssertionError("computed although diagnostics are off")

    monkeypatch.setattr("awr_modules.loss.batch_diagnostics", refused)
    monkeypatch.setattr("awr_modules.loss.closed_form_or_sampled_entropy", refused)
    for out in (loss(batch.clone()), loss.actor_loss(batch.clone())):
        assert set(out.keys()) <= {"loss_actor", "loss_value"}
        torch.testing.assert_close(out["loss_actor"], expected["loss_actor"])
    torch.testing.assert_close(loss(batch.clone())["loss_value"], expected["loss_value"])
    monkeypatch.undo()
    loss.diagnostics = True
    torch.manual_seed(3)
    out = loss(batch.clone())
    assert set(out.keys()) == set(expected.keys())
    for key in loss.out_keys:
        torch.testing.assert_close(out[key], expected[key], equal_nan=True, msg=key)
