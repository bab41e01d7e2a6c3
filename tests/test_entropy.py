"""The entropy-coefficient part: ``alpha`` of the bonus ``-alpha H(pi(.|s))`` tuned toward a target entropy.

- one step on ``J(alpha) = alpha (H - H_target)`` over ``log alpha``, by hand: ``alpha`` grows while the entropy is
  below the target and shrinks while above;
- the refusals (a fixed-std actor, a coefficient also set in the loss) and what is allowed (behaviour cloning);
- the bonus a tuned part turns on is the loss's own bonus, and the policy's entropy it measures is the mean of the
  closed form over the stored states (a sampled estimate for TanhNormal);
- an iteration tunes ``alpha`` before its policy phase, on every actor kind whose entropy can move, and a resumed
  iteration goes on exactly as one that never stopped; ``awr fit`` logs the coefficient and resumes it.
"""

from __future__ import annotations

import copy
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import ACT_DIM, N_ACTIONS, OBS_DIM, dist_params, make_actor, make_critic
from lightning_helpers import checkpoint_dir, load_checkpoint, metric_rows, tiny_args
from tensordict import TensorDict

from awr_modules import AWRLoss, AWRModule, make_replay_buffer
from awr_modules.cli import cli_main
from awr_modules.data import GivenBuffers
from awr_modules.entropy import FixedCoefficient, TunedToEntropy, mean_policy_entropy
from awr_modules.execution import Compiled, Eager, PlainSteps
from awr_modules.iteration import AWRIteration
from awr_modules.phases import Phase
from awr_modules.targets import TDLambda
from awr_modules.temperature import Fixed as FixedTemperature
from awr_recipes.classic_control import ClassicControl

REPO = Path(__file__).resolve().parent.parent
ROWS = 40
TUNED = ["--model.entropy=awr_modules.entropy.TunedToEntropy", "--model.entropy.init_args.target=5.0",
         "--model.entropy.init_args.initial_coeff=0.02", "--model.entropy.init_args.optimizer=torch.optim.Adam",
         "--model.entropy.init_args.optimizer.init_args.lr=0.1"]
"""A target far above a fresh policy's entropy (about 1.4 nats per action dimension): ``alpha`` must grow."""


# ------------------------------------------------------------------ the update by hand
@pytest.mark.parametrize(("entropy", "grows"), [(1.0, True), (3.5, False)])
def test_one_sgd_step_on_log_alpha_moves_alpha_toward_the_target(entropy: float, grows: bool) -> None:
    """``log alpha <- log alpha - lr * alpha * (H - H_target)``: with ``H_target = 2``, ``alpha = 0.5``, ``lr = 0.1``,
    an entropy of 1 (below) gives ``log alpha + 0.05``, an entropy of 3.5 (above) ``log alpha - 0.075``."""
    part = TunedToEntropy(target=2.0, initial_coeff=0.5, optimizer=partial(torch.optim.SGD, lr=0.1))
    coeff = part.update(entropy)
    expected = math.exp(math.log(0.5) - 0.1 * 0.5 * (entropy - 2.0))
    assert coeff == pytest.approx(expected, rel=1e-12, abs=0)
    assert (coeff > 0.5) == grows and part.coeff == coeff
    assert part.update(entropy) == pytest.approx(math.exp(math.log(expected) - 0.1 * expected * (entropy - 2.0)),
                                                 rel=1e-12, abs=0)  # the second step from the new alpha


@pytest.mark.parametrize(("entropy", "sign"), [(-3.0, 1), (0.5, -1)])
def test_adams_first_step_moves_log_alpha_by_its_step_size_toward_the_target(entropy: float, sign: int) -> None:
    """Adam's first step is ``lr * g / (|g| + eps)``: ``lr`` in the direction of the target, whatever the scale."""
    part = TunedToEntropy(target=-1.0, initial_coeff=0.1, optimizer=partial(torch.optim.Adam, lr=0.05))
    assert math.log(part.update(entropy)) == pytest.approx(math.log(0.1) + sign * 0.05, rel=1e-6)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"target": math.nan}, "TunedToEntropy: target must be a finite entropy"),
    ({"target": 0.0, "initial_coeff": 0.0}, "TunedToEntropy: initial_coeff must be > 0"),
])
def test_bad_arguments_are_refused_naming_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TunedToEntropy(**kwargs)


