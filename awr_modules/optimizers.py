r"""Optimizers that cap the size of each step by clipping the gradient's norm before the update.

AWR's policy step is a weighted log-likelihood step (AWR's Eq. 14 as a minibatch gradient):

.. math::

    g = -\frac{1}{B} \sum_i w_i \nabla_\theta \log \pi_\theta(a_i \mid s_i), \qquad
    w_i = \min\left(\exp(A_i / \beta), w_{\max}\right).

The weights are capped at ``max_weight``; the log-likelihood's gradient is not. For a Gaussian actor,
:math:`\nabla_\mu \log \pi = (a - \mu) / \sigma^2`, so where a learned std shrinks, or the buffer holds
actions far from the policy's mean, one minibatch can move the policy far from the one that collected the
data, and later steps can end in a non-finite loss. A cap on the step bounds that move whatever the weights
and the std are.

:class:`ClippedSGD` and :class:`ClippedAdam` rescale the gradients of each parameter group jointly before
SGD's or Adam's own update, with ``torch.nn.utils.clip_grad_norm_``'s rule (the clip TorchRL's training
scripts apply as ``max_grad_norm``):

.. math::

    g \leftarrow g \cdot \min\left(1, \frac{c}{\lVert g \rVert_2 + 10^{-6}}\right),

where :math:`c` is the group's ``max_grad_norm``. Being optimizers, they are chosen in YAML wherever an
optimizer is (``model.actor_optimizer``, ``configs/reference/clipped_actor.yaml``). The module steps an
optimizer after Lightning's precision plugin has unscaled the gradients and after DDP's ranks averaged them,
so the clip sees the gradient the update uses. The log's ``train/gradient_norm_actor`` (and ``_value``) is the norm of
each phase's last gradient before any clip (:func:`awr_modules.execution.gradient_norm`): where it runs above the
cap, the clip is shortening the steps. Compiled phases run them fused, the clip inside the graph
(:class:`~awr_modules.fused_steps.FusedClippedSGDSteps`, :class:`~awr_modules.fused_steps.FusedClippedAdamSteps`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

Parameters = Iterable[torch.Tensor] | Iterable[dict[str, Any]]

GRADIENT_NORM_EPS = 1e-6
"""Added to the norm before dividing, as ``torch.nn.utils.clip_grad_norm_`` adds it."""


def joint_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of ``tensors`` taken together as one vector (``clip_grad_norm_``'s norm), in float32 at least;
    traceable, and never read back to Python."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))


def _without_step_hooks(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` without the wrapper ``torch.optim.Optimizer`` puts around each optimizer class's ``step`` (it runs
    the optimizer's step hooks): the clipped optimizer's own ``step`` has that wrapper already, and the base
    optimizer's update called through it would run every hook twice."""
    return step.__wrapped__ if getattr(step, "hooked", False) else step


class ClipsGradientNorm(torch.optim.Optimizer):
    """Base of the clipped optimizers: before the update of :attr:`base_optimizer`, scales each parameter group's
    gradients so that their joint L2 norm is at most the group's ``max_grad_norm``.

    ``max_grad_norm`` is a setting of every parameter group, as ``lr`` is: it is saved with the optimizer's
    state, and a scheduler or a later ``add_param_group`` can change it per group.
    """

    base_optimizer: type[torch.optim.Optimizer] = torch.optim.Optimizer
    """The optimizer whose update follows the clip."""

    unclipped_norms: list[torch.Tensor]
    """Each parameter group's gradient norm before the last step's clip (the log's ``gradient_norm_*`` entries)."""

    def _set_max_grad_norm(self, max_grad_norm: float) -> None:
        if not max_grad_norm > 0:
            raise ValueError(f"{type(self).__name__}: max_grad_norm must be > 0, got {max_grad_norm}.")
        self.defaults["max_grad_norm"] = max_grad_norm
        for group in self.param_groups:
            group.setdefault("max_grad_norm", max_grad_norm)

    @torch.no_grad()
    def clip_gradients(self) -> None:
        """Clip each group's gradients in place to its ``max_grad_norm`` (parameters without a gradient are left out),
        keeping each group's norm before the clip in :attr:`unclipped_norms`."""
        self.unclipped_norms = []
        for group in self.param_groups:
            gradients = [p for p in group["params"] if p.grad is not None]
            if gradients:
                self.unclipped_norms.append(torch.nn.utils.clip_grad_norm_(gradients, group["max_grad_norm"]))

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Evaluate ``closure`` (if any: it computes the gradients), clip the gradients, then take the base
        optimizer's step; returns the closure's value."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.clip_gradients()
        _without_step_hooks(self.base_optimizer.step)(self)
        return loss


class ClippedSGD(ClipsGradientNorm, torch.optim.SGD):
    """``torch.optim.SGD`` with each step's gradient norm clipped to ``max_grad_norm`` first.

    Args:
        params: the parameters (or parameter groups) to optimize.
        lr: SGD's step size.
        momentum: SGD's momentum factor.
        max_grad_norm: the largest L2 norm of a parameter group's gradient that a step uses; larger gradients
            are scaled down to it.
        sgd_options: any other ``torch.optim.SGD`` argument (``dampening``, ``nesterov``, ``weight_decay``, ...).
    """

    base_optimizer = torch.optim.SGD

    def __init__(self, params: Parameters, lr: float = 1e-3, momentum: float = 0.0, *, max_grad_norm: float,
                 **sgd_options: Any) -> None:
        super().__init__(params, lr=lr, momentum=momentum, **sgd_options)
        self._set_max_grad_norm(max_grad_norm)


class ClippedAdam(ClipsGradientNorm, torch.optim.Adam):
    """``torch.optim.Adam`` with each step's gradient norm clipped to ``max_grad_norm`` first.

    Adam divides by a running scale of the gradient, so a clip changes its step only where a gradient is large
    against that scale: it damps a sudden spike, not a steady gradient.

    Args:
        params: the parameters (or parameter groups) to optimize.
        lr: Adam's step size.
        max_grad_norm: the largest L2 norm of a parameter group's gradient that a step uses.
        adam_options: any other ``torch.optim.Adam`` argument (``betas``, ``eps``, ``fused``, ...).
    """

    base_optimizer = torch.optim.Adam

    def __init__(self, params: Parameters, lr: float = 1e-3, *, max_grad_norm: float, **adam_options: Any) -> None:
        super().__init__(params, lr=lr, **adam_options)
        self._set_max_grad_norm(max_grad_norm)
