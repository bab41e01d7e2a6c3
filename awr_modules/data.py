"""The data source part: where an AWR run's transitions come from, and the buffers they go to.

Steps 1 and 2 of an AWR iteration. A data source owns its replay buffers, its collection worker's lifetime
and what a checkpoint must hold of them:

- :class:`Collected`: online collection with the current policy into a FIFO buffer (the reference), in this
  process or, with ``asynchronous``, in a worker that collects the next batch while the phases run;
- :class:`MinariDataset`: offline, a local Minari dataset's transitions and nothing else;
- :class:`CollectedBesideDataset`: online, with a dataset kept in its own buffer for the whole run;
  minibatches draw from both;
- :class:`CollectedAfterDataset`: online, with a dataset that fills the FIFO buffer first and ages out as
  collected transitions push it out;
- :class:`GivenBuffers`: TorchRL replay buffers that a pipeline of your own fills (no config: for code that
  drives :class:`~awr_modules.iteration.AWRIteration` itself).

Datasets are read with Minari's own reader (:mod:`awr_modules.offline_data`).
"""

from __future__ import annotations

import copy
import gc
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.utils import NestedKey
from torchrl.collectors import Collector
from torchrl.data import ReplayBuffer

from awr_modules.collector import make_collector, publish_weights
from awr_modules.cpu_worker import CpuWorkerEnv
from awr_modules.observation_statistics import ObservationStatistics
from awr_modules.offline_data import DatasetIdentity, read_minari_dataset
from awr_modules.recipe import Recipe
from awr_modules.replay_buffer import make_replay_buffer
from awr_modules.run_state import check_same_dataset, rank_state, restore_rank_state


@dataclass
class DataContext:
    """What a data source needs to know of the run when it builds its buffers (:meth:`DataSource.setup`).

    Attributes:
        recipe: builds the envs, and maps a dataset's actions to the actor's units.
        env_signature: the task's space shapes (:func:`~awr_modules.run_state.env_signature`).
        seed: this rank's seed (collection envs; a worker adds the iteration it starts at).
        device: where the buffers live and the policy acts.
        rank: this process's rank (a memory-mapped dataset gets a folder per rank).
        prioritized: the loss samples by weight: buffers with a prioritized sampler.
        refreshed_keys: the keys a refresh writes (a memory-mapped layout cannot grow later).
        statistics: the networks' observation statistics, started from a dataset's states (or ``None``).
        chunk_size: rows read at once from a dataset for the statistics (``None``: all), as the targets refresh.
    """

    recipe: Recipe
    env_signature: dict[str, Any]
    seed: int
    device: torch.device
    rank: int = 0
    prioritized: bool = False
    refreshed_keys: tuple[NestedKey, ...] = ("state_value", "value_target", "advantage")
    statistics: ObservationStatistics | None = None
    chunk_size: int | None = None


class DataSource:
    """Base of the data sources: no collection, no buffers. See the module's docstring for the parts."""

    collects = False

    def __init__(self) -> None:
        self._buffer: ReplayBuffer | None = None  # the FIFO buffer (collected, or a dataset's rows offline)
        self._dataset: ReplayBuffer | None = None  # a dataset's rows kept beside the FIFO buffer
        self.identity: DatasetIdentity | None = None
        self._context: DataContext | None = None  # set by setup()

    # ------------------------------------------------------------ checks
    def check(self, *, samples_by_weight: bool, refresh_every: int) -> None:
        """Refuse, before any step, a loss or targets part this source cannot serve (the message names both)."""

    # ---------------------------------------------------------- lifetime
    def setup(self, context: DataContext) -> None:
        """Build the buffers (and read a dataset) for a run on ``context.device``."""
        self._context = context

    def start(self, actor: torch.nn.Module, iteration: int) -> None:
        """Start collecting with ``actor`` (iteration ``iteration`` of the run, 0 for a new run)."""

    def stop(self, *, after_failure: bool = False) -> None:
        """Stop collection workers; ``after_failure``: training already raised, and that error is the one to
        report."""

    # ------------------------------------------------------------- steps
    @property
    def frames_per_iteration(self) -> int:
        """Env steps collected per iteration and rank (0: none)."""
        return 0

    def collect(self, iteration: int) -> TensorDictBase | None:
        """Step 1: the next batch ``[envs, T]`` of transitions (``None``: this source collects none)."""
        return None

    def store(self, batch: TensorDictBase) -> list[torch.Tensor | None]:
        """Step 2: ``batch``'s transitions into the FIFO buffer; per buffer of :attr:`buffers`, the storage indices
        written (``None`` for a buffer nothing was written to)."""
        raise NotImplementedError(f"{type(self).__name__} stores no collected transitions.")

    def publish(self, actor: torch.nn.Module) -> None:
        """After an iteration: the policy that collects the next batch is ``actor`` as it is now."""

    @property
    def buffers(self) -> list[ReplayBuffer]:
        """The buffers the phases train on: those that hold transitions (a kept dataset's first)."""
        return [buffer for buffer in (self._dataset, self._buffer) if buffer is not None and len(buffer)]

    @property
    def fifo(self) -> ReplayBuffer | None:
        """The FIFO buffer a checkpoint saves (``None`` offline: the dataset is read again)."""
        return self._buffer if self.collects else None

    # --------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """This rank's buffer and RNG states, and the dataset's identity (named, not copied)."""
        return {"rank": rank_state(self.fifo), "dataset": self.identity.as_dict() if self.identity else None}

    def load_state_dict(self, rank: dict[str, Any], dataset: dict[str, Any] | None,
                        priority_fn: Callable[[TensorDictBase], torch.Tensor] | None) -> None:
        """Restore a saved rank state (refusing a checkpoint written with another dataset)."""
        check_same_dataset(dataset, self.identity)
        restore_rank_state(rank, self.fifo, priority_fn)

    # ------------------------------------------------------------ helpers
    def _new_buffer(self, capacity: int) -> ReplayBuffer:
        return make_replay_buffer(capacity, prioritized=self._context.prioritized, priority="weight",
                                  device=self._context.device)


