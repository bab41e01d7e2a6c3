"""Several optimizer steps of a phase as one compiled graph: gradients by ``torch.func.grad``, updates in place.

A phase of the AWR iteration is hundreds of minibatch steps of a small network. Compiled one step
at a time (loss graph, ``backward()``, optimizer ``step()``), a HalfCheetah policy step on one CPU
core still pays autograd's engine, the optimizer's Python loop and a graph call per step: about
three times its arithmetic. A :class:`FusedSteps` compiles ``steps_per_call`` whole steps into one
graph: each step's gradient is ``torch.func.grad`` of the phase's minibatch loss with respect to
the network's parameters (swapped in with ``torch.func.functional_call``), and the optimizer's update
is written in place on the network's own parameters and the optimizer's own state tensors, so
checkpoints, learning-rate changes and a later unfused step see one optimizer state. A per-step hook
(a Q critic's soft target update) runs inside the graph after each update.

Each subclass writes out one ``torch.optim`` update, pinned to it step for step by a test:

- :class:`FusedSGDSteps`: ``torch.optim.SGD`` (``dampening=0``, no Nesterov, no weight decay):
  ``b <- mu b + g``, ``theta <- theta - lr b``, with ``b`` starting at ``0`` (equal to SGD's first ``b = g``);
- :class:`FusedAdamSteps`: ``torch.optim.Adam`` (no AMSGrad, no weight decay; any of its implementations);
- :class:`FusedClippedSGDSteps`, :class:`FusedClippedAdamSteps`: :class:`~awr_modules.optimizers.ClippedSGD` and
  :class:`~awr_modules.optimizers.ClippedAdam`, the same updates on gradients clipped to a norm first.

:func:`fused_steps_class` picks the subclass that writes out a given optimizer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

from awr_modules.optimizers import GRADIENT_NORM_EPS, ClippedAdam, ClippedSGD, joint_norm

MinibatchLoss = Callable[[TensorDictBase, torch.Tensor], TensorDictBase]
Tensors = list[torch.Tensor]


class _NetworkHolder(nn.Module):
    """``network`` as a submodule, so that ``functional_call`` swaps its parameters while the loss runs."""

    def __init__(self, network: nn.Module, minibatch_loss: MinibatchLoss) -> None:
        super().__init__()
        self.network = network
        self._minibatch_loss = minibatch_loss

    def forward(self, stored: TensorDictBase, index: torch.Tensor) -> TensorDictBase:
        return self._minibatch_loss(stored, index)


class FusedSteps:
    """``steps_per_call`` minibatch steps on ``network`` per call of one compiled graph (base class).

    A subclass writes out one optimizer's update: :attr:`optimizer_class` and :meth:`group_fits` (which
    optimizers it writes out: :meth:`fits`), :meth:`state` (the optimizer's state tensors per parameter,
    created as the optimizer would create them where it has not stepped yet), :meth:`hyperparameters` (read
    from the optimizer on every call, so a scheduler's change reaches the next call) and :meth:`update` (one
    step, in place, traced into the graph).

    Args:
        minibatch_loss: the phase's loss on ``stored[index]`` (uncompiled: it is traced into the graph);
            it must read ``network``'s parameters through the module (the loss built with
            ``functional=False``).
        loss_key: the entry of the loss output that is minimised.
        network: the network the phase trains; its parameters are updated in place.
        optimizer: an optimizer over ``network``'s trainable parameters that :meth:`fits`; its state tensors
            are the ones updated.
        steps_per_call: steps per graph (at least 2: a graph of one step is what ``compile`` already gives).
        after_step: runs after every update, inside the graph (it must be traceable by ``torch.compile``, as
            :class:`~awr_modules.q_critic.LeafwiseSoftUpdate`'s ``step`` is).
        gradient_norm_key: where given, the returned loss output gains this entry: the L2 norm of the last step's
            gradient, before any clip.
    """

    optimizer_name = "an optimizer"

    def __init__(self, minibatch_loss: MinibatchLoss, loss_key: str, network: nn.Module,
                 optimizer: torch.optim.Optimizer, steps_per_call: int = 8, *,
                 after_step: Callable[[], None] | None = None, gradient_norm_key: str | None = None) -> None:
        if steps_per_call < 2:
            raise ValueError(f"{type(self).__name__}: steps_per_call must be >= 2, got {steps_per_call}.")
        if not self.fits(optimizer):
            raise ValueError(f"{type(self).__name__}: the optimizer must be {self.optimizer_name} over one "
                             f"parameter group.")
        names, parameters = zip(*[(name, p) for name, p in network.named_parameters() if p.requires_grad], strict=True)
        if {id(p) for p in parameters} != {id(p) for p in optimizer.param_groups[0]["params"]}:
            raise ValueError(f"{type(self).__name__}: the optimizer must step exactly the network's trainable "
                             f"parameters.")
        self.steps_per_call = steps_per_call
        self._parameters = parameters
        self._optimizer = optimizer
        update = self.update

        holder = _NetworkHolder(network, minibatch_loss)

        def objective(weights: tuple[torch.Tensor, ...], stored: TensorDictBase,
                      index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            swapped = {f"network.{name}": weight for name, weight in zip(names, weights, strict=True)}
            out = torch.func.functional_call(holder, swapped, (stored, index))
            return out[loss_key], dict(out.items())  # a dict: torch.func returns it also where dynamo runs eagerly

        gradient = torch.func.grad(objective, has_aux=True)

        def steps(stored: TensorDictBase, indices: torch.Tensor, state: list[Tensors],
                  hyperparameters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            out, gradients = None, None
            with torch.no_grad():
                for step in range(indices.shape[0]):
                    gradients, out = gradient(tuple(p.detach() for p in parameters), stored, indices[step])
                    update(list(parameters), list(gradients), state, hyperparameters)
                    if after_step is not None:
                        after_step()
                if gradient_norm_key is not None:
                    out[gradient_norm_key] = joint_norm(gradients)
            return out

        self._steps = torch.compile(steps)

    def __call__(self, stored: TensorDictBase, indices: torch.Tensor) -> TensorDictBase:
        """Take one step per row of ``indices`` (``[n * steps_per_call, batch]``); the last step's loss output."""
        if indices.shape[0] % self.steps_per_call:
            raise ValueError(f"{type(self).__name__}: {indices.shape[0]} steps are not a multiple of "
                             f"{self.steps_per_call}.")
        device = self._parameters[0].device
        group = self._optimizer.param_groups[0]
        hyperparameters = {name: torch.as_tensor(float(value), device=device)
                           for name, value in self.hyperparameters(group).items()}
        state = self.state(self._optimizer, self._parameters)
        out = None
        for chunk in indices.view(-1, self.steps_per_call, indices.shape[-1]):
            out = self._steps(stored, chunk, state, hyperparameters)
        return TensorDict(out, [])

    # ------------------------------------------------------------- per optimizer
    optimizer_class: type[torch.optim.Optimizer] = torch.optim.Optimizer
    """The optimizer whose update :meth:`update` writes out (exactly this class, not a subclass)."""

    @classmethod
    def fits(cls, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer`` is an :attr:`optimizer_class` of one parameter group whose settings
        :meth:`update` writes out (:meth:`group_fits`)."""
        return (type(optimizer) is cls.optimizer_class and len(optimizer.param_groups) == 1
                and cls.group_fits(optimizer.param_groups[0]))

    @staticmethod
    def group_fits(group: dict) -> bool:
        """Whether :meth:`update` writes out the update of a parameter group with these settings."""
        raise NotImplementedError

    @staticmethod
    def hyperparameters(group: dict) -> dict[str, float]:
        """The values of ``group`` (the optimizer's one parameter group) that :meth:`update` reads."""
        raise NotImplementedError

    @staticmethod
    def state(optimizer: torch.optim.Optimizer, parameters: tuple[nn.Parameter, ...]) -> list[Tensors]:
        """The optimizer's state tensors :meth:`update` reads and writes, one list per kind, each aligned with
        ``parameters``."""
        raise NotImplementedError

    @staticmethod
    def update(parameters: Tensors, gradients: Tensors, state: list[Tensors],
               hyperparameters: dict[str, torch.Tensor]) -> None:
        """One optimizer step, in place on ``parameters`` and ``state``."""
        raise NotImplementedError


class FusedSGDSteps(FusedSteps):
    """``torch.optim.SGD``'s update with momentum ``mu`` and step size ``lr``: ``b <- mu b + g``,
    ``theta <- theta - lr b`` (``dampening=0``, no Nesterov, no weight decay), on SGD's own momentum buffers."""

    optimizer_name = "a plain torch.optim.SGD"
    optimizer_class = torch.optim.SGD

    @staticmethod
    def group_fits(group: dict) -> bool:
        return (group["dampening"] == 0 and not group["nesterov"] and group["weight_decay"] == 0
                and not group["maximize"])

    @staticmethod
    def hyperparameters(group: dict) -> dict[str, float]:
        return {"lr": group["lr"], "momentum": group["momentum"]}

    @staticmethod
    def state(optimizer: torch.optim.Optimizer, parameters: tuple[nn.Parameter, ...]) -> list[Tensors]:
        buffers = []
        for parameter in parameters:
            state = optimizer.state[parameter]
            if state.get("momentum_buffer") is None:  # SGD has not stepped yet: b = 0, then b = g
                state["momentum_buffer"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
            buffers.append(state["momentum_buffer"])
        return [buffers]

    @staticmethod
    def update(parameters: Tensors, gradients: Tensors, state: list[Tensors],
               hyperparameters: dict[str, torch.Tensor]) -> None:
        lr, momentum = hyperparameters["lr"], hyperparameters["momentum"]
        for parameter, buffer, grad in zip(parameters, state[0], gradients, strict=True):
            buffer.mul_(momentum).add_(grad)
            parameter.sub_(lr * buffer)


class FusedAdamSteps(FusedSteps):
    r"""``torch.optim.Adam``'s update (Kingma and Ba, 2015) on Adam's own state (``step``, ``exp_avg``,
    ``exp_avg_sq``), for any of its implementations (for-loop, ``foreach``, ``fused``):

    .. math::

        t &\leftarrow t + 1, \quad m \leftarrow \beta_1 m + (1 - \beta_1) g, \quad
        v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
        \theta &\leftarrow \theta - \frac{lr}{1 - \beta_1^t} \,
        \frac{m}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon}

    (no AMSGrad, no weight decay, not ``maximize``). The step counts stay tensors, so the graph never
    reads them back to Python.
    """

    optimizer_name = "a torch.optim.Adam without AMSGrad or weight decay"
    optimizer_class = torch.optim.Adam

    @staticmethod
    def group_fits(group: dict) -> bool:
        return (not group["amsgrad"] and group["weight_decay"] == 0 and not group["maximize"]
                and not group.get("differentiable", False))

    @staticmethod
    def hyperparameters(group: dict) -> dict[str, float]:
        beta1, beta2 = group["betas"]
        return {"lr": group["lr"], "beta1": beta1, "beta2": beta2, "eps": group["eps"]}

    @staticmethod
    def state(optimizer: torch.optim.Optimizer, parameters: tuple[nn.Parameter, ...]) -> list[Tensors]:
        group = optimizer.param_groups[0]
        on_device = bool(group.get("fused") or group.get("capturable"))
        steps, averages, squares = [], [], []
        for parameter in parameters:
            state = optimizer.state[parameter]
            if len(state) == 0:  # Adam has not stepped yet: its own initial state (Adam._init_group)
                state["step"] = torch.zeros((), dtype=torch.float32,
                                            device=parameter.device if on_device else "cpu")
                state["exp_avg"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
            steps.append(state["step"])
            averages.append(state["exp_avg"])
            squares.append(state["exp_avg_sq"])
        return [steps, averages, squares]

    @staticmethod
    def update(parameters: Tensors, gradients: Tensors, state: list[Tensors],
               hyperparameters: dict[str, torch.Tensor]) -> None:
        lr, eps = hyperparameters["lr"], hyperparameters["eps"]
        beta1, beta2 = hyperparameters["beta1"], hyperparameters["beta2"]
        steps, averages, squares = state
        for parameter, grad, step, average, square in zip(parameters, gradients, steps, averages, squares,
                                                          strict=True):
            step.add_(1)
            average.lerp_(grad, 1 - beta1)
            square.mul_(beta2).add_((1 - beta2) * grad * grad)
            t = step.to(parameter.device)
            step_size = lr / (1 - beta1.pow(t))
            denominator = square.sqrt() / (1 - beta2.pow(t)).sqrt() + eps
            parameter.sub_(step_size * average / denominator)


def clipped_to_norm(gradients: Tensors, max_norm: torch.Tensor) -> Tensors:
    """``gradients`` scaled jointly to an L2 norm of at most ``max_norm``: ``torch.nn.utils.clip_grad_norm_``'s
    rule (:mod:`awr_modules.optimizers`), traceable, without reading the norm back to Python."""
    scale = torch.clamp(max_norm / (joint_norm(gradients) + GRADIENT_NORM_EPS), max=1.0)
    return [g * scale for g in gradients]


class ClippedFirst:
    """Over a :class:`FusedSteps` subclass: its optimizer's update on gradients clipped to the group's
    ``max_grad_norm`` first (:func:`clipped_to_norm`), as :class:`~awr_modules.optimizers.ClipsGradientNorm` does."""

    @classmethod
    def hyperparameters(cls, group: dict) -> dict[str, float]:
        return {**super().hyperparameters(group), "max_grad_norm": group["max_grad_norm"]}

    @classmethod
    def update(cls, parameters: Tensors, gradients: Tensors, state: list[Tensors],
               hyperparameters: dict[str, torch.Tensor]) -> None:
        super().update(parameters, clipped_to_norm(gradients, hyperparameters["max_grad_norm"]), state, hyperparameters)


class FusedClippedSGDSteps(ClippedFirst, FusedSGDSteps):
    """:class:`~awr_modules.optimizers.ClippedSGD`'s update: :class:`FusedSGDSteps`'s on the clipped gradient."""

    optimizer_name = "an awr_modules.optimizers.ClippedSGD"
    optimizer_class = ClippedSGD


class FusedClippedAdamSteps(ClippedFirst, FusedAdamSteps):
    """:class:`~awr_modules.optimizers.ClippedAdam`'s update: :class:`FusedAdamSteps`'s on the clipped gradient."""

    optimizer_name = "an awr_modules.optimizers.ClippedAdam without AMSGrad or weight decay"
    optimizer_class = ClippedAdam


FUSED_STEPS: tuple[type[FusedSteps], ...] = (FusedSGDSteps, FusedAdamSteps, FusedClippedSGDSteps, FusedClippedAdamSteps)
"""The optimizers' updates that phases can run fused, tried in order."""


def fused_steps_class(optimizer: torch.optim.Optimizer) -> type[FusedSteps] | None:
    """The :class:`FusedSteps` subclass that writes out ``optimizer``'s update, or ``None``."""
    return next((fused for fused in FUSED_STEPS if fused.fits(optimizer)), None)
