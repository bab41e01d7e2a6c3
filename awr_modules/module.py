"""``AWRModule``: Lightning's hooks around one AWR iteration per epoch.

The iteration itself (:class:`~awr_modules.iteration.AWRIteration`) and its parts live in modules of their
own, each injected by the config (LightningCLI's ``class_path``): the data source (:mod:`awr_modules.data`),
the value targets (:mod:`awr_modules.targets`), the temperature (:mod:`awr_modules.temperature`), the
evaluator (:mod:`awr_modules.evaluators`), the execution (:mod:`awr_modules.execution`), the two phases
(:class:`~awr_modules.phases.Phase`), the loss and the optimizers. This module hands each its turn; devices,
precision, DDP, checkpoints and logging stay Lightning's.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from tensordict import TensorDictBase
from torch.utils.data import DataLoader

from awr_modules.cuda_graphs import move_distribution_kwargs
from awr_modules.data import DataContext, DataSource
from awr_modules.distributed import gather_rank_states, mean_across_ranks
from awr_modules.entropy import EntropyCoefficient
from awr_modules.evaluation import evaluate, evaluation_metrics
from awr_modules.evaluation_worker import EvaluatedSnapshot
from awr_modules.evaluators import InProcess
from awr_modules.execution import Execution
from awr_modules.iteration import AWRIteration, IterationResult
from awr_modules.lightning_steps import LightningSteps, StopWorkersOnException
from awr_modules.loss_factory import LossFactory, build_loss
from awr_modules.module_parts import DEFAULT_PARTS, own_parts, reference_sgd
from awr_modules.phases import Phase
from awr_modules.recipe import Recipe
from awr_modules.run_state import CHECKPOINT_KEY, FORMAT_VERSION, checked_run_state, env_signature, own_rank_state
from awr_modules.targets import ValueTargets
from awr_modules.temperature import Temperature


class AWRModule(pl.LightningModule):
    """Advantage-Weighted Regression (Peng et al., 2019), one AWR iteration per Lightning epoch.

    Args:
        recipe: builds the env and the networks (e.g. ``awr_recipes.classic_control.ClassicControl``).

    Keyword Args:
        data: where transitions come from (default: online collection, :class:`~awr_modules.data.Collected`).
            Each part's default is a fresh instance per module.
        targets: the value targets and their refresh (default: TD(lambda), :class:`~awr_modules.targets.TDLambda`).
        temperature: ``beta`` of ``exp(A / beta)`` (default: fixed at 1, :class:`~awr_modules.temperature.Fixed`).
        entropy: the entropy bonus's coefficient (default: the loss's own,
            :class:`~awr_modules.entropy.FixedCoefficient`).
        loss: builds the :class:`~awr_modules.AWRLoss` on the recipe's networks, with the loss's own settings
            (``max_weight``, ``weighting``, ``action_bound_penalty``, ...); ``None``: its defaults, with the
            reference's action-bound penalty for the recipe's actor.
        value_phase: steps and batch size of the value phase (reference 200 of 256).
        policy_phase: steps and batch size of the policy phase (reference 1000 of 256).
        actor_optimizer: builds the actor's optimizer (Lightning's ``OptimizerCallable``: in YAML a
            ``class_path`` with ``init_args``); ``None``: the reference's SGD, step size 5e-5, momentum 0.9.
        critic_optimizer: the same for the critic; ``None``: SGD, step size 0.01, momentum 0.9.
        actor_scheduler: a learning-rate scheduler of the actor's optimizer, stepped once per iteration.
        critic_scheduler: the same for the critic's optimizer.
        evaluator: the deterministic policy's evaluations (default: in this process, 10 episodes).
        execution: how the phases' steps run (default: eagerly).
        max_env_steps: stop once this many env steps (all ranks) were collected.
        seed: base seed; rank ``r`` collects with ``seed + 1000 * r`` and evaluates with ``+ 500``. ``None`` (the
            CLI links ``seed_everything`` here) takes the seed ``lightning.seed_everything`` set, else 0.
        init_from: a checkpoint of this task whose networks and observation statistics (frozen) a new run starts
            from, with this config's parts (online fine-tuning of an offline run, say). ``--ckpt_path`` instead
            resumes a run.
    """

    def __init__(
        self,
        recipe: Recipe,
        *,
        data: DataSource = DEFAULT_PARTS["data"],
        targets: ValueTargets = DEFAULT_PARTS["targets"],
        temperature: Temperature = DEFAULT_PARTS["temperature"],
        entropy: EntropyCoefficient = DEFAULT_PARTS["entropy"],
        loss: LossFactory | None = None,
        value_phase: Phase = Phase(200, 256),  # noqa: B008 - frozen
        policy_phase: Phase = Phase(1000, 256),  # noqa: B008 - frozen
        actor_optimizer: OptimizerCallable | None = None,
        critic_optimizer: OptimizerCallable | None = None,
        actor_scheduler: LRSchedulerCallable | None = None,
        critic_scheduler: LRSchedulerCallable | None = None,
        evaluator: InProcess = DEFAULT_PARTS["evaluator"],
        execution: Execution = DEFAULT_PARTS["execution"],
        max_env_steps: int | None = None,
        seed: int | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        data, targets, temperature, entropy, evaluator, execution = own_parts(
            data=data, targets=targets, temperature=temperature, entropy=entropy, evaluator=evaluator,
            execution=execution).values()
        if not data.collects and max_env_steps is not None:
            rank_zero_warn(f"AWRModule: max_env_steps counts collected env steps and model.data "
                           f"({type(data).__name__}) collects none; bound the run with trainer.max_epochs.")
        self.automatic_optimization = False
        self.recipe = recipe
        self.seed, self.init_from, self.max_env_steps = seed, init_from, max_env_steps
        self._optimizers = (actor_optimizer or reference_sgd(5e-5), critic_optimizer or reference_sgd(0.01))
        self._schedulers = (actor_scheduler, critic_scheduler)
        spec_env = recipe.make_env(seed or 0)
        self.actor, self.critic = recipe.make_networks(spec_env, targets.value_scale)
        self.targets_networks = targets.make_networks(recipe, spec_env, self.actor, self.critic)  # a Q critic's
        self.env_signature = env_signature(spec_env)
        spec_env.close()
        self.loss_module = build_loss(loss, self.actor, self.critic, targets.value_scale)
        self.evaluator = evaluator
        self.awr = AWRIteration(self.loss_module, data, targets, temperature, value_phase, policy_phase, execution,
                                entropy=entropy)
        self._starts_from_init = False
        self.last_iteration: IterationResult | None = None  # what the last training step left (callbacks read it)

    @property
    def env_steps(self) -> int:
        """Env steps collected so far, all ranks."""
        return self.awr.env_steps

    @property
    def iteration(self) -> int:
        """AWR iterations completed."""
        return self.awr.iteration

    # ------------------------------------------------------------ building
    def setup(self, stage: str) -> None:
        """Build buffers and workers' factories here, not in ``__init__``, so ``ddp_spawn`` can pickle the module."""
        seed = self._rank_seed()
        self.awr.statistics = self.recipe.observation_statistics(self.actor, self.critic)
        self.evaluator.setup(partial(self.recipe.make_evaluator, seed + 500, self.evaluator.episodes))
        if stage == "fit":
            torch.manual_seed(seed)
            keys = self.loss_module.tensor_keys
            self.awr.data.setup(DataContext(
                recipe=self.recipe, env_signature=self.env_signature, seed=seed,
                device=self.trainer.strategy.root_device, rank=self.global_rank,
                prioritized=self.loss_module.samples_by_weight, statistics=self.awr.statistics,
                refreshed_keys=(keys.value, keys.value_target, keys.advantage), chunk_size=self.awr.targets.chunk_size))
            self._starts_from_init = self.init_from is not None  # unless a resume restores the run

    def load_networks(self, path: str | os.PathLike) -> dict[str, Any]:
        """Load a checkpoint's networks (normaliser included) after checking that it was written for this task and
        these network sizes; returns the checkpoint's AWR section (:mod:`awr_modules.run_state`)."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checked_run_state(checkpoint, self.recipe.env_id, self.env_signature, self.state_dict())
        self.load_state_dict(checkpoint["state_dict"])
        return state

    def _rank_seed(self) -> int:
        """This rank's seed: rank ``r`` collects with ``seed + 1000 * r``."""
        seed = self.seed
        if seed is None:  # the run's one seed: what seed_everything set (Lightning keeps it in PL_GLOBAL_SEED)
            seed = int(os.environ.get("PL_GLOBAL_SEED", "0"))
        return seed + 1000 * self.global_rank

    def on_fit_start(self) -> None:
        """Load ``init_from`` into a new run (a resume clears it); move the distribution's tensors to the device."""
        if self._starts_from_init:
            self._starts_from_init = False
            state = self.load_networks(self.init_from)
            statistics = self.awr.statistics
            if statistics is not None and state["normalizers"]:  # frozen: the policy was trained on them
                statistics.load_state_dict(state["normalizers"][0], env_steps=statistics.freeze_after)
        move_distribution_kwargs(self.actor, self.device)

    def on_train_start(self) -> None:
        """Start collecting and evaluating once the policy sits on its device (after any checkpoint restore)."""
        world_size = self.trainer.world_size
        pool = mean_across_ranks(self.trainer.strategy, self.device) if world_size > 1 else None
        self.awr.bind(*self.optimizers(), LightningSteps(self), device=self.device, world_size=world_size, pool=pool)
        self.awr.data.start(self.actor, self.iteration)
        self.evaluator.start(self.actor, fitting=True, rank=self.global_rank)

    def on_validation_start(self) -> None:
        if self.trainer.state.fn != "fit":
            self.evaluator.start(self.actor, fitting=False, rank=self.global_rank)

    on_test_start = on_validation_start

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """The actor's and the critic's optimizers (the critic's steps the value phase's network: a Q critic's own),
        and the schedulers given for them (stepped once per iteration)."""
        trained = (self.actor, self.awr.networks["value"])  # the critic, or the networks of the targets part's own
        optimizers = [make(network.parameters()) for make, network in zip(self._optimizers, trained)]
        schedulers = [make(optimizer) for make, optimizer in zip(self._schedulers, optimizers) if make is not None]
        for scheduler in schedulers:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                raise TypeError("AWRModule: ReduceLROnPlateau steps on a monitored metric; the schedulers here step "
                                "once per iteration. Use a schedule of iterations (StepLR, CosineAnnealingLR, ...).")
        return optimizers, schedulers

    def configure_callbacks(self) -> list[pl.Callback]:
        return [StopWorkersOnException()]

    def train_dataloader(self) -> DataLoader:
        """One item per rank: each Lightning epoch is one AWR iteration on every rank."""
        return DataLoader(range(self.trainer.world_size), batch_size=1)

    val_dataloader = test_dataloader = train_dataloader

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(range(self.evaluator.episodes), batch_size=1)

    # ------------------------------------------------------- one iteration
    def training_step(self, batch: Any, batch_idx: int) -> None:
        """One AWR iteration (:class:`~awr_modules.iteration.AWRIteration`), then its log."""
        self.last_iteration = result = self.awr.run()
        self._log_iteration(result)
        self._log_evaluations(self.evaluator.finished())
        if self.max_env_steps is not None and self.env_steps >= self.max_env_steps:
            self.trainer.should_stop = True

    def on_train_epoch_end(self) -> None:
        """Step the learning-rate schedulers once per AWR iteration (manual optimization leaves it to the module)."""
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            scheduler.step()

    def _log_iteration(self, result: IterationResult) -> None:
        ranks, own = result.metrics()
        self.log_dict({"env_steps": float(self.env_steps), "iteration": float(self.iteration), **ranks}, sync_dist=True)
        self.log_dict(own)

    # ---------------------------------------------------------- evaluation
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """An evaluation of the deterministic policy, logged as ``eval/return`` and ``eval/episode_length``."""
        self._log_evaluations(self.evaluator.evaluate(self.actor, self.env_steps, self.global_step), "eval")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Same as validation, logged as ``test/return`` (``awr test -c ... --ckpt_path ...``)."""
        self._log_evaluations(self.evaluator.evaluate(self.actor, self.env_steps, self.global_step), "test")

    def _log_evaluations(self, results: list[EvaluatedSnapshot], prefix: str = "eval") -> None:
        """Log evaluations: one that ran now through Lightning's ``log``; a worker's at its snapshot's step."""
        for result in results:
            metrics = evaluation_metrics(prefix, result.returns, result.lengths)
            if self.evaluator.in_process:
                for name, value in metrics.items():
                    self.log(name, value, sync_dist=True)
                self.log("env_steps", float(self.env_steps), sync_dist=True)
                continue
            for logger in self.loggers:
                logger.log_metrics({**metrics, "env_steps": float(result.env_steps)}, step=result.global_step)

    def on_train_end(self) -> None:
        """Log the evaluations still running in the worker (the last snapshot's included)."""
        self._log_evaluations(self.evaluator.finished(wait=True))

    def on_predict_epoch_start(self) -> None:
        """Run the evaluator's episodes once, side by side; ``predict_step`` hands them out."""
        env = self.recipe.make_env(self._rank_seed() + 500, self.evaluator.episodes)
        self._predicted = evaluate(env, self.actor).episodes

    def predict_step(self, batch: Any, batch_idx: int) -> TensorDictBase:
        """One deterministic episode per item (``awr predict``): the rollout TensorDict, on the CPU."""
        return self._predicted[batch_idx].cpu()

    # ---------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store what Lightning does not (:mod:`awr_modules.run_state`): the format's version, the task, and the
        iteration's state, with every rank's buffer and RNG states gathered (Lightning writes rank 0's)."""
        state = self.awr.state_dict()
        ranks = gather_rank_states(state.pop("rank"), self.trainer.world_size)
        checkpoint[CHECKPOINT_KEY] = {"version": FORMAT_VERSION, "env_id": self.recipe.env_id,
                                      "signature": self.env_signature, **state, "ranks": ranks}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another task, shape or format before any weight is loaded, then restore the run."""
        state = checked_run_state(checkpoint, self.recipe.env_id, self.env_signature, self.state_dict(),
                                  resume=self.trainer.state.fn == "fit")
        self._starts_from_init = False  # a resumed run continues from its own checkpoint
        rank = own_rank_state(state["ranks"], self.trainer.world_size, self.global_rank)
        self.awr.load_state_dict({**state, "rank": rank})

    # ------------------------------------------------------------ teardown
    def teardown(self, stage: str) -> None:
        self.stop_workers()

    def stop_workers(self, *, after_failure: bool = False) -> None:
        """Shut the collection and evaluation workers down, where there are any."""
        self.evaluator.stop()
        self.awr.data.stop(after_failure=after_failure)