# ------------------------------------------------------------------ refusals and the loss
def test_a_fixed_std_actor_is_refused_naming_both_parts() -> None:
    loss = AWRLoss(make_actor("normal"), make_critic())  # IndependentNormal with a FixedStd head
    with pytest.raises(ValueError, match=r"model.entropy \(TunedToEntropy\).*policy=fixed_std.*cannot move"):
        TunedToEntropy(target=0.0).attach(loss)
    with pytest.raises(ValueError, match=r"model.entropy \(TunedToEntropy\).*policy=fixed_std"):
        AWRModule(ClassicControl("Pendulum-v1", hidden_sizes=[8]), entropy=TunedToEntropy(target=0.0))
    module = AWRModule(ClassicControl("Pendulum-v1", hidden_sizes=[8], policy="learned_std"),
                       entropy=TunedToEntropy(target=0.0))
    assert module.loss_module.entropy_bonus


def test_a_coefficient_set_in_the_loss_too_is_refused() -> None:
    loss = AWRLoss(make_actor("plain_normal"), make_critic(), entropy_coeff=0.1)
    with pytest.raises(ValueError, match=r"model.entropy \(TunedToEntropy\).*model.loss.init_args.entropy_coeff=0.1"):
        TunedToEntropy(target=0.0).attach(loss)


def test_behaviour_cloning_takes_a_tuned_entropy_floor() -> None:
    """With ``weighting="uniform"`` there is no temperature, but the bonus means the same: an entropy floor."""
    module = AWRModule(ClassicControl("Pendulum-v1", hidden_sizes=[8], policy="learned_std"),
                       entropy=TunedToEntropy(target=0.0), loss=partial(AWRLoss, weighting="uniform"))
    assert module.loss_module.entropy_bonus and float(module.loss_module.entropy_coeff) == pytest.approx(0.01)


@pytest.mark.parametrize("kind", ["plain_normal", "tanh_normal", "categorical"])
def test_a_tuned_part_turns_on_the_same_bonus_as_a_loss_built_with_the_coefficient(kind: str) -> None:
    actor, critic = make_actor(kind), make_critic()
    built = AWRLoss(actor, critic, entropy_coeff=0.3, functional=False)
    tuned = AWRLoss(actor, critic, functional=False)
    assert not tuned.entropy_bonus
    TunedToEntropy(target=0.0, initial_coeff=0.3).attach(tuned)
    assert tuned.entropy_bonus and float(tuned.entropy_coeff) == pytest.approx(0.3)
    batch = _rows(kind)[:8].set("advantage", torch.randn(8, 1)).set("value_target", torch.randn(8, 1))
    torch.manual_seed(2)  # TanhNormal's entropy is a one-sample estimate
    expected = built.actor_loss(batch.clone())["loss_actor"]
    torch.manual_seed(2)
    torch.testing.assert_close(tuned.actor_loss(batch.clone())["loss_actor"], expected, rtol=0, atol=0)


def test_the_fixed_default_leaves_the_loss_as_it_was_built() -> None:
    for coeff in (0.0, 0.2):
        loss = AWRLoss(make_actor("normal"), make_critic(), entropy_coeff=coeff)
        FixedCoefficient().attach(loss)
        assert loss.entropy_bonus == (coeff > 0) and float(loss.entropy_coeff) == pytest.approx(coeff)
    module = AWRModule(ClassicControl("Pendulum-v1", hidden_sizes=[8]))
    assert type(module.awr.entropy) is FixedCoefficient and module.awr.entropy is not AWRModule(
        ClassicControl("Pendulum-v1", hidden_sizes=[8])).awr.entropy


# ------------------------------------------------------------------ the measured entropy
def test_the_measured_entropy_is_the_closed_forms_mean_over_every_stored_state() -> None:
    actor, buffer = make_actor("categorical"), make_replay_buffer(ROWS)
    buffer.extend(_rows("categorical"))
    loss = AWRLoss(actor, make_critic())  # functional: the parameters are swapped in
    states = buffer.storage.get(torch.arange(ROWS))
    log_p = torch.log_softmax(dist_params(actor, states)["logits"], -1)
    by_hand = -(log_p.exp() * log_p).sum(-1).double().mean()
    for chunk_size in (None, 7):
        torch.testing.assert_close(mean_policy_entropy(loss, [buffer], chunk_size), by_hand)
    assert float(by_hand) <= math.log(N_ACTIONS)


