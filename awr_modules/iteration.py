"""One AWR iteration, the paper's loop, as one object of parts and without Lightning.

1. collect ``frames_per_iteration`` env steps with the current policy (the data part);
2. store them in the FIFO buffer, trajectory boundaries kept (the data part);
3. refresh the value targets ``R`` over the stored paths with the critic (the targets part);
4. value phase: minibatch steps on ``0.5 ((V(s) - R) / s_v)^2`` (the execution part); a targets part with
   networks of its own steps those instead (a Q critic: TD on each minibatch, nothing to do in step 3, and
   ``A = Q(s, a) - V_pi(s)`` in step 5; :mod:`awr_modules.q_critic`);
5. refresh the advantages ``A = R - V(s)`` with the updated critic, standardised over everything stored,
   and set the temperature ``beta`` (the temperature part) and a tuned entropy coefficient (the entropy part);
6. policy phase: minibatch steps on ``-w log pi(a|s)`` with ``w = min(exp(A / beta), w_max)``;
   then publish the policy that collects the next batch;
7. (the caller) log, and evaluate the deterministic policy every few iterations.

Tests drive it with plain buffers and :class:`~awr_modules.execution.PlainSteps`; the Lightning module
(:class:`~awr_modules.module.AWRModule`) drives it with Lightning's steps, devices and DDP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tensordict import TensorDictBase
from torch import nn

from awr_modules.data import DataSource
from awr_modules.entropy import EntropyCoefficient, FixedCoefficient, mean_policy_entropy
from awr_modules.execution import Execution, OptimizerSteps
from awr_modules.loss import AWRLoss
from awr_modules.observation_statistics import ObservationStatistics
from awr_modules.phases import Phase, PhaseClock, check_finite_losses, phase_inputs
from awr_modules.targets import ValueTargets
from awr_modules.temperature import Temperature, effective_sample_size, kl_from_behaviour
from awr_modules.value_targets import write_priorities

Pool = Callable[[torch.Tensor], torch.Tensor]
"""The mean of a tensor across DDP ranks (the identity on one process)."""


@dataclass
class IterationResult:
    """What one iteration leaves for the log.

    Attributes:
        batch: the collected batch ``[envs, T]`` (``None`` offline).
        outputs: the loss output of each phase's last minibatch step (the phases that took steps).
        seconds: wall-clock seconds per step of the iteration.
        weights: the temperature and the AWR weights' ESS and KL over everything stored (iterations that
            refreshed the advantages); a tuned entropy coefficient and the policy's entropy it was tuned on.
    """

    batch: TensorDictBase | None
    outputs: list[TensorDictBase]
    seconds: dict[str, float]
    weights: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> tuple[dict[str, torch.Tensor | float], dict[str, float]]:
        """What the log shows of this iteration: the metrics to average across DDP ranks (the episodes that ended
        in the batch, as ``train/return`` and ``train/episode_length``, and each phase's last loss output as
        ``train/<key>``), and this process's own (the phases' ``time/<step>`` seconds and the weights')."""
        ranks: dict[str, torch.Tensor | float] = {}
        if self.batch is not None:
            done = self.batch["next", "done"]
            if done.any():
                ranks["train/return"] = self.batch["next", "episode_reward"][done].float().mean()
                ranks["train/episode_length"] = self.batch["next", "step_count"][done].float().mean()
        for out in self.outputs:
            ranks.update((f"train/{key}", value.detach().float()) for key, value in out.items())
        return ranks, {**{f"time/{step}": seconds for step, seconds in self.seconds.items()}, **self.weights}


