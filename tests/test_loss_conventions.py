"""``AWRLoss`` behaves like TorchRL's own losses: the generic checks TorchRL runs over its objectives.

For every actor kind (IndependentNormal with a fixed std, plain Normal, TanhNormal, one-hot
categorical): keyword dispatch, renamed keys, complete and de-duplicated ``in_keys``, ``out_keys``
naming every entry, reductions with and without TorchRL's validity mask, coefficient assignment,
deepcopy and ``state_dict``, value-estimator dispatch, and ``torch.vmap`` over stacked parameters;
and what the loss's direct calls of the networks read of tensordict's ``TensorDictModule``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import ACTOR_KINDS, make_actor, make_batch, make_critic
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torchrl.objectives.utils import ValueEstimators
from torchrl.objectives.value import GAE, TD0Estimator, TDLambdaEstimator, VTrace

from awr_modules import AWRLoss, KStepReturnEstimator

N = 8
MASK_KEY = ("collector", "mask")


def _loss(kind: str, **kwargs) -> AWRLoss:
    return AWRLoss(make_actor(kind), make_critic(), **kwargs)


LOG_PROB = _loss("normal").tensor_keys.sample_log_prob  # tensordict's name for the actor's log-prob


def _batch(kind: str, n: int = N) -> TensorDict:
    """``conftest.make_batch`` with the behaviour log-prob under the loss's default key."""
    batch = make_batch(kind, n)
    batch.rename_key_("sample_log_prob", "_log_prob")
    return batch.rename_key_("_log_prob", LOG_PROB)


def _trajectory(kind: str, steps: int = 6) -> TensorDict:
    """A [2, T] trajectory batch without targets: the loss's value estimator computes them."""
    batch = _batch(kind, 2 * steps).exclude("advantage", "value_target").reshape(2, steps)
    batch.set("next", TensorDict({"observation": torch.randn(2, steps, 3), "reward": torch.randn(2, steps, 1),
                                  "done": torch.zeros(2, steps, 1, dtype=torch.bool),
                                  "terminated": torch.zeros(2, steps, 1, dtype=torch.bool)}, [2, steps]))
    return batch


@pytest.mark.parametrize("kind", ACTOR_KINDS)
def test_keyword_dispatch_returns_out_keys_in_order(kind):
    loss, batch = _loss(kind), _batch(kind)
    batch.set("priority_weight", torch.linspace(0.5, 1.5, N))
    torch.manual_seed(3)  # TanhNormal's entropy is a one-sample estimate
    expected = loss(batch.clone())
    kwargs = {"observation": batch["observation"], "action": batch["action"], "advantage": batch["advantage"],
              "value_target": batch["value_target"], LOG_PROB: batch[LOG_PROB],
              "priority_weight": batch["priority_weight"]}
    torch.manual_seed(3)
    outputs = loss(**kwargs)
    assert isinstance(outputs, tuple) and len(outputs) == len(loss.out_keys)
    for key, value in zip(loss.out_keys, outputs, strict=True):
        torch.testing.assert_close(value, expected[key], msg=key)


@pytest.mark.parametrize("kind", ACTOR_KINDS)
def test_in_keys_are_complete_and_unique(kind):
    loss = _loss(kind)
    keys = loss.in_keys
    assert len(keys) == len(set(keys))
    assert {"observation", "action", "advantage", "value_target", "priority_weight", loss.tensor_keys.sample_log_prob,
            ("next", "reward"), ("next", "done"), ("next", "terminated"), ("next", "observation")} == set(keys)
    loss.set_keys(action="act", reward="rew")
    assert "act" in loss.in_keys and ("next", "rew") in loss.in_keys and "action" not in loss.in_keys


