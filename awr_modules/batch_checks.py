"""Refusals of a batch ``AWRLoss`` cannot use, each naming the key, the shape or the count at fault.

They run before any gradient is computed (``AWRLoss(check_inputs=True)``, or once per phase over
a whole buffer with :meth:`AWRLoss.check_batch`). Every value check is one host sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey


def check_keys_and_values(tensordict: TensorDictBase, needed: Sequence[NestedKey],
                          finite: Sequence[NestedKey]) -> None:
    """Raise if a ``needed`` key is missing, or a present ``finite`` key holds nan or inf."""
    present = tensordict.keys(True)
    missing = [key for key in dict.fromkeys(needed) if key not in present]
    if missing:
        raise KeyError(
            f"AWRLoss: the batch lacks {missing}; it has {sorted(map(str, present))}. "
            f"Rename keys with loss.set_keys(...) or fix the networks' in_keys."
        )
    for key in finite:
        if key in present:
            check_finite(tensordict.get(key), repr(key))


def check_trajectory_inputs(tensordict: TensorDictBase, needed: Sequence[NestedKey], advantage: NestedKey,
                            value_target: NestedKey, *, check_values: bool) -> None:
    """Raise if a batch without targets lacks what the value estimator reads (``needed``: reward, done,
    terminated under ``"next"``) or, with ``check_values``, has a non-finite reward."""
    missing = [key for key in needed if key not in tensordict.keys(True)]
    if missing:
        raise KeyError(
            f"AWRLoss: the batch has no {advantage!r}/{value_target!r}, so the value estimator "
            f"must compute them, but it lacks {missing}. Pass trajectory-shaped data [*B, T] with 'next', "
            f"or refresh targets over the buffer with awr_modules.refresh_value_targets first."
        )
    if check_values:
        check_finite(tensordict.get(needed[0]), repr(needed[0]))


def check_finite(value: torch.Tensor, what: str) -> None:
    if not torch.isfinite(value).all():
        bad = (~torch.isfinite(value)).sum().item()
        raise ValueError(f"AWRLoss: {what} has {bad} non-finite entries (nan or inf) out of {value.numel()}.")


def per_sample(value: torch.Tensor, batch_size: torch.Size, key: NestedKey) -> torch.Tensor:
    """A per-transition scalar read under ``key``, stored as ``[*B]`` or ``[*B, 1]``, as ``[*B]``."""
    if value.shape == batch_size + (1,):
        value = value.squeeze(-1)
    if value.shape != batch_size:
        raise ValueError(
            f"AWRLoss: {key!r} has shape {tuple(value.shape)}; expected {tuple(batch_size)} or "
            f"{tuple(batch_size) + (1,)} (one value per transition of the batch)."
        )
    return value
