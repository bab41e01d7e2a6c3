"""``AWRModule``: the AWR iteration as a Lightning module.

One Lightning *epoch* is one AWR iteration (``../shared/DESIGN.md``):

1. collect ``frames_per_iteration`` steps with the stochastic policy (TorchRL collector);
2. extend the FIFO replay buffer;
3. refresh TD(lambda) value targets over the stored trajectories with the critic;
4. value phase: ``critic_steps`` minibatch steps on ``0.5 ((V - R) / s_v)^2``;
5. refresh advantages with the updated critic (normalised over the buffer);
6. policy phase: ``actor_steps`` minibatch steps on ``-w log pi(a|s)``, ``w = min(exp(A / beta), w_max)``;
7. log; Lightning's validation loop evaluates the deterministic policy every
   ``check_val_every_n_epoch`` iterations.

Lightning does devices, precision, DDP, checkpointing and logging. The rest lives in
modules of its own: DDP gradient and statistics sync in :mod:`awr_modules.distributed`,
the observation statistics in :mod:`awr_modules.observation_statistics` (handed over by
the recipe), evaluation in :mod:`awr_modules.evaluation`, and what a checkpoint holds
besides Lightning's own in :mod:`awr_modules.run_state`.
"""

from __future__ import annotations

import copy
import gc
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from tensordict import TensorDictBase
from torch.utils.data import DataLoader
from torchrl.collectors import Collector
from torchrl.data import ReplayBuffer
from torchrl.envs import EnvBase

from awr_modules.collector import make_collector
from awr_modules.cpu_worker import CpuWorkerEnv
from awr_modules.cuda_graphs import CapturedGradients, move_distribution_kwargs
from awr_modules.distributed import (
    average_gradients,
    direct_steps_suffice,
    gather_rank_states,
    mean_across_ranks,
    no_backward_sync,
)
from awr_modules.evaluation import Evaluation, evaluate, evaluation_metrics
from awr_modules.evaluation_worker import EvaluationWorker, EvaluationWorkerError
from awr_modules.fused_steps import FusedSGDSteps, fused_phases
from awr_modules.loss import AWRLoss
from awr_modules.observation_statistics import ObservationStatistics
from awr_modules.offline_data import DatasetIdentity, read_minari_dataset
from awr_modules.phases import (
    MinibatchLoss,
    PhaseClock,
    check_finite_losses,
    for_compiled_phases,
    minibatch_losses,
    phase_inputs,
)
from awr_modules.recipe import Recipe
from awr_modules.replay_buffer import make_replay_buffer
from awr_modules.run_state import (
    CHECKPOINT_KEY,
    check_same_dataset,
    checked_run_state,
    env_signature,
    own_rank_state,
    rank_state,
    restore_rank_state,
)
from awr_modules.temperature import MEASURES, effective_sample_size, kl_from_behaviour, solve_temperature
from awr_modules.value_targets import refresh_value_targets_over, write_priorities

INJECTED = ("actor_optimizer", "critic_optimizer", "actor_scheduler", "critic_scheduler")


@dataclass
class _Runtime:
    """What ``setup()`` builds: kept outside the module tree so envs never enter ``state_dict`` or DDP."""

    eval_env: EnvBase
    actor_loss: MinibatchLoss | None = None
    value_loss: MinibatchLoss | None = None
    collector: Collector | None = None
    batches: Iterator[TensorDictBase] | None = None
    buffer: ReplayBuffer | None = None
    statistics: ObservationStatistics | None = None  # the recipe's link from collected states to the networks
    captured: CapturedGradients | None = None  # set when ``cudagraphs`` applies (a single CUDA device)
    direct_steps: bool = False  # backward and optimizer steps without Lightning's per-step calls
    fused: dict[str, FusedSGDSteps] | None = None  # per phase, where several steps run as one graph
    predicted: list[TensorDictBase] | None = None  # ``awr predict``'s episodes, run once per predict epoch
    evaluates_in_worker: bool = False  # ``evaluation="async"`` during fit: validation hands snapshots over
    evaluator: EvaluationWorker | None = None  # rank 0's evaluation worker then
    iteration_ended: float | None = None  # ``time.perf_counter()`` when the last training step returned
    collected: TensorDictBase | None = None  # this iteration's collected batch ``[envs, T]`` (None offline)
    dataset: ReplayBuffer | None = None  # a dataset's transitions kept apart from the FIFO buffer
    dataset_identity: DatasetIdentity | None = None  # what checkpoints record of the dataset
    refreshed: bool = False  # whether this process has refreshed the stored targets yet
    values_current: bool = False  # every stored V(s) is the current critic's, but for rows written since
    buffer_weights: dict[str, float] | None = None  # the temperature and the buffer's weight ESS / KL, for the log
    starts_from_init: bool = False  # ``init_from`` still to load (a new run, not a resume), in ``on_fit_start``


def _check_data_sources(collection: str, evaluation: str, dataset: str | None, dataset_transitions: str,
                        refresh_every: int, weighting: str) -> None:
    if collection not in ("sync", "async", "none"):
        raise ValueError(f"AWRModule: collection must be 'sync', 'async' or 'none' (offline), got {collection!r}.")
    if evaluation not in ("sync", "async"):
        raise ValueError(f"AWRModule: evaluation must be 'sync' or 'async', got {evaluation!r}.")
    if dataset_transitions not in ("keep", "age_out"):
        raise ValueError(f"AWRModule: dataset_transitions must be 'keep' or 'age_out', got {dataset_transitions!r}.")
    if collection == "none" and dataset is None:
        raise ValueError("AWRModule: collection='none' trains offline and needs a dataset (model.dataset).")
    if refresh_every > 1 and collection != "none":
        raise ValueError("AWRModule: refresh_every > 1 is for offline runs; collected transitions need targets "
                         "in the iteration that stores them.")
    if dataset is not None and collection != "none" and dataset_transitions == "keep" and weighting == "sampling":
        raise ValueError("AWRModule: weighting='sampling' samples one prioritized buffer; with a kept dataset beside "
                         "the FIFO buffer use weighting='loss' or dataset_transitions='age_out'.")


