"""What ``AWRLoss`` needs from TorchRL's ``LossModule`` that torchrl 0.12 does not have yet.

torchrl 0.13 added ``LossModule._reduce_loss`` (reduction that honours TorchRL's validity masks),
``LossModule.register_coeff_buffer`` and ``dispatch_value_estimator``. The package supports torchrl
0.12 to 0.14 (clusters cannot always pick their torch), so :class:`LossModuleFallbacks` provides the
first two with the same behaviour, and is placed *after* ``LossModule`` in ``AWRLoss``'s bases: where
TorchRL has the method, TorchRL's is the one that runs; :func:`build_builtin_estimator` uses
TorchRL's estimator registry where it exists.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey
from torchrl.objectives.utils import ValueEstimators, default_value_kwargs
from torchrl.objectives.value import GAE, TD0Estimator, TD1Estimator, TDLambdaEstimator

try:  # torchrl >= 0.13
    from torchrl.objectives.utils import dispatch_value_estimator
except ImportError:  # torchrl 0.12
    dispatch_value_estimator = None

AUTO_LOSS_MASK_KEYS: tuple[NestedKey, ...] = (("collector", "mask"), "shifted_valid")
"""The validity masks TorchRL writes (a padding ``SliceSampler``, the value estimators), as in torchrl 0.14."""

__all__ = ["AUTO_LOSS_MASK_KEYS", "LossModuleFallbacks", "build_builtin_estimator", "check_compiled_extension",
           "validity_mask"]


def validity_mask(tensordict: TensorDictBase, keys: tuple[NestedKey, ...], shape: torch.Size) -> torch.Tensor | None:
    """The positions all of the masks found under ``keys`` keep, shaped ``shape``; ``None`` if there is none."""
    mask = None
    for key in keys:
        found = tensordict.get(key, None)
        if found is not None:
            found = found.reshape(shape)
            mask = found if mask is None else mask & found
    return mask

_BUILTIN_ESTIMATORS = {ValueEstimators.TD0: TD0Estimator, ValueEstimators.TD1: TD1Estimator,
                       ValueEstimators.TDLambda: TDLambdaEstimator, ValueEstimators.GAE: GAE}


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
    loss_module._value_estimator = _BUILTIN_ESTIMATORS[value_type](value_network=loss_module.critic_network, **kwargs)
    loss_module.value_type = value_type


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