@pytest.mark.parametrize("kind", ACTOR_KINDS)
def test_out_keys_name_every_entry_and_can_be_selected(kind):
    loss = _loss(kind)
    out = loss(_batch(kind))
    assert set(out.keys()) == set(loss.out_keys)
    assert loss.out_keys[:2] == ["loss_actor", "loss_value"]
    batch = _batch(kind)
    torch.manual_seed(3)
    expected = loss(batch.clone())
    torch.manual_seed(3)
    loss.select_out_keys("loss_actor", "weight_ess")
    loss_actor, ess = loss(observation=batch["observation"], action=batch["action"], advantage=batch["advantage"],
                           value_target=batch["value_target"])
    torch.testing.assert_close(loss_actor, expected["loss_actor"])
    torch.testing.assert_close(ess, expected["weight_ess"])


def test_kl_behaviour_is_nan_without_a_stored_log_prob():
    out = _loss("normal")(_batch("normal").exclude(LOG_PROB))
    assert math.isnan(out["kl_behaviour"])


@pytest.mark.parametrize("kind", ACTOR_KINDS)
def test_renamed_keys_read_and_write_the_new_names(kind):
    loss, batch = _loss(kind), _batch(kind)
    torch.manual_seed(3)
    expected = loss(batch.clone())
    loss.set_keys(action="act", advantage="adv", value_target="ret", sample_log_prob="mu", priority="prio")
    renamed = batch.clone()
    for old, new in (("action", "act"), ("advantage", "adv"), ("value_target", "ret"), (LOG_PROB, "mu")):
        renamed.rename_key_(old, new)
    torch.manual_seed(3)
    out = loss(renamed)
    for key in loss.out_keys:
        torch.testing.assert_close(out[key], expected[key], msg=key)
    assert "prio" in renamed and "td_error" not in renamed


def _padded(kind: str) -> tuple[TensorDict, TensorDict]:
    """A batch, and the same batch with 3 padded rows (garbage, nan advantages) masked out."""
    batch = _batch(kind)
    padding = _batch(kind, 3)
    padding["advantage"] = torch.full((3, 1), float("nan"))
    padded = torch.cat([batch, padding])
    padded.set(MASK_KEY, torch.cat([torch.ones(N, 1, dtype=torch.bool), torch.zeros(3, 1, dtype=torch.bool)]))
    return batch, padded


@pytest.mark.parametrize("normalize_advantage", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ACTOR_KINDS)
def test_masked_rows_change_nothing(kind, reduction, normalize_advantage):
    batch, padded = _padded(kind)
    torch.manual_seed(1)  # TanhNormal's entropy is a one-sample estimate
    loss = _loss(kind, reduction=reduction, normalize_advantage=normalize_advantage, check_inputs=False)
    expected = loss(batch)
    torch.manual_seed(1)
    out = loss(padded)
    keys = [key for key in loss.out_keys if not (kind == "tanh_normal" and key == "entropy")]
    for key in keys:
        torch.testing.assert_close(out[key], expected[key], msg=key)


@pytest.mark.parametrize("kind", ACTOR_KINDS)
def test_masked_rows_leave_the_gradients_of_the_valid_ones(kind):
    """Padded rows with nan targets and importance weights: the same finite gradients as without them."""
    batch, padded = _padded(kind)
    batch.set("priority_weight", torch.linspace(0.5, 1.5, N))
    padded.set("priority_weight", torch.cat([batch["priority_weight"], torch.full((3,), float("nan"))]))
    padded["value_target"][N:] = float("nan")
    loss = _loss(kind, check_inputs=False, normalize_advantage=True)
    gradients = []
    for data in (batch, padded):
        loss.zero_grad()
        torch.manual_seed(5)  # TanhNormal's entropy is a one-sample estimate
        out = loss(data)
        (out["loss_actor"] + out["loss_value"]).backward()
        gradients.append([p.grad.clone() for p in loss.parameters() if p.grad is not None])
    assert gradients[0] and all(torch.isfinite(g).all() for g in gradients[1])
    for expected, got in zip(*gradients, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ACTOR_KINDS)
