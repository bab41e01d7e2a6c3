"""What ``AWRLoss`` needs from TorchRL and tensordict beyond their public calls, in one place.

torchrl 0.13 added ``LossModule._reduce_loss`` (reduction that honours TorchRL's validity masks),
``LossModule.register_coeff_buffer`` and ``dispatch_value_estimator``. The package supports torchrl
0.12 to 0.14 (clusters cannot always pick their torch), so :class:`LossModuleFallbacks` provides the
first two with the same behaviour, and is placed *after* ``LossModule`` in ``AWRLoss``'s bases: where
TorchRL has the method, TorchRL's is the one that runs; :func:`build_builtin_estimator` uses
TorchRL's estimator registry where it exists.

:func:`direct_call` and :func:`direct_distribution` evaluate a plain chain of ``TensorDictModule``
objects on tensors, skipping the wrappers' per-call bookkeeping (see :class:`DirectCall`). They read two private
attributes of ``TensorDictModule`` (``_kwargs``, ``_get_kwargs``); a test fails if tensordict renames them.
:func:`unchecked_tensordict` builds a TensorDict of tensors already known to fit through tensordict's private
``TensorDict._new_unsafe``; a test fails if tensordict renames it or it stops giving the public constructor's result.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, nullcontext
from inspect import signature

import torch
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from tensordict.nn import (
    ProbabilisticTensorDictModule,
    ProbabilisticTensorDictSequential,
    TensorDictModule,
    TensorDictModuleBase,
    TensorDictSequential,
    skip_existing,
)
from tensordict.utils import NestedKey
from torch import distributions as d
from torch import nn
from torchrl.objectives.utils import ValueEstimators, default_value_kwargs
from torchrl.objectives.value import GAE, TD0Estimator, TD1Estimator, TDLambdaEstimator, VTrace

try:  # torchrl >= 0.13
    from torchrl.objectives.utils import dispatch_value_estimator
except ImportError:  # torchrl 0.12
    dispatch_value_estimator = None

AUTO_LOSS_MASK_KEYS: tuple[NestedKey, ...] = (("collector", "mask"), "shifted_valid")
"""The validity masks TorchRL writes (a padding ``SliceSampler``, the value estimators), as in torchrl 0.14."""

__all__ = ["AUTO_LOSS_MASK_KEYS", "DirectCall", "DirectDistribution", "LossModuleFallbacks", "actor_distribution",
           "build_builtin_estimator", "check_compiled_extension", "critic_value", "direct_call", "direct_distribution",
           "unchecked_tensordict", "validity_mask"]

_NEW_UNSAFE = getattr(TensorDict, "_new_unsafe", None)


def unchecked_tensordict(tensors: dict[NestedKey, torch.Tensor], batch_size: torch.Size,
                         device: torch.device | None = None) -> TensorDict:
    """``TensorDict(tensors, batch_size=batch_size, device=device)`` without the constructor's per-entry checks.

    For tensors the caller has just made to fit, on ``device``, with ``batch_size`` leading: the gathered rows
    of a stored TensorDict, a loss's scalar outputs. The public constructor checks every entry's shape and
    device and parses the batch size again: about 11 of the 32 us that a minibatch of four keys and 256 rows
    costs (this thread's CPU time), on every step of a phase. tensordict's own operations build their results
    with ``TensorDict._new_unsafe``, which skips those checks. It stores each key as given, so nested keys
    (``("next", "reward")``), and a tensordict without it, take the public constructor, told that nothing moves
    (``non_blocking=False``): with ``non_blocking=None`` it records device transfers in a state that the nested
    TensorDict it builds records in again, which raises under ``torch.compile`` (tensordict 0.12-0.14) and
    sends the whole compiled frame back to eager mode.
    """
    if _NEW_UNSAFE is None or not all(type(key) is str for key in tensors):
        return TensorDict(tensors, batch_size=batch_size, device=device, non_blocking=False)
    return _NEW_UNSAFE(tensors, batch_size=batch_size, device=device)


def validity_mask(tensordict: TensorDictBase, keys: tuple[NestedKey, ...], shape: torch.Size) -> torch.Tensor | None:
    """The positions all of the masks found under ``keys`` keep, shaped ``shape``; ``None`` if there is none."""
    mask = None
    for key in keys:
        found = tensordict.get(key, None)
        if found is not None:
            found = found.reshape(shape)
            mask = found if mask is None else mask & found
    return mask


# ------------------------------------------------------------------ direct calls of TensorDictModules
class DirectCall:
    """What calling a chain of plain ``TensorDictModule`` objects on a tensordict computes, on tensors alone.

    A ``TensorDictModule`` reads its ``in_keys``, calls the module it wraps and writes the results under
    its ``out_keys``; a ``TensorDictSequential`` runs its modules in turn. For the small networks of RL
    that bookkeeping costs as much as the network itself (tensordict 0.14 even searches the import path
    for pandas for every tensor it writes), so :class:`~awr_modules.AWRLoss` calls the wrapped modules
    directly: the same modules, on the same tensors, in the same order. Built by :func:`direct_call`
    only for chains whose wrappers add nothing but the bookkeeping; a call refuses (:meth:`applies`) while
    a wrapper has a hook (a ``safe`` TorchRL module, ``select_out_keys``) or tensordict's
    ``skip_existing`` is on, and the caller then calls the wrappers as usual.
    """

    def __init__(self, steps: list[TensorDictModule], wrappers: list[TensorDictModuleBase]) -> None:
        self.steps = steps
        self.wrappers = wrappers

    def applies(self) -> bool:
        """Whether a direct call computes what calling the wrappers would, now."""
        return not skip_existing() and not any(w._forward_hooks or w._forward_pre_hooks for w in self.wrappers)

    def __call__(self, tensordict: TensorDictBase) -> dict[NestedKey, torch.Tensor]:
        """The tensors each step writes, by key; inputs are read from earlier steps' outputs or ``tensordict``."""
        values: dict[NestedKey, torch.Tensor] = {}
        for step in self.steps:
            inputs = [values[key] if key in values else tensordict.get(key) for key in step.in_keys]
            function = step.module if step.method is None else getattr(step.module, step.method)
            if step._kwargs is None:
                out = function(*inputs, **step.method_kwargs)
            else:
                out = function(**dict(zip(step._kwargs, inputs, strict=True)), **step.method_kwargs)
            out_keys = step.out_keys
            if isinstance(out, (dict, TensorDictBase)) and all(key in out for key in out_keys):
                out = tuple(out[key] for key in out_keys)
            elif not isinstance(out, tuple):
                out = (out,)
            if len(out) != len(out_keys):
                raise RuntimeError(f"{type(step).__name__} returned {len(out)} tensors for out_keys {out_keys}.")
            values.update((key, value) for key, value in zip(out_keys, out) if key != "_")
        return values


class DirectDistribution:
    """``actor.get_dist(tensordict)`` with the deterministic part run as a :class:`DirectCall`.

    The distribution is the last module's ``distribution_class`` built from the tensors under its
    ``in_keys`` (named by its ``dist_keys``) and its ``distribution_kwargs``, as
    ``ProbabilisticTensorDictModule.get_dist`` builds it.
    """

    def __init__(self, parameters: DirectCall, head: ProbabilisticTensorDictModule) -> None:
        self.parameters = parameters
        self.head = head

    def applies(self) -> bool:
        return self.parameters.applies()

    def __call__(self, tensordict: TensorDictBase) -> d.Distribution:
        values = self.parameters(tensordict)
        head = self.head
        arguments = {(name[-1] if isinstance(name, tuple) else name):
                     values[key] if key in values else tensordict.get(key, None)
                     for name, key in zip(head.dist_keys, head.in_keys, strict=True)}
        extra = head.distribution_kwargs
        extra = dict(extra.items()) if isinstance(extra, TensorDictBase) else extra
        return head.distribution_class(**arguments, **extra)


def _children(sequence: TensorDictSequential) -> list[nn.Module]:
    modules = sequence.module
    return list(modules.values()) if isinstance(modules, nn.ModuleDict) else list(modules)


def _overrides(module: nn.Module, base: type, *names: str) -> bool:
    return any(getattr(type(module), name) is not getattr(base, name) for name in names)


def _plain_steps(module: nn.Module, wrappers: list[TensorDictModuleBase]) -> list[TensorDictModule] | None:
    """The ``TensorDictModule`` objects ``module`` runs, in order, if it is a plain chain of them; else ``None``."""
    if isinstance(module, ProbabilisticTensorDictSequential | ProbabilisticTensorDictModule):
        return None
    if isinstance(module, TensorDictSequential):
        if _overrides(module, TensorDictSequential, "forward", "_run_module") or module.partial_tolerant:
            return None
        wrappers.append(module)
        steps = []
        for child in _children(module):
            child_steps = _plain_steps(child, wrappers)
            if child_steps is None:
                return None
            steps += child_steps
        return steps
    plain = (isinstance(module, TensorDictModule)
             and not _overrides(module, TensorDictModule, "forward", "_call_module", "_write_to_tensordict")
             and hasattr(module, "_kwargs") and not getattr(module, "_get_kwargs", True))
    if not plain:
        return None
    wrappers.append(module)
    return [module]


def direct_call(module: TensorDictModuleBase) -> DirectCall | None:
    """A :class:`DirectCall` of ``module`` (a ``TensorDictModule`` such as a ``ValueOperator``, or a sequence of
    them), or ``None`` where the module is not such a plain chain."""
    wrappers: list[TensorDictModuleBase] = []
    steps = _plain_steps(module, wrappers)
    return None if steps is None else DirectCall(steps, wrappers)


def direct_distribution(actor: TensorDictModuleBase) -> DirectDistribution | None:
    """A :class:`DirectDistribution` of a ``ProbabilisticTensorDictSequential`` (TorchRL's ``ProbabilisticActor``)
    whose modules are a plain chain followed by one ``ProbabilisticTensorDictModule``; else ``None``."""
    if (not isinstance(actor, ProbabilisticTensorDictSequential) or actor.return_composite
            or _overrides(actor, ProbabilisticTensorDictSequential, "get_dist", "get_dist_params",
                          "build_dist_from_params")):
        return None
    *deterministic, head = _children(actor)
    if not isinstance(head, ProbabilisticTensorDictModule) or _overrides(head, ProbabilisticTensorDictModule,
                                                                          "get_dist"):
        return None
    wrappers: list[TensorDictModuleBase] = [actor.det_part]
    steps: list[TensorDictModule] = []
    for module in deterministic:
        module_steps = _plain_steps(module, wrappers)
        if module_steps is None:
            return None
        steps += module_steps
    return DirectDistribution(DirectCall(steps, wrappers), head)


def _parameters_in(params: TensorDictParams | None, network: nn.Module) -> AbstractContextManager:
    """Swap a functional loss's ``params`` into ``network`` for one call; nothing when ``params`` is ``None``."""
    return params.to_module(network) if params is not None else nullcontext()


def actor_distribution(actor: ProbabilisticTensorDictSequential, params: TensorDictParams | None,
                       direct: DirectDistribution | None, tensordict: TensorDictBase) -> d.Distribution:
    """``actor.get_dist(tensordict)`` with ``params`` swapped in, as a :class:`DirectDistribution` where it applies."""
    with _parameters_in(params, actor):
        if direct is not None and direct.applies():
            return direct(tensordict)
        return actor.get_dist(tensordict)


def critic_value(critic: TensorDictModuleBase, params: TensorDictParams | None, direct: DirectCall | None,
                 tensordict: TensorDictBase, key: NestedKey) -> torch.Tensor:
    """What ``critic`` writes under ``key`` for ``tensordict`` (``params`` swapped in), without writing it there."""
    with _parameters_in(params, critic):
        if direct is not None and direct.applies():
            return direct(tensordict)[key]
        return critic(tensordict.select(*critic.in_keys, strict=False)).get(key)


_BUILTIN_ESTIMATORS = {ValueEstimators.TD0: TD0Estimator, ValueEstimators.TD1: TD1Estimator,
                       ValueEstimators.TDLambda: TDLambdaEstimator, ValueEstimators.GAE: GAE,
                       ValueEstimators.VTrace: VTrace}


def build_builtin_estimator(loss_module, value_type: ValueEstimators, supported: tuple, **hyperparams) -> None:
    """Give ``loss_module`` one of TorchRL's estimators on its ``critic_network``: through TorchRL's
    registry (``dispatch_value_estimator``, torchrl >= 0.13), else built here with TorchRL's defaults."""
    if dispatch_value_estimator is not None:
        dispatch_value_estimator(loss_module, value_type, supported=supported, **hyperparams)
        return
    if value_type not in supported:
        raise NotImplementedError(
            f"Value type {value_type!r} is not implemented for loss {type(loss_module).__name__}. "
            f"Supported value types: {sorted(v.name for v in supported)}."
        )
    kwargs = {**default_value_kwargs(value_type), **hyperparams}
    if value_type == ValueEstimators.VTrace and "actor_network" not in kwargs:
        kwargs["actor_network"] = _vtrace_actor(loss_module)
    loss_module._value_estimator = _BUILTIN_ESTIMATORS[value_type](value_network=loss_module.critic_network, **kwargs)
    loss_module.value_type = value_type


def _vtrace_actor(loss_module) -> nn.Module:
    """The actor a V-trace estimator gets, as torchrl 0.13+'s ``VTrace.for_loss`` gives it: the loss's own, or for
    a functional loss a copy whose parameters are the loss's ``actor_network_params`` (the same tensors)."""
    actor = loss_module.actor_network
    if getattr(loss_module, "functional", False):
        actor = copy.deepcopy(actor)
        params = loss_module.actor_network_params
        # the tensors themselves, not copies into the copy's registrations (tensordict 0.14's default; 0.12 has no
        # such option and writes the tensors)
        shared = {"preserve_module_state": False} if "preserve_module_state" in signature(params.to_module).parameters else {}
        params.to_module(actor, **shared)
    return actor


class LossModuleFallbacks:
    """torchrl 0.14's ``_reduce_loss`` and ``register_coeff_buffer`` for torchrl 0.12."""

    def register_coeff_buffer(self, name: str, value: float | torch.Tensor) -> None:
        self.register_buffer(name, torch.as_tensor(float(value)))

    def _loss_mask_keys(self) -> tuple[NestedKey, ...]:
        return AUTO_LOSS_MASK_KEYS

    def _reduce_loss(
        self, loss: torch.Tensor, tensordict: TensorDictBase | None = None, *, reduction: str | None = None
    ) -> torch.Tensor:
        """Reduce ``loss`` over the positions the input's masks mark valid; ``"none"`` keeps the shape."""
        reduction = self.reduction if reduction is None else reduction
        mask = None if tensordict is None else validity_mask(tensordict, self._loss_mask_keys(), loss.shape)
        if mask is not None:
            loss = torch.where(mask, loss, torch.zeros_like(loss))  # select: padded rows may hold nan
            if reduction == "mean":
                return loss.sum() / mask.sum().clamp_min(1)
        if reduction == "mean":
            return loss.mean()
        if reduction == "sum":
            return loss.sum()
        return loss


TESTED_PAIRS = "torch 2.14.x with torchrl 0.14.1; torch 2.11.x with torchrl 0.12.0 and tensordict 0.12.4"


def check_compiled_extension(purpose: str) -> None:
    """Refuse, naming the versions, when torchrl's compiled extension did not load with this torch.

    torchrl does not pin torch, and its C++ extension (the prioritized sampler's segment trees) loads
    only beside the torch it was built for; otherwise torchrl warns at import and raises
    ``"SumSegmentTreeFp32 is not available"`` deep inside the first prioritized sample. ``purpose`` says
    what needed it.
    """
    import torchrl

    try:  # torchrl 0.13+: a package of sampler modules
        from torchrl.data.replay_buffers.samplers import prioritized
    except ImportError:  # torchrl 0.12: one module
        from torchrl.data.replay_buffers import samplers as prioritized

    if getattr(prioritized, "SumSegmentTreeFp32", True) is not None:
        return
    try:
        from torchrl._extension import pytorch_version
    except ImportError:  # pragma: no cover - older layouts
        pytorch_version = "another version"
    raise RuntimeError(
        f"{purpose} needs torchrl's compiled extension, which did not load: torchrl {torchrl.__version__} was "
        f"built with torch {pytorch_version}, this is torch {torch.__version__}. Install the torchrl (and "
        f"tensordict) built for this torch; tested pairs: {TESTED_PAIRS}. Without it, train with "
        f"weighting='loss' (uniform sampling, no prioritized buffer)."
    )
