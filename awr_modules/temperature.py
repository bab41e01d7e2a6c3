"""A temperature that tunes itself: ``beta`` solved each iteration so that the AWR weights meet a target.

AWR's weights ``w_i = min(exp(A_i / beta), w_max)`` over the buffer's transitions define the policy it
regresses to: ``pi(a|s) ~ mu(a|s) exp(A / beta)`` (AWR.md), estimated on the buffer by self-normalised
importance weights ``p_i = w_i / sum_j w_j``. The paper fixes ``beta`` per task and names its tuning as the
method's weakness. Without the clip both measures below are monotone in ``beta`` (a larger ``beta``
flattens the weights), so one bisection over ``log beta`` finds the ``beta`` that meets a target (with the
clip, on the branch it leaves monotone: see :func:`solve_temperature`):

- ``"ess"``: the weights' normalised effective sample size ``(sum w)^2 / (n sum w^2)``, the fraction of the
  buffer that effectively carries the policy's gradient (1 for uniform weights);
- ``"kl"``: ``KL(pi || mu) = sum_i p_i log(n p_i)``, how far the regression target moves from the behaviour
  policy: the KL constraint whose Lagrange multiplier ``beta`` is.

For advantages ``A ~ N(0, s^2)`` without clipping both have closed forms, which the tests use:
``ESS = exp(-s^2 / beta^2)`` and ``KL = s^2 / (2 beta^2)``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

TemperatureMeasure = Literal["ess", "kl"]
MEASURES = ("ess", "kl")


def _log_weights(advantage: torch.Tensor, temperature: float, max_weight: float) -> torch.Tensor:
    """``log w = min(A / beta, log w_max)`` per transition, flat, in float32."""
    return torch.clamp(advantage.detach().reshape(-1).float() / temperature, max=math.log(max_weight))


def effective_sample_size(advantage: torch.Tensor, temperature: float, max_weight: float = math.inf) -> float:
    """``(sum w)^2 / (n sum w^2)`` of the AWR weights: in ``(0, 1]``, 1 when every weight is equal."""
    log_weight = _log_weights(advantage, temperature, max_weight)
    weight = torch.exp(log_weight - log_weight.max())  # scale-free; nothing overflows at a small beta
    return float(weight.sum().double().pow(2) / (weight.numel() * weight.pow(2).sum().double()))


def kl_from_behaviour(advantage: torch.Tensor, temperature: float, max_weight: float = math.inf) -> float:
    """``KL(pi || mu) = sum_i p_i log(n p_i)`` with ``p_i = w_i / sum_j w_j``: ``>= 0``, 0 for equal weights."""
    log_weight = _log_weights(advantage, temperature, max_weight)
    log_p = log_weight - torch.logsumexp(log_weight, 0)
    return float((log_p.exp() * (log_p + math.log(log_p.numel()))).sum().clamp_min(0.0))


def measure_weights(advantage: torch.Tensor, temperature: float, measure: TemperatureMeasure,
                    max_weight: float = math.inf) -> float:
    """The weights' ``"ess"`` or ``"kl"`` at ``temperature``."""
    if measure == "ess":
        return effective_sample_size(advantage, temperature, max_weight)
    if measure == "kl":
        return kl_from_behaviour(advantage, temperature, max_weight)
    raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}.")


