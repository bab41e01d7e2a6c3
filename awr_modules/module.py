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

Lightning does devices, precision, DDP, checkpointing and logging. Under DDP every
rank collects with its own seed and runs the same number of steps; gradients are
averaged across ranks before each optimizer step, and observation statistics are
merged after each collection, so parameters stay identical on every rank.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from tensordict import TensorDictBase
from torch import distributions as d
from torch.utils.data import DataLoader
from torchrl.collectors import Collector
from torchrl.data import ReplayBuffer
from torchrl.envs import EnvBase, ExplorationType, VecNormV2, set_exploration_type
from torchrl.modules import ProbabilisticActor, TanhNormal

from awr_modules.collector import make_collector
from awr_modules.cuda_graphs import CapturedGradients
from awr_modules.evaluation import first_episodes
from awr_modules.loss import AWRLoss
from awr_modules.normalizer import ObservationNormalizer
from awr_modules.recipe import Recipe
from awr_modules.replay_buffer import make_replay_buffer
from awr_modules.value_targets import refresh_value_targets

CHECKPOINT_KEY = "awr"
EVAL_MAX_STEPS = 100_000  # a safety bound only: evaluation episodes end at the env's own time limit


class _PhaseClock:
    """Wall-clock seconds spent in each phase of an iteration (laps with the same name add up)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now


MinibatchLoss = Callable[[TensorDictBase, torch.Tensor], TensorDictBase]
"""A phase's loss on the minibatch ``stored[index]``, given the stored data and the indices."""


@dataclass
class _Runtime:
    """What ``setup()`` builds: kept outside the module tree so envs never enter ``state_dict`` or DDP."""

    train_env: EnvBase
    eval_env: EnvBase
    actor_loss: MinibatchLoss | None = None
    value_loss: MinibatchLoss | None = None
    collector: Collector | None = None
    batches: Iterator[TensorDictBase] | None = None
    buffer: ReplayBuffer | None = None
    captured: CapturedGradients | None = None  # set when ``cudagraphs`` applies (a single CUDA device)
    predicted: list[TensorDictBase] | None = None  # ``awr predict``'s episodes, run once per predict epoch


def _minibatch_losses(loss: AWRLoss, *, compile: bool = False) -> tuple[MinibatchLoss, MinibatchLoss]:
    """The policy and value phases' losses on ``stored[index]``: ``(actor_loss, value_loss)``.

    With ``compile`` each is one ``torch.compile`` graph of the gather and the loss together,
    whose inputs are the phase's stored TensorDict (the same for all its steps) and fresh
    indices. Compiling the loss alone would build a new minibatch TensorDict in eager mode
    every step and check the graph's guards against it: a fixed cost per step, large beside the
    compiled loss of these small networks. Two functions, so that each phase keeps its own
    compiled graphs.
    """

    def actor_loss(stored: TensorDictBase, index: torch.Tensor) -> TensorDictBase:
        return loss.actor_loss(stored[index])

    def value_loss(stored: TensorDictBase, index: torch.Tensor) -> TensorDictBase:
        return loss.value_loss(stored[index])

    if compile:
        return torch.compile(actor_loss), torch.compile(value_loss)
    return actor_loss, value_loss


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"AWRModule: {name} must be > 0, got {value}.")


