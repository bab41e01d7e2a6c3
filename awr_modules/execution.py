"""The execution part: how a phase's minibatch steps run. Every speed-up of the phases lives here.

A phase (step 4 or 6 of an AWR iteration) is hundreds of identical small steps: gather ``stored[index]``,
compute the loss, backward, optimizer step. The parts differ only in how those steps are executed:

- :class:`Eager`: one Python call of the loss per step;
- :class:`Compiled`: the gather and the loss as one ``torch.compile`` graph per phase, and, where SGD or Adam
  steps on one device need none of Lightning's per-step calls, ``fused_steps`` whole steps per graph call
  (:class:`~awr_modules.fused_steps.FusedSteps`);
- :class:`CudaGraphs`: on one CUDA device, each step's gradient computation replayed as a captured CUDA graph
  (:class:`~awr_modules.cuda_graphs.CapturedGradients`), compiled first or not.

All three take the same steps (tested): the backward and the optimizer step go through an
:class:`OptimizerSteps`, which the Lightning module implements with Lightning's calls (precision, DDP) and
:class:`PlainSteps` with plain PyTorch.
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol

import torch
from tensordict import TensorDictBase
from torch import nn

from awr_modules.cuda_graphs import CapturedGradients
from awr_modules.fused_steps import FusedSteps, fused_steps_class
from awr_modules.loss import AWRLoss
from awr_modules.optimizers import ClipsGradientNorm, joint_norm
from awr_modules.phases import MinibatchLoss, OwnValuePhase, for_compiled_phases, minibatch_losses

LOSS_KEYS = {"policy": "loss_actor", "value": "loss_value"}
"""The loss output each phase minimises."""

GRADIENT_NORM_KEYS = {"policy": "gradient_norm_actor", "value": "gradient_norm_value"}
"""The entry that each phase's last loss output gains: the L2 norm of that step's gradient (:func:`gradient_norm`)."""


def gradient_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The L2 norm of the gradient that ``optimizer``'s last step used, before any clip: a clipped optimizer's own
    record of it (:class:`~awr_modules.optimizers.ClipsGradientNorm`), else the norm of its parameters' gradients
    as the step left them (unscaled under mixed precision, averaged across ranks under DDP)."""
    if isinstance(optimizer, ClipsGradientNorm) and getattr(optimizer, "unclipped_norms", None):
        return joint_norm(optimizer.unclipped_norms)
    gradients = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return joint_norm(gradients) if gradients else torch.zeros(())


class OptimizerSteps(Protocol):
    """How a phase's backward passes and optimizer steps are taken.

    Attributes:
        direct: plain ``backward()`` and the optimizer's own ``step()`` are all that is needed (one device, full
            precision, no step hooks): steps may then also run fused, outside any per-step call.
    """

    direct: bool

    def backward(self, objective: torch.Tensor) -> None: ...

    def step(self, optimizer: Any, network: nn.Module) -> None: ...

    def count(self, optimizer: Any, steps: int) -> None:
        """Account for ``steps`` optimizer steps that ran fused, outside :meth:`step`."""

    def unwrapped(self, optimizer: Any) -> torch.optim.Optimizer:
        """The ``torch.optim.Optimizer`` behind ``optimizer`` (fused steps update its state directly)."""