def solve_temperature(advantage: torch.Tensor, target: float, measure: TemperatureMeasure = "ess", *,
                      max_weight: float = math.inf, bounds: tuple[float, float] = (1e-3, 1e3),
                      grid: int = 25, iterations: int = 40) -> float:
    """The ``beta`` at which the weights' ``measure`` equals ``target``, by bisection over ``log beta``.

    Without the clip, ESS grows with ``beta`` and KL shrinks with it. The clip ``w_max`` bends both at a small
    ``beta``: once most positive advantages sit at the clip, the weights become two-valued (``w_max`` or about
    0) and the ESS rises again towards the fraction of positive advantages as ``beta -> 0``. The search therefore
    keeps to the branch where a larger ``beta`` means flatter weights: above the ESS's minimum (the KL's maximum)
    over a ``grid`` of ``log beta`` within ``bounds``. A target beyond that branch's reach (an ESS below its
    minimum, say) returns the branch's end nearest to it. Forty halvings leave ``beta`` within a relative
    ``1e-11`` of the crossing.

    Args:
        advantage: the advantages the weights are computed from (e.g. the whole buffer's, standardised).
        target: an ESS in ``(0, 1)`` or a KL ``> 0`` (nats).
        measure: ``"ess"`` or ``"kl"``.
        max_weight: the loss's weight clip ``w_max``.
        bounds: the ``beta`` range searched.
    """
    if measure == "ess" and not 0 < target < 1:
        raise ValueError(f"solve_temperature: an ESS target must be in (0, 1), got {target}.")
    if measure == "kl" and not target > 0:
        raise ValueError(f"solve_temperature: a KL target must be > 0, got {target}.")
    increasing = measure == "ess"  # the measure's direction in beta on the branch searched
    log_betas = torch.linspace(math.log(bounds[0]), math.log(bounds[1]), grid, dtype=torch.float64)
    values = torch.tensor([measure_weights(advantage, math.exp(b), measure, max_weight) for b in log_betas.tolist()])
    turn = int(values.argmin() if increasing else values.argmax())  # the first of equal values: a flat start
    low, high = float(log_betas[turn]), float(log_betas[-1])
    for _ in range(iterations):
        middle = (low + high) / 2
        above = measure_weights(advantage, math.exp(middle), measure, max_weight) > target
        if above == increasing:  # the measure at ``middle`` is on the large-beta side of the target
            high = middle
        else:
            low = middle
    return math.exp((low + high) / 2)


class Temperature:
    """Base of the temperature parts: the ``beta`` of ``w = min(exp(A / beta), w_max)`` an iteration's policy
    phase uses, set on the loss after the advantages' refresh.

    Args:
        beta: the temperature (reference 1.0 on standardised advantages); for a tuned temperature, the first
            iteration's value only.
    """

    tunes = False

    def __init__(self, beta: float = 1.0) -> None:
        if not beta > 0:
            raise ValueError(f"{type(self).__name__}: beta must be > 0, got {beta}.")
        self.beta = beta

    def solve(self, advantage: torch.Tensor, max_weight: float) -> float | None:
        """This iteration's ``beta`` for the buffer's ``advantage`` (``None``: keep the loss's)."""
        return None


class Fixed(Temperature):
    """A fixed ``beta``, the paper's choice (tuned per task by hand)."""


class _Tuned(Temperature):
    measure: TemperatureMeasure
    tunes = True

    def __init__(self, target: float, beta: float = 1.0) -> None:
        super().__init__(beta)
        if self.measure == "ess" and not 0 < target < 1:
            raise ValueError(f"{type(self).__name__}: target must be an ESS in (0, 1), got {target}.")
        if self.measure == "kl" and not target > 0:
            raise ValueError(f"{type(self).__name__}: target must be a KL > 0 (nats), got {target}.")
        self.target = target

    def solve(self, advantage: torch.Tensor, max_weight: float) -> float:
        return solve_temperature(advantage, self.target, self.measure, max_weight=max_weight)


class TunedToESS(_Tuned):
    """``beta`` solved every iteration so that the AWR weights over the whole buffer keep a normalised effective
    sample size ``(sum w)^2 / (n sum w^2)`` of ``target`` (:func:`solve_temperature`). Standardised Gaussian
    advantages at ``beta = 1`` (the reference) have an ESS of ``exp(-1) = 0.37``.

    Args:
        target: the ESS in ``(0, 1)``.
        beta: the first iteration's temperature.
    """

    measure = "ess"


class TunedToKL(_Tuned):
    """``beta`` solved every iteration so that the weighted policy ``pi ~ mu exp(A / beta)`` keeps
    ``KL(pi || mu) = target`` nats from the behaviour policy on the buffer (:func:`solve_temperature`); the KL
    constraint whose Lagrange multiplier ``beta`` is. Standardised Gaussian advantages at ``beta = 1`` give 0.5.

    Args:
        target: the KL ``> 0`` (nats).
        beta: the first iteration's temperature.
    """

    measure = "kl"
