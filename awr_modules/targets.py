"""The value targets part: which return ``R`` the critic regresses to, and when it is recomputed.

AWR recomputes the return of every stored path with the current critic twice per iteration (steps 3 and 5
of :mod:`awr_modules.iteration`): before the value phase (``R``, with the critic that the last iteration
left) and after it (``A = R - V(s)``, with the updated critic, standardised over the buffer). A part of
this module owns that: the estimator it gives the loss (TD(lambda), GAE or the paper's k-step return),
how often the refresh runs (offline runs may space it out), in chunks of whole paths, and which stored
``V(s)`` are still the current critic's, so that the first refresh of an iteration runs the critic on
the newly stored rows only.

- :class:`TDLambda` (the reference): ``G_t = r_t + gamma ((1 - lambda) V(s_{t+1}) + lambda G_{t+1})``.
- :class:`GAE`: ``A_t = sum_l (gamma lambda)^l delta_{t+l}`` with ``delta_t = r_t + gamma V(s_{t+1}) - V(s_t)``
  and ``R_t = A_t + V(s_t)``; the same ``R`` as TD(lambda), computed by TorchRL's ``GAE``.
- :class:`KStep`: ``R_t = sum_{i<k} gamma^i r_{t+i} + gamma^k V(s_{t+k})``, the seed formula of the paper.
- :class:`VTrace`: V-trace (Espeholt et al., 2018), the current policy's value from the older behaviour
  policies' paths, with truncated importance ratios ``pi(a|s) / mu(a|s)`` (TorchRL's ``VTrace``).

At a time-limit cut each bootstraps from ``V(s')``; after a termination it does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from tensordict import TensorDictBase
from torchrl.data import ReplayBuffer
from torchrl.objectives import LossModule
from torchrl.objectives.utils import ValueEstimators

from awr_modules._torchrl_compat import actor_distribution
from awr_modules.distributions import per_transition
from awr_modules.kstep import KStepReturnEstimator
from awr_modules.value_targets import LogProb, refresh_value_targets_over

if TYPE_CHECKING:
    from awr_modules.data import DataSource
    from awr_modules.phases import OwnValuePhase


class ValueTargets:
    """Base of the value-target parts: the discount, the refresh schedule and the stale-row tracking.

    Args:
        gamma: discount (reference 0.99), ``0 <= gamma < 1``.
        value_scale: ``s_v``: the critic predicts ``V / s_v`` and the value error is divided by it, so that the
            reference's step sizes fit any return scale. ``None``: ``1 / (1 - gamma)``, the reference's.
        normalize_advantage: standardise the advantages over everything stored before weighting (reference: yes).
        refresh_every: recompute targets and advantages every this many iterations. Online runs need 1 (the
            transitions stored in an iteration need targets in it); an offline run may space them out, since
            a refresh over a whole dataset costs more than a phase.
        chunk_size: refresh about this many transitions at a time, in runs of whole stored paths, so that no
            refresh reads a whole (memory-mapped) dataset at once; ``None``: each buffer at once.
    """

    def __init__(self, gamma: float = 0.99, *, value_scale: float | None = None, normalize_advantage: bool = True,
                 refresh_every: int = 1, chunk_size: int | None = None) -> None:
        name = type(self).__name__
        if not 0 <= gamma < 1:
            raise ValueError(f"{name}: gamma must be in [0, 1), got {gamma}.")
        if value_scale is not None and not value_scale > 0:
            raise ValueError(f"{name}: value_scale must be > 0 (or null for 1 / (1 - gamma)), got {value_scale}.")
        if refresh_every < 1:
            raise ValueError(f"{name}: refresh_every must be >= 1, got {refresh_every}.")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"{name}: chunk_size must be >= 1 (or null for whole buffers), got {chunk_size}.")
        self.gamma = gamma
        self.value_scale = value_scale if value_scale is not None else 1.0 / (1.0 - gamma)
        self.normalize_advantage = normalize_advantage
        self.refresh_every = refresh_every
        self.chunk_size = chunk_size
        self._refreshed = False  # whether this process has refreshed yet (a resumed run must, whatever the count)
        self._values_current = False  # every stored V(s) is the current critic's, but for rows written since

    def check(self, data: DataSource, loss: LossModule) -> None:
        """Refuse, before any step, a data source or loss this part cannot work with (the message names both)."""

    def attach(self, loss: LossModule) -> None:
        """Give ``loss`` this part's value estimator (TorchRL's ``make_value_estimator``)."""
        raise NotImplementedError

    def make_networks(self, recipe: Any, env: Any, actor: Any, critic: Any) -> torch.nn.Module | None:
        """Networks of this part's own (a Q critic's), built by ``recipe`` for ``env`` beside the loss's ``actor``
        and ``critic``; the Lightning module registers them (checkpoints, devices). ``None``: the loss's critic."""
        return None

    def value_phase(self) -> OwnValuePhase | None:
        """The value phase's own loss, network, keys and per-step hook where this part trains networks of its own
        (:class:`~awr_modules.phases.OwnValuePhase`); ``None``: ``AWRLoss.value_loss`` on the loss's critic."""
        return None

    def _refresh_options(self, loss: LossModule) -> dict[str, Any]:
        """What a refresh passes to :func:`~awr_modules.value_targets.refresh_value_targets_over` beyond the
        estimator (V-trace: the current policy)."""
        return {}

    def values_moved(self) -> None:
        """The critic's inputs or weights changed outside a refresh (the observation normaliser moved): every
        stored ``V(s)`` is out of date."""
        self._values_current = False

    def refreshes_in(self, iteration: int) -> bool:
        """Whether iteration ``iteration`` (0-based) recomputes targets and advantages."""
        return iteration % self.refresh_every == 0 or not self._refreshed

    def refresh_targets(self, buffers: list[ReplayBuffer], loss: LossModule,
                        written: list[torch.Tensor | None]) -> None:
        """Step 3: ``R`` over the stored paths with the critic as it is. ``written``: per buffer, the storage
        indices stored in this iteration (``None``: nothing was written to it). Where every other stored ``V(s)``
        is still the current critic's, the critic runs on the written rows only."""
        stale = None
        if self._values_current:
            empty = torch.empty(0, dtype=torch.long)
            stale = [rows if rows is not None else empty for rows in written]
        refresh_value_targets_over(buffers, loss.value_estimator, stale_values=stale, chunk_size=self.chunk_size,
                                   **self._refresh_options(loss))
        self._refreshed = True
        self._values_current = False  # the value phase comes next and moves V

    def refresh_advantages(self, buffers: list[ReplayBuffer], loss: LossModule,
                           critic_moves_in_policy_phase: bool) -> None:
        """Step 5: ``A = R - V(s)`` with the updated critic, standardised over ``buffers`` together (the sampling
        priorities of a buffer that samples by weight follow once the temperature is set)."""
        refresh_value_targets_over(buffers, loss.value_estimator, normalize_advantage=self.normalize_advantage,
                                   chunk_size=self.chunk_size, **self._refresh_options(loss))
        self._values_current = not critic_moves_in_policy_phase