class Collected(DataSource):
    """Online collection with the current (stochastic) policy into a FIFO replay buffer (the reference).

    Args:
        frames_per_iteration: env steps collected per iteration and rank (reference ``samples_per_iter`` 2048).
        num_envs: envs stepped in lock-step by TorchRL's collector (each gets ``frames_per_iteration / num_envs``
            steps per iteration); more envs amortise per-step overhead.
        buffer_size: FIFO buffer capacity in transitions (reference 50,000).
        asynchronous: a worker process (TorchRL's ``AsyncCollector``) collects the next iteration's batch while
            this iteration's phases run, acting with the weights published after the last iteration
            (:meth:`publish`). A batch is then at most one iteration behind (one may straddle a publication), and
            each stored log-prob is that of the snapshot that acted. The worker is seeded with the rank's seed plus
            the iteration it starts at, but the run is not reproducible step for step: where a publication falls
            within a batch depends on timing. ``False``: the reference's order, collect then update.
    """

    collects = True

    def __init__(self, frames_per_iteration: int = 2048, num_envs: int = 1, buffer_size: int = 50_000,
                 asynchronous: bool = False) -> None:
        super().__init__()
        name = type(self).__name__
        for field, value in (("frames_per_iteration", frames_per_iteration), ("num_envs", num_envs),
                             ("buffer_size", buffer_size)):
            if value < 1:
                raise ValueError(f"{name}: {field} must be >= 1, got {value}.")
        if not isinstance(asynchronous, bool):
            raise TypeError(f"{name}: asynchronous must be true or false, got {asynchronous!r}.")
        if frames_per_iteration % num_envs:
            raise ValueError(f"{name}: frames_per_iteration ({frames_per_iteration}) must be a multiple of num_envs "
                             f"({num_envs}): each env contributes the same number of steps.")
        self._frames = frames_per_iteration
        self.num_envs = num_envs
        self.buffer_size = buffer_size
        self.asynchronous = asynchronous
        self._collector: Collector | None = None
        self._batches: Iterator[TensorDictBase] | None = None

    @property
    def frames_per_iteration(self) -> int:
        return self._frames

    def check(self, *, samples_by_weight: bool, refresh_every: int) -> None:
        if refresh_every > 1:
            raise ValueError(f"model.targets.refresh_every={refresh_every} is for offline data; model.data "
                             f"({type(self).__name__}) collects transitions that need targets in the iteration "
                             "that stores them: use refresh_every 1.")

    def setup(self, context: DataContext) -> None:
        super().setup(context)
        self._buffer = self._new_buffer(self.buffer_size)

    def start(self, actor: torch.nn.Module, iteration: int) -> None:
        context = self._context
        make_env = partial(context.recipe.make_env, context.seed, self.num_envs)
        if self.asynchronous and context.device.type == "cpu":
            make_env = CpuWorkerEnv(make_env)
        self._collector = make_collector(
            make_env if self.asynchronous else make_env(),
            copy.deepcopy(actor) if self.asynchronous else actor,  # the worker's own behaviour policy
            asynchronous=self.asynchronous, frames_per_batch=self._frames, total_frames=-1,
            policy_device=context.device, storing_device=context.device)
        if self.asynchronous:  # a spawned worker starts with a random torch seed: give it the rank's (per resume)
            self._collector.set_seed(context.seed + iteration)
        self._batches = iter(self._collector)

    def collect(self, iteration: int) -> TensorDictBase:
        try:
            return next(self._batches)
        except Exception as error:  # an env that raised, or a collection worker that died
            where = "collection worker process" if self.asynchronous else "collection"
            raise RuntimeError(
                f"{type(self).__name__}: the {where} failed in iteration {iteration + 1} ({type(error).__name__}: "
                f"{error}). Resume from the last checkpoint with `awr fit ... --ckpt_path last`."
            ) from error

    def store(self, batch: TensorDictBase) -> list[torch.Tensor | None]:
        written = self._buffer.extend(self._rows(batch.reshape(-1)))
        return [None if buffer is not self._buffer else written for buffer in self.buffers]

    def _rows(self, rows: TensorDictBase) -> TensorDictBase:
        return rows

    def publish(self, actor: torch.nn.Module) -> None:
        """An asynchronous worker gets ``actor``'s weights (normaliser included) through TorchRL's weight sync
        and acts with them until the next publication; an in-process collector steps ``actor`` itself."""
        if self.asynchronous:
            publish_weights(self._collector, actor)

    def stop(self, *, after_failure: bool = False) -> None:
        collector, self._collector, self._batches = self._collector, None, None
        if collector is None:
            return
        threads = torch.get_num_threads()
        try:
            collector.shutdown()
        except Exception:
            if not after_failure:  # torchrl 0.12 raises when it finds a dead worker: the first error stands
                raise
        finally:
            # TorchRL's multiprocess collectors raise this process's torch thread count on shutdown, and again
            # when the object is collected (its ``__del__`` shuts down once more), which could land inside a later
            # ``torch.compile`` trace: collect it now and keep the run's setting.
            del collector
            gc.collect()
            torch.set_num_threads(threads)


