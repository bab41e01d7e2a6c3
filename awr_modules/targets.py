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

At a time-limit cut each bootstraps from ``V(s')``; after a termination it does not.
"""

from __future__ import annotations

import torch
from torchrl.data import ReplayBuffer
from torchrl.objectives import LossModule
from torchrl.objectives.utils import ValueEstimators

from awr_modules.kstep import KStepReturnEstimator
from awr_modules.value_targets import refresh_value_targets_over


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

    def attach(self, loss: LossModule) -> None:
        """Give ``loss`` this part's value estimator (TorchRL's ``make_value_estimator``)."""
        raise NotImplementedError

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
        refresh_value_targets_over(buffers, loss.value_estimator, stale_values=stale, chunk_size=self.chunk_size)
        self._refreshed = True
        self._values_current = False  # the value phase comes next and moves V

    def refresh_advantages(self, buffers: list[ReplayBuffer], loss: LossModule,
                           critic_moves_in_policy_phase: bool) -> None:
        """Step 5: ``A = R - V(s)`` with the updated critic, standardised over ``buffers`` together (the sampling
        priorities of a buffer that samples by weight follow once the temperature is set)."""
        refresh_value_targets_over(buffers, loss.value_estimator, normalize_advantage=self.normalize_advantage,
                                   chunk_size=self.chunk_size)
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