class TDLambda(ValueTargets):
    """TD(lambda) returns over the stored paths (the reference's targets).

    ``G_t = r_t + gamma ((1 - lambda) V(s_{t+1}) + lambda G_{t+1})``; ``lmbda=1`` is the Monte-Carlo return
    bootstrapped at cuts, ``lmbda=0`` TD(0).

    Args:
        gamma: discount (reference 0.99).
        lmbda: lambda (reference 0.95), ``0 <= lmbda <= 1``.

    Other keywords: see :class:`ValueTargets`.
    """

    def __init__(self, gamma: float = 0.99, lmbda: float = 0.95, *, value_scale: float | None = None,
                 normalize_advantage: bool = True, refresh_every: int = 1, chunk_size: int | None = None) -> None:
        super().__init__(gamma, value_scale=value_scale, normalize_advantage=normalize_advantage,
                         refresh_every=refresh_every, chunk_size=chunk_size)
        if not 0 <= lmbda <= 1:
            raise ValueError(f"{type(self).__name__}: lmbda must be in [0, 1], got {lmbda}.")
        self.lmbda = lmbda

    def attach(self, loss: LossModule) -> None:
        loss.make_value_estimator(ValueEstimators.TDLambda, gamma=self.gamma, lmbda=self.lmbda)