class _ReadsDataset:
    """Reading a local Minari dataset into rows for the actor (mixed into the dataset sources)."""

    dataset_id: str
    dataset_root: str | None
    memmap_dir: str | None = None

    def _read(self, context: DataContext) -> TensorDict:
        """The dataset's rows (refused early if it does not fit the recipe), actions in the actor's units; the
        observation statistics start from its states."""
        signature, folder = context.env_signature, None
        if self.memmap_dir is not None:  # this rank's fresh folder: a previous start's rows are read again
            folder = os.path.join(self.memmap_dir, f"rank{context.rank}")
            shutil.rmtree(folder, ignore_errors=True)
        rows, self.identity = read_minari_dataset(
            self.dataset_id, env_id=context.recipe.env_id, root=self.dataset_root,
            observation_shape=tuple(signature["observation_shape"]),
            action_shape=() if signature["discrete"] else tuple(signature["action_shape"]),
            memmap_dir=folder, policy_actions=context.recipe.policy_actions,
            extra_columns=context.refreshed_keys if folder is not None else ())
        if context.statistics is not None:
            for part in rows.split(context.chunk_size or rows.shape[0]):  # a memory-mapped dataset piece by piece
                context.statistics.update(part, 0)
        return rows


class MinariDataset(_ReadsDataset, DataSource):
    """Offline: a local Minari dataset's transitions, all of them, and no env steps besides evaluation.

    Args:
        dataset_id: the Minari id (e.g. ``"hopper/medium-v0"``); its env must be the recipe's.
        dataset_root: the Minari datasets folder (default ``MINARI_DATASETS_PATH``, else ``~/.minari/datasets``).
        memmap_dir: keep the rows in memory-mapped files under this folder (a ``rank<r>`` folder each, rewritten
            at every start) instead of in memory, for datasets larger than memory; pair it with the targets'
            ``chunk_size``.
    """

    def __init__(self, dataset_id: str, dataset_root: str | None = None, memmap_dir: str | None = None) -> None:
        super().__init__()
        self.dataset_id, self.dataset_root, self.memmap_dir = dataset_id, dataset_root, memmap_dir

    def setup(self, context: DataContext) -> None:
        super().setup(context)
        rows = self._read(context)
        if self.memmap_dir is not None:  # the files are the buffer's storage: nothing is copied
            self._buffer = make_replay_buffer(rows.shape[0], prioritized=context.prioritized, priority="weight",
                                              storage=rows)
            return
        self._buffer = self._new_buffer(rows.shape[0])
        self._buffer.extend(rows.to(self._buffer.storage.device))


