"""The entropy coefficient: ``alpha`` of the policy loss's bonus ``-alpha mean_s H(pi(.|s))``, fixed or tuned.

AWR regresses the policy onto its own advantage-weighted actions, so it explores less than entropy-regularised
methods. The loss (:class:`~awr_modules.AWRLoss`) can subtract an entropy bonus ``alpha H(pi(.|s))``; a fixed
``alpha`` (:class:`FixedCoefficient`, the loss's own ``entropy_coeff``) is a guess per task. :class:`TunedToEntropy`
instead tunes ``alpha`` toward a target entropy ``H_target`` as SAC tunes its temperature (Haarnoja et al., 2018, "Soft
Actor-Critic Algorithms and Applications", Eq. 18), by gradient steps over ``log alpha`` on

    J(alpha) = alpha * (H(pi) - H_target),      dJ / d(log alpha) = alpha * (H(pi) - H_target),

where ``H(pi)`` is the policy's mean entropy over the states it is trained on. A descent step
``log alpha <- log alpha - lr * alpha * (H - H_target)`` (plain SGD) therefore raises ``alpha`` while the entropy
is below the target (a stronger bonus widens the policy) and lowers it while the entropy is above. ``alpha =
exp(log alpha)`` stays positive, so the bonus can only widen the policy: the target acts as a floor, and a policy
whose likelihood alone keeps it wider sees ``alpha`` decay toward 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torchrl.data import ReplayBuffer

from awr_modules._torchrl_compat import actor_distribution
from awr_modules.distributions import closed_form_or_sampled_entropy, per_transition
from awr_modules.loss import AWRLoss
from awr_modules.precision import float32_context

CoefficientOptimizer = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
"""Builds the optimizer of ``log alpha`` from its one parameter (Lightning's ``OptimizerCallable``: in YAML a
``class_path`` with ``init_args``, the learning rate among them)."""


def _default_optimizer(parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Adam with step size 0.05 (one step per iteration: see :class:`TunedToEntropy`)."""
    return torch.optim.Adam(parameters, lr=0.05)

CONSTANT_SCALE = "constant_scale"
"""The attribute (``True``) by which a module of an actor says that it outputs a scale no parameter moves, as the
recipes' fixed-std head does: such an actor's entropy cannot move, and a tuned coefficient is refused on it."""


def has_constant_scale(actor: torch.nn.Module) -> bool:
    """Whether a module of ``actor`` declares a constant scale (:data:`CONSTANT_SCALE`)."""
    return any(getattr(module, CONSTANT_SCALE, False) for module in actor.modules())


def mean_policy_entropy(loss: AWRLoss, buffers: list[ReplayBuffer], chunk_size: int | None = None) -> torch.Tensor:
    """``mean_s H(pi(.|s))`` of the loss's actor over every state stored in ``buffers``, without gradient and in
    float32 also under autocast, as a float64 scalar on the buffers' device (``chunk_size`` states at a time;
    ``None``: a buffer at once).

    The closed form where the distribution has one; for TanhNormal, which has none, the one-sample estimate
    ``-log pi(a~pi|s)`` per state (:func:`~awr_modules.distributions.closed_form_or_sampled_entropy`, the estimate
    the loss's bonus uses), whose mean over the buffer is an unbiased estimate of the mean entropy.
    """
    total, count = None, 0
    with float32_context(), torch.no_grad():
        for buffer in buffers:
            length = len(buffer)
            step = chunk_size or length
            for start in range(0, length, step):
                states = buffer.storage.get(slice(start, min(start + step, length)))
                states = states.select(*loss.actor_network.in_keys)
                dist = actor_distribution(loss.actor_network, loss.actor_network_params, None, states)
                summed = per_transition(closed_form_or_sampled_entropy(dist), states.batch_dims).double().sum()
                total = summed if total is None else total + summed
                count += states.numel()
    if total is None:
        raise ValueError("mean_policy_entropy: the buffers hold no state.")
    return total / count


class EntropyCoefficient:
    """Base of the entropy-coefficient parts: what ``alpha`` the policy phase's bonus ``-alpha H(pi(.|s))`` uses.

    :meth:`attach` checks the loss and readies its bonus (before the phases are built); a part that :attr:`tunes`
    gets the policy's entropy each iteration in :meth:`update` and returns the coefficient to set on the loss.
    """

    tunes = False

    def attach(self, loss: AWRLoss) -> None:
        """Check that this part fits ``loss`` and set the loss's bonus up (here: nothing, the loss's own)."""

    def update(self, entropy: float) -> float:
        """The coefficient the next policy phase uses, after the policy's mean entropy ``entropy`` was measured."""
        raise NotImplementedError(f"{type(self).__name__} does not tune the entropy coefficient.")

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to go on exactly (nothing for a fixed coefficient)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; an empty ``state`` (a checkpoint written without this part) keeps this part's
        initial state."""


class FixedCoefficient(EntropyCoefficient):
    """The loss's own fixed ``entropy_coeff`` (``model.loss.init_args.entropy_coeff``; reference 0, no bonus)."""