def test_reduction_none_keeps_the_batch_shape_also_with_a_mask(kind):
    batch, padded = _padded(kind)
    loss = _loss(kind, reduction="none", check_inputs=False)
    plain = loss(batch.reshape(2, N // 2))
    assert plain["loss_actor"].shape == plain["loss_value"].shape == torch.Size([2, N // 2])
    masked = loss(padded)
    assert masked["loss_actor"].shape == torch.Size([N + 3])
    torch.testing.assert_close(masked["loss_value"][:N], loss(batch)["loss_value"])
    assert (masked["loss_value"][N:] == 0).all() and (masked["loss_actor"][N:] == 0).all()


COEFFICIENTS = {"temperature": 0.5, "max_weight": 3.0, "value_scale": 4.0, "entropy_coeff": 0.2,
                "action_l2_coeff": 0.1, "action_bound_penalty": 2.0}


@pytest.mark.parametrize(("kind", "name"), [
    (kind, name) for kind in ACTOR_KINDS for name in sorted(COEFFICIENTS)
    if not (name == "action_bound_penalty" and kind in ("tanh_normal", "categorical"))])  # refused there
def test_coefficients_are_assignable_buffers(kind, name):
    """Assigning a coefficient gives the losses of a loss built with that value."""
    value = COEFFICIENTS[name]
    initial = {"entropy_coeff": 0.05, "action_l2_coeff": 0.05, "action_bound_penalty": 1.0}
    actor, critic = make_actor(kind), make_critic()
    loss = AWRLoss(actor, critic, **{name: initial.get(name, 1.0)})
    batch = _batch(kind)
    setattr(loss, name, value)
    assert isinstance(getattr(loss, name), torch.Tensor) and getattr(loss, name).item() == pytest.approx(value)
    assert name in dict(loss.named_buffers())
    fresh = AWRLoss(actor, critic, **{name: value})
    torch.manual_seed(4)  # TanhNormal's entropy is a one-sample estimate
    out = loss(batch.clone())
    torch.manual_seed(4)
    expected = fresh(batch.clone())
    for key in ("loss_actor", "loss_value"):
        torch.testing.assert_close(out[key], expected[key])


def test_temperature_assignment_changes_the_weights():
    loss = _loss("normal", max_weight=1e6)
    advantage = torch.tensor([1.0, 2.0])
    loss.temperature = 0.5
    torch.testing.assert_close(loss.weights(advantage), torch.exp(advantage / 0.5))


@pytest.mark.parametrize("functional", [True, False], ids=["functional", "stateful"])
@pytest.mark.parametrize("kind", ACTOR_KINDS)
def test_deepcopy_and_state_dict_round_trip(kind, functional):
    loss = _loss(kind, temperature=0.7, functional=functional)
    batch = _batch(kind)
    torch.manual_seed(2)
    expected = loss(batch.clone())
    clone = copy.deepcopy(loss)
    assert set(clone.state_dict()) == set(loss.state_dict())
    fresh = _loss(kind, functional=functional)
    fresh.load_state_dict(loss.state_dict())
    assert fresh.temperature.item() == pytest.approx(0.7)
    for copied in (clone, fresh):
        torch.manual_seed(2)
        out = copied(batch.clone())
        torch.testing.assert_close(out["loss_actor"], expected["loss_actor"])
        torch.testing.assert_close(out["loss_value"], expected["loss_value"])


@pytest.mark.parametrize(("value_type", "estimator_class"), [
    (ValueEstimators.TD0, TD0Estimator), (ValueEstimators.TDLambda, TDLambdaEstimator), (ValueEstimators.GAE, GAE),
    (ValueEstimators.VTrace, VTrace)])
def test_value_estimator_dispatch(value_type, estimator_class):
    loss = _loss("normal")
    loss.make_value_estimator(value_type, gamma=0.9)
    assert type(loss.value_estimator) is estimator_class and loss.value_type == value_type
    assert float(loss.value_estimator.gamma) == pytest.approx(0.9)
    assert loss.value_estimator.tensor_keys.advantage == "advantage"


def test_unsupported_value_estimator_is_refused():
    unsupported = [v for v in ValueEstimators if v not in AWRLoss.SUPPORTED_VALUE_ESTIMATORS]  # MAGAE (torchrl 0.14)
    if not unsupported:
        pytest.skip("this torchrl has no value estimator the loss does not support")
    with pytest.raises(NotImplementedError, match=unsupported[0].name):
        _loss("normal").make_value_estimator(unsupported[0])


def test_a_user_estimator_keeps_its_own_keys():
    loss = _loss("normal")
    loss.set_keys(advantage="adv", value_target="ret")
    estimator = TD0Estimator(gamma=0.9, value_network=loss.critic_network)
    estimator.set_keys(reward="my_reward")
    loss.make_value_estimator(estimator)
    assert loss.value_estimator is estimator
    keys = estimator.tensor_keys
    assert (keys.advantage, keys.value_target, keys.reward) == ("advantage", "value_target", "my_reward")


def test_built_estimators_follow_renamed_keys():
    loss = _loss("normal")
    loss.make_value_estimator(KStepReturnEstimator, gamma=0.9, horizon=2)
    loss.set_keys(reward="rew")
    assert loss.value_estimator.tensor_keys.reward == "rew"
    assert loss.value_estimator.tensor_keys.advantage == "advantage"


def _vmapped(loss: AWRLoss, stacked: TensorDict, batch: TensorDict) -> tuple[torch.Tensor, torch.Tensor]:
    def losses(params: TensorDict, data: TensorDict) -> tuple[torch.Tensor, torch.Tensor]:
        with params.to_module(loss):
            out = loss(data)
        return out["loss_actor"], out["loss_value"]

    return torch.vmap(losses, (0, None), randomness=loss.vmap_randomness)(stacked, batch)


@pytest.mark.parametrize("source", ["stored_targets", "estimator"])
@pytest.mark.parametrize("kind", ACTOR_KINDS)
def test_vmap_over_stacked_parameters(kind, source):
    """Three parameter sets in one call give each set's own losses: no data-dependent control flow.

    (TanhNormal's entropy is a random one-sample estimate: vmap draws it once for all sets, and the
    bonus stays off so that the vmapped draws need not match the eager ones.)
    """
    loss = _loss(kind, check_inputs=False, action_bound_penalty=None,
                 entropy_coeff=0.0 if kind == "tanh_normal" else 0.01)
    assert loss.vmap_randomness == ("same" if kind == "tanh_normal" else "error")
    params = TensorDict.from_module(loss)
    stacked = torch.stack([params.data.apply(lambda p, i=i: p + 0.1 * i * torch.randn_like(p)) for i in range(3)])
    batch = _batch(kind) if source == "stored_targets" else _trajectory(kind)
    actor_losses, value_losses = _vmapped(loss, stacked, batch)
    assert actor_losses.shape == value_losses.shape == torch.Size([3])
    for index in range(3):
        with stacked[index].to_module(loss):
            expected = loss(batch.clone())
        torch.testing.assert_close(actor_losses[index], expected["loss_actor"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(value_losses[index], expected["loss_value"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(actor_losses[0], actor_losses[2])


def test_keyword_dispatch_without_diagnostics_returns_the_two_losses():
    loss, batch = _loss("normal", diagnostics=False), _batch("normal")
    expected = _loss("normal")
    expected.load_state_dict(loss.state_dict())
    outputs = loss(observation=batch["observation"], action=batch["action"], advantage=batch["advantage"],
                   value_target=batch["value_target"])
    assert loss.out_keys == ["loss_actor", "loss_value"] and len(outputs) == 2
    reference = expected(batch.clone())
    torch.testing.assert_close(outputs[0], reference["loss_actor"])
    torch.testing.assert_close(outputs[1], reference["loss_value"])


class _TwoHeads(torch.nn.Module):
    """``scaled(a=..., b=..., factor=...)``: a module called by keyword and through a method of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)

    def scaled(self, a: torch.Tensor, b: torch.Tensor, factor: float = 1.0) -> tuple[torch.Tensor, ...]:
        return factor * self.linear(a), b.sum(-1, keepdim=True), a.mean(-1, keepdim=True)


def test_direct_calls_read_what_tensordict_module_keeps_of_its_arguments():
    """The two private attributes of ``TensorDictModule`` the direct calls read: ``_kwargs`` (the argument names of
    a dict of ``in_keys``) and ``_get_kwargs``. A module called by keyword, through a method, with nested keys and an
    output skipped with ``"_"``, gives through :func:`direct_call` what the module writes."""
    from awr_modules._torchrl_compat import direct_call

    module = TensorDictModule(_TwoHeads(), in_keys={"a": "observation", "b": ("nested", "x")},
                              out_keys=["first", ("nested", "second"), "_"], method="scaled",
                              method_kwargs={"factor": 2.0})
    assert module._kwargs == ["a", "b"] and module.in_keys == ["observation", ("nested", "x")]
    assert module._get_kwargs == {}
    batch = TensorDict({"observation": torch.randn(N, 3), "nested": {"x": torch.randn(N, 4)}}, [N])
    expected = module(batch.clone())
    values = direct_call(module)(batch)
    assert set(values) == {"first", ("nested", "second")}
    for key, value in values.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    assert direct_call(TensorDictModule(_TwoHeads(), in_keys=["observation"], out_keys=["y"],
                                        get_kwargs={"as_padded_tensor": True})) is None


def test_unchecked_tensordicts_are_what_the_public_constructor_builds():
    """``unchecked_tensordict`` reads tensordict's private ``TensorDict._new_unsafe``: it must still exist, and what
    it builds (flat keys) must be what ``TensorDict(...)`` builds; nested keys take the public constructor and end
    up nested."""
    from awr_modules._torchrl_compat import unchecked_tensordict

    assert callable(getattr(TensorDict, "_new_unsafe", None)), "tensordict renamed TensorDict._new_unsafe"
    flat = {"observation": torch.randn(N, 3), "action": torch.randn(N, 2)}
    built, expected = unchecked_tensordict(flat, torch.Size([N]), torch.device("cpu")), TensorDict(flat, [N], "cpu")
    assert type(built) is TensorDict
    assert (built.batch_size, built.device, set(built.keys())) == (expected.batch_size, expected.device, set(flat))
    assert all(built.get(key) is flat[key] for key in flat)
    nested = unchecked_tensordict({"observation": flat["observation"], ("next", "reward"): torch.ones(N, 1)},
                                  torch.Size([N]))
    assert nested.get("next").batch_size == torch.Size([N]) and nested.get(("next", "reward")).shape == (N, 1)
    scalars = unchecked_tensordict({"loss_actor": torch.tensor(1.5)}, torch.Size([]))
    assert scalars.batch_size == torch.Size([]) and scalars.get("loss_actor").item() == 1.5


def test_independent_log_probs_are_summed_from_the_base_bit_for_bit():
    """The loss sums an ``IndependentNormal``'s base log-probs itself: the same bits as ``Independent.log_prob``; a
    subclass with a ``log_prob`` of its own (TorchRL's ``TruncatedNormal``) is asked as it is."""
    from torchrl.modules import IndependentNormal, TruncatedNormal

    from awr_modules.distributions import log_prob_per_transition

    loc, scale = torch.randn(N, 4), torch.rand(N, 4) + 0.1
    action = torch.randn(N, 4)
    dist = IndependentNormal(loc, scale)
    assert torch.equal(log_prob_per_transition(dist, action, 1), dist.log_prob(action))
    truncated = TruncatedNormal(loc, scale, low=-1.0, high=1.0)
    inside = action.clamp(-0.9, 0.9)
    assert torch.equal(log_prob_per_transition(truncated, inside, 1), truncated.log_prob(inside))
    plain = torch.distributions.Normal(loc, scale)  # per-dimension log-probs, summed per transition
    assert torch.equal(log_prob_per_transition(plain, action, 1), plain.log_prob(action).sum(-1))
