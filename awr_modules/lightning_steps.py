"""Optimizer steps through Lightning: precision plugins, DDP's gradient averaging and Lightning's step count.

:class:`LightningSteps` is the :class:`~awr_modules.execution.OptimizerSteps` of the Lightning module. An AWR
iteration runs many backward passes per Lightning step, each through one network and outside DDP's forward,
so DDP's reducer is bypassed and the gradients are averaged by hand before each optimizer step
(:mod:`awr_modules.distributed`). Where none of Lightning's per-step calls is needed (full precision, one
device, no step hooks: :func:`~awr_modules.distributed.direct_steps_suffice`), the steps are the plain
``backward()`` and the optimizer's own ``step()``, and Lightning's step counter is advanced by hand.
:class:`StopWorkersOnException` is the callback that stops the module's workers when a run fails.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import nn

from awr_modules.distributed import average_gradients, direct_steps_suffice, no_backward_sync


def count_optimizer_step(optimizer: LightningOptimizer) -> None:
    """Advance ``trainer.global_step`` by one optimizer step taken outside ``LightningOptimizer.step``.

    Lightning has no public call for this: manual optimization counts steps in the optimizer wrapper's
    ``_on_before_step`` / ``_on_after_step`` callbacks. This is the project's one use of them; a test fails
    if Lightning renames or drops them.
    """
    optimizer._on_before_step()
    optimizer._on_after_step()


def counts_steps(optimizer: object) -> bool:
    """Whether ``optimizer`` has the step-count callbacks :func:`count_optimizer_step` calls."""
    return hasattr(optimizer, "_on_before_step") and hasattr(optimizer, "_on_after_step")


class LightningSteps:
    """Backward passes and optimizer steps of ``module``'s phases, the way its trainer needs them."""

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module
        trainer = module.trainer
        self.direct = all(counts_steps(o) for o in module.optimizers()) and direct_steps_suffice(trainer, module)

    def backward(self, objective: torch.Tensor) -> None:
        """Lightning's backward (precision plugin included); under DDP without its gradient sync."""
        if self.direct:
            objective.backward()
            return
        with no_backward_sync(self.module.trainer.strategy):
            self.module.manual_backward(objective)

    def step(self, optimizer: LightningOptimizer, network: nn.Module) -> None:
        """Average ``network``'s gradients across ranks (DDP), then Lightning's optimizer step."""
        if self.direct:
            optimizer.optimizer.step()
            count_optimizer_step(optimizer)
            return
        if self.module.trainer.world_size > 1:
            average_gradients(network.parameters(), self.module.trainer.strategy)
        optimizer.step()

    def count(self, optimizer: LightningOptimizer, steps: int) -> None:
        for _ in range(steps):
            count_optimizer_step(optimizer)

    def unwrapped(self, optimizer: LightningOptimizer) -> torch.optim.Optimizer:
        return optimizer.optimizer


class StopWorkersOnException(pl.Callback):
    """Shuts the module's workers down when training fails: Lightning calls ``teardown`` only when it ends
    normally, and worker processes would otherwise outlive the run."""

    def on_exception(self, trainer: pl.Trainer, module: pl.LightningModule, exception: BaseException) -> None:
        module.stop_workers(after_failure=True)