class GAE(TDLambda):
    """Generalised advantage estimation (TorchRL's ``GAE``): ``A_t = sum_l (gamma lambda)^l delta_{t+l}``,
    ``R_t = A_t + V(s_t)``. The critic runs twice per refresh (``V(s)`` and ``V(s')``), where the
    TD(lambda) part shares one pass."""

    def attach(self, loss: LossModule) -> None:
        loss.make_value_estimator(ValueEstimators.GAE, gamma=self.gamma, lmbda=self.lmbda)


class KStep(ValueTargets):
    """The paper's k-step return ``R_t = sum_{i<k} gamma^i r_{t+i} + gamma^k V(s_{t+k})``
    (:class:`~awr_modules.KStepReturnEstimator`), cut at path ends.

    Args:
        gamma: discount.
        horizon: ``k >= 1``; 1 is TD(0).

    Other keywords: see :class:`ValueTargets`.
    """

    def __init__(self, gamma: float = 0.99, horizon: int = 10, *, value_scale: float | None = None,
                 normalize_advantage: bool = True, refresh_every: int = 1, chunk_size: int | None = None) -> None:
        super().__init__(gamma, value_scale=value_scale, normalize_advantage=normalize_advantage,
                         refresh_every=refresh_every, chunk_size=chunk_size)
        if horizon < 1:
            raise ValueError(f"KStep: horizon must be >= 1, got {horizon}.")
        self.horizon = horizon

    def attach(self, loss: LossModule) -> None:
        loss.make_value_estimator(KStepReturnEstimator, gamma=self.gamma, horizon=self.horizon)


