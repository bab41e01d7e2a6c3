"""The value and policy phases: how minibatches are drawn and checked, and how their steps are taken.

- a phase's minibatches, drawn all at once, sample the buffer uniformly (value phase,
  ``weighting="loss"``) or proportionally to the priorities (``weighting="sampling"``),
  exactly as ``buffer.sample`` per step would, and carry only the keys the loss reads;
- the loss's input checks run once over the stored data of a phase;
- a non-finite loss at the end of a phase stops training with the optimizer to look at;
- the compiled and fused executions train the same parameters as eager.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lightning_helpers import tiny_args
from tensordict import TensorDict

from awr_modules import AWRLoss, AWRModule, make_replay_buffer
from awr_modules.cli import cli_main
from awr_modules.phases import check_finite_losses, for_compiled_phases, minibatch, phase_inputs
from awr_recipes.classic_control import ClassicControl

SIZE = 8


def _loss_with_buffer(prioritized: bool) -> tuple[AWRLoss, object, torch.Tensor]:
    """A Pendulum loss and a buffer of SIZE transitions; observation[:, 0] is the row number."""
    recipe = ClassicControl("Pendulum-v1", hidden_sizes=[8])
    loss = AWRLoss(*recipe.make_networks(recipe.make_env(0)), weighting="sampling" if prioritized else "loss")
    buffer = make_replay_buffer(SIZE, prioritized=prioritized, priority="weight")
    rows = torch.arange(SIZE, dtype=torch.float32)
    buffer.extend(TensorDict({
        "observation": torch.stack([rows, torch.zeros(SIZE), torch.zeros(SIZE)], -1),
        "action": torch.zeros(SIZE, 1), "action_log_prob": torch.zeros(SIZE),
        "advantage": torch.zeros(SIZE, 1), "value_target": torch.zeros(SIZE, 1),
        "collector": TensorDict({"traj_ids": torch.zeros(SIZE, dtype=torch.long)}, [SIZE]),  # not read by the loss
    }, [SIZE]))
    priority = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 1.5, 8.0])
    if prioritized:
        buffer.update_priority(torch.arange(SIZE), priority)
    return loss, buffer, priority


def _minibatches(loss: AWRLoss, buffer, steps: int, batch_size: int, prioritized: bool) -> list[TensorDict]:
    """The minibatches a phase would train on: its stored view gathered at its drawn indices."""
    stored, indices = phase_inputs(buffer, loss, steps, batch_size, prioritized=prioritized)
    return [stored[index] for index in indices]


def _frequencies(batches) -> torch.Tensor:
    rows = torch.cat([batch["observation"][:, 0].long() for batch in batches])
    return torch.bincount(rows, minlength=SIZE).double() / rows.numel()


@pytest.mark.parametrize("prioritized", [False, True])
def test_phase_minibatches_sample_like_the_buffer(prioritized):
    loss, buffer, priority = _loss_with_buffer(prioritized)
    torch.manual_seed(0)
    batches = _minibatches(loss, buffer, 100, 200, prioritized)
    assert len(batches) == 100
    assert all(batch.batch_size == torch.Size([200]) for batch in batches)
    assert set(batches[0].keys()) == {"observation", "action", "action_log_prob", "advantage", "value_target"}
    expected = priority / priority.sum() if prioritized else torch.full((SIZE,), 1 / SIZE)
    # 20k draws: each frequency's standard error is at most 0.0035; 0.01 is about 3 of them.
    assert (_frequencies(batches) - expected.double()).abs().max() < 0.01


def test_value_phase_samples_uniformly_even_when_the_actor_samples_by_weight():
    loss, buffer, _ = _loss_with_buffer(prioritized=True)
    torch.manual_seed(0)
    frequency = _frequencies(_minibatches(loss, buffer, 100, 200, False))
    assert (frequency - 1 / SIZE).abs().max() < 0.01


def test_phase_checks_the_stored_data_once_before_its_first_step():
    loss, buffer, _ = _loss_with_buffer(prioritized=False)
    buffer.storage.get(slice(0, SIZE))["advantage"][3] = float("nan")
    with pytest.raises(ValueError, match="advantage.*non-finite"):
        phase_inputs(buffer, loss, 10, 4, prioritized=False)


@pytest.mark.parametrize(("key", "optimizer"), [("loss_actor", "actor_optimizer"), ("loss_value", "critic_optimizer")])
def test_non_finite_phase_loss_names_the_optimizer(key, optimizer):
    with pytest.raises(FloatingPointError, match=f"{key}.*{optimizer}"):
        check_finite_losses(3, None, TensorDict({key: torch.tensor(float("nan"))}, []))
    check_finite_losses(3, TensorDict({key: torch.tensor(1.0)}, []))  # finite: no error


@pytest.mark.parametrize("device", [None, "cpu"])
def test_a_minibatch_of_nested_keys_compiles_into_one_graph(device):
    """A Q critic's minibatch (``("next", "reward")`` beside ``observation``), gathered from storage on a device,
    compiles without a graph break (``fullgraph=True`` raises on one): a break there sent the whole compiled phase
    back to eager mode."""
    stored = for_compiled_phases(TensorDict({"observation": torch.randn(50, 3), "next": {
        "reward": torch.randn(50, 1), "terminated": torch.zeros(50, 1, dtype=torch.bool)}}, [50], device=device))
    index = torch.tensor([3, 1, 4, 1])
    torch._dynamo.reset()
    gathered = torch.compile(lambda data, rows: minibatch(data, rows)["next", "reward"] * 2, fullgraph=True)(
        stored, index)
    torch.testing.assert_close(gathered, stored["next", "reward"][index] * 2)


def test_compiled_losses_train_the_same_parameters_as_eager(tmp_path):
    trained = {}
    for execution in ("Eager", "Compiled"):
        out = tmp_path / execution
        extra = [f"--model.execution=awr_modules.execution.{execution}"]
        cli = cli_main(["fit", *tiny_args(out, epochs=1, extra=extra), "--seed_everything=0"])
        trained[execution] = [p.detach().clone() for p in cli.model.parameters()]
    for eager, compiled in zip(trained["Eager"], trained["Compiled"], strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_fused_steps_train_the_same_parameters_and_count_global_steps(tmp_path, monkeypatch):
    """``Compiled(fused_steps=2)``: of each phase's 3 steps, 2 run as one fused graph and 1 alone; the parameters
    and ``global_step`` equal those of one step per graph call; the shared compiles each phase's graphs once
    while the buffer grows (the fused and the single-step graph of each phase: four graphs), none again for a
    new length or for tensordict's pytree registration."""
    from awr_modules.fused_steps import FusedSGDSteps

    calls = []
    fused_call = FusedSGDSteps.__call__
    monkeypatch.setattr(FusedSGDSteps, "__call__", lambda self, *args: calls.append(1) or fused_call(self, *args))
    trained = {}
    for fused_steps in (1, 2):
        out = tmp_path / f"fused_{fused_steps}"
        if fused_steps == 2:
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
        cli = cli_main(["fit", *tiny_args(out, epochs=3, extra=["--model.execution=awr_modules.execution.Compiled",
                                                               f"--model.execution.init_args.fused_steps={fused_steps}"]),
                        "--seed_everything=0"])
        assert cli.trainer.global_step == 3 * (3 + 3)
        trained[fused_steps] = [p.detach().clone() for p in cli.model.parameters()]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 4  # three buffer lengths, compiled once
    assert len(calls) == 3 * 2  # two phases per iteration, fused only with fused_steps=2
    for one_by_one, fused in zip(trained[1], trained[2], strict=True):
        torch.testing.assert_close(fused, one_by_one, rtol=1e-4, atol=1e-5)


