"""``LightningSteps``: the phases' steps through Lightning, and the one private Lightning API they use.

Direct steps (full precision, one device, no step hooks) call the optimizer's own ``step()`` and advance
``trainer.global_step`` by hand through the ``LightningOptimizer`` callbacks ``_on_before_step`` and
``_on_after_step`` (:func:`~awr_modules.lightning_steps.count_optimizer_step`): Lightning's private API, which
manual optimization binds to its step counter. Pinned, so that a Lightning release that renames or drops them
fails here and not silently in a run's step count:

- a ``LightningOptimizer`` has both callbacks, and its own ``step()`` calls them around the step;
- a fit with direct steps takes them directly, and its ``trainer.global_step`` equals the optimizer steps taken
  (with the callbacks gone, ``LightningSteps`` would fall back to Lightning's steps: ``direct`` is checked too;
  with them renamed into no-ops, the count would stay at 0);
- a fit with a step hook goes through Lightning's ``optimizer.step()`` and counts the same steps.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning_helpers import CountOptimizerSteps, tiny_args

from awr_modules.cli import cli_main
from awr_modules.lightning_steps import LightningSteps, count_optimizer_step, counts_steps

EPOCHS, VALUE_STEPS, POLICY_STEPS = 2, 3, 3  # tiny_args: 3 value and 3 policy steps per iteration


def test_a_lightning_optimizer_has_the_step_callbacks_and_its_step_calls_them():
    parameter = torch.nn.Parameter(torch.ones(2))
    optimizer = LightningOptimizer(torch.optim.SGD([parameter], lr=0.5))
    assert hasattr(optimizer, "_on_before_step") and hasattr(optimizer, "_on_after_step")
    assert callable(optimizer._on_before_step) and callable(optimizer._on_after_step)
    assert counts_steps(optimizer)
    assert not counts_steps(optimizer.optimizer)  # a plain optimizer has no step count of Lightning's

    calls = []
    optimizer._on_before_step = lambda: calls.append(("before", parameter.detach().clone()))
    optimizer._on_after_step = lambda: calls.append(("after", parameter.detach().clone()))
    parameter.grad = torch.ones(2)
    # Lightning's own step: the callbacks around its strategy's optimizer step (a stand-in strategy here)
    optimizer._strategy = SimpleNamespace(optimizer_step=lambda inner, closure, **kwargs: inner.step(closure))
    optimizer.step()
    assert [name for name, _ in calls] == ["before", "after"]
    torch.testing.assert_close(calls[0][1], torch.ones(2))
    torch.testing.assert_close(calls[1][1], torch.full((2,), 0.5))

    calls.clear()
    count_optimizer_step(optimizer)  # what a direct step does after the optimizer's own step
    assert [name for name, _ in calls] == ["before", "after"]
    torch.testing.assert_close(parameter.detach(), torch.full((2,), 0.5))  # counts, steps nothing


@pytest.mark.parametrize(("extra", "direct"), [
    ([], True),
    (["--trainer.callbacks+=lightning_helpers.CountOptimizerSteps"], False),  # a step hook: Lightning's steps
], ids=["direct", "through_lightning"])
def test_global_step_counts_every_optimizer_step(tmp_path, extra, direct):
    cli = cli_main(["fit", *tiny_args(tmp_path, epochs=EPOCHS, extra=extra), "--trainer.logger=false"])
    steps = cli.model.awr.execution._steps
    assert isinstance(steps, LightningSteps) and steps.direct is direct
    taken = EPOCHS * (VALUE_STEPS + POLICY_STEPS)
    assert cli.model.iteration == EPOCHS
    assert cli.trainer.global_step == taken
    hooked = [callback for callback in cli.trainer.callbacks if isinstance(callback, CountOptimizerSteps)]
    assert [callback.steps for callback in hooked] == ([] if direct else [taken])