class PlainSteps:
    """Plain PyTorch steps: ``objective.backward()`` and ``optimizer.step()`` (a loop without Lightning)."""

    direct = True

    def backward(self, objective: torch.Tensor) -> None:
        objective.backward()

    def step(self, optimizer: torch.optim.Optimizer, network: nn.Module) -> None:
        optimizer.step()

    def count(self, optimizer: torch.optim.Optimizer, steps: int) -> None:
        return None

    def unwrapped(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer


class Execution:
    """Base of the execution parts: runs a phase's steps one by one, eagerly.

    :meth:`bind` is called once the networks, the optimizers and the device are known (the start of training);
    :meth:`run_phase` then runs each phase.
    """

    compiles = False

    def __init__(self) -> None:
        self._losses: dict[str, MinibatchLoss] = {}
        self._steps: OptimizerSteps | None = None
        self._loss: AWRLoss | None = None
        self._after_step: dict[str, Any] = {}

    def bind(self, loss: AWRLoss, networks: dict[str, nn.Module], optimizers: dict[str, Any],
             steps: OptimizerSteps, *, device: torch.device, world_size: int,
             own_value: OwnValuePhase | None = None) -> None:
        """Build the phases' minibatch losses for ``loss`` (``networks`` and ``optimizers`` keyed by phase name,
        ``"policy"`` and ``"value"``); ``own_value``: the targets part's own value phase (loss and per-step hook)."""
        actor_loss, value_loss = minibatch_losses(loss, compile=self.compiles, own_value=own_value)
        self._losses = {"policy": actor_loss, "value": value_loss}
        after_step = own_value.after_step if own_value is not None else None
        self._after_step = {"value": after_step} if after_step is not None else {}
        self._steps = steps
        self._loss = loss

    def run_phase(self, phase: str, stored: TensorDictBase, indices: torch.Tensor, optimizer: Any,
                  network: nn.Module) -> TensorDictBase | None:
        """One step per row of ``indices`` ``[steps, batch_size]`` on ``stored[index]``: the last step's loss output."""
        if self.compiles:
            stored = for_compiled_phases(stored)
        return self._one_by_one(phase, stored, indices, optimizer, network)

    def _one_by_one(self, phase: str, stored: TensorDictBase, indices: torch.Tensor, optimizer: Any,
                    network: nn.Module) -> TensorDictBase | None:
        loss_fn, key, steps = self._losses[phase], LOSS_KEYS[phase], self._steps
        set_to_none = self._grads_set_to_none

        def gradients(index: torch.Tensor) -> TensorDictBase:
            out = loss_fn(stored, index)
            optimizer.zero_grad(set_to_none=set_to_none)
            steps.backward(out[key])
            return out

        step = self._wrap(phase, stored, gradients, network)
        after_step = self._after_step.get(phase)
        out = None
        for index in indices:
            out = step(index)
            steps.step(optimizer, network)
            if after_step is not None:
                after_step()
        if out is not None:
            out = out.copy()  # a captured graph's output is reused by its next replay
            out.set(GRADIENT_NORM_KEYS[phase], gradient_norm(steps.unwrapped(optimizer)))
        return out

    _grads_set_to_none = True

    def _wrap(self, phase: str, stored: TensorDictBase, gradients: Any, network: nn.Module) -> Any:
        """The gradient computation as it runs each step (as it is, here)."""
        return gradients


class Eager(Execution):
    """Each minibatch step as plain PyTorch calls: the loss, ``backward()``, the optimizer's ``step()``.

    Only a phase's last loss output is logged (:class:`~awr_modules.iteration.IterationResult`), so the
    loss's diagnostics (weights' ESS, entropy, ...) are computed on that step alone: the steps before it run
    with ``AWRLoss.diagnostics`` off, the switch the loss offers loops that log every n-th step. The
    parameters' updates are the same either way (tested); a policy step costs less (``benchmarks/README.md``).
    """

    def run_phase(self, phase: str, stored: TensorDictBase, indices: torch.Tensor, optimizer: Any,
                  network: nn.Module) -> TensorDictBase | None:
        loss = self._loss
        if loss is not None and loss.diagnostics and len(indices) > 1:
            loss.diagnostics = False
            try:
                self._one_by_one(phase, stored, indices[:-1], optimizer, network)
            finally:
                loss.diagnostics = True
            indices = indices[-1:]
        return self._one_by_one(phase, stored, indices, optimizer, network)


class Compiled(Execution):
    """The phases' minibatch gather and loss as one ``torch.compile`` graph (default inductor backend) per phase,
    compiled once on its first minibatch (seconds), for every buffer length.

    Where the steps are direct (full precision, one device, no step hooks), each phase whose optimizer is plain
    SGD or Adam runs ``fused_steps`` minibatch steps as one compiled graph (:class:`~awr_modules.fused_steps.FusedSteps`:
    gradients by ``torch.func.grad``, the optimizer's update in place; the same steps as ``torch.optim``'s, tested);
    a phase's remaining steps run one by one. A per-step hook of the targets part (a Q critic's soft target
    update) runs inside the fused graph after each step. Elsewhere the backward and optimizer steps stay outside
    the graph, so every precision and strategy works as without it.

    Args:
        fused_steps: minibatch steps per fused graph call; 1 never fuses.
    """

    compiles = True

    def __init__(self, fused_steps: int = 8) -> None:
        super().__init__()
        if fused_steps < 1:
            raise ValueError(f"Compiled: fused_steps must be >= 1, got {fused_steps}.")
        self.fused_steps = fused_steps
        self._fused: dict[str, FusedSteps] = {}

    def bind(self, loss: AWRLoss, networks: dict[str, nn.Module], optimizers: dict[str, Any],
             steps: OptimizerSteps, *, device: torch.device, world_size: int,
             own_value: OwnValuePhase | None = None) -> None:
        super().bind(loss, networks, optimizers, steps, device=device, world_size=world_size, own_value=own_value)
        raw = {phase: steps.unwrapped(optimizer) for phase, optimizer in optimizers.items()}
        self._fused = {}
        if self.fused_steps > 1 and steps.direct:
            eager = dict(zip(("policy", "value"), minibatch_losses(loss, own_value=own_value), strict=True))  # traced
            for phase in ("policy", "value"):
                fused = fused_steps_class(raw[phase])
                if fused is not None:
                    self._fused[phase] = fused(eager[phase], LOSS_KEYS[phase], networks[phase], raw[phase],
                                               self.fused_steps, after_step=self._after_step.get(phase),
                                               gradient_norm_key=GRADIENT_NORM_KEYS[phase])

    @property
    def fuses(self) -> bool:
        """Whether the bound phases run fused steps."""
        return bool(self._fused)

    def run_phase(self, phase: str, stored: TensorDictBase, indices: torch.Tensor, optimizer: Any,
                  network: nn.Module) -> TensorDictBase | None:
        stored = for_compiled_phases(stored)
        out, fused = None, self._fused.get(phase)
        if fused is not None:
            whole = indices.shape[0] - indices.shape[0] % fused.steps_per_call
            if whole:
                out = fused(stored, indices[:whole])
                self._steps.count(optimizer, whole)
            indices = indices[whole:]
        return self._one_by_one(phase, stored, indices, optimizer, network) if len(indices) else out


class CudaGraphs(Execution):
    """On one CUDA device, each phase's gradient computation (minibatch gather, loss, backward) replayed as a
    captured CUDA graph (:class:`~awr_modules.cuda_graphs.CapturedGradients`); optimizer steps stay outside the
    graph, so every precision works. Refused under DDP; without a CUDA device the phases run eagerly (a warning).

    Args:
        compile: compile the loss first (``torch.compile``), as :class:`Compiled` does.
    """

    def __init__(self, compile: bool = True) -> None:
        super().__init__()
        self.compiles = compile
        self._captured: CapturedGradients | None = None

    def bind(self, loss: AWRLoss, networks: dict[str, nn.Module], optimizers: dict[str, Any],
             steps: OptimizerSteps, *, device: torch.device, world_size: int,
             own_value: OwnValuePhase | None = None) -> None:
        if world_size > 1:
            raise ValueError(f"CudaGraphs: CUDA graphs are for a single device; under DDP (world size {world_size}) "
                             "use model.execution: awr_modules.execution.Compiled.")
        super().bind(loss, networks, optimizers, steps, device=device, world_size=world_size, own_value=own_value)
        self._captured = None
        if device.type != "cuda":
            warnings.warn(f"CudaGraphs: CUDA graphs need a CUDA device; on {device.type} the phases run eagerly.",
                          stacklevel=2)
            return
        self._captured = CapturedGradients(warmup=3 if self.compiles else 2)

    @property
    def _grads_set_to_none(self) -> bool:
        # a captured graph writes the gradients into tensors that outlive it: zeroed in place, never set to None
        return self._captured is None

    def _wrap(self, phase: str, stored: TensorDictBase, gradients: Any, network: nn.Module) -> Any:
        if self._captured is None:
            return gradients
        return self._captured(phase, stored, gradients, network)