def test_tanh_normal_entropy_is_the_mean_of_one_sample_estimates() -> None:
    """TanhNormal has no closed form: ``-log pi(a~pi|s)`` once per state, averaged over the buffer."""
    actor, buffer = make_actor("tanh_normal"), make_replay_buffer(ROWS)
    buffer.extend(_rows("tanh_normal"))
    loss = AWRLoss(actor, make_critic(), functional=False)
    states = buffer.storage.get(torch.arange(ROWS)).select("observation")
    torch.manual_seed(4)
    measured = mean_policy_entropy(loss, [buffer])
    torch.manual_seed(4)
    dist = actor.get_dist(states.clone())
    by_hand = -dist.log_prob(dist.rsample()).double().mean()
    torch.testing.assert_close(measured, by_hand)


# ------------------------------------------------------------------ the iteration
def _rows(kind: str) -> TensorDict:
    """ROWS transitions of four 10-step paths (the last one truncated), with actions of the actor ``kind``."""
    generator = torch.Generator().manual_seed(1)
    observation = torch.randn(ROWS, OBS_DIM, generator=generator)
    if kind == "categorical":
        action = torch.nn.functional.one_hot(torch.randint(N_ACTIONS, (ROWS,), generator=generator), N_ACTIONS)
    else:
        action = (torch.rand(ROWS, ACT_DIM, generator=generator) * 1.8 - 0.9)
    done = torch.zeros(ROWS, 1, dtype=torch.bool)
    done[9::10] = True
    terminated = done.clone()
    terminated[-1] = False
    return TensorDict({
        "observation": observation, "action": action, "action_log_prob": -torch.rand(ROWS, generator=generator),
        "next": TensorDict({"observation": torch.roll(observation, -1, 0),
                            "reward": torch.randn(ROWS, 1, generator=generator),
                            "done": done, "terminated": terminated, "truncated": done & ~terminated}, [ROWS]),
    }, [ROWS])


def _iteration(kind: str, entropy, execution=None) -> tuple[AWRIteration, tuple[torch.optim.Optimizer,
                                                                                torch.optim.Optimizer]]:
    torch.manual_seed(0)
    actor, critic = make_actor(kind), make_critic()
    loss = AWRLoss(actor, critic, check_inputs=False, functional=False, value_scale=2.0)
    buffer = make_replay_buffer(ROWS)
    buffer.extend(_rows(kind))
    optimizers = (torch.optim.SGD(actor.parameters(), lr=0.005, momentum=0.9),
                  torch.optim.SGD(critic.parameters(), lr=0.05, momentum=0.9))
    iteration = AWRIteration(loss, GivenBuffers(buffer), TDLambda(0.9, 0.8), FixedTemperature(0.7), Phase(4, 8),
                             Phase(5, 8), execution or Eager(), entropy=entropy)
    iteration.bind(*optimizers, PlainSteps())
    return iteration, optimizers


@pytest.mark.parametrize("kind", ["plain_normal", "tanh_normal", "categorical"])
def test_an_iteration_steps_alpha_on_the_policys_entropy_before_its_policy_phase(kind: str) -> None:
    """The coefficient the policy phase uses is one SGD step from ``initial_coeff`` on the entropy of the policy
    that phase starts from (the value phase leaves the actor as it is), over every stored state."""
    part = TunedToEntropy(target=0.5, initial_coeff=0.2, optimizer=partial(torch.optim.SGD, lr=0.3))
    iteration, _ = _iteration(kind, part)
    seen = []
    actor_loss = iteration.loss.actor_loss
    iteration.loss.actor_loss = lambda td: seen.append(float(iteration.loss.entropy_coeff)) or actor_loss(td)
    torch.manual_seed(5)
    expected_entropy = float(mean_policy_entropy(iteration.loss, iteration.data.buffers))
    torch.manual_seed(5)
    result = iteration.run()
    logged = result.weights["train/buffer_entropy"]
    if kind != "tanh_normal":  # a sampled estimate draws other samples once the phases drew theirs
        assert logged == pytest.approx(expected_entropy, rel=1e-12)
    coeff = math.exp(math.log(0.2) - 0.3 * 0.2 * (logged - 0.5))
    assert result.weights["train/entropy_coeff"] == pytest.approx(coeff, rel=1e-12)
    assert seen == pytest.approx([coeff] * 5, rel=1e-6)  # every policy step, in float32
    assert (coeff > 0.2) == (logged < 0.5)


class _FirstStepOnly(TunedToEntropy):
    """Steps once, then keeps that coefficient: what a graph that kept the first value it read would use."""

    def update(self, entropy: float) -> float:
        if not hasattr(self, "_kept"):
            self._kept = super().update(entropy)
        return self._kept


def _tuned(kind: type[TunedToEntropy] = TunedToEntropy) -> TunedToEntropy:
    return kind(target=4.0, initial_coeff=0.5, optimizer=partial(torch.optim.SGD, lr=0.5))