def _check_dataset_storage(collection: str, dataset: str | None, dataset_transitions: str,
                           refresh_chunk_size: int | None, dataset_memmap_dir: str | None) -> None:
    if refresh_chunk_size is not None and refresh_chunk_size < 1:
        raise ValueError(f"AWRModule: refresh_chunk_size must be >= 1, got {refresh_chunk_size}.")
    if dataset_memmap_dir is None:
        return
    if dataset is None:
        raise ValueError("AWRModule: dataset_memmap_dir holds a dataset's transitions; set model.dataset too.")
    if collection != "none" and dataset_transitions == "keep":
        raise ValueError("AWRModule: a memory-mapped dataset kept beside the FIFO buffer would be copied into memory "
                         "for every phase; train offline (collection='none') or use dataset_transitions='age_out'.")


def _check_temperature_tuning(tuning: str, target: float | None, weighting: str) -> None:
    if tuning not in ("fixed", *MEASURES):
        raise ValueError(f"AWRModule: temperature_tuning must be 'fixed', 'ess' or 'kl', got {tuning!r}.")
    if tuning == "fixed":
        return
    if weighting == "uniform":
        raise ValueError("AWRModule: weighting='uniform' has no temperature to tune; use temperature_tuning='fixed'.")
    if target is None or not (0 < target < 1 if tuning == "ess" else target > 0):
        raise ValueError(f"AWRModule: temperature_tuning={tuning!r} needs temperature_target "
                         f"{'in (0, 1)' if tuning == 'ess' else '> 0'}, got {target}.")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"AWRModule: {name} must be > 0, got {value}.")