class CollectedBesideDataset(_ReadsDataset, Collected):
    """Online collection (:class:`Collected`) with a dataset kept in a buffer of its own for the whole run:
    each phase draws its minibatches uniformly from the dataset's and the FIFO buffer's transitions together.

    Args:
        dataset_id: the Minari id; ``dataset_root``: its folder (see :class:`MinariDataset`).

    Other arguments: see :class:`Collected`.
    """

    def __init__(self, dataset_id: str, dataset_root: str | None = None, frames_per_iteration: int = 2048,
                 num_envs: int = 1, buffer_size: int = 50_000, asynchronous: bool = False) -> None:
        super().__init__(frames_per_iteration, num_envs, buffer_size, asynchronous)
        self.dataset_id, self.dataset_root = dataset_id, dataset_root

    def check(self, *, samples_by_weight: bool, refresh_every: int) -> None:
        super().check(samples_by_weight=samples_by_weight, refresh_every=refresh_every)
        if samples_by_weight:
            raise ValueError("model.loss weighting='sampling' samples one prioritized buffer; model.data "
                             "(CollectedBesideDataset) keeps the dataset in a second one. Use weighting='loss', or "
                             "model.data CollectedAfterDataset.")

    def setup(self, context: DataContext) -> None:
        super().setup(context)
        rows = self._read(context)
        self._dataset = self._new_buffer(rows.shape[0])
        self._dataset.extend(rows.to(self._dataset.storage.device))


class CollectedAfterDataset(_ReadsDataset, Collected):
    """Online collection (:class:`Collected`) into a FIFO buffer that a dataset fills first (its newest
    ``buffer_size`` transitions); collected transitions push the dataset's out.

    Args:
        dataset_id: the Minari id; ``dataset_root``: its folder (see :class:`MinariDataset`).
        memmap_dir: read the dataset through memory-mapped files there (see :class:`MinariDataset`).

    Other arguments: see :class:`Collected`.
    """

    def __init__(self, dataset_id: str, dataset_root: str | None = None, memmap_dir: str | None = None,
                 frames_per_iteration: int = 2048, num_envs: int = 1, buffer_size: int = 50_000,
                 asynchronous: bool = False) -> None:
        super().__init__(frames_per_iteration, num_envs, buffer_size, asynchronous)
        self.dataset_id, self.dataset_root, self.memmap_dir = dataset_id, dataset_root, memmap_dir

    def setup(self, context: DataContext) -> None:
        super().setup(context)
        rows = self._read(context)
        if rows.shape[0] > self.buffer_size:
            warnings.warn(f"CollectedAfterDataset: the dataset's {rows.shape[0]} transitions exceed buffer_size "
                          f"({self.buffer_size}); its newest {self.buffer_size} fill the buffer.", stacklevel=2)
            rows = rows[-self.buffer_size:]  # one write per slot (a wrapped extend would write slots twice)
        self._buffer.extend(rows.to(self._buffer.storage.device))

    def _rows(self, rows: TensorDictBase) -> TensorDictBase:
        """Collected rows with only the fields the dataset's have, so that both share one storage layout."""
        return rows.select(*self._buffer.storage.get(0).keys(True, True), strict=False)


class GivenBuffers(DataSource):
    """Transitions already stored in TorchRL replay buffers that the caller fills (and checkpoints) itself.

    Args:
        buffers: FIFO buffers of transitions with ``"next"`` reward, done and terminated; paths are separate
            across buffers. A loss that samples by weight needs exactly one prioritized buffer.

    Example::

        iteration = AWRIteration(loss, GivenBuffers(buffer), TDLambda(), Fixed(), Phase(200), Phase(1000), Eager())
        iteration.bind(actor_optimizer, critic_optimizer, PlainSteps())
        iteration.run()
    """

    def __init__(self, *buffers: ReplayBuffer) -> None:
        super().__init__()
        self._given = list(buffers)

    def check(self, *, samples_by_weight: bool, refresh_every: int) -> None:
        if samples_by_weight and len(self._given) != 1:
            raise ValueError(f"GivenBuffers: a loss that samples by weight reads one prioritized buffer, got "
                             f"{len(self._given)}.")

    @property
    def buffers(self) -> list[ReplayBuffer]:
        return [buffer for buffer in self._given if len(buffer)]
