"""The value and policy phases' minibatches: drawn all at once, read through one loss call each.

A phase is hundreds of identical minibatch steps over a buffer whose targets do not change
within the phase (steps 4 and 6 of an AWR iteration). Drawing every index up front and
gathering each minibatch inside the loss call (one ``torch.compile`` graph with ``compile``)
keeps the per-step cost to what the arithmetic needs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tensordict import TensorDictBase
from tensordict.utils import NestedKey
from torch import nn
from torchrl.data import ReplayBuffer

from awr_modules._torchrl_compat import unchecked_tensordict
from awr_modules.loss import AWRLoss


@dataclass(frozen=True)
class Phase:
    """One phase of an AWR iteration: ``steps`` minibatch steps of ``batch_size`` transitions each, drawn from
    everything stored (value phase: reference 200 steps of 256; policy phase: 1000 steps of 256)."""

    steps: int
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"Phase: steps must be >= 0, got {self.steps}.")
        if self.batch_size < 1:
            raise ValueError(f"Phase: batch_size must be >= 1, got {self.batch_size}.")


class PhaseClock:
    """Wall-clock seconds spent in each phase of an iteration (laps with the same name add up)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now


CHECK_CHUNK = 1 << 16  # rows per input check: a memory-mapped dataset is never read whole

MinibatchLoss = Callable[[TensorDictBase, torch.Tensor], TensorDictBase]
"""A phase's loss on the minibatch ``stored[index]``, given the stored data and the indices."""


@dataclass(frozen=True)
class OwnValuePhase:
    """A value phase that steps networks of the targets part's own (a Q critic's) instead of the loss's critic.

    Attributes:
        loss: the loss of one minibatch; its output holds ``loss_value``, the objective the phase minimises.
        network: what the phase's optimizer steps.
        keys: the stored keys ``loss`` reads (:func:`phase_inputs` keeps only these).
        check: checks a phase's stored data once before its steps (refusing missing keys by name).
        after_step: runs after every optimizer step (a target network's soft update); in fused steps, inside
            their compiled graph (so it must be traceable by ``torch.compile``).
    """

    loss: Callable[[TensorDictBase], TensorDictBase]
    network: nn.Module
    keys: tuple[NestedKey, ...]
    check: Callable[[TensorDictBase], None]
    after_step: Callable[[], None] | None = None


def minibatch(stored: TensorDictBase, index: torch.Tensor) -> TensorDictBase:
    """``stored[index]`` for a 1-D ``index``, gathered leaf by leaf: compiled, the graph reads the stored length only
    as its tensors' (symbolic) size, where ``TensorDict.__getitem__`` checks it as a Python int the graph guards on.
    ``index_select`` gathers the same rows as ``tensor[index]`` at about 60% of the cost on these small batches, and
    one new TensorDict of the gathered leaves, built without the constructor's checks (they fit by construction:
    :func:`~awr_modules._torchrl_compat.unchecked_tensordict`), costs less than ``stored.apply`` (about 22 against
    50 us eager)."""
    return unchecked_tensordict({key: tensor.index_select(0, index) for key, tensor in stored.items(True, True)},
                                index.shape, stored.device)


def minibatch_losses(loss: AWRLoss, *, compile: bool = False,
                     own_value: OwnValuePhase | None = None) -> tuple[MinibatchLoss, MinibatchLoss]:
    """The policy and value phases' losses on ``stored[index]``: ``(actor_loss, value_loss)`` (``own_value``: the
    value phase's own loss instead of ``loss.value_loss``).

    With ``compile`` each is one ``torch.compile`` graph of the gather and the loss together,
    whose inputs are the phase's stored TensorDict (the same for all its steps) and fresh
    indices. Compiling the loss alone would build a new minibatch TensorDict in eager mode
    every step and check the graph's guards against it: a fixed cost per step, large beside the
    compiled loss of these small networks. Two functions, so that each phase keeps its own
    compiled graphs.
    """

    def actor_loss(stored: TensorDictBase, index: torch.Tensor) -> TensorDictBase:
        return loss.actor_loss(minibatch(stored, index))

    value_of = loss.value_loss if own_value is None else own_value.loss

    def value_loss(stored: TensorDictBase, index: torch.Tensor) -> TensorDictBase:
        return value_of(minibatch(stored, index))

    if compile:
        return torch.compile(actor_loss), torch.compile(value_loss)
    return actor_loss, value_loss