class AWRModule(pl.LightningModule):
    """Advantage-Weighted Regression, one AWR iteration per Lightning epoch.

    Args:
        recipe: builds the env and the networks (e.g. ``awr_recipes.classic_control.ClassicControl``).

    Keyword Args:
        frames_per_iteration: env steps collected per iteration and rank (reference ``samples_per_iter`` 2048).
        num_envs: envs stepped in lock-step by the collector (each gets ``frames_per_iteration / num_envs``
            steps per iteration); more envs amortise per-step overhead.
        buffer_size: FIFO replay buffer capacity in transitions (reference 50,000).
        critic_steps: value-phase minibatch steps per iteration (reference 200).
        actor_steps: policy-phase minibatch steps per iteration (reference 1000).
        critic_batch_size: value-phase minibatch size (reference 256).
        actor_batch_size: policy-phase minibatch size (reference 256).
        critic_lr: critic step size (reference 0.01 with SGD, momentum 0.9).
        actor_lr: actor step size (reference 5e-5 .. 5e-4 by task, SGD, momentum 0.9).
        optimizer: ``"sgd"`` with ``momentum`` (reference) or ``"adam"``, at ``actor_lr`` / ``critic_lr``; the
            shorthand for the reference's settings, replaced by ``actor_optimizer`` / ``critic_optimizer``.
        actor_optimizer: any optimizer, injected (Lightning's ``OptimizerCallable``: in YAML a ``class_path``
            such as ``torch.optim.Adam`` with ``init_args``); it is built on the actor's parameters.
        critic_optimizer: the same for the critic.
        actor_scheduler: a learning-rate scheduler of the actor's optimizer (``LRSchedulerCallable``, e.g.
            ``torch.optim.lr_scheduler.CosineAnnealingLR``), stepped once per iteration.
        critic_scheduler: the same for the critic's optimizer.
        momentum: SGD momentum (reference 0.9).
        gamma: discount (reference 0.99).
        td_lambda: lambda of the TD(lambda) targets (reference 0.95).
        temperature: ``beta`` of ``exp(A / beta)`` (reference 1.0 on normalised advantages); with
            ``temperature_tuning`` the first iteration's value only.
        temperature_tuning: ``"fixed"`` (the reference) or ``"ess"`` / ``"kl"``: every iteration, after the
            advantages' refresh, ``beta`` is solved (:func:`~awr_modules.temperature.solve_temperature`) so that
            the weights over the whole buffer have ``temperature_target`` as their normalised effective sample
            size, or as the KL of the weighted policy from the behaviour policy (nats). Logged as
            ``train/temperature``, beside ``train/buffer_weight_ess`` and ``train/buffer_weight_kl`` (always).
        temperature_target: the ESS in ``(0, 1)`` or the KL ``> 0`` that ``temperature_tuning`` holds. Standardised
            Gaussian advantages at ``beta = 1`` (the reference) have an ESS of ``exp(-1) = 0.37`` and a KL of 0.5.
        max_weight: weight clip (reference 20).
        normalize_advantage: standardise advantages over the buffer before weighting (reference: yes).
        value_scale: ``s_v``; ``None`` means ``1 / (1 - gamma)`` as the reference. The critic network predicts
            ``V / s_v`` (the recipe scales its output) and the loss divides the value error by ``s_v``, so the
            network regresses ``R / s_v`` with the reference's step sizes.
        action_bound_penalty: penalty on the Gaussian mean leaving ``[-1, 1]`` (reference 10). ``None``: the
            reference's setting for the recipe's actor (10 for a Gaussian mean, 0 for categorical or
            TanhNormal actors); a positive value with such an actor is refused (see ``AWRLoss``).
        entropy_coeff: entropy bonus (reference 0).
        action_l2_coeff: L2 penalty on the Gaussian mean or the logits (reference ``action_l2_weight``:
            0, and 0.001 for LunarLander).
        weighting: ``"loss"`` (paper: ``w`` multiplies the log-likelihood, uniform sampling),
            ``"sampling"`` (the buffer samples proportionally to ``w``; loss weight 1) or ``"uniform"``
            (weight 1, uniform sampling: behaviour cloning, the offline baseline).
        eval_episodes: episodes of the deterministic policy per evaluation.
        max_env_steps: stop training once this many env steps (all ranks) were collected.
        seed: base seed; rank ``r`` collects with ``seed + 1000 * r``. ``None`` (the CLI's: it links
            ``seed_everything`` here) takes the seed ``lightning.seed_everything`` set, else 0.
        compile: run each phase's minibatch gather and loss through ``torch.compile`` (default
            inductor backend): one graph per phase, compiled once on its first minibatch (seconds), for
            every buffer length (:func:`~awr_modules.phases.for_compiled_phases`); backward and optimizer
            steps stay outside the graph, so every precision and strategy works as without it.
        cudagraphs: on a CUDA device, replay each phase's gradient computation (minibatch gather,
            loss, backward) as a CUDA graph (:mod:`awr_modules.cuda_graphs`); optimizer steps stay
            outside the graph, so every precision works. Combines with ``compile``. Single device only
            (an error under DDP); without a CUDA device it has no effect (a warning).
        collection: ``"sync"`` (the reference's order: collect, then update) or ``"async"``: a worker
            process (TorchRL's ``AsyncCollector``) collects the next iteration's steps while this
            iteration's phases run, acting with the weights published after the last iteration. A batch
            is then at most one iteration behind (one may straddle a publication), and each stored
            log-prob is that of the snapshot that acted. The worker is seeded with the rank's seed (plus
            the iteration it starts at), but the run is not reproducible step for step: where a
            publication falls within a batch depends on timing.
        fused_steps: with ``compile``, full precision, one device, no step hooks and plain SGD, this many
            minibatch steps of a phase run as one compiled graph (:class:`~awr_modules.fused_steps.FusedSGDSteps`:
            gradients by ``torch.func.grad``, SGD's update in place; the same steps as ``SGD``, tested);
            a phase's remaining steps run one by one. ``1``: one step per graph call.
        evaluation: ``"sync"`` (training waits for each evaluation) or ``"async"``: during ``fit``, rank 0
            sends a snapshot of the actor to a worker process that evaluates it while training goes on
            (:class:`~awr_modules.evaluation_worker.EvaluationWorker`); each result is logged when it
            arrives, at the optimizer step and with the ``env_steps`` of its snapshot. ``awr validate``
            and ``awr test`` evaluate in the process either way.
        dataset: a local Minari dataset id (:mod:`awr_modules.offline_data`) whose transitions train the
            networks too; observation statistics start from its states. With ``collection="none"`` the run is
            offline: no env steps besides evaluation.
        dataset_root: the Minari datasets folder (default ``MINARI_DATASETS_PATH``, else ``~/.minari/datasets``).
        dataset_transitions: with online collection, ``"keep"`` (the dataset stays beside the FIFO buffer for
            the whole run; minibatches draw from both) or ``"age_out"`` (the dataset fills the FIFO buffer first,
            its newest ``buffer_size`` transitions, and collected ones push them out).
        refresh_every: offline only: recompute targets and advantages every this many iterations (their cost
            grows with the dataset; online runs refresh every iteration, as new transitions need targets).
        refresh_chunk_size: refresh targets this many transitions at a time, in runs of whole stored paths
            (:func:`~awr_modules.value_targets.refresh_value_targets`), so that no refresh reads a whole
            dataset at once; ``None``: each buffer at once.
        dataset_memmap_dir: keep the dataset's transitions in memory-mapped files under this folder (a
            ``rank<r>`` folder each, rewritten at every start) instead of in memory: datasets larger than
            memory train offline (``collection="none"``) or age out (``dataset_transitions="age_out"``).
            Pair it with ``refresh_chunk_size``.
        init_from: a checkpoint of this task whose networks and observation statistics (frozen) a new run starts
            from, with this config's settings: online fine-tuning of an offline run, say. ``--ckpt_path`` instead
            resumes a run, with the hyperparameters stored in its checkpoint (Lightning's CLI restores them).
    """

    def __init__(
        self,
        recipe: Recipe,
        *,
        frames_per_iteration: int = 2048,
        num_envs: int = 1,
        buffer_size: int = 50_000,
        critic_steps: int = 200,
        actor_steps: int = 1000,
        critic_batch_size: int = 256,
        actor_batch_size: int = 256,
        critic_lr: float = 0.01,
        actor_lr: float = 5e-5,
        optimizer: Literal["sgd", "adam"] = "sgd",
        momentum: float = 0.9,
        actor_optimizer: OptimizerCallable | None = None,
        critic_optimizer: OptimizerCallable | None = None,
        actor_scheduler: LRSchedulerCallable | None = None,
        critic_scheduler: LRSchedulerCallable | None = None,
        gamma: float = 0.99,
        td_lambda: float = 0.95,
        temperature: float = 1.0,
        temperature_tuning: Literal["fixed", "ess", "kl"] = "fixed",
        temperature_target: float | None = None,
        max_weight: float = 20.0,
        normalize_advantage: bool = True,
        value_scale: float | None = None,
        action_bound_penalty: float | None = None,
        entropy_coeff: float = 0.0,
        action_l2_coeff: float = 0.0,
        weighting: Literal["loss", "sampling", "uniform"] = "loss",
        eval_episodes: int = 10,
        max_env_steps: int | None = None,
        seed: int | None = None,
        compile: bool = False,
        cudagraphs: bool = False,
        fused_steps: int = 8,
        collection: Literal["sync", "async", "none"] = "sync",
        evaluation: Literal["sync", "async"] = "sync",
        dataset: str | None = None,
        dataset_root: str | None = None,
        dataset_transitions: Literal["keep", "age_out"] = "keep",
        refresh_every: int = 1,
        refresh_chunk_size: int | None = None,
        dataset_memmap_dir: str | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        for name in ("frames_per_iteration", "num_envs", "buffer_size", "critic_batch_size", "actor_batch_size",
                     "critic_lr", "actor_lr", "gamma", "eval_episodes", "fused_steps", "refresh_every"):
            _positive(name, locals()[name])
        for name in ("critic_steps", "actor_steps", "momentum", "td_lambda"):
            if locals()[name] < 0:
                raise ValueError(f"AWRModule: {name} must be >= 0, got {locals()[name]}.")
        if frames_per_iteration % num_envs:
            raise ValueError(f"AWRModule: frames_per_iteration ({frames_per_iteration}) must be a multiple of "
                             f"num_envs ({num_envs}): each env contributes the same number of steps.")
        _check_data_sources(collection, evaluation, dataset, dataset_transitions, refresh_every, weighting)
        _check_dataset_storage(collection, dataset, dataset_transitions, refresh_chunk_size, dataset_memmap_dir)
        _check_temperature_tuning(temperature_tuning, temperature_target, weighting)
        if collection == "none" and max_env_steps is not None:
            rank_zero_warn("AWRModule: max_env_steps counts collected env steps and an offline run takes none; "
                           "bound it with trainer.max_epochs.")
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"AWRModule: optimizer must be 'sgd' or 'adam', got {optimizer!r}.")
        if gamma >= 1 or td_lambda > 1:
            raise ValueError(f"AWRModule: need gamma < 1 and td_lambda <= 1, got gamma={gamma}, td_lambda={td_lambda}.")
        # Injected callables stay out of the checkpoint's hyperparameters (which load with weights_only=True);
        # the config that built them is saved beside the run's logs.
        self.save_hyperparameters(ignore=["recipe", *INJECTED])
        self._injected = {"actor_optimizer": actor_optimizer, "critic_optimizer": critic_optimizer,
                          "actor_scheduler": actor_scheduler, "critic_scheduler": critic_scheduler}
        self.automatic_optimization = False
        self.recipe = recipe

        spec_env = recipe.make_env(seed)
        value_scale = value_scale if value_scale is not None else 1.0 / (1.0 - gamma)
        self.actor, self.critic = recipe.make_networks(spec_env, value_scale)
        self._env_signature = env_signature(spec_env)
        spec_env.close()
        self.loss_module = AWRLoss(
            self.actor,
            self.critic,
            temperature=temperature,
            max_weight=max_weight,
            value_scale=value_scale,
            action_bound_penalty=action_bound_penalty,
            entropy_coeff=entropy_coeff,
            action_l2_coeff=action_l2_coeff,
            weighting=weighting,
            check_inputs=False,  # the module checks each phase's data once (see _phase_inputs)
            functional=False,  # the networks are called as they are: no parameter swap per minibatch
        )
        self.loss_module.make_value_estimator(gamma=gamma, lmbda=td_lambda)
        self.env_steps = 0
        self.iteration = 0
        self.runtime: _Runtime | None = None

    @property
    def env_signature(self) -> dict[str, Any]:
        """The shapes of the task's spaces, as checkpoints record them (:func:`~awr_modules.run_state.env_signature`)."""
        return self._env_signature

    # ------------------------------------------------------------ building
    def setup(self, stage: str) -> None:
        """Build envs and buffer here, not in ``__init__``, so ``ddp_spawn`` can pickle the module."""
        rank_seed = self._rank_seed()
        actor_loss, value_loss = minibatch_losses(self.loss_module, compile=self.hparams.compile)
        runtime = _Runtime(eval_env=self.recipe.make_env(rank_seed + 500, self.hparams.eval_episodes),
                           actor_loss=actor_loss, value_loss=value_loss)
        runtime.statistics = self.recipe.observation_statistics(self.actor, self.critic)
        if stage == "fit":
            runtime.captured = self._captured_gradients()
            torch.manual_seed(rank_seed)
            if self.hparams.collection != "none":
                runtime.buffer = self._new_buffer(self.hparams.buffer_size)
            if self.hparams.dataset is not None:
                self._load_dataset(runtime)
            runtime.starts_from_init = self.hparams.init_from is not None  # unless a resume restores the run
        self.runtime = runtime

    def load_networks(self, path: str | os.PathLike) -> dict[str, Any]:
        """Load a checkpoint's networks (normaliser included) after checking that it was written for this task and
        these network sizes; returns the checkpoint's AWR section (:mod:`awr_modules.run_state`)."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checked_run_state(checkpoint, self.recipe.env_id, self._env_signature, self.state_dict())
        self.load_state_dict(checkpoint["state_dict"])
        return state

    def _start_from(self, path: str, runtime: _Runtime) -> None:
        """Load a checkpoint's networks and observation statistics (frozen: the policy was trained on them)."""
        runtime.starts_from_init = False
        state = self.load_networks(path)
        if runtime.statistics is not None and state["normalizers"]:
            runtime.statistics.load_state_dict(state["normalizers"][0], env_steps=runtime.statistics.freeze_after)

    def _new_buffer(self, capacity: int) -> ReplayBuffer:
        return make_replay_buffer(
            capacity,
            prioritized=self.loss_module.samples_by_weight,
            priority="weight",
            device=self.trainer.strategy.root_device,  # the module is moved there after setup()
        )

    def _load_dataset(self, runtime: _Runtime) -> None:
        """Read the dataset (refused early if it does not fit the recipe), its actions in the actor's units, into
        its own buffer or the FIFO buffer (``age_out``); the observation statistics start from its states."""
        hp, keys = self.hparams, self.loss_module.tensor_keys
        memmap_dir = self._dataset_memmap_dir()
        rows, runtime.dataset_identity = read_minari_dataset(
            hp.dataset, env_id=self.recipe.env_id, root=hp.dataset_root,
            observation_shape=tuple(self._env_signature["observation_shape"]),
            action_shape=() if self._env_signature["discrete"] else tuple(self._env_signature["action_shape"]),
            memmap_dir=memmap_dir, policy_actions=self.recipe.policy_actions,
            extra_columns=(keys.value, keys.value_target, keys.advantage) if memmap_dir is not None else ())
        if runtime.statistics is not None:
            for part in rows.split(hp.refresh_chunk_size or rows.shape[0]):  # a memory-mapped dataset piece by piece
                runtime.statistics.update(part, 0)
        if hp.dataset_transitions == "age_out" and hp.collection != "none":
            if rows.shape[0] > hp.buffer_size:
                rank_zero_warn(f"AWRModule: the dataset's {rows.shape[0]} transitions exceed buffer_size "
                               f"({hp.buffer_size}); age_out keeps its newest {hp.buffer_size}.")
                rows = rows[-hp.buffer_size:]  # one write per slot (a wrapped extend would write slots twice)
            runtime.buffer.extend(rows.to(runtime.buffer.storage.device))
            return
        if memmap_dir is not None:  # the files are the buffer's storage: nothing is copied
            runtime.dataset = make_replay_buffer(rows.shape[0], prioritized=self.loss_module.samples_by_weight,
                                                 priority="weight", storage=rows)
            return
        runtime.dataset = self._new_buffer(rows.shape[0])
        runtime.dataset.extend(rows.to(runtime.dataset.storage.device))

    def _dataset_memmap_dir(self) -> str | None:
        """This rank's fresh folder for the dataset's memory-mapped rows, or ``None`` (rows in memory)."""
        if self.hparams.dataset_memmap_dir is None:
            return None
        folder = os.path.join(self.hparams.dataset_memmap_dir, f"rank{self.global_rank}")
        shutil.rmtree(folder, ignore_errors=True)  # a previous start's rows: read again, as a resume does
        return folder

    def _sources(self) -> list[ReplayBuffer]:
        """The buffers the phases train on: the dataset's and the FIFO buffer, those that hold transitions."""
        return [buffer for buffer in (self.runtime.dataset, self.runtime.buffer) if buffer is not None and len(buffer)]

    def _rank_seed(self) -> int:
        """This rank's seed: rank ``r`` collects with ``seed + 1000 * r`` (its eval env with ``+ 500``)."""
        seed = self.hparams.seed
        if seed is None:  # the run's one seed: what seed_everything set (Lightning keeps it in PL_GLOBAL_SEED)
            seed = int(os.environ.get("PL_GLOBAL_SEED", "0"))
        return seed + 1000 * self.global_rank

    def _captured_gradients(self) -> CapturedGradients | None:
        """The CUDA-graph cache when ``cudagraphs`` is on and can apply; a clear error or warning if not."""
        if not self.hparams.cudagraphs:
            return None
        if self.trainer.world_size > 1:
            raise ValueError("AWRModule: cudagraphs is for a single device; under DDP (world size "
                             f"{self.trainer.world_size}) use compile=true without cudagraphs.")
        if self.trainer.strategy.root_device.type != "cuda":
            rank_zero_warn("AWRModule: cudagraphs needs a CUDA device; on "
                           f"{self.trainer.strategy.root_device.type} the phases run eagerly.")
            return None
        return CapturedGradients(warmup=3 if self.hparams.compile else 2)

    def on_fit_start(self) -> None:
        """Load ``init_from`` into a new run (after any checkpoint restore, which clears it); the actor sits on its
        device now: move its distribution's tensor arguments there too."""
        if self.runtime.starts_from_init:
            self._start_from(self.hparams.init_from, self.runtime)
        move_distribution_kwargs(self.actor, self.device)

    def on_train_start(self) -> None:
        """Start the collector once the policy sits on its device (after setup and checkpoint restore).

        ``collection="async"`` builds the env in the collector's worker process, which starts stepping at once
        with a copy of the actor: the worker acts with the weights the learner published last
        (:meth:`_publish_policy`), never with weights halfway through a phase.
        """
        runtime, hp = self.runtime, self.hparams
        if hp.collection != "none":
            self._start_collector()
        # Steps outside Lightning still count in ``global_step`` through its optimizers' step counters.
        counters = all(hasattr(w, "_on_before_step") and hasattr(w, "_on_after_step") for w in self.optimizers())
        runtime.direct_steps = counters and direct_steps_suffice(self.trainer, self)
        runtime.fused = self._fused_steps()
        runtime.evaluates_in_worker = hp.evaluation == "async"
        if runtime.evaluates_in_worker and self.global_rank == 0:
            runtime.evaluator = EvaluationWorker(partial(self.recipe.make_evaluator, self._rank_seed() + 500,
                                                         hp.eval_episodes), self.actor)

    def _start_collector(self) -> None:
        runtime, hp = self.runtime, self.hparams
        make_env = partial(self.recipe.make_env, self._rank_seed(), hp.num_envs)
        asynchronous = hp.collection == "async"
        if asynchronous and self.device.type == "cpu":
            make_env = CpuWorkerEnv(make_env)
        runtime.collector = make_collector(
            make_env if asynchronous else make_env(),
            copy.deepcopy(self.actor) if asynchronous else self.actor,  # the worker's own behaviour policy
            asynchronous=asynchronous,
            frames_per_batch=hp.frames_per_iteration,
            total_frames=-1,
            policy_device=self.device,
            storing_device=self.device,
        )
        if asynchronous:  # a spawned worker starts with a random torch seed: give it the rank's (per resume)
            runtime.collector.set_seed(self._rank_seed() + self.iteration)
        runtime.batches = iter(runtime.collector)

    def _fused_steps(self) -> dict[str, FusedSGDSteps] | None:
        """Each phase's :class:`FusedSGDSteps` where they apply: ``compile`` with ``fused_steps > 1``, direct
        steps (full precision, one device, no step hooks), no CUDA graphs, and plain SGD."""
        if not (self.hparams.compile and self.runtime.direct_steps and self.runtime.captured is None):
            return None
        return fused_phases(*minibatch_losses(self.loss_module), self.actor, self.critic,  # traced into the graphs
                            *(w.optimizer for w in self.optimizers()), self.hparams.fused_steps)

    def on_train_end(self) -> None:
        """Log the evaluations still running in the worker (the last snapshot's included)."""
        self._log_worker_evaluations(wait=True)

    def configure_callbacks(self) -> list[pl.Callback]:
        return [_StopWorkersOnException()]

    def teardown(self, stage: str) -> None:
        self._stop_workers()
        self.runtime = None

    def _stop_workers(self, *, after_failure: bool = False) -> None:
        """Shut the collector (and an async collection worker) and the evaluation worker down, where present.

        ``after_failure``: training already raised, and that error is the one to report; a shutdown that
        fails too (torchrl 0.12 raises when it finds the worker dead) is left at that.
        """
        if self.runtime is None:
            return
        evaluator, self.runtime.evaluator = self.runtime.evaluator, None
        if evaluator is not None:
            evaluator.shutdown()
        collector, self.runtime.collector = self.runtime.collector, None
        self.runtime.batches = None  # the iterator holds the collector too
        if collector is None:
            return
        threads = torch.get_num_threads()
        try:
            collector.shutdown()
        except Exception:
            if not after_failure:
                raise
        finally:
            # TorchRL's multiprocess collectors raise this process's torch thread count on shutdown, and
            # again whenever the object is collected (its ``__del__`` shuts down once more), which could
            # land inside a later ``torch.compile`` trace: collect it now and keep the run's setting.
            del collector
            gc.collect()
            torch.set_num_threads(threads)

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """The actor's and the critic's optimizers (injected, else ``optimizer`` at ``actor_lr`` / ``critic_lr``) and
        the schedulers given for them, which :meth:`on_train_epoch_end` steps once per iteration."""
        def make(network: torch.nn.Module, lr: float, injected: OptimizerCallable | None) -> torch.optim.Optimizer:
            if injected is not None:
                return injected(network.parameters())
            if self.hparams.optimizer == "adam":
                return torch.optim.Adam(network.parameters(), lr=lr)
            return torch.optim.SGD(network.parameters(), lr=lr, momentum=self.hparams.momentum)

        injected = self._injected
        optimizers = [make(self.actor, self.hparams.actor_lr, injected["actor_optimizer"]),
                      make(self.critic, self.hparams.critic_lr, injected["critic_optimizer"])]
        schedulers = [scheduler(optimizer) for scheduler, optimizer in
                      zip((injected["actor_scheduler"], injected["critic_scheduler"]), optimizers) if scheduler is not None]
        for scheduler in schedulers:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                raise TypeError("AWRModule: ReduceLROnPlateau steps on a monitored metric; the schedulers here step "
                                "once per iteration without one. Use a schedule of iterations (StepLR, CosineAnnealingLR, ...).")
        return optimizers, schedulers

    def on_train_epoch_end(self) -> None:
        """Step the learning-rate schedulers once per AWR iteration (manual optimization leaves it to the module)."""
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            scheduler.step()

    def train_dataloader(self) -> DataLoader:
        """One item per rank: each Lightning epoch is one AWR iteration on every rank."""
        return DataLoader(range(self.trainer.world_size), batch_size=1)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(range(self.trainer.world_size), batch_size=1)

    # ------------------------------------------------------- one iteration
    def training_step(self, batch: Any, batch_idx: int) -> None:
        actor_optimizer, critic_optimizer = self.optimizers()
        loss, hp = self.loss_module, self.hparams
        estimator = loss.value_estimator
        clock = PhaseClock()
        if self.runtime.iteration_ended is not None:  # Lightning's work between iterations: checkpoint, logs, eval
            clock.seconds["between_iterations"] = clock.started - self.runtime.iteration_ended

        data = self._collect() if hp.collection != "none" else None              # 1. collect
        written = self._store(data) if data is not None else None               # 2. FIFO buffer
        clock.lap("collect")
        # always online; every ``refresh_every`` offline, and once a process has (re)read its dataset
        refresh = self.iteration % hp.refresh_every == 0 or not self.runtime.refreshed
        self.runtime.refreshed = True
        if refresh:
            refresh_value_targets_over(self._sources(), estimator,               # 3. R over stored paths
                                       stale_values=self._stale_values(written), chunk_size=hp.refresh_chunk_size)
        self.runtime.values_current = False                                      # the value phase moves V
        clock.lap("refresh")
        value_out = self._phase("value", hp.critic_steps, hp.critic_batch_size, prioritized=False,
                                loss_fn=self.runtime.value_loss, loss_key="loss_value",      # 4. value phase
                                optimizer=critic_optimizer, network=self.critic)
        clock.lap("value_phase")
        priority_fn = loss.sampling_priority if loss.samples_by_weight else None
        tunes = hp.temperature_tuning != "fixed"
        if refresh:
            refresh_value_targets_over(self._sources(), estimator,               # 5. A with the new critic
                                       normalize_advantage=hp.normalize_advantage,
                                       priority_fn=None if tunes else priority_fn, chunk_size=hp.refresh_chunk_size)
            self.runtime.values_current = not self._critic_shares_actor_parameters()
            self.runtime.buffer_weights = self._weigh_buffer(priority_fn if tunes else None)
        clock.lap("refresh")
        actor_out = self._phase("policy", hp.actor_steps, hp.actor_batch_size,   # 6. policy phase
                                prioritized=loss.samples_by_weight, loss_fn=self.runtime.actor_loss,
                                loss_key="loss_actor", optimizer=actor_optimizer, network=self.actor)
        clock.lap("policy_phase")
        self._publish_policy()                                                   # the next batch's behaviour policy
        self.iteration += 1
        check_finite_losses(self.iteration, value_out, actor_out)
        last = [out for out in (value_out, actor_out) if out is not None]       # last minibatch of each phase
        self._log_iteration(data, last, clock.seconds)                           # 7. log
        self._log_worker_evaluations()
        if hp.max_env_steps is not None and self.env_steps >= hp.max_env_steps:
            self.trainer.should_stop = True
        self.runtime.iteration_ended = time.perf_counter()

    def _phase(self, phase: str, steps: int, batch_size: int, *, prioritized: bool,
               loss_fn: MinibatchLoss, loss_key: str, optimizer: Any,
               network: torch.nn.Module) -> TensorDictBase | None:
        """``steps`` minibatch steps of one phase; the loss output of the last one (``None`` if no step).

        Where fused steps apply (:meth:`_fused_steps`), whole groups of ``fused_steps`` steps run as one
        compiled graph first. Each remaining step computes gradients on ``stored[index]`` (eagerly, or
        replayed as a CUDA graph with ``cudagraphs``) and then takes the optimizer step (:meth:`_optimizer_step`).
        """
        inputs = phase_inputs(self._sources(), self.loss_module, steps, batch_size, prioritized=prioritized)
        if inputs is None:
            return None
        stored, indices = inputs
        if self.hparams.compile:
            stored = for_compiled_phases(stored)
        out = None
        fused = self.runtime.fused[phase] if self.runtime.fused else None
        if fused is not None:
            whole = indices.shape[0] - indices.shape[0] % fused.steps_per_call
            if whole:
                out = fused(stored, indices[:whole])
                self._count_steps(optimizer, whole)
            indices = indices[whole:]
        captured = self.runtime.captured

        def gradients(index: torch.Tensor) -> TensorDictBase:
            out = loss_fn(stored, index)
            # A captured graph must write the gradients into tensors that outlive it: zeroed in
            # place, never set to None (see awr_modules.cuda_graphs).
            optimizer.zero_grad(set_to_none=captured is None)
            self._backward(out[loss_key])
            return out

        step = captured(phase, stored, gradients, network) if captured is not None else gradients
        for index in indices:
            out = step(index)
            self._optimizer_step(optimizer, network)
        return out

    def _store(self, data: TensorDictBase) -> torch.Tensor:
        """Step 2: the batch's transitions into the FIFO buffer; beside dataset rows (``age_out``), only the
        fields those have, so that both share one storage layout. Returns the storage indices written."""
        rows = data.reshape(-1)
        buffer = self.runtime.buffer
        if self.runtime.dataset_identity is not None and self.hparams.dataset_transitions == "age_out":
            rows = rows.select(*buffer.storage.get(0).keys(True, True), strict=False)
        return buffer.extend(rows)

    def _stale_values(self, written: torch.Tensor | None) -> list[torch.Tensor] | None:
        """Per source buffer, the rows whose stored ``V(s)`` is out of date: the rows just written, when the
        critic and the observation normaliser have not changed since the last refresh (then the first refresh
        of an iteration runs the critic on the new rows only); ``None`` (all rows) otherwise."""
        if not self.runtime.values_current:
            return None
        none = torch.empty(0, dtype=torch.long)
        return [written if buffer is self.runtime.buffer and written is not None else none
                for buffer in self._sources()]

    def _weigh_buffer(self, priority_fn: Callable[[TensorDictBase], torch.Tensor] | None) -> dict[str, float]:
        """The AWR weights over every stored transition, after the advantages' refresh: with ``temperature_tuning``
        the temperature that meets the target is set first (and then the sampling priorities, with ``priority_fn``);
        returns the temperature and the weights' ESS and KL from the behaviour policy, for the log."""
        hp, loss = self.hparams, self.loss_module
        key = loss.tensor_keys.advantage
        advantage = torch.cat([buffer.storage.get(slice(0, len(buffer))).get(key).reshape(-1)
                               for buffer in self._sources()])
        max_weight = float(loss.max_weight)
        if hp.temperature_tuning != "fixed":
            temperature = torch.tensor(solve_temperature(advantage, hp.temperature_target, hp.temperature_tuning,
                                                         max_weight=max_weight))
            if self.trainer.world_size > 1:  # one temperature for all ranks: the mean of each rank's buffer's
                temperature = mean_across_ranks(self.trainer.strategy, self.device)(temperature)
            loss.temperature.fill_(float(temperature))
        if priority_fn is not None:
            (buffer,) = self._sources()  # prioritized sampling reads one buffer
            write_priorities(buffer, priority_fn, hp.refresh_chunk_size)
        temperature = float(loss.temperature)
        return {"train/temperature": temperature,
                "train/buffer_weight_ess": effective_sample_size(advantage, temperature, max_weight),
                "train/buffer_weight_kl": kl_from_behaviour(advantage, temperature, max_weight)}

    def _critic_shares_actor_parameters(self) -> bool:
        """Whether the policy phase moves the critic too (a recipe whose networks share layers)."""
        return bool({id(p) for p in self.actor.parameters()} & {id(p) for p in self.critic.parameters()})

    def _collect(self) -> TensorDictBase:
        """Step 1: the next batch of the collector; the observation statistics follow it."""
        try:
            data = next(self.runtime.batches)
        except Exception as error:  # an env that raised, or a collection worker that died
            where = "collection worker process" if self.hparams.collection == "async" else "collection"
            raise RuntimeError(
                f"AWRModule: the {where} failed in iteration {self.iteration + 1} ({type(error).__name__}: {error}). "
                f"Resume from the last checkpoint with `awr fit ... --ckpt_path last`."
            ) from error
        self.env_steps += data.numel() * self.trainer.world_size
        self.runtime.collected = data
        statistics = self.runtime.statistics
        if statistics is not None:
            if not statistics.frozen:  # the networks' normaliser moves: every stored V(s) is out of date
                self.runtime.values_current = False
            pool = mean_across_ranks(self.trainer.strategy, self.device) if self.trainer.world_size > 1 else None
            statistics.update(data, self.env_steps, pool)
        return data

    def _publish_policy(self) -> None:
        """With ``collection="async"``, send the actor's weights (normaliser included) to the collection
        worker's copy through TorchRL's weight sync: the worker acts with this snapshot until the next
        iteration publishes. An in-process collector steps the module's own actor already."""
        if self.hparams.collection == "async":
            self.runtime.collector.update_policy_weights_(self.actor)

    def _backward(self, objective: torch.Tensor) -> None:
        """Lightning's backward; under DDP without its gradient sync (averaged in :meth:`_optimizer_step`).

        With :func:`~awr_modules.distributed.direct_steps_suffice` the plain ``backward`` instead.
        """
        if self.runtime.direct_steps:
            objective.backward()
            return
        with no_backward_sync(self.trainer.strategy):
            self.manual_backward(objective)

    def _optimizer_step(self, optimizer: Any, network: torch.nn.Module) -> None:
        """Average ``network``'s gradients across ranks (DDP), then Lightning's optimizer step; with
        :func:`~awr_modules.distributed.direct_steps_suffice` the wrapped optimizer's own step, counted in
        ``trainer.global_step`` as Lightning counts it."""
        if self.runtime.direct_steps:
            optimizer._on_before_step()  # Lightning's step counter (manual optimization's progress)
            optimizer.optimizer.step()
            optimizer._on_after_step()
            return
        if self.trainer.world_size > 1:
            average_gradients(network.parameters(), self.trainer.strategy)
        optimizer.step()

    def _count_steps(self, optimizer: Any, steps: int) -> None:
        """Count ``steps`` optimizer steps taken outside Lightning in ``trainer.global_step``."""
        for _ in range(steps):
            optimizer._on_before_step()
            optimizer._on_after_step()

    def _log_iteration(self, data: TensorDictBase | None, outputs: list[TensorDictBase],
                       seconds: dict[str, float]) -> None:
        self.log("env_steps", float(self.env_steps), prog_bar=True, sync_dist=True)
        self.log("iteration", float(self.iteration), prog_bar=True, sync_dist=True)
        done = None if data is None else data["next", "done"]
        returns = None if data is None else data["next", "episode_reward"][done]
        if returns is not None and returns.numel():
            self.log("train/return", returns.float().mean(), prog_bar=True, sync_dist=True)
            self.log("train/episode_length", data["next", "step_count"][done].float().mean(), sync_dist=True)
        for phase, value in seconds.items():
            self.log(f"time/{phase}", value)
        for name, value in (self.runtime.buffer_weights or {}).items():
            self.log(name, value)
        for out in outputs:
            for key, value in out.items():
                self.log(f"train/{key}", value.detach().float(), sync_dist=True)

    # ---------------------------------------------------------- evaluation
    def _evaluate(self) -> Evaluation:
        """``eval_episodes`` episodes of the deterministic policy, side by side; its normaliser holds the
        training statistics."""
        return evaluate(self.runtime.eval_env, self.actor)

    def _log_evaluation(self, prefix: str) -> None:
        evaluation = self._evaluate()
        for name, value in evaluation_metrics(prefix, evaluation.returns, evaluation.lengths).items():
            self.log(name, value, prog_bar=name.endswith("/return"), sync_dist=True)
        self.log("env_steps", float(self.env_steps), sync_dist=True)

    def _log_worker_evaluations(self, *, wait: bool = False) -> None:
        """Log the evaluation worker's finished results, each at its snapshot's optimizer step and env steps."""
        evaluator = self.runtime.evaluator
        if evaluator is None:
            return
        with _naming_the_evaluation_worker():
            finished = evaluator.finished(wait=wait)
        for result in finished:
            metrics = {**evaluation_metrics("eval", result.returns, result.lengths), "env_steps": float(result.env_steps)}
            for logger in self.loggers:
                logger.log_metrics(metrics, step=result.global_step)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """``eval_episodes`` deterministic episodes, logged as ``eval/return`` and ``eval/episode_length``;
        with ``evaluation="async"`` during fit, a snapshot for the evaluation worker (rank 0) instead."""
        if not self.runtime.evaluates_in_worker:
            self._log_evaluation("eval")
            return
        if self.runtime.evaluator is not None:
            with _naming_the_evaluation_worker():
                self.runtime.evaluator.submit(self.actor, self.env_steps, self.global_step)
        self._log_worker_evaluations()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Same as validation, logged as ``test/return`` (``awr test -c ... --ckpt_path ...``)."""
        self._log_evaluation("test")

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(range(self.hparams.eval_episodes), batch_size=1)

    def on_predict_epoch_start(self) -> None:
        """Run the ``eval_episodes`` episodes once, side by side; ``predict_step`` hands them out."""
        self.runtime.predicted = self._evaluate().episodes

    def predict_step(self, batch: Any, batch_idx: int) -> TensorDictBase:
        """One deterministic episode per item (``awr predict``): the rollout TensorDict, on the CPU."""
        return self.runtime.predicted[batch_idx].cpu()

    # ---------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store what Lightning does not (:mod:`awr_modules.run_state`): counters, observation statistics,
        the env signature, and every rank's replay buffer and RNG states (gathered: Lightning writes rank 0's)."""
        runtime = self.runtime
        checkpoint[CHECKPOINT_KEY] = {
            "env_id": self.recipe.env_id,
            "signature": self._env_signature,
            "env_steps": self.env_steps,
            "iteration": self.iteration,
            "normalizers": [runtime.statistics.state_dict()] if runtime.statistics is not None else [],
            "ranks": gather_rank_states(rank_state(runtime.buffer), self.trainer.world_size),
            # named, not copied: a resumed run reads it again (and refuses it if it changed)
            "dataset": runtime.dataset_identity.as_dict() if runtime.dataset_identity is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another task or shape before any weight is loaded, then restore the run."""
        state = checked_run_state(checkpoint, self.recipe.env_id, self._env_signature, self.state_dict())
        check_same_dataset(state.get("dataset"), self.runtime.dataset_identity)
        self.runtime.starts_from_init = False  # a resumed run continues from its own checkpoint
        self.env_steps = state["env_steps"]
        self.iteration = state["iteration"]
        statistics = self.runtime.statistics
        if statistics is not None and state["normalizers"]:
            statistics.load_state_dict(state["normalizers"][0], self.env_steps)
        own = own_rank_state(state["ranks"], self.trainer.world_size, self.global_rank)
        loss = self.loss_module
        restore_rank_state(own, self.runtime.buffer, loss.sampling_priority if loss.samples_by_weight else None)


@contextmanager
def _naming_the_evaluation_worker() -> Iterator[None]:
    """Re-raise an evaluation worker's failure as the module's, with the way to resume."""
    try:
        yield
    except EvaluationWorkerError as error:
        raise RuntimeError(f"AWRModule: {error} Resume from the last checkpoint with "
                           "`awr fit ... --ckpt_path last`.") from error


class _StopWorkersOnException(pl.Callback):
    """Shuts the module's collector and evaluation worker down when training fails: Lightning calls
    ``teardown`` only when it ends normally, and worker processes would otherwise outlive the run."""

    def on_exception(self, trainer: pl.Trainer, module: pl.LightningModule, exception: BaseException) -> None:
        module._stop_workers(after_failure=True)