class TunedToEntropy(EntropyCoefficient):
    """``alpha`` tuned toward a target entropy: one optimizer step on ``log alpha`` per iteration, on
    ``J(alpha) = alpha * (H(pi) - H_target)`` (this module's docstring), with ``H(pi)`` the current policy's mean
    entropy over every state stored (:func:`mean_policy_entropy`; pooled across DDP ranks).

    When: once per iteration, after the advantages' refresh and before the policy phase, with the policy that
    phase starts from; the phase then uses the new ``alpha`` for all its steps. Not per policy step (as SAC does):
    the execution parts run a phase's steps as compiled graphs, fused multi-step graphs or captured CUDA graphs of
    the actor's objective and optimizer alone, into which a second optimizer would have to be built. The loss reads
    ``alpha`` from its ``entropy_coeff`` buffer, which is filled in place between phases (as the temperature is):
    every graph reads the new value without being rebuilt. The buffer's states are those the policy loss averages
    over, so the measurement is the objective's own entropy term, without a minibatch's noise. One step per
    iteration means a larger step size than SAC's per-step 3e-4: an Adam step moves ``log alpha`` by about its ``lr``
    whatever the gradient's scale, so the default ``lr = 0.05`` can change ``alpha`` by a factor ``e`` in 20 iterations.

    The loss's bonus is turned on by this part (:meth:`attach`), so leave ``model.loss.init_args.entropy_coeff``
    out; the actor's entropy must be able to move (a learned std, TanhNormal or a categorical: not a fixed std).
    With behaviour cloning (``weighting="uniform"``) the bonus still means what it says, an entropy floor on the
    cloned policy, and is allowed. A target above the family's maximum (``log n`` for ``n`` discrete actions) is
    never met: ``alpha`` then keeps growing.

    Args:
        target: ``H_target`` in nats, the mean entropy of ``pi(.|s)`` (summed over action dimensions). SAC's
            heuristic for ``d`` continuous action dimensions is ``-d``; the reference's fixed std 0.4 has
            ``0.50 d``; a categorical over ``n`` actions has at most ``log n``.
        initial_coeff: ``alpha`` of the first iteration (``> 0``).
        optimizer: builds the optimizer of ``log alpha`` (one step per iteration), its step size in its own
            ``init_args``; ``None``: Adam, ``lr=0.05``. ``torch.optim.SGD`` without momentum takes the plain step
            ``log alpha -= lr * alpha * (H - H_target)``.
    """

    tunes = True

    def __init__(self, target: float, initial_coeff: float = 0.01,
                 optimizer: CoefficientOptimizer | None = None) -> None:
        name = type(self).__name__
        if not math.isfinite(target):
            raise ValueError(f"{name}: target must be a finite entropy in nats, got {target}.")
        if not initial_coeff > 0:
            raise ValueError(f"{name}: initial_coeff must be > 0, got {initial_coeff}.")
        self.target, self.initial_coeff = float(target), initial_coeff
        self.log_coeff = torch.nn.Parameter(torch.tensor(math.log(initial_coeff), dtype=torch.float64))
        self._optimizer = (optimizer or _default_optimizer)([self.log_coeff])

    @property
    def coeff(self) -> float:
        """The current ``alpha = exp(log alpha)``."""
        return math.exp(float(self.log_coeff.detach()))

    def attach(self, loss: AWRLoss) -> None:
        """Refuse a loss whose actor's entropy cannot move or that sets a coefficient itself; turn its entropy bonus
        on (before any graph of the phases is built: the loss branches on it in Python) at ``initial_coeff``."""
        name = type(self).__name__
        if has_constant_scale(loss.actor_network):
            raise ValueError(f"model.entropy ({name}) tunes the entropy bonus, but the actor has a fixed std "
                             "(model.recipe.init_args.policy=fixed_std): its entropy cannot move. Use a learned std "
                             "(policy=learned_std, bounded_std or tanh_normal), or "
                             "awr_modules.entropy.FixedCoefficient.")
        if float(loss.entropy_coeff) != 0:
            raise ValueError(f"model.entropy ({name}) sets the entropy coefficient, but model.loss.init_args."
                             f"entropy_coeff={float(loss.entropy_coeff)} sets one too: leave it out of model.loss "
                             f"(the tuned coefficient starts at model.entropy.init_args.initial_coeff).")
        loss.entropy_bonus = True
        loss.entropy_coeff.fill_(self.coeff)

    def update(self, entropy: float) -> float:
        """One optimizer step on ``log alpha`` against ``J = alpha * (entropy - target)``; the new ``alpha``."""
        self._optimizer.zero_grad()
        objective = self.log_coeff.exp() * (entropy - self.target)
        objective.backward()
        self._optimizer.step()
        return self.coeff

    def state_dict(self) -> dict[str, Any]:
        return {"log_coeff": self.log_coeff.detach().clone(), "optimizer": self._optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        with torch.no_grad():
            self.log_coeff.copy_(state["log_coeff"])
        self._optimizer.load_state_dict(state["optimizer"])