def phase_inputs(buffers: ReplayBuffer | list[ReplayBuffer], loss: AWRLoss, steps: int, batch_size: int, *,
                 prioritized: bool, own: OwnValuePhase | None = None) -> tuple[TensorDictBase, torch.Tensor] | None:
    """The stored data a phase reads and its ``[steps, batch_size]`` minibatch indices, drawn at once.

    Targets and advantages do not change within a phase, so drawing all indices up
    front samples exactly as ``buffer.sample`` per step would (independent draws with
    replacement: uniform, or proportional to the priorities with ``prioritized``), at
    a fraction of the per-step cost. Only the keys the loss reads are kept (a view of
    the storage, no copy), and the loss's input checks run once over them instead of
    once per step. Several buffers (a dataset's beside the FIFO buffer) are read as one:
    their transitions side by side (a copy of those keys), drawn uniformly; prioritized
    sampling needs a single buffer. ``None`` when ``steps`` is 0. ``own``: a value phase of the targets part's
    own, whose keys and check replace the loss's.
    """
    if steps == 0:
        return None
    buffers = [buffers] if isinstance(buffers, ReplayBuffer) else list(buffers)
    if prioritized and len(buffers) != 1:
        raise ValueError(f"phase_inputs: prioritized sampling reads one buffer, got {len(buffers)}.")
    wanted = list(own.keys) if own is not None else [*loss.in_keys_given_targets, loss.tensor_keys.sample_log_prob]
    views = [buffer.storage.get(slice(0, len(buffer))) for buffer in buffers]  # views, no copy
    shared = [key for key in wanted if all(key in view.keys(True) for view in views)]
    views = [view.select(*shared) for view in views]
    stored = views[0] if len(views) == 1 else torch.cat(views)
    storage = buffers[0].storage
    if prioritized:
        index, _ = buffers[0].sampler.sample(storage, steps * batch_size)  # beta = 0: no importance weights
    else:
        index = torch.randint(stored.shape[0], (steps * batch_size,), device=storage.device)
    for part in stored.split(CHECK_CHUNK):  # keys and finiteness, once per phase (a memory-mapped dataset in pieces)
        (own.check if own is not None else loss.check_batch)(part)
    return stored, index.to(storage.device).view(steps, batch_size)


def for_compiled_phases(stored: TensorDictBase) -> TensorDictBase:
    """``stored`` (a phase's data, from :func:`phase_inputs`) made ready for ``torch.compile`` graphs that
    compile once for every buffer length.

    The FIFO buffer grows by one batch per iteration until it is full, so the data a phase reads has a
    new length every iteration. ``torch.compile`` specialises a graph on the length it first sees and
    compiles again, with a symbolic length, at the second: seconds per phase. Marking the leading
    dimension dynamic makes the first graph the symbolic one. Flattening and rebuilding ``stored``
    once through PyTorch's pytree first registers its class in tensordict's pytree table eagerly;
    registered inside the first trace, the table's size changes under the guard that trace recorded,
    and the next call compiles once more.
    """
    leaves, spec = torch.utils._pytree.tree_flatten(stored)
    torch.utils._pytree.tree_unflatten(leaves, spec)
    for tensor in stored.values(True, True):
        torch._dynamo.maybe_mark_dynamic(tensor, 0)
    return stored


def check_finite_losses(iteration: int, *outputs: TensorDictBase | None) -> None:
    """Stop with a clear message once a phase's last loss is nan or inf (one host sync per iteration).

    A non-finite loss leaves non-finite parameters behind, so the last minibatch of a
    phase shows a divergence anywhere in it.
    """
    for out in outputs:
        if out is None:
            continue
        for key in ("loss_value", "loss_actor"):
            value = out.get(key, None)
            if value is not None and not torch.isfinite(value).all():
                optimizer = "critic_optimizer" if key == "loss_value" else "actor_optimizer"
                raise FloatingPointError(
                    f"AWRModule: {key} became {value.item()} in iteration {iteration}; the networks diverged. "
                    f"Lower the learning rate in model.{optimizer}.init_args.lr, or check the rewards."
                )