def test_direct_steps_train_like_lightnings_per_step_calls_and_count_global_steps(tmp_path, monkeypatch):
    """Full precision on one device and no step hook: the phases call backward and the optimizer's step
    themselves. A callback with a step hook brings Lightning's calls back; both train the same parameters."""
    steps_per_iteration = 3 + 3  # tiny_args: value_phase.steps + policy_phase.steps
    lightning_backward = AWRModule.manual_backward
    with monkeypatch.context() as patch:
        patch.setattr(AWRModule, "manual_backward", lambda *args: pytest.fail("Lightning's backward ran"))
        direct = cli_main(["fit", *tiny_args(tmp_path / "direct", epochs=2), "--seed_everything=0"])
    assert AWRModule.manual_backward is lightning_backward
    hooked = cli_main(["fit", *tiny_args(tmp_path / "hooked", epochs=2), "--seed_everything=0",
                       "--trainer.callbacks+=lightning_helpers.CountOptimizerSteps"])
    (counter,) = [c for c in hooked.trainer.callbacks if type(c).__name__ == "CountOptimizerSteps"]
    assert counter.steps == 2 * steps_per_iteration  # the hook ran at every step: Lightning's path
    for cli in (direct, hooked):
        assert cli.trainer.global_step == 2 * steps_per_iteration
    for a, b in zip(direct.model.parameters(), hooked.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_direct_steps_need_full_precision_one_device_and_no_step_hooks():
    from types import SimpleNamespace

    import lightning.pytorch as pl
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    from awr_modules.distributed import direct_steps_suffice

    class Hooked(pl.Callback):
        def on_after_backward(self, trainer, module) -> None:
            pass

    module = AWRModule(ClassicControl("Pendulum-v1", hidden_sizes=[8]))  # the parts' defaults
    single = SingleDeviceStrategy(device=torch.device("cpu"))

    def trainer(precision, strategy, callbacks=()):
        return SimpleNamespace(precision_plugin=precision, strategy=strategy, callbacks=list(callbacks))

    assert direct_steps_suffice(trainer(Precision(), single), module)
    assert not direct_steps_suffice(trainer(MixedPrecision("bf16-mixed", "cpu"), single), module)
    assert not direct_steps_suffice(trainer(Precision(), DDPStrategy()), module)
    assert not direct_steps_suffice(trainer(Precision(), single, [Hooked()]), module)


def test_fit_reuses_stored_values_only_while_critic_and_normaliser_are_unchanged(tmp_path, monkeypatch):
    """An iteration's first refresh runs the critic on the new rows only once the observation statistics are
    frozen (the critic moves in the value phase alone); its targets equal a full refresh, in a wrapped ring."""
    import awr_modules.targets as targets_file

    full_refresh, reused = targets_file.refresh_value_targets_over, []

    def checked(buffers, estimator, *, stale_values=None, **kwargs):
        expected = None
        if stale_values is not None:
            expected = [copy.deepcopy(buffer) for buffer in buffers]
            full_refresh(expected, estimator, **kwargs)
        full_refresh(buffers, estimator, stale_values=stale_values, **kwargs)
        reused.append(stale_values is not None)
        for buffer, full in zip(buffers, expected, strict=True) if expected else []:
            index = torch.arange(len(buffer))
            for key in ("state_value", "value_target", "advantage"):
                torch.testing.assert_close(buffer.storage.get(index)[key], full.storage.get(index)[key],
                                           atol=1e-5, rtol=1e-5)

    monkeypatch.setattr(targets_file, "refresh_value_targets_over", checked)
    # 128 frames per iteration, statistics frozen at 256 env steps (after the 2nd collection), a ring of 300
    cli_main(["fit", *tiny_args(tmp_path, epochs=5, extra=["--model.data.init_args.buffer_size=300"])])
    assert reused == [False, False, False, False, True, False, True, False, True, False]