def _two_iterations(entropy: TunedToEntropy, execution=None) -> tuple[list[torch.Tensor], list[float]]:
    iteration, _ = _iteration("plain_normal", entropy, execution)
    torch.manual_seed(3)
    coeffs = [iteration.run().weights["train/entropy_coeff"] for _ in range(2)]
    return [p.detach().clone() for p in iteration.loss.actor_network.parameters()], coeffs


@pytest.mark.parametrize("fused_steps", [1, 5], ids=["one_by_one", "fused"])
def test_compiled_phases_read_the_coefficient_filled_between_phases(fused_steps: int) -> None:
    """The coefficient changes between the two iterations' policy phases; compiled (and fused) steps take the same
    steps as eager ones, which they could not if a graph had kept the first iteration's value (the control)."""
    eager, coeffs = _two_iterations(_tuned())
    compiled, compiled_coeffs = _two_iterations(_tuned(), Compiled(fused_steps=fused_steps))
    assert coeffs[1] > 1.5 * coeffs[0] and compiled_coeffs == pytest.approx(coeffs, rel=1e-5)
    for ran, expected in zip(compiled, eager, strict=True):
        torch.testing.assert_close(ran, expected, rtol=1e-5, atol=1e-5)
    kept, _ = _two_iterations(_tuned(_FirstStepOnly))
    assert any(not torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(kept, eager, strict=True))


def test_a_fixed_coefficient_logs_nothing_of_its_own() -> None:
    iteration, _ = _iteration("plain_normal", None)
    assert type(iteration.entropy) is FixedCoefficient
    assert not {"train/entropy_coeff", "train/buffer_entropy"} & set(iteration.run().weights)


def _tuned_to_three_nats() -> TunedToEntropy:
    return TunedToEntropy(target=3.0, initial_coeff=0.05, optimizer=partial(torch.optim.Adam, lr=0.2))


def _snapshot(iteration: AWRIteration, optimizers) -> dict:
    return {"iteration": copy.deepcopy(iteration.state_dict()), "loss": copy.deepcopy(iteration.loss.state_dict()),
            "optimizers": [copy.deepcopy(o.state_dict()) for o in optimizers],
            "buffer": copy.deepcopy(iteration.data.buffers[0].state_dict()), "rng": torch.get_rng_state()}


def _restored(snapshot: dict, *, with_entropy: bool = True):
    iteration, optimizers = _iteration("plain_normal", _tuned_to_three_nats())
    state = dict(snapshot["iteration"])
    if not with_entropy:
        del state["entropy"]  # a checkpoint written before the entropy part
    iteration.load_state_dict(state)
    iteration.loss.load_state_dict(snapshot["loss"])
    iteration.data.buffers[0].load_state_dict(snapshot["buffer"])
    for optimizer, saved in zip(optimizers, snapshot["optimizers"], strict=True):
        optimizer.load_state_dict(saved)
    torch.set_rng_state(snapshot["rng"])
    return iteration


def test_a_resumed_iteration_goes_on_exactly_as_one_that_never_stopped() -> None:
    straight, _ = _iteration("plain_normal", _tuned_to_three_nats())
    torch.manual_seed(7)  # the minibatches' draws
    straight_results = [straight.run() for _ in range(3)]
    stopped, optimizers = _iteration("plain_normal", _tuned_to_three_nats())
    torch.manual_seed(7)
    for _ in range(2):
        stopped.run()
    snapshot = _snapshot(stopped, optimizers)
    assert set(snapshot["iteration"]["entropy"]) == {"log_coeff", "optimizer"}
    resumed = _restored(snapshot)
    assert resumed.entropy.coeff == stopped.entropy.coeff != pytest.approx(0.05)
    last = resumed.run()
    assert last.weights == pytest.approx(straight_results[-1].weights, rel=0, abs=0)
    for ran, expected in zip(resumed.loss.parameters(), straight.loss.parameters(), strict=True):
        torch.testing.assert_close(ran, expected, rtol=0, atol=0)
    assert float(resumed.entropy.log_coeff) == float(straight.entropy.log_coeff)
    assert float(resumed.loss.entropy_coeff) == float(straight.loss.entropy_coeff)

    # without its saved state the part starts over from initial_coeff, with a fresh Adam: another coefficient
    fresh = _restored(snapshot, with_entropy=False)
    assert fresh.entropy.coeff == pytest.approx(0.05)
    assert fresh.run().weights["train/entropy_coeff"] != pytest.approx(last.weights["train/entropy_coeff"])