class AWRModule(pl.LightningModule):
    """Advantage-Weighted Regression, one AWR iteration per Lightning epoch.

    Args:
        recipe: builds the env and the networks (e.g. ``recipes.classic_control.ClassicControl``).

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
        optimizer: ``"sgd"`` with ``momentum`` (reference) or ``"adam"``.
        momentum: SGD momentum (reference 0.9).
        gamma: discount (reference 0.99).
        td_lambda: lambda of the TD(lambda) targets (reference 0.95).
        temperature: ``beta`` of ``exp(A / beta)`` (reference 1.0 on normalised advantages).
        max_weight: weight clip (reference 20).
        normalize_advantage: standardise advantages over the buffer before weighting (reference: yes).
        value_scale: ``s_v``; ``None`` means ``1 / (1 - gamma)`` as the reference. The critic network predicts
            ``V / s_v`` (the recipe scales its output) and the loss divides the value error by ``s_v``, so the
            network regresses ``R / s_v`` with the reference's step sizes.
        action_bound_penalty: penalty on the Gaussian mean leaving ``[-1, 1]`` (reference 10); not applied
            to actors without an unbounded Gaussian mean (categorical, TanhNormal).
        entropy_coeff: entropy bonus (reference 0).
        action_l2_coeff: L2 penalty on the Gaussian mean or the logits (reference ``action_l2_weight``:
            0, and 0.001 for LunarLander).
        weighting: ``"loss"`` (paper: ``w`` multiplies the log-likelihood, uniform sampling) or
            ``"sampling"`` (the buffer samples proportionally to ``w``; loss weight 1).
        eval_episodes: episodes of the deterministic policy per evaluation.
        max_env_steps: stop training once this many env steps (all ranks) were collected.
        seed: base seed; rank ``r`` collects with ``seed + 1000 * r``.
        compile: run each phase's minibatch gather and loss through ``torch.compile`` (default
            inductor backend): one graph per phase, compiled on its first minibatch (seconds) and
            once more with a dynamic buffer length when the buffer has grown; backward and optimizer
            steps stay Lightning's, so every precision and strategy works as without it.
        cudagraphs: on a CUDA device, replay each phase's gradient computation (minibatch gather,
            loss, backward) as a CUDA graph (:mod:`awr_modules.cuda_graphs`); optimizer steps stay
            Lightning's, so every precision works. Combines with ``compile``. Single device only
            (an error under DDP); without a CUDA device it has no effect (a warning).
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
        gamma: float = 0.99,
        td_lambda: float = 0.95,
        temperature: float = 1.0,
        max_weight: float = 20.0,
        normalize_advantage: bool = True,
        value_scale: float | None = None,
        action_bound_penalty: float = 10.0,
        entropy_coeff: float = 0.0,
        action_l2_coeff: float = 0.0,
        weighting: Literal["loss", "sampling"] = "loss",
        eval_episodes: int = 10,
        max_env_steps: int | None = None,
        seed: int = 0,
        compile: bool = False,
        cudagraphs: bool = False,
    ) -> None:
        super().__init__()
        for name in ("frames_per_iteration", "num_envs", "buffer_size", "critic_batch_size", "actor_batch_size",
                     "critic_lr", "actor_lr", "gamma", "eval_episodes"):
            _positive(name, locals()[name])
        for name in ("critic_steps", "actor_steps", "momentum", "td_lambda"):
            if locals()[name] < 0:
                raise ValueError(f"AWRModule: {name} must be >= 0, got {locals()[name]}.")
        if frames_per_iteration % num_envs:
            raise ValueError(f"AWRModule: frames_per_iteration ({frames_per_iteration}) must be a multiple of "
                             f"num_envs ({num_envs}): each env contributes the same number of steps.")
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"AWRModule: optimizer must be 'sgd' or 'adam', got {optimizer!r}.")
        if gamma >= 1 or td_lambda > 1:
            raise ValueError(f"AWRModule: need gamma < 1 and td_lambda <= 1, got gamma={gamma}, td_lambda={td_lambda}.")
        self.save_hyperparameters(ignore=["recipe"])
        self.automatic_optimization = False
        self.recipe = recipe

        spec_env = recipe.make_env(seed)
        value_scale = value_scale if value_scale is not None else 1.0 / (1.0 - gamma)
        self.actor, self.critic = recipe.make_networks(spec_env, value_scale)
        self._env_signature = self._signature(spec_env)
        spec_env.close()
        self.loss_module = AWRLoss(
            self.actor,
            self.critic,
            temperature=temperature,
            max_weight=max_weight,
            value_scale=value_scale,
            action_bound_penalty=action_bound_penalty if _has_unbounded_gaussian_mean(self.actor) else 0.0,
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

    # ------------------------------------------------------------ building
    @staticmethod
    def _signature(env: EnvBase) -> dict[str, Any]:
        """What a checkpoint must match: the env id and the shapes of its spaces."""
        spec = env.action_spec
        return {
            "observation_shape": list(env.observation_spec["observation"].shape),
            "action_shape": list(spec.shape),
            "discrete": not spec.dtype.is_floating_point,
        }

    def setup(self, stage: str) -> None:
        """Build envs and buffer here, not in ``__init__``, so ``ddp_spawn`` can pickle the module."""
        rank_seed = self.hparams.seed + 1000 * self.global_rank
        actor_loss, value_loss = _minibatch_losses(self.loss_module, compile=self.hparams.compile)
        runtime = _Runtime(train_env=self.recipe.make_env(rank_seed, self.hparams.num_envs),
                           eval_env=self.recipe.make_env(rank_seed + 500, self.hparams.eval_episodes),
                           actor_loss=actor_loss, value_loss=value_loss)
        if stage == "fit":
            runtime.captured = self._captured_gradients()
            torch.manual_seed(rank_seed)
            runtime.buffer = make_replay_buffer(
                self.hparams.buffer_size,
                prioritized=self.hparams.weighting == "sampling",
                priority="weight",
                device=self.trainer.strategy.root_device,  # the module is moved there after setup()
            )
        self.runtime = runtime

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
        """The actor sits on its device now: move its distribution's tensor arguments there too."""
        _move_distribution_kwargs(self.actor, self.device)

    def on_train_start(self) -> None:
        """Start the collector once the policy sits on its device (after setup and checkpoint restore)."""
        runtime = self.runtime
        runtime.collector = make_collector(
            runtime.train_env,
            self.actor,
            frames_per_batch=self.hparams.frames_per_iteration,
            total_frames=-1,
            policy_device=self.device,
            storing_device=self.device,
        )
        runtime.batches = iter(runtime.collector)

    def teardown(self, stage: str) -> None:
        if self.runtime is not None and self.runtime.collector is not None:
            self.runtime.collector.shutdown()
        self.runtime = None

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        def make(params, lr: float) -> torch.optim.Optimizer:
            if self.hparams.optimizer == "adam":
                return torch.optim.Adam(params, lr=lr)
            return torch.optim.SGD(params, lr=lr, momentum=self.hparams.momentum)

        return [make(self.actor.parameters(), self.hparams.actor_lr),
                make(self.critic.parameters(), self.hparams.critic_lr)]

    def train_dataloader(self) -> DataLoader:
        """One item per rank: each Lightning epoch is one AWR iteration on every rank."""
        return DataLoader(range(self.trainer.world_size), batch_size=1)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(range(self.trainer.world_size), batch_size=1)

    # ------------------------------------------------------- one iteration
    def training_step(self, batch: Any, batch_idx: int) -> None:
        actor_optimizer, critic_optimizer = self.optimizers()
        loss, buffer, hp = self.loss_module, self.runtime.buffer, self.hparams
        estimator = loss.value_estimator
        clock = _PhaseClock()

        data = self._collect()                                                   # 1. collect
        buffer.extend(data.reshape(-1))                                          # 2. FIFO buffer
        clock.lap("collect")
        refresh_value_targets(buffer, estimator)                                 # 3. R over stored paths
        clock.lap("refresh")
        value_out = self._phase("value", hp.critic_steps, hp.critic_batch_size, prioritized=False,
                                loss_fn=self.runtime.value_loss, loss_key="loss_value",      # 4. value phase
                                optimizer=critic_optimizer, network=self.critic)
        clock.lap("value_phase")
        priority_fn = self._sampling_priority if hp.weighting == "sampling" else None
        refresh_value_targets(buffer, estimator,                                 # 5. A with the new critic
                              normalize_advantage=hp.normalize_advantage, priority_fn=priority_fn)
        clock.lap("refresh")
        actor_out = self._phase("policy", hp.actor_steps, hp.actor_batch_size,   # 6. policy phase
                                prioritized=hp.weighting == "sampling", loss_fn=self.runtime.actor_loss,
                                loss_key="loss_actor", optimizer=actor_optimizer, network=self.actor)
        clock.lap("policy_phase")
        self.iteration += 1
        self._check_finite_losses(value_out, actor_out)
        last = [out for out in (value_out, actor_out) if out is not None]       # last minibatch of each phase
        self._log_iteration(data, last, clock.seconds)                           # 7. log
        if hp.max_env_steps is not None and self.env_steps >= hp.max_env_steps:
            self.trainer.should_stop = True

    def _phase(self, phase: str, steps: int, batch_size: int, *, prioritized: bool,
               loss_fn: MinibatchLoss, loss_key: str, optimizer: Any,
               network: torch.nn.Module) -> TensorDictBase | None:
        """``steps`` minibatch steps of one phase; the loss output of the last one (``None`` if no step).

        Each step computes gradients on ``stored[index]`` (eagerly, or replayed as a CUDA graph
        with ``cudagraphs``) and then takes Lightning's optimizer step.
        """
        inputs = self._phase_inputs(steps, batch_size, prioritized=prioritized)
        if inputs is None:
            return None
        stored, indices = inputs
        captured = self.runtime.captured

        def gradients(index: torch.Tensor) -> TensorDictBase:
            out = loss_fn(stored, index)
            # A captured graph must write the gradients into tensors that outlive it: zeroed in
            # place, never set to None (see awr_modules.cuda_graphs).
            optimizer.zero_grad(set_to_none=captured is None)
            self._backward(out[loss_key])
            return out

        step = captured(phase, stored, gradients, network) if captured is not None else gradients
        out = None
        for index in indices:
            out = step(index)
            self._optimizer_step(optimizer, network)
        return out

    def _phase_inputs(self, steps: int, batch_size: int, *,
                      prioritized: bool) -> tuple[TensorDictBase, torch.Tensor] | None:
        """The stored data a phase reads and its ``[steps, batch_size]`` minibatch indices, drawn at once.

        Targets and advantages do not change within a phase, so drawing all indices up
        front samples exactly as ``buffer.sample`` per step would (independent draws with
        replacement: uniform, or proportional to the priorities with ``prioritized``), at
        a fraction of the per-step cost. Only the keys the loss reads are kept (a view of
        the storage, no copy), and the loss's input checks run once over them instead of
        once per step. ``None`` when ``steps`` is 0.
        """
        buffer = self.runtime.buffer
        if steps == 0:
            return None
        storage = buffer.storage
        if prioritized:
            index, _ = buffer.sampler.sample(storage, steps * batch_size)  # beta = 0: no importance weights
        else:
            index = torch.randint(len(buffer), (steps * batch_size,), device=storage.device)
        keys = [*self.loss_module.in_keys, self.loss_module.tensor_keys.sample_log_prob]
        stored = storage.get(slice(0, len(buffer))).select(*keys, strict=False)  # a view, no copy
        self.loss_module.check_batch(stored)  # keys and finiteness, once for the whole phase
        return stored, index.to(storage.device).view(steps, batch_size)

    def _check_finite_losses(self, *outputs: TensorDictBase | None) -> None:
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
                    raise FloatingPointError(
                        f"AWRModule: {key} became {value.item()} in iteration {self.iteration}; the networks "
                        f"diverged. Lower {'critic_lr' if key == 'loss_value' else 'actor_lr'} or check the rewards."
                    )

    def _sampling_priority(self, data: TensorDictBase) -> torch.Tensor:
        """Priorities for ``weighting="sampling"``: the AWR weights themselves."""
        return self.loss_module.weights(data[self.loss_module.tensor_keys.advantage])

    def _collect(self) -> TensorDictBase:
        data = next(self.runtime.batches)
        self.env_steps += data.numel() * self.trainer.world_size
        for vecnorm in self._normalizers(self.runtime.train_env):
            self._merge_across_ranks(vecnorm)
            self._load_statistics(vecnorm)
            if self.env_steps >= self.recipe.normalizer_samples and not vecnorm.frozen:
                vecnorm.freeze()
        return data

    def _load_statistics(self, vecnorm: VecNormV2) -> None:
        """Give the networks' observation normaliser the running statistics of the collected states."""
        if vecnorm.frozen:
            return
        (key,) = vecnorm.in_keys
        for normalizer in self.modules():
            if isinstance(normalizer, ObservationNormalizer):
                normalizer.load_statistics(vecnorm.loc[key], vecnorm.scale[key])

    def _backward(self, objective: torch.Tensor) -> None:
        """Lightning's backward; under DDP without its gradient sync (averaged in :meth:`_optimizer_step`).

        The loss is computed outside DDP's forward (many backward passes per Lightning
        step, each touching only one network), so DDP's reducer is bypassed and the
        gradient of the network actually optimized is all-reduced by hand.
        """
        strategy = self.trainer.strategy
        with strategy.block_backward_sync() if isinstance(strategy, ParallelStrategy) else nullcontext():
            self.manual_backward(objective)

    def _optimizer_step(self, optimizer: Any, network: torch.nn.Module) -> None:
        """Average ``network``'s gradients across ranks (DDP), then Lightning's optimizer step."""
        if self.trainer.world_size > 1:
            grads = [p.grad for p in network.parameters() if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            flat = self.trainer.strategy.reduce(flat, reduce_op="mean")
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        optimizer.step()

    def _merge_across_ranks(self, vecnorm: VecNormV2) -> None:
        """Average observation statistics over ranks so that every rank normalises alike.

        ``VecNormV2`` keeps running first and second moments (``loc`` = E[x], ``var`` = E[x^2]);
        every rank saw the same number of samples, so their mean is the pooled moment.
        """
        if self.trainer.world_size <= 1 or vecnorm.frozen:
            return
        state = vecnorm.get_extra_state()
        reduce = self.trainer.strategy.reduce  # on the module's device (NCCL reduces GPU tensors only)
        merged = {key: value if key.startswith("count") else reduce(value.to(self.device, copy=True), reduce_op="mean").to(value.device)
                  for key, value in state.items()}
        vecnorm.set_extra_state(merged)

    @staticmethod
    def _normalizers(env: EnvBase) -> list[VecNormV2]:
        transform = getattr(env, "transform", None)
        return [t for t in (transform if transform is not None else []) if isinstance(t, VecNormV2)]

    def _log_iteration(self, data: TensorDictBase, outputs: list[TensorDictBase], seconds: dict[str, float]) -> None:
        done = data["next", "done"]
        returns = data["next", "episode_reward"][done]
        self.log("env_steps", float(self.env_steps), prog_bar=True, sync_dist=True)
        self.log("iteration", float(self.iteration), prog_bar=True, sync_dist=True)
        if returns.numel():
            self.log("train/return", returns.float().mean(), prog_bar=True, sync_dist=True)
            self.log("train/episode_length", data["next", "step_count"][done].float().mean(), sync_dist=True)
        for phase, value in seconds.items():
            self.log(f"time/{phase}", value)
        for out in outputs:
            for key, value in out.items():
                self.log(f"train/{key}", value.detach().float(), sync_dist=True)

    # ---------------------------------------------------------- evaluation
    def _evaluation_episodes(self) -> list[TensorDictBase]:
        """``eval_episodes`` episodes of the deterministic (mean / mode) policy, one per sub-env of the eval env.

        The policy's normaliser holds the training statistics.
        """
        with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
            return first_episodes(self.runtime.eval_env, self.actor, EVAL_MAX_STEPS)

    def _log_evaluation(self, prefix: str) -> None:
        rollouts = self._evaluation_episodes()
        returns = [rollout["next", "reward"].sum().item() for rollout in rollouts]
        self.log(f"{prefix}/return", float(np.mean(returns)), prog_bar=True, sync_dist=True)
        self.log(f"{prefix}/return_std", float(np.std(returns)), sync_dist=True)
        self.log(f"{prefix}/episode_length", float(np.mean([r.shape[-1] for r in rollouts])), sync_dist=True)
        self.log("env_steps", float(self.env_steps), sync_dist=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """``eval_episodes`` deterministic episodes, logged as ``eval/return`` and ``eval/episode_length``."""
        self._log_evaluation("eval")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Same as validation, logged as ``test/return`` (``awr test -c ... --ckpt_path ...``)."""
        self._log_evaluation("test")

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(range(self.hparams.eval_episodes), batch_size=1)

    def on_predict_epoch_start(self) -> None:
        """Run the ``eval_episodes`` episodes once, side by side; ``predict_step`` hands them out."""
        self.runtime.predicted = self._evaluation_episodes()

    def predict_step(self, batch: Any, batch_idx: int) -> TensorDictBase:
        """One deterministic episode per item (``awr predict``): the rollout TensorDict, on the CPU."""
        return self.runtime.predicted[batch_idx].cpu()

    # ---------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store what Lightning does not: buffers, normaliser, counters, RNG states, the env signature.

        Lightning calls this hook on every rank and writes rank 0's dictionary; each rank's
        replay buffer and RNG states differ, so they are gathered into ``ranks[r]``.
        """
        checkpoint[CHECKPOINT_KEY] = {
            "env_id": self.recipe.env_id,
            "signature": self._env_signature,
            "env_steps": self.env_steps,
            "iteration": self.iteration,
            "normalizers": [v.get_extra_state() for v in self._normalizers(self.runtime.train_env)],
            "ranks": self._gather_rank_states({"buffer": self._buffer_state(), "rng": _rng_state()}),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another task or shape before any weight is loaded, then restore the run."""
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            raise ValueError(
                f"AWRModule: the checkpoint has no {CHECKPOINT_KEY!r} section; it was not written by AWRModule "
                f"(or is corrupt). Pass a checkpoint from `awr fit`."
            )
        if state["env_id"] != self.recipe.env_id or state["signature"] != self._env_signature:
            raise ValueError(
                f"AWRModule: checkpoint is for env {state['env_id']!r} with spaces {state['signature']}, but the "
                f"config builds {self.recipe.env_id!r} with {self._env_signature}. Use the config it was trained with."
            )
        state_dict = checkpoint.get("state_dict", {})
        _rename_functional_parameters(state_dict)
        self._check_state_shapes(state_dict)
        self.env_steps = state["env_steps"]
        self.iteration = state["iteration"]
        for vecnorm, saved in zip(self._normalizers(self.runtime.train_env), state["normalizers"]):
            if saved:
                vecnorm.set_extra_state(saved)
                if self.env_steps >= self.recipe.normalizer_samples:
                    vecnorm.freeze()
        own = self._own_rank_state(state)
        buffer = self.runtime.buffer
        if own["buffer"] is not None and buffer is not None:  # checkpoints load on the CPU: back to the buffer's device
            saved = _to_device(own["buffer"], buffer.storage.device)
            current = buffer.state_dict()
            if isinstance(saved.get("_sampler"), dict) and _SAMPLER_TREES[0] in saved["_sampler"]:
                saved["_sampler"] = _trees_from_tensors(saved["_sampler"], current["_sampler"])
            buffer.load_state_dict({**current, **saved})
        _set_rng_state(own["rng"])

    def _gather_rank_states(self, local: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's ``local`` state (on the CPU), in rank order; a one-item list without DDP."""
        local = _to_device(local, "cpu")
        if self.trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return [local]
        states: list[Any] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(states, local)
        return states

    def _own_rank_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """This rank's buffer and RNG states; another world size reuses the saved ranks' states in turn."""
        ranks = state.get("ranks") or [{"buffer": state.get("buffer"), "rng": state["rng"]}]  # before per-rank states
        if len(ranks) != self.trainer.world_size:
            rank_zero_warn(
                f"AWRModule: the checkpoint holds the replay buffers of {len(ranks)} rank(s), this run has "
                f"{self.trainer.world_size}; rank r resumes with the buffer of saved rank r % {len(ranks)}."
            )
        return ranks[self.global_rank % len(ranks)]

    def _buffer_state(self) -> dict[str, Any] | None:
        """The buffer's storage, cursor and sampler, in types ``torch.load(weights_only=True)`` accepts.

        A prioritized sampler's sum and min trees are C++ objects: they are saved as tensors of
        their leaves (see :func:`_trees_as_tensors`).
        """
        if self.runtime is None or self.runtime.buffer is None:
            return None
        state = self.runtime.buffer.state_dict()
        if _SAMPLER_TREES[0] in state["_sampler"]:
            state["_sampler"] = _trees_as_tensors(state["_sampler"])
        return state

    def _check_state_shapes(self, saved: dict[str, torch.Tensor]) -> None:
        """Fail with one clear message on mismatched network sizes, instead of a partial load."""
        own = self.state_dict()
        missing = sorted(set(own) - set(saved))
        unexpected = sorted(set(saved) - set(own))
        mismatched = [f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(v.shape)}"
                      for k, v in own.items()
                      if isinstance(v, torch.Tensor) and k in saved and saved[k].shape != v.shape]
        if missing or unexpected or mismatched:
            raise ValueError(
                "AWRModule: the checkpoint's networks do not match this config (hidden sizes, policy kind?): "
                f"missing {missing[:4]}, unexpected {unexpected[:4]}, shape mismatches {mismatched[:4]}."
            )


def _rename_functional_parameters(state_dict: dict[str, Any]) -> None:
    """Read checkpoints written while the loss was functional (keys ``loss_module.<network>_params.*``).

    With ``AWRLoss(functional=False)`` the loss holds the networks as submodules, so the same
    tensors (also saved as ``actor.*`` / ``critic.*``) are now saved under ``loss_module.<network>.*``.
    """
    for network in ("actor_network", "critic_network"):
        old = f"loss_module.{network}_params."
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[f"loss_module.{network}.{key[len(old):]}"] = state_dict.pop(key)


_SAMPLER_TREES = ("_sum_tree", "_min_tree")  # a prioritized sampler's segment trees in its state_dict


def _trees_as_tensors(sampler_state: dict[str, Any]) -> dict[str, Any]:
    """A prioritized sampler's state with each segment tree replaced by the tensor of its leaves.

    The leaves are what the sampler stores per slot, ``(priority + eps) ** alpha``.
    """
    state = dict(sampler_state)
    for name in _SAMPLER_TREES:
        tree = state[name]
        state[name] = torch.as_tensor(tree[torch.arange(tree.size, device=getattr(tree, "device", "cpu"))])
    return state


def _trees_from_tensors(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`_trees_as_tensors`: the saved leaves written into the trees of ``current``,
    a ``state_dict()`` of the sampler being restored (its trees are copies, on the sampler's device)."""
    state = dict(saved)
    for name in _SAMPLER_TREES:
        tree = current[name]
        device = getattr(tree, "device", "cpu")  # TorchRL's CUDA segment trees say where they live, CPU ones do not
        tree[torch.arange(tree.size, device=device)] = saved[name].to(device)
        state[name] = tree
    return state


def _rng_state() -> dict[str, Any]:
    """Torch (CPU and, once used, CUDA), NumPy and Python generator states, in ``weights_only``-safe types."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position,
             has_gauss, cached], "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    random.setstate(state["python"])


def _move_distribution_kwargs(actor: torch.nn.Module, device: torch.device | str) -> None:
    """Move tensors in ``distribution_kwargs`` (e.g. TanhNormal's ``low``/``high``) to ``device``.

    They sit in a plain dict, which ``module.to(device)`` does not reach: on a GPU each
    forward would copy them from the host, a copy that a CUDA graph cannot capture.
    """
    for module in actor.modules():
        kwargs = getattr(module, "distribution_kwargs", None)
        if isinstance(kwargs, dict):
            for key, value in kwargs.items():
                if isinstance(value, torch.Tensor):
                    kwargs[key] = value.to(device)


def _to_device(state: Any, device: torch.device | str) -> Any:
    """``state`` with every tensor in its nested dicts, lists and tuples moved to ``device``.

    Dicts are copied with their type and attributes: a TensorDict state dict is an
    ``OrderedDict`` whose ``_metadata`` attribute holds the batch size, which Lightning's
    ``move_data_to_device`` drops (it rebuilds mappings).
    """
    if isinstance(state, torch.Tensor):
        return state.to(device)
    if isinstance(state, dict):
        moved = copy.copy(state)
        for key, value in state.items():
            moved[key] = _to_device(value, device)
        return moved
    if isinstance(state, (list, tuple)):
        return type(state)(_to_device(value, device) for value in state)
    return state


def _has_unbounded_gaussian_mean(actor: ProbabilisticActor) -> bool:
    """The bound penalty applies to a Gaussian mean that can leave [-1, 1]: not to TanhNormal or categoricals."""
    distribution = actor[-1].distribution_class
    return issubclass(distribution, (d.Normal, d.Independent)) and not issubclass(distribution, TanhNormal)