class AWRIteration:
    """The AWR iteration over its parts; :meth:`run` runs one.

    Args:
        loss: the :class:`~awr_modules.AWRLoss` on the actor and critic (its variant decides how samples are
            weighted and whether the buffer samples by weight).
        data: the data source (:mod:`awr_modules.data`).
        targets: the value targets (:mod:`awr_modules.targets`); attached to ``loss`` here.
        temperature: the temperature (:mod:`awr_modules.temperature`).
        value_phase: steps and batch size of step 4.
        policy_phase: steps and batch size of step 6.
        execution: how the phases' steps run (:mod:`awr_modules.execution`).
        statistics: the networks' observation statistics, updated from each collected batch (or ``None``).
        entropy: the entropy coefficient (:mod:`awr_modules.entropy`; ``None``: the loss's own); attached to ``loss``.

    A combination of parts that makes no sense is refused here, before any step, with both parts named.
    """

    def __init__(self, loss: AWRLoss, data: DataSource, targets: ValueTargets, temperature: Temperature,
                 value_phase: Phase, policy_phase: Phase, execution: Execution,
                 statistics: ObservationStatistics | None = None, *,
                 entropy: EntropyCoefficient | None = None) -> None:
        data.check(samples_by_weight=loss.samples_by_weight, refresh_every=targets.refresh_every)
        targets.check(data, loss)
        if temperature.tunes and not loss.weighs_by_advantage:
            raise ValueError(f"model.temperature ({type(temperature).__name__}) tunes beta, but model.loss weighs "
                             "every sample alike (weighting='uniform'): use awr_modules.temperature.Fixed.")
        targets.attach(loss)
        self.entropy = entropy = entropy if entropy is not None else FixedCoefficient()
        entropy.attach(loss)
        loss.temperature.fill_(temperature.beta)
        self.loss, self.data, self.targets, self.temperature = loss, data, targets, temperature
        self.value_phase, self.policy_phase, self.execution = value_phase, policy_phase, execution
        self.statistics = statistics
        self.own_value_phase = targets.value_phase()  # a Q critic's TD loss on its own networks, or None
        self.env_steps = 0  # collected by all ranks
        self.iteration = 0  # iterations completed
        self._optimizers: dict[str, object] = {}
        self._world_size = 1
        self._pool: Pool | None = None

    @property
    def networks(self) -> dict[str, nn.Module]:
        own = self.own_value_phase
        return {"policy": self.loss.actor_network, "value": own.network if own else self.loss.critic_network}

    def bind(self, actor_optimizer: object, critic_optimizer: object, steps: OptimizerSteps, *,
             device: torch.device | str = "cpu", world_size: int = 1, pool: Pool | None = None) -> None:
        """Ready the phases: the optimizers (plain or Lightning's), how steps are taken, the device and, under
        DDP, the world size and ``pool`` (a mean across ranks)."""
        self._optimizers = {"policy": actor_optimizer, "value": critic_optimizer}
        self._world_size, self._pool = world_size, pool
        self.execution.bind(self.loss, self.networks, self._optimizers, steps, device=torch.device(device),
                            world_size=world_size, own_value=self.own_value_phase)
        actor_parameters = {id(p) for p in self.loss.actor_network.parameters()}
        self._critic_moves_with_actor = any(id(p) in actor_parameters for p in self.loss.critic_network.parameters())

    def run(self) -> IterationResult:
        """One AWR iteration (steps 1-6 of the module's docstring)."""
        clock, data, targets = PhaseClock(), self.data, self.targets
        batch = data.collect(self.iteration)                                      # 1. collect
        written = None
        if batch is not None:
            self._count(batch)
            written = data.store(batch)                                           # 2. FIFO buffer
        clock.lap("collect")
        buffers = data.buffers
        refresh = targets.refreshes_in(self.iteration)
        if refresh:
            targets.refresh_targets(buffers, self.loss, written or [None] * len(buffers))  # 3. R over stored paths
        clock.lap("refresh")
        value_out = self._phase("value", self.value_phase)                       # 4. value phase
        clock.lap("value_phase")
        weights = {}
        if refresh:
            targets.refresh_advantages(buffers, self.loss, self._critic_moves_with_actor)  # 5. A, new critic
            weights = self._weigh(buffers)
        weights.update(self._tune_entropy(buffers))
        clock.lap("refresh")
        policy_out = self._phase("policy", self.policy_phase)                    # 6. policy phase
        clock.lap("policy_phase")
        data.publish(self.loss.actor_network)                                    # the next batch's behaviour policy
        self.iteration += 1
        check_finite_losses(self.iteration, value_out, policy_out)
        return IterationResult(batch, [out for out in (value_out, policy_out) if out is not None], clock.seconds,
                               weights)

    def _count(self, batch: TensorDictBase) -> None:
        """Count the batch's env steps (all ranks); the observation statistics follow it."""
        self.env_steps += batch.numel() * self._world_size
        if self.statistics is not None:
            if not self.statistics.frozen:  # the networks' normaliser moves: every stored V(s) is out of date
                self.targets.values_moved()
            self.statistics.update(batch, self.env_steps, self._pool)

    def _phase(self, name: str, phase: Phase) -> TensorDictBase | None:
        prioritized = name == "policy" and self.loss.samples_by_weight
        own = self.own_value_phase if name == "value" else None
        inputs = phase_inputs(self.data.buffers, self.loss, phase.steps, phase.batch_size, prioritized=prioritized,
                              own=own)
        if inputs is None:
            return None
        stored, indices = inputs
        return self.execution.run_phase(name, stored, indices, self._optimizers[name], self.networks[name])

    def _weigh(self, buffers: list) -> dict[str, float]:
        """The temperature for this iteration's weights (then the sampling priorities that follow from it), and
        the weights' ESS and KL from the behaviour policy over everything stored, for the log."""
        loss = self.loss
        key = loss.tensor_keys.advantage
        advantage = torch.cat([buffer.storage.get(slice(0, len(buffer))).get(key).reshape(-1) for buffer in buffers])
        max_weight = float(loss.max_weight)
        beta = self.temperature.solve(advantage, max_weight)
        if beta is not None:
            beta = torch.tensor(beta)
            if self._pool is not None:  # one temperature for all ranks: the mean of each rank's solution
                beta = self._pool(beta)
            loss.temperature.fill_(float(beta))
        if loss.samples_by_weight:
            (buffer,) = buffers  # prioritized sampling reads one buffer
            write_priorities(buffer, loss.sampling_priority, self.targets.chunk_size)
        beta = float(loss.temperature)
        return {"train/temperature": beta,
                "train/buffer_weight_ess": effective_sample_size(advantage, beta, max_weight),
                "train/buffer_weight_kl": kl_from_behaviour(advantage, beta, max_weight)}

    def _tune_entropy(self, buffers: list) -> dict[str, float]:
        """A tuned entropy coefficient's step from the policy's mean entropy over everything stored (the mean across
        ranks), set on the loss for the policy phase (in place: compiled graphs read it); both for the log."""
        if not self.entropy.tunes or not buffers:
            return {}
        entropy = mean_policy_entropy(self.loss, buffers, self.targets.chunk_size)
        if self._pool is not None:
            entropy = self._pool(entropy)
        coeff = self.entropy.update(float(entropy))
        self.loss.entropy_coeff.fill_(coeff)
        return {"train/entropy_coeff": coeff, "train/buffer_entropy": float(entropy)}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to go on exactly: the counters, the observation statistics, the entropy
        coefficient's state, and this process's buffer and RNG states (``rank``) and the dataset's identity (the
        parts' weights are the loss's)."""
        data = self.data.state_dict()
        return {"env_steps": self.env_steps, "iteration": self.iteration,
                "normalizers": [self.statistics.state_dict()] if self.statistics is not None else [],
                "entropy": self.entropy.state_dict(),
                "rank": data["rank"], "dataset": data["dataset"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s counters and statistics, and, where it holds one, a ``rank`` state."""
        self.env_steps, self.iteration = int(state["env_steps"]), int(state["iteration"])
        if self.statistics is not None and state.get("normalizers"):
            self.statistics.load_state_dict(state["normalizers"][0], self.env_steps)
        self.entropy.load_state_dict(state.get("entropy") or {})  # none: written before the part, its start
        if state.get("rank") is not None:
            loss = self.loss
            self.data.load_state_dict(state["rank"], state.get("dataset"),
                                      loss.sampling_priority if loss.samples_by_weight else None)