class VTrace(ValueTargets):
    r"""V-trace targets (Espeholt et al., 2018, IMPALA): the value of the *current* policy ``pi`` estimated from paths
    that older behaviour policies ``mu`` collected, by TorchRL's V-trace (``ValueEstimators.VTrace``).

    The FIFO buffer holds about ``buffer_size / frames_per_iteration`` iterations of behaviour policies (25 for
    the reference's 50,000 / 2048), and TD(lambda) over it estimates the value of their mixture. V-trace corrects
    each step by the truncated importance ratios of the stored action, ``rho_t = min(rho_bar, pi(a_t|x_t) /
    mu(a_t|x_t))`` and ``c_t = min(c_bar, pi(a_t|x_t) / mu(a_t|x_t))`` (``mu``: the log-probs the collector stored
    under the loss's ``sample_log_prob`` key; ``pi``: the loss's actor now):

    .. math::

        v_s = V(x_s) + \sum_{t \ge s} \gamma^{t-s} \Big(\prod_{i=s}^{t-1} c_i\Big)
              \rho_t \big(r_t + \gamma V(x_{t+1}) - V(x_t)\big)

    along each stored path, with no bootstrap after a termination (``V(x_{t+1}) = 0``) and ``V(s')`` at a
    time-limit cut or where collection stopped (the cuts of :func:`~awr_modules.value_targets.trajectory_ends`).
    ``rho_bar`` sets the value whose fixed point is estimated (``rho_bar = inf``: ``V^pi``; smaller: a policy
    between ``mu`` and ``pi``); ``c_bar`` bounds how far a correction reaches back (the variance). With
    ``pi = mu`` and ``rho_bar = c_bar = 1``, ``v_s`` is the TD(1) return bootstrapped at cuts.

    The critic regresses to ``R = v_s``. The AWR weights use the advantage of the stored action under ``pi``,

    .. math::

        A_s = q_s - V(x_s), \qquad q_s = r_s + \gamma v_{s+1}

    (``v_{s+1} = V(s')`` at a cut, no bootstrap after a termination), standardised over the buffer as the other
    parts do: IMPALA's estimate of ``Q^pi(x_s, a_s) - V^pi(x_s)``. Not ``v_s - V(x_s)``, nor TorchRL's advantage
    ``rho_s (q_s - V(x_s))`` (the two are equal when ``rho_bar = c_bar``): both scale an action's advantage by its
    own ratio, so an action the current policy has made unlikely would get an advantage near 0 however good it
    was. ``rho_s`` corrects IMPALA's policy gradient, an expectation under ``pi``, for sampling ``a_s`` from
    ``mu``; AWR's weighted regression samples from the buffer on purpose (its solution is
    ``pi* ~ mu exp(A / beta)``), so only the future after ``a_s`` needs correcting. On-policy (ratios 1, bars
    ``>= 1``) ``A_s = v_s - V(x_s)``, TD(1)'s advantage.

    A refresh reuses the stored ``V(s)`` where the critic did not change (as the other parts) and recomputes the
    ratios, one actor pass over every stored row, at every refresh: they depend on the actor, which the policy
    phase moves. ``log pi`` is taken of the stored action (TorchRL's ``VTrace`` module would take it of an action
    it draws), by the loss's own actor, so the ratios are those of the policy the policy phase trains. (A batch
    that reaches the loss without targets goes through TorchRL's ``VTrace`` module as it is; an AWR iteration's
    batches always carry the refreshed targets.)

    Use it when the buffer spans many behaviour policies (a large buffer, small ``frames_per_iteration``, an
    asynchronous collector) and the mixture's value lags the current policy's. It needs stored behaviour
    log-probs: collected transitions have them, a Minari dataset does not (refused before any step, :meth:`check`).

    Args:
        gamma: discount (reference 0.99).
        rho_bar: truncation of ``rho_t``, ``> 0`` (IMPALA: 1).
        c_bar: truncation of ``c_t``, ``> 0`` (IMPALA: 1).

    Other keywords: see :class:`ValueTargets`.
    """

    def __init__(self, gamma: float = 0.99, rho_bar: float = 1.0, c_bar: float = 1.0, *,
                 value_scale: float | None = None, normalize_advantage: bool = True, refresh_every: int = 1,
                 chunk_size: int | None = None) -> None:
        super().__init__(gamma, value_scale=value_scale, normalize_advantage=normalize_advantage,
                         refresh_every=refresh_every, chunk_size=chunk_size)
        for name, value in (("rho_bar", rho_bar), ("c_bar", c_bar)):
            if not value > 0:
                raise ValueError(f"VTrace: {name} must be > 0, got {value}.")
        self.rho_bar = rho_bar
        self.c_bar = c_bar

    def check(self, data: DataSource, loss: LossModule) -> None:
        key = loss.tensor_keys.sample_log_prob
        needs = (f"model.targets (VTrace) needs the behaviour policy's log-probs log mu(a|s), stored under {key!r}, "
                 f"but model.data ({type(data).__name__})")
        if getattr(data, "dataset_id", None) is not None:  # the sources that read a Minari dataset
            raise ValueError(f"{needs} reads a Minari dataset, which stores none. Use TDLambda, GAE or KStep "
                             "targets.")
        for buffer in data.buffers:  # buffers filled before the run (GivenBuffers)
            if key not in buffer.storage.get(0).keys(True):
                raise ValueError(f"{needs} holds transitions without them. Store the collector's log-probs (the "
                                 "actor's return_log_prob=True), or use TDLambda, GAE or KStep targets.")

    def attach(self, loss: LossModule) -> None:
        loss.make_value_estimator(ValueEstimators.VTrace, gamma=self.gamma, rho_thresh=self.rho_bar,
                                  c_thresh=self.c_bar)

    def _refresh_options(self, loss: LossModule) -> dict[str, Any]:
        return {"log_prob": policy_log_prob(loss)}


def policy_log_prob(loss: LossModule) -> LogProb:
    """``log pi(a|s)`` of the stored actions under ``loss``'s actor as the loss sees it (its current parameters),
    the same log-likelihood the policy phase weights."""
    actor, action_key = loss.actor_network, loss.tensor_keys.action
    params = getattr(loss, "actor_network_params", None)

    def log_prob(rows: TensorDictBase) -> torch.Tensor:
        dist = actor_distribution(actor, params, None, rows.select(*actor.in_keys, strict=False))
        return per_transition(dist.log_prob(rows.get(action_key)), rows.batch_dims)

    return log_prob