# ------------------------------------------------------------------ awr fit
def _task_args(tmp_path: Path, task: str, epochs: int) -> list[str]:
    """``tiny_args`` on Pendulum with a learned std (``pendulum``) or a bounded one (``pendulum_bounded``), or on
    CartPole (a categorical policy)."""
    args = tiny_args(tmp_path, epochs=epochs, extra=TUNED)
    if task.startswith("pendulum"):
        policy = "bounded_std" if task == "pendulum_bounded" else "learned_std"
        return [*args, f"--model.recipe.init_args.policy={policy}"]
    cartpole = str(REPO / "configs" / "cartpole.yaml")
    return [cartpole if arg.endswith("pendulum.yaml") else arg for arg in args]


@pytest.mark.parametrize("task", ["pendulum", "pendulum_bounded", "cartpole"])
def test_fit_logs_the_tuned_coefficient_and_the_policys_entropy(tmp_path, task: str) -> None:
    cli = cli_main(["fit", *_task_args(tmp_path, task, epochs=2)])
    coeffs, entropies = metric_rows(tmp_path, "train/entropy_coeff"), metric_rows(tmp_path, "train/buffer_entropy")
    assert len(coeffs) == len(entropies) == 2
    assert all(entropy < 5.0 for entropy in entropies) and 0.02 < coeffs[0] < coeffs[1]  # below target: alpha grows
    assert float(cli.model.loss_module.entropy_coeff) == pytest.approx(coeffs[-1], rel=1e-6)
    assert cli.model.loss_module.entropy_bonus


def test_fit_resumes_the_coefficient_and_its_optimizer(tmp_path) -> None:
    """The checkpoint holds ``log alpha`` and Adam's state; the resumed run's next step starts from both: the
    coefficient it logs is the saved part's step on the entropy it measured."""
    cli_main(["fit", *_task_args(tmp_path, "pendulum", epochs=2)])
    saved = load_checkpoint(checkpoint_dir(tmp_path) / "last.ckpt")["awr"]["entropy"]
    assert saved["optimizer"]["state"][0]["step"] == 2
    resumed = cli_main(["fit", *_task_args(tmp_path, "pendulum", epochs=3), "--ckpt_path=last"])
    coeffs, entropies = metric_rows(tmp_path, "train/entropy_coeff"), metric_rows(tmp_path, "train/buffer_entropy")
    assert len(coeffs) == 3 and math.exp(float(saved["log_coeff"])) == pytest.approx(coeffs[1], rel=1e-6)
    by_hand = TunedToEntropy(target=5.0, initial_coeff=0.02, optimizer=partial(torch.optim.Adam, lr=0.1))
    by_hand.load_state_dict(saved)
    assert by_hand.update(entropies[2]) == pytest.approx(coeffs[2], rel=1e-5)
    assert resumed.model.awr.entropy.state_dict()["optimizer"]["state"][0]["step"] == 3


def test_a_checkpoint_written_before_the_part_resumes_it_from_its_initial_state(tmp_path) -> None:
    """A 0.2.0 checkpoint without the ``entropy`` key (a run with the loss's fixed coefficient) resumes with a tuned
    one: it starts at ``initial_coeff``, and its first Adam step moves ``log alpha`` by ``lr`` toward the target."""
    args = tiny_args(tmp_path, epochs=1, extra=["--model.recipe.init_args.policy=learned_std"])
    cli_main(["fit", *args])
    last = checkpoint_dir(tmp_path) / "last.ckpt"
    checkpoint = load_checkpoint(last)
    del checkpoint["awr"]["entropy"]
    torch.save(checkpoint, last)
    resumed = cli_main(["fit", *_task_args(tmp_path, "pendulum", epochs=2), "--ckpt_path=last"])
    assert resumed.model.iteration == 2
    assert metric_rows(tmp_path, "train/entropy_coeff") == pytest.approx([0.02 * math.exp(0.1)], rel=1e-6)


def test_the_reference_overlay_switches_a_task_to_a_learned_std_with_a_tuned_coefficient() -> None:
    cli = cli_main(["-c", str(REPO / "configs" / "halfcheetah.yaml"),
                    "-c", str(REPO / "configs" / "reference" / "tuned_entropy.yaml")], run=False)
    module = cli.model
    assert module.recipe.policy == "learned_std" and type(module.awr.entropy) is TunedToEntropy
    assert module.awr.entropy.target == -6.0 and module.loss_module.entropy_bonus
