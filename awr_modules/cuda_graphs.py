"""Gradient computations of a phase replayed as CUDA graphs.

AWR's networks are tiny (two hidden layers of 128 and 64 units), so on a GPU an eager
minibatch step is bound by Python and kernel launches, not arithmetic: gathering the
minibatch, the loss's forward and its backward are a few hundred small kernels.
:class:`CapturedGradients` records them once per phase as one CUDA graph, with
tensordict's :class:`~tensordict.nn.CudaGraphModule` (what TorchRL's fast scripts use), and
replays the graph for every later minibatch of that phase: one launch instead of hundreds.

What is captured is ``index -> gradients``: gather ``stored[index]``, the loss, zero the
gradients in place and run the backward. The gradients must be zeroed in place, not set to
``None``: the call that captures the graph also computes its minibatch's gradients eagerly,
and a ``None`` reset inside the capture would swap ``.grad`` for tensors the graph has not yet
written, so that call's optimizer step would read garbage (seen on an H100). The optimizer step stays outside the graph, through Lightning,
so precision plugins (the 16-mixed gradient scaler), ``on_before_optimizer_step`` hooks and
``trainer.global_step`` behave as in eager mode.

A graph reads the stored tensors, the parameters and the network's buffers at the addresses
it saw when it was captured (and the stored length), and writes the gradient tensors it saw:
the buffer grows until it is full, and Lightning resets gradients to ``None`` before each
evaluation, so a phase's graph is recaptured whenever any of these changed (every iteration
until the buffer is full, then once after each evaluation). Python side effects inside the captured function (hooks such
as ``on_after_backward``) run only during the warm-up and capture calls.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from tensordict import TensorDictBase
from tensordict.nn import CudaGraphModule

GradientStep = Callable[[torch.Tensor], TensorDictBase]


def _capturable(step: GradientStep) -> GradientStep:
    """``step`` with a detached output and autocast's weight-cast cache off, as capture requires.

    ``CudaGraphModule`` needs outputs that do not require grad. With autocast's cache on, a
    captured graph would keep reading the low-precision copies of the weights made before
    capture, never the updated weights. Precision and dtype stay those of the enclosing
    autocast region (Lightning's, under ``bf16-mixed`` or ``16-mixed``).
    """

    def capturable(index: torch.Tensor) -> TensorDictBase:
        device_type = index.device.type
        with torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type),
                            enabled=torch.is_autocast_enabled(device_type), cache_enabled=False):
            return step(index).detach()

    return capturable


class CapturedGradients:
    """One captured gradient computation per phase, recaptured when the data it reads moved.

    Args:
        warmup: eager calls before capture (``CudaGraphModule``'s ``warmup``; compiled losses
            compile during these). Warm-up and capture calls compute real gradients, so every
            call is one minibatch step of the phase.

    Example (what ``AWRModule`` does in each phase; ``stored`` on a CUDA device)::

        captured = CapturedGradients()

        def gradients(index):  # zero in place: the gradient tensors must outlive the graph
            out = loss.actor_loss(stored[index])
            optimizer.zero_grad(set_to_none=False)
            out["loss_actor"].backward()
            return out

        step = captured("policy", stored, gradients, actor)
        for index in torch.randint(len(stored), (1000, 256), device=stored.device):
            out = step(index)   # eager twice, then one graph replay per call
            optimizer.step()    # outside the graph
    """

    def __init__(self, warmup: int = 2) -> None:
        self.warmup = warmup
        self._graphs: dict[str, tuple[tuple, CudaGraphModule]] = {}

    @staticmethod
    def _layout(stored: TensorDictBase, network: torch.nn.Module) -> tuple:
        """What a captured graph reads and writes at fixed addresses: the stored data (and its length), the
        network's parameters, buffers (e.g. the observation normaliser) and gradients."""
        return (tuple(stored.batch_size), tuple(t.data_ptr() for t in stored.values(True, True)),
                tuple(p.data_ptr() for p in network.parameters()), tuple(b.data_ptr() for b in network.buffers()),
                tuple(p.grad.data_ptr() for p in network.parameters()))

    def __call__(self, phase: str, stored: TensorDictBase, step: GradientStep,
                 network: torch.nn.Module) -> GradientStep:
        """The graphed ``step`` of ``phase`` over ``stored``, writing the gradients of ``network``.

        ``step(index)`` gathers ``stored[index]`` and computes the gradients of ``network``'s
        parameters. Parameters without a gradient get a zero one first, so that the
        gradients live in tensors that exist before the graph and outlive it.
        """
        for parameter in network.parameters():
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        layout = self._layout(stored, network)
        cached = self._graphs.get(phase)
        if cached is None or cached[0] != layout:
            with warnings.catch_warnings():  # tensordict unregisters TensorDict from pytree, as it must here
                warnings.filterwarnings("ignore", message="Tensordict is registered in PyTree")
                graph = CudaGraphModule(_capturable(step), warmup=self.warmup,
                                        device=next(iter(stored.values(True, True))).device)
            cached = (layout, graph)
            self._graphs[phase] = cached
        return cached[1]


def move_distribution_kwargs(actor: torch.nn.Module, device: torch.device | str) -> None:
    """Move tensors in ``distribution_kwargs`` (e.g. TanhNormal's ``low``/``high``) to ``device``.

    They sit in a plain dict, which ``module.to(device)`` does not reach: on a GPU each
    forward would copy them from the host, a copy that a CUDA graph cannot capture.
    """
    for module in actor.modules():
        kwargs = getattr(module, "distribution_kwargs", None)
        if isinstance(kwargs, dict):
            for key, value in kwargs.items():
                if isinstance(value, torch.Tensor):
                    kwargs[key] = value.to(device)
