"""The AWR replay buffer: a FIFO TorchRL buffer of transitions, optionally prioritized.

Two prioritizations, never stacked with the loss's own weighting:

- ``priority="weight"`` samples transition ``i`` with probability
  ``w_i / sum_j w_j`` (``alpha = 1``) where ``w = min(exp(A / beta), max_weight)``,
  and the loss then uses weight 1 (``AWRLoss(weighting="sampling")``) with no
  importance correction (``beta = 0``). The expected gradient is the paper's
  weighted objective ``E[w grad log pi]`` divided by ``sum w``, with lower
  variance: no single sample carries the clip weight 20.
- ``priority="td_error"`` is classic prioritized replay for the critic:
  priority ``|R - V(s)|`` with importance weights (``beta > 0``) that the loss
  multiplies into both per-sample losses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from tensordict import TensorDictBase
from torchrl.data import (
    LazyMemmapStorage,
    LazyTensorStorage,
    TensorDictPrioritizedReplayBuffer,
    TensorDictReplayBuffer,
    TensorStorage,
)
from torchrl.data.replay_buffers import SamplerWithoutReplacement

from awr_modules._torchrl_compat import check_compiled_extension

_PRIORITY_DEFAULTS = {"weight": (1.0, 0.0), "td_error": (0.6, 0.4)}  # (alpha, beta)


def make_replay_buffer(
    capacity: int,
    *,
    prioritized: bool = True,
    alpha: float | None = None,
    beta: float | None = None,
    priority: Literal["weight", "td_error"] = "weight",
    storage: Literal["memory", "memmap"] | TensorDictBase = "memory",
    scratch_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
) -> TensorDictReplayBuffer:
    """Build the FIFO replay buffer of an AWR run (reference: 50,000 transitions).

    Args:
        capacity: number of transitions kept; the oldest are overwritten first.

    Keyword Args:
        prioritized: a ``TensorDictPrioritizedReplayBuffer`` if ``True``; otherwise a
            ``TensorDictReplayBuffer`` that walks shuffled epochs without
            replacement, as the reference's minibatches do.
        alpha: priority exponent. Default 1.0 for ``priority="weight"`` (sampling
            exactly proportional to ``w``), 0.6 for ``"td_error"``.
        beta: importance-sampling exponent. Default 0.0 for ``"weight"`` (must be
            0: a correction would cancel the AWR weighting), 0.4 for ``"td_error"``.
        priority: what the priorities are: the AWR ``"weight"`` or ``"td_error"``.
        storage: ``"memory"`` (``LazyTensorStorage``) or ``"memmap"`` (on disk,
            ``LazyMemmapStorage``, for buffers larger than RAM); or transitions ``[capacity]`` that become
            the storage itself (TorchRL's ``TensorStorage``: full, nothing copied), e.g. a dataset's
            memory-mapped rows.
        scratch_dir: directory of the memmap storage (default: a temporary one).
        device: where the stored transitions live.
        batch_size: default minibatch size of ``sample()``.

    The buffer's whole state (storage, priorities, write cursor) round-trips
    through ``state_dict()``/``load_state_dict()`` and ``dumps(path)``/``loads(path)``.

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from awr_modules import make_replay_buffer
        >>> buffer = make_replay_buffer(1000, priority="weight", batch_size=4)
        >>> index = buffer.extend(TensorDict({"observation": torch.randn(10, 3)}, [10]))
        >>> buffer.update_priority(index, torch.rand(10) + 0.1)
        >>> buffer.sample()["observation"].shape
        torch.Size([4, 3])
    """
    if int(capacity) <= 0:
        raise ValueError(f"make_replay_buffer: capacity must be a positive number of transitions, got {capacity}.")
    if priority not in _PRIORITY_DEFAULTS:
        raise ValueError(f"make_replay_buffer: priority must be 'weight' or 'td_error', got {priority!r}.")
    if isinstance(storage, TensorDictBase):
        if storage.shape[:1] != (int(capacity),):
            raise ValueError(f"make_replay_buffer: a TensorDict storage must hold capacity ({capacity}) rows, "
                             f"got shape {tuple(storage.shape)}.")
        backing = TensorStorage(storage, device=device or storage.device or "cpu")
    elif storage == "memory":
        backing = LazyTensorStorage(int(capacity), device=device or "cpu")
    elif storage == "memmap":
        backing = LazyMemmapStorage(int(capacity), scratch_dir=scratch_dir, device=device or "cpu")
    else:
        raise ValueError(f"make_replay_buffer: storage must be 'memory' or 'memmap', got {storage!r}.")
    if prioritized:
        check_compiled_extension("make_replay_buffer(prioritized=True)")
    if not prioritized:
        return TensorDictReplayBuffer(storage=backing, sampler=SamplerWithoutReplacement(), batch_size=batch_size)

    default_alpha, default_beta = _PRIORITY_DEFAULTS[priority]
    alpha = default_alpha if alpha is None else alpha
    beta = default_beta if beta is None else beta
    if alpha < 0 or beta < 0:
        raise ValueError(f"make_replay_buffer: alpha and beta must be >= 0, got alpha={alpha}, beta={beta}.")
    if priority == "weight" and beta != 0:
        raise ValueError(
            "make_replay_buffer: priority='weight' samples proportionally to the AWR weights; an importance "
            f"correction (beta={beta}) would divide them out again. Use beta=0, or priority='td_error'."
        )
    return TensorDictPrioritizedReplayBuffer(
        alpha=alpha,
        beta=beta,
        storage=backing,
        priority_key="td_error",
        batch_size=batch_size,
    )
