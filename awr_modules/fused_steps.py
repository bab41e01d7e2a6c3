"""Several SGD steps of a phase as one compiled graph: gradients by ``torch.func.grad``, updates in place.

A phase of the AWR iteration is hundreds of minibatch steps of a small network. Compiled one step
at a time (loss graph, ``backward()``, optimizer ``step()``), a HalfCheetah policy step on one CPU
core still pays autograd's engine, the optimizer's Python loop and a graph call per step: about
three times its arithmetic. :class:`FusedSGDSteps` compiles ``steps_per_call`` whole steps into one
graph: each step's gradient is ``torch.func.grad`` of the phase's minibatch loss with respect to
the network's parameters (swapped in with ``torch.func.functional_call``), and the SGD update with
momentum is written in place on the network's own parameters and the optimizer's own momentum
buffers, so checkpoints, learning-rate changes and a later unfused step see one optimizer state.
The update is ``torch.optim.SGD``'s (``dampening=0``, no Nesterov, no weight decay):
``b <- mu b + g``, ``theta <- theta - lr b``, with ``b`` starting at ``0`` (equal to SGD's first
``b = g``); a test pins the fused steps to ``SGD``'s parameters step for step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

MinibatchLoss = Callable[[TensorDictBase, torch.Tensor], TensorDictBase]


def fusable(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is a plain ``torch.optim.SGD`` (one group; no dampening, Nesterov or weight
    decay), the update :class:`FusedSGDSteps` writes out."""
    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
        return False
    group = optimizer.param_groups[0]
    return group["dampening"] == 0 and not group["nesterov"] and group["weight_decay"] == 0 and not group["maximize"]


def fused_phases(actor_loss: MinibatchLoss, value_loss: MinibatchLoss, actor: nn.Module, critic: nn.Module,
                 actor_optimizer: torch.optim.Optimizer, critic_optimizer: torch.optim.Optimizer,
                 steps_per_call: int) -> dict[str, FusedSGDSteps] | None:
    """The policy and value phases' :class:`FusedSGDSteps` (keys ``"policy"``, ``"value"``); ``None`` unless
    ``steps_per_call > 1`` and both optimizers are :func:`fusable`."""
    if steps_per_call < 2 or not (fusable(actor_optimizer) and fusable(critic_optimizer)):
        return None
    return {"policy": FusedSGDSteps(actor_loss, "loss_actor", actor, actor_optimizer, steps_per_call),
            "value": FusedSGDSteps(value_loss, "loss_value", critic, critic_optimizer, steps_per_call)}


class _NetworkHolder(nn.Module):
    """``network`` as a submodule, so that ``functional_call`` swaps its parameters while the loss runs."""

    def __init__(self, network: nn.Module, minibatch_loss: MinibatchLoss) -> None:
        super().__init__()
        self.network = network
        self._minibatch_loss = minibatch_loss

    def forward(self, stored: TensorDictBase, index: torch.Tensor) -> TensorDictBase:
        return self._minibatch_loss(stored, index)


class FusedSGDSteps:
    """``steps_per_call`` minibatch SGD steps on ``network`` per call of one compiled graph.

    Args:
        minibatch_loss: the phase's loss on ``stored[index]`` (uncompiled: it is traced into the graph);
            it must read ``network``'s parameters through the module (the loss built with
            ``functional=False``).
        loss_key: the entry of the loss output that is minimised.
        network: the network the phase trains; its parameters are updated in place.
        optimizer: a :func:`fusable` ``SGD`` over ``network``'s parameters; its learning rate and momentum
            are read on every call, and its momentum buffers are the ones updated.
        steps_per_call: steps per graph (at least 2: a graph of one step is what ``compile`` already gives).
    """

    def __init__(self, minibatch_loss: MinibatchLoss, loss_key: str, network: nn.Module,
                 optimizer: torch.optim.SGD, steps_per_call: int = 8) -> None:
        if steps_per_call < 2:
            raise ValueError(f"FusedSGDSteps: steps_per_call must be >= 2, got {steps_per_call}.")
        if not fusable(optimizer):
            raise ValueError("FusedSGDSteps: the optimizer must be a plain torch.optim.SGD over one parameter group.")
        names, parameters = zip(*[(name, p) for name, p in network.named_parameters() if p.requires_grad], strict=True)
        if {id(p) for p in parameters} != {id(p) for p in optimizer.param_groups[0]["params"]}:
            raise ValueError("FusedSGDSteps: the optimizer must step exactly the network's trainable parameters.")
        self.steps_per_call = steps_per_call
        self._names, self._parameters = names, parameters
        self._optimizer = optimizer
        self._network = network

        holder = _NetworkHolder(network, minibatch_loss)

        def objective(weights: tuple[torch.Tensor, ...], stored: TensorDictBase,
                      index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            swapped = {f"network.{name}": weight for name, weight in zip(names, weights, strict=True)}
            out = torch.func.functional_call(holder, swapped, (stored, index))
            return out[loss_key], dict(out.items())  # a dict: torch.func returns it also where dynamo runs eagerly

        gradient = torch.func.grad(objective, has_aux=True)

        def steps(stored: TensorDictBase, indices: torch.Tensor, momentum_buffers: list[torch.Tensor],
                  lr: torch.Tensor, momentum: torch.Tensor) -> dict[str, torch.Tensor]:
            out = None
            with torch.no_grad():
                for step in range(indices.shape[0]):
                    gradients, out = gradient(tuple(p.detach() for p in parameters), stored, indices[step])
                    for parameter, buffer, grad in zip(parameters, momentum_buffers, gradients, strict=True):
                        buffer.mul_(momentum).add_(grad)
                        parameter.sub_(lr * buffer)
            return out

        self._steps = torch.compile(steps)

    def __call__(self, stored: TensorDictBase, indices: torch.Tensor) -> TensorDictBase:
        """Take one step per row of ``indices`` (``[n * steps_per_call, batch]``); the last step's loss output."""
        if indices.shape[0] % self.steps_per_call:
            raise ValueError(f"FusedSGDSteps: {indices.shape[0]} steps are not a multiple of {self.steps_per_call}.")
        group = self._optimizer.param_groups[0]
        device = self._parameters[0].device
        lr = torch.as_tensor(float(group["lr"]), device=device)
        momentum = torch.as_tensor(float(group["momentum"]), device=device)
        buffers = [self._momentum_buffer(p) for p in self._parameters]
        out = None
        for chunk in indices.view(-1, self.steps_per_call, indices.shape[-1]):
            out = self._steps(stored, chunk, buffers, lr, momentum)
        return TensorDict(out, [])

    def _momentum_buffer(self, parameter: nn.Parameter) -> torch.Tensor:
        """The optimizer's momentum buffer of ``parameter``, created (zeros) where SGD has not stepped yet."""
        state = self._optimizer.state[parameter]
        if state.get("momentum_buffer") is None:
            state["momentum_buffer"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
        return state["momentum_buffer"]
