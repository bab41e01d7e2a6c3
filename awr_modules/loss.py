"""The AWR loss as a TorchRL ``LossModule``.

Advantage-Weighted Regression (Peng, Kumar, Zhang, Levine, 2019) maximises
``E_{s~d_mu}[E_{a~pi} A_mu(s, a)] - alpha KL(pi || mu)``. Its solution is
``pi*(a|s) ~ mu(a|s) exp(A(s, a) / beta)``; projecting it onto the policy class
gives a weighted maximum-likelihood regression on replay data (paper, Eq. 10):

    max_pi E_{(s,a)~D}[ log pi(a|s) * min(exp(A(s, a) / beta), max_weight) ]

and the critic regresses the return (Eq. 9): ``min_V E[(R - V(s))^2]``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from tensordict.nn import (
    ProbabilisticTensorDictSequential,
    TensorDictModule,
    TensorDictModuleBase,
    TensorDictSequential,
    composite_lp_aggregate,
    dispatch,
)
from tensordict.utils import NestedKey
from torch import distributions as d
from torchrl.modules import TanhNormal
from torchrl.objectives import LossModule
from torchrl.objectives.utils import ValueEstimators, default_value_kwargs
from torchrl.objectives.value import GAE, TD0Estimator, TD1Estimator, TDLambdaEstimator, ValueEstimatorBase

from awr_modules._torchrl_compat import LossModuleFallbacks, dispatch_value_estimator
from awr_modules.precision import float32_context
from awr_modules.value_targets import mean_and_std, standardize_advantage

REFERENCE_ACTION_BOUND_PENALTY = 10.0
"""The reference's ``action_bound_weight``: what ``action_bound_penalty=None`` means for a Gaussian actor."""
_WEIGHTINGS = ("loss", "sampling")
_REDUCTIONS = ("mean", "sum", "none")
_BUILTIN_ESTIMATORS = {ValueEstimators.TD0: TD0Estimator, ValueEstimators.TD1: TD1Estimator,
                       ValueEstimators.TDLambda: TDLambdaEstimator, ValueEstimators.GAE: GAE}
_ESTIMATOR_KEYS = ("advantage", "value_target", "value", "reward", "done", "terminated")
_NETWORK_PARAMS = ("actor_network_params", "critic_network_params",
                   "target_actor_network_params", "target_critic_network_params")


def _per_transition(value: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """Sum per-action-dimension terms (log-probs, entropies, penalties of a plain Normal) to one per transition."""
    while value.ndim > batch_dims:
        value = value.sum(-1)
    return value


def _base(dist: d.Distribution) -> d.Distribution:
    """The per-dimension distribution inside an ``Independent`` one (IndependentNormal's Normal)."""
    return dist.base_dist if isinstance(dist, d.Independent) else dist


def _parameters_in(params: TensorDictParams | None, network: torch.nn.Module) -> AbstractContextManager:
    """Swap functional ``params`` into ``network`` for one call; nothing when the loss is not functional."""
    return params.to_module(network) if params is not None else nullcontext()


def _entropy(dist: d.Distribution) -> torch.Tensor:
    """Closed-form entropy, or a one-sample estimate -log pi(a~pi) where none exists (TanhNormal)."""
    try:
        return dist.entropy()
    except NotImplementedError:
        sample = dist.rsample() if dist.has_rsample else dist.sample()
        return -dist.log_prob(sample)


def _distribution_class(actor: TensorDictModuleBase) -> type | None:
    """The distribution class of a TorchRL actor (a ``ProbabilisticActor``'s last module has it)."""
    module = actor[-1] if isinstance(actor, TensorDictSequential) else actor
    return getattr(module, "distribution_class", None)


def has_unbounded_gaussian_mean(actor: TensorDictModuleBase) -> bool:
    """Whether ``actor``'s distribution is a Gaussian whose mean can leave ``[-1, 1]`` (not TanhNormal)."""
    distribution = _distribution_class(actor)
    return (isinstance(distribution, type) and issubclass(distribution, (d.Normal, d.Independent))
            and not issubclass(distribution, TanhNormal))


def _masked_mean(value: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return value.mean()
    return torch.where(valid, value, torch.zeros_like(value)).sum() / valid.sum().clamp_min(1)


class AWRLoss(LossModule, LossModuleFallbacks):
    r"""Advantage-Weighted Regression loss: weighted log-likelihood for the actor, regression for the critic.

    For a batch of stored transitions ``(s, a)`` with advantage ``A = R - V(s)``:

    .. math::

        w &= \min(\exp(A / \beta), w_{max}) \quad\text{(no gradient)} \\
        \mathcal{L}_{actor} &= -\operatorname{mean}(w \log\pi(a|s))
            + c_{bound}\,\tfrac12\operatorname{mean}\lVert\mu(s) - \mathrm{clip}(\mu(s), -1, 1)\rVert^2
            - c_{ent}\,\operatorname{mean} H(\pi(\cdot|s))
            + c_{l2}\,\tfrac12\operatorname{mean}\lVert\theta_\pi(s)\rVert^2 \\
        \mathcal{L}_{value} &= \tfrac12\operatorname{mean}\big((V(s) - R) / s_v\big)^2

    ``beta`` is :attr:`temperature`, ``w_max`` is :attr:`max_weight` and ``s_v`` is
    :attr:`value_scale` (the reference normalises values by ``1 / (1 - gamma)``).

    If the batch carries ``advantage`` and ``value_target`` they are used as they
    are (the usual case: :func:`~awr_modules.refresh_value_targets` wrote them over
    the stored trajectories). Otherwise the loss's value estimator computes them,
    and the batch must then be trajectory-shaped ``[*B, T]`` with ``"next"``.

    Like TorchRL's losses: ``forward`` also takes keyword tensors (``loss(observation=...,
    action=..., advantage=..., value_target=...)``) and then returns a tuple in
    :attr:`out_keys` order; means honour TorchRL's validity masks (``("collector", "mask")``
    of a padding slice sampler), which also restrict the diagnostics and the batch
    standardisation; coefficients are buffers that can be assigned or scheduled
    (``loss.temperature = 0.5``).

    Args:
        actor_network: a TorchRL actor whose ``get_dist`` returns a distribution
            (``ProbabilisticActor`` with ``Normal``/``IndependentNormal``, ``TanhNormal``,
            ``Categorical``/``OneHotCategorical``...). Only ``log_prob`` of the
            stored action is used, so fixed or learned scales both work.
        value_network: a ``ValueOperator`` writing ``state_value``.

    Keyword Args:
        temperature: ``beta`` of the paper, the Lagrange multiplier of the KL
            constraint: smaller means greedier weights. Must be > 0.
            Reference: 1.0 (on normalised advantages).
        max_weight: the weight clip ``w_max`` that bounds the variance of a
            single sample's gradient. Must be > 0. Reference: 20.
        normalize_advantage: standardise ``A`` over the batch (eps 1e-5) before
            weighting. The reference standardises over the whole buffer, which
            :func:`~awr_modules.refresh_value_targets` does; this flag is for
            pipelines that feed raw advantages.
        value_scale: ``s_v``; the value error is divided by it so step sizes do
            not depend on the return scale. The reference uses ``1 / (1 - gamma)``.
        action_bound_penalty: coefficient of the penalty on the Gaussian mean leaving the
            normalised action box ``[-1, 1]``. It applies to Gaussian actors (the reference's
            fixed-std policy) only: a positive value with another actor is an error. ``None``
            means the reference's setting for this actor: 10 for a Gaussian mean, else 0.
        entropy_coeff: coefficient of an entropy bonus (reference: 0).
        action_l2_coeff: coefficient of ``0.5 |theta(s)|^2`` on the distribution's action parameters
            ``theta`` (the Gaussian mean, or the logits of a categorical) -- the reference's
            ``action_l2_weight`` (0 by default; 0.001 for LunarLander).
        weighting: ``"loss"`` (the paper) multiplies the log-likelihood by ``w``;
            ``"sampling"`` means the replay buffer samples transitions with
            probability proportional to ``w`` (:attr:`samples_by_weight`,
            :meth:`sampling_priority`), so the per-sample weight is 1. The two never stack.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-sample losses, the batch shape).
        check_inputs: check keys and finiteness of the inputs before computing
            (one host sync per call). ``False`` leaves no data-dependent Python control flow,
            as ``torch.func.vmap``, ``torch.compile`` and CUDA graphs need.
        functional: hold the networks' parameters in ``actor_network_params`` /
            ``critic_network_params`` (TensorDicts of the same parameter tensors) and
            swap them into the networks on every call: TorchRL's default, which lets a
            caller pass other parameters (``vmap`` over stacked parameters). ``False``, as
            TorchRL's PPO option of that name, holds the networks as submodules and calls
            them as they are, without the per-call swap (a fixed cost per step, noticeable
            for small MLPs on a CPU).

    A penalty or bonus whose coefficient is 0 at construction is not computed at all (as PPO's
    ``entropy_bonus``); the coefficient of a term that is on can be changed at any time.

    Keys (renamable with :meth:`set_keys`, see :class:`AWRLoss._AcceptedKeys`): :attr:`in_keys`
    lists every key the loss may read; it writes ``td_error = |R - V(s)|`` into the input.

    Returns (from :meth:`forward`): a TensorDict with the :attr:`out_keys`: ``loss_actor``,
    ``loss_value`` and detached diagnostics ``weight_mean``, ``weight_max``,
    ``weight_clip_fraction``, ``weight_ess`` (effective sample size ``(sum w)^2 / (n sum w^2)``,
    a fraction), ``advantage_mean``, ``advantage_std``, ``log_prob_mean``, ``entropy`` and
    ``kl_behaviour`` (an estimate of ``KL(mu || pi) = E_mu[log mu(a|s) - log pi(a|s)]`` from the
    stored behaviour log-prob; nan when the batch has none).

    Examples:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from tensordict.nn import NormalParamExtractor, TensorDictModule
        >>> from torchrl.modules import MLP, ProbabilisticActor, TanhNormal, ValueOperator
        >>> from awr_modules import AWRLoss
        >>> net = torch.nn.Sequential(MLP(in_features=3, out_features=2), NormalParamExtractor())
        >>> actor = ProbabilisticActor(
        ...     TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
        ...     in_keys=["loc", "scale"], distribution_class=TanhNormal)
        >>> critic = ValueOperator(MLP(in_features=3, out_features=1), in_keys=["observation"])
        >>> loss = AWRLoss(actor, critic, temperature=1.0, max_weight=20.0)
        >>> batch = TensorDict({"observation": torch.randn(8, 3), "action": torch.rand(8, 1) - 0.5,
        ...     "advantage": torch.randn(8, 1), "value_target": torch.randn(8, 1)}, [8])
        >>> out = loss(batch)
        >>> (out["loss_actor"] + out["loss_value"]).backward()
        >>> loss_actor, loss_value, *diagnostics = loss(
        ...     observation=torch.randn(8, 3), action=torch.rand(8, 1) - 0.5,
        ...     advantage=torch.randn(8, 1), value_target=torch.randn(8, 1))
    """

    @dataclass
    class _AcceptedKeys:
        """Every TensorDict key the loss reads or writes; rename with ``loss.set_keys(name=key)``.

        Attributes:
            action: the stored behaviour action ``a`` whose log-likelihood is weighted.
            advantage: ``A = R - V(s)``; read if present, else written by the value estimator.
            value_target: the return ``R`` the critic regresses to.
            value: where the critic writes ``V(s)``.
            sample_log_prob: ``log mu(a|s)`` stored at collection, for the KL diagnostic
                (``"action_log_prob"`` or ``"sample_log_prob"``, as tensordict names the actor's log-prob).
            priority: where ``|R - V(s)|`` is written for a prioritized replay buffer.
            priority_weight: importance weights written by a prioritized sampler.
            reward: reward (under ``"next"``) for the value estimator.
            done: end of trajectory (under ``"next"``) for the value estimator.
            terminated: termination without bootstrap (under ``"next"``).
        """

        action: NestedKey = "action"
        advantage: NestedKey = "advantage"
        value_target: NestedKey = "value_target"
        value: NestedKey = "state_value"
        sample_log_prob: NestedKey | None = None
        priority: NestedKey = "td_error"
        priority_weight: NestedKey = "priority_weight"
        reward: NestedKey = "reward"
        done: NestedKey = "done"
        terminated: NestedKey = "terminated"

        def __post_init__(self) -> None:
            if self.sample_log_prob is None:  # follow tensordict's naming of the actor's log-prob, as TorchRL does
                aggregate = composite_lp_aggregate(nowarn=True)
                self.sample_log_prob = "sample_log_prob" if aggregate else "action_log_prob"

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys
    default_value_estimator = ValueEstimators.TDLambda
    SUPPORTED_VALUE_ESTIMATORS = tuple(_BUILTIN_ESTIMATORS)
    _schedulable_buffers = frozenset(
        {"temperature", "max_weight", "value_scale", "action_bound_penalty", "entropy_coeff", "action_l2_coeff"})
    DIAGNOSTICS = ("weight_mean", "weight_max", "weight_clip_fraction", "weight_ess", "advantage_mean",
                   "advantage_std", "log_prob_mean", "entropy", "kl_behaviour")

    actor_network: ProbabilisticTensorDictSequential
    critic_network: TensorDictModule
    actor_network_params: TensorDictParams | None  # None with functional=False
    critic_network_params: TensorDictParams | None
    target_actor_network_params: TensorDictParams | None
    target_critic_network_params: TensorDictParams | None

    def __init__(
        self,
        actor_network: ProbabilisticTensorDictSequential,
        value_network: TensorDictModule,
        *,
        temperature: float = 1.0,
        max_weight: float = 20.0,
        normalize_advantage: bool = False,
        value_scale: float = 1.0,
        action_bound_penalty: float | None = 0.0,
        entropy_coeff: float = 0.0,
        action_l2_coeff: float = 0.0,
        weighting: Literal["loss", "sampling"] = "loss",
        reduction: Literal["mean", "sum", "none"] = "mean",
        check_inputs: bool = True,
        functional: bool = True,
    ) -> None:
        action_bound_penalty = self._resolve_bound_penalty(actor_network, action_bound_penalty)
        for name, value in (("temperature", temperature), ("max_weight", max_weight), ("value_scale", value_scale)):
            if not value > 0:
                raise ValueError(f"AWRLoss: {name} must be > 0, got {value}.")
        for name, value in (("action_bound_penalty", action_bound_penalty), ("entropy_coeff", entropy_coeff),
                            ("action_l2_coeff", action_l2_coeff)):
            if value < 0:
                raise ValueError(f"AWRLoss: {name} must be >= 0, got {value}.")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"AWRLoss: reduction must be one of {_REDUCTIONS}, got {reduction!r}.")
        if weighting not in _WEIGHTINGS:
            raise ValueError(f"AWRLoss: weighting must be one of {_WEIGHTINGS}, got {weighting!r}.")
        self._in_keys = self._out_keys = None
        super().__init__()
        self._functional = functional
        if functional:
            self.convert_to_functional(actor_network, "actor_network")
            self.convert_to_functional(value_network, "critic_network")
        else:
            self.actor_network, self.critic_network = actor_network, value_network
            self.actor_network_params = self.critic_network_params = None
            self.target_actor_network_params = self.target_critic_network_params = None
        for name, value in (("temperature", temperature), ("max_weight", max_weight), ("value_scale", value_scale),
                            ("action_bound_penalty", action_bound_penalty), ("entropy_coeff", entropy_coeff),
                            ("action_l2_coeff", action_l2_coeff)):
            self.register_coeff_buffer(name, float(value))
        # Python flags fixed at construction: branching on a buffer would sync the device and break graphs
        self._penalize_action_bound = action_bound_penalty > 0
        self._penalize_action_l2 = action_l2_coeff > 0
        self._entropy_bonus = entropy_coeff > 0
        if _distribution_class(actor_network) is TanhNormal:  # its entropy (a diagnostic) is a one-sample estimate
            self._vmap_randomness = "same"  # one draw shared by vmapped parameter sets
        self.normalize_advantage = normalize_advantage
        self._weighting = weighting
        self.reduction = reduction
        self.check_inputs = check_inputs

    @staticmethod
    def _resolve_bound_penalty(actor: ProbabilisticTensorDictSequential, penalty: float | None) -> float:
        """The one place that decides whether an actor takes the action-bound penalty."""
        gaussian = has_unbounded_gaussian_mean(actor)
        if penalty is None:
            return REFERENCE_ACTION_BOUND_PENALTY if gaussian else 0.0
        if penalty > 0 and not gaussian:
            raise ValueError(
                f"AWRLoss: action_bound_penalty needs a Gaussian actor (Normal/IndependentNormal) whose mean "
                f"can leave [-1, 1]; got {getattr(_distribution_class(actor), '__name__', type(actor).__name__)}. "
                f"Set action_bound_penalty=0 (or None for the reference's setting of each actor)."
            )
        return float(penalty)

    @property
    def functional(self) -> bool:
        """Whether the networks' parameters live in ``*_network_params`` and are swapped in per call."""
        return self._functional

    # ------------------------------------------------------------- variants
    @property
    def weighting(self) -> str:
        """``"loss"`` (``w`` multiplies the log-likelihood) or ``"sampling"`` (the buffer samples by ``w``)."""
        return self._weighting

    @property
    def samples_by_weight(self) -> bool:
        """Whether the replay buffer must draw transition ``i`` with probability ``w_i / sum_j w_j``
        (``alpha = 1``, no importance correction): ``weighting="sampling"``."""
        return self._weighting == "sampling"

    def sampling_priority(self, tensordict: TensorDictBase) -> torch.Tensor:
        """The priorities a buffer that samples by weight needs: ``w`` of the stored advantages."""
        return self.weights(tensordict.get(self.tensor_keys.advantage))

    # ----------------------------------------------------------------- keys
    @property
    def in_keys(self) -> list[NestedKey]:
        """Every key the loss may read, each once: targets, actions, the networks' inputs, and what the
        value estimator reads when the batch has no targets (``"next"`` entries)."""
        if self._in_keys is None:
            keys = self.tensor_keys
            candidates = [*self.in_keys_given_targets, keys.sample_log_prob, keys.priority_weight,
                          ("next", keys.reward), ("next", keys.done), ("next", keys.terminated),
                          *[("next", key) for key in self.critic_network.in_keys]]
            self._in_keys = list(dict.fromkeys(candidates))
        return self._in_keys

    @in_keys.setter
    def in_keys(self, values: list[NestedKey] | None) -> None:
        self._in_keys = values

    @property
    def in_keys_given_targets(self) -> list[NestedKey]:
        """The keys the loss reads from a batch that carries ``advantage`` and ``value_target``."""
        keys = self.tensor_keys
        candidates = [keys.action, keys.advantage, keys.value_target, *self.actor_network.in_keys,
                      *self.critic_network.in_keys]
        return list(dict.fromkeys(candidates))

    @property
    def out_keys(self) -> list[str]:
        """``loss_actor``, ``loss_value`` and the diagnostics, in the order ``forward(**kwargs)`` returns them."""
        if self._out_keys is None:
            self._out_keys = ["loss_actor", "loss_value", *self.DIAGNOSTICS]
        return self._out_keys

    @out_keys.setter
    def out_keys(self, values: list[str]) -> None:
        self._out_keys = values

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        """Pass the renamed keys on to the value estimator; other keys it has stay as they are."""
        renamed = {name: getattr(self.tensor_keys, name) for name in kwargs if name in _ESTIMATOR_KEYS}
        if self._value_estimator is not None and renamed:
            self._value_estimator.set_keys(**renamed)
        self._in_keys = None

    # ------------------------------------------------------- value estimator
    def make_value_estimator(
        self, value_type: ValueEstimators | ValueEstimatorBase | type | None = None, **hyperparams
    ) -> AWRLoss:
        """Choose how ``advantage``/``value_target`` are computed when the batch lacks them.

        ``value_type`` is one of :attr:`SUPPORTED_VALUE_ESTIMATORS` (TD0, TD1, TDLambda -- the
        default, with the reference's gamma 0.99 and lambda 0.95 -- or GAE), built through
        TorchRL's estimator registry on this loss's critic; an estimator class such as
        :class:`~awr_modules.KStepReturnEstimator`, built with ``hyperparams`` on this loss's
        critic; or an estimator instance, used as it is: its keys are the user's and are
        not overwritten (the loss still reads its own ``advantage``/``value_target`` keys).
        """
        if value_type is None:
            value_type = self.default_value_estimator
        if isinstance(value_type, ValueEstimatorBase):
            LossModule.make_value_estimator(self, value_type)
            self._in_keys = None
            return self
        if isinstance(value_type, type) and issubclass(value_type, ValueEstimatorBase):
            LossModule.make_value_estimator(self, value_type, **{"value_network": self.critic_network, **hyperparams})
        elif dispatch_value_estimator is not None:
            dispatch_value_estimator(self, value_type, supported=self.SUPPORTED_VALUE_ESTIMATORS, **hyperparams)
        elif value_type in _BUILTIN_ESTIMATORS:  # torchrl 0.12 has no estimator registry
            kwargs = {**default_value_kwargs(value_type), **hyperparams}
            self._value_estimator = _BUILTIN_ESTIMATORS[value_type](value_network=self.critic_network, **kwargs)
            self.value_type = value_type
        else:
            raise NotImplementedError(
                f"AWRLoss: value estimator {value_type!r} is not supported; use one of "
                f"{[v.name for v in self.SUPPORTED_VALUE_ESTIMATORS]}, KStepReturnEstimator, or an estimator instance."
            )
        self._value_estimator.set_keys(**{name: getattr(self.tensor_keys, name) for name in _ESTIMATOR_KEYS})
        self._in_keys = None
        return self

    # ----------------------------------------------------------------- math
    def weights(self, advantage: torch.Tensor) -> torch.Tensor:
        """AWR weights ``w = min(exp(A / temperature), max_weight)`` in float32, without gradient.

        Written as ``exp(min(A / beta, log w_max))`` so that large advantages never overflow.
        """
        scaled = advantage.detach().float() / self.temperature
        return torch.exp(torch.clamp(scaled, max=torch.log(self.max_weight)))

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Compute ``loss_actor``, ``loss_value`` and diagnostics for a batch of transitions."""
        prepared = self._prepare(tensordict)  # checks and targets once for both losses
        out = self._actor_loss(tensordict, *prepared)
        out.update(self._value_loss(tensordict, *prepared))
        self._clear_weakrefs(tensordict, out, *_NETWORK_PARAMS)
        return out

    def actor_loss(self, tensordict: TensorDictBase) -> TensorDictBase:
        """``loss_actor = -mean(w log pi(a|s))`` (+ penalties, - entropy bonus) and the diagnostics.

        Runs only the actor: the policy phase of an AWR iteration calls this alone.
        """
        out = self._actor_loss(tensordict, *self._prepare(tensordict))
        self._clear_weakrefs(tensordict, out, *_NETWORK_PARAMS)
        return out

    def value_loss(self, tensordict: TensorDictBase) -> TensorDictBase:
        """``loss_value = 0.5 mean(((V(s) - R) / s_v)^2)``; writes ``|R - V(s)|`` as the priority.

        Runs only the critic: the value phase of an AWR iteration calls this alone.
        """
        out = self._value_loss(tensordict, *self._prepare(tensordict))
        self._clear_weakrefs(tensordict, out, *_NETWORK_PARAMS)
        return out

    def _prepare(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                             torch.Tensor | None]:
        """Advantage and value target as ``[*B]`` float32, the importance weights and the validity mask."""
        if self.check_inputs:
            self.check_batch(tensordict)
        advantage, value_target = self._advantage_and_target(tensordict)
        priority_weight = self._maybe_get_priority_weight(tensordict)
        if priority_weight is not None:
            priority_weight = priority_weight.reshape(tensordict.batch_size).float()
        return advantage, value_target, priority_weight, self._valid_mask(tensordict)

    def _valid_mask(self, tensordict: TensorDictBase) -> torch.Tensor | None:
        """The rows TorchRL's validity masks keep (``None``: all), for diagnostics and standardisation."""
        valid = None
        for key in self._loss_mask_keys():
            found = tensordict.get(key, None)
            if found is not None:
                found = found.reshape(tensordict.batch_size)
                valid = found if valid is None else valid & found
        return valid

    def _advantage_and_target(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.tensor_keys
        if keys.advantage not in tensordict.keys(True) or keys.value_target not in tensordict.keys(True):
            self._check_trajectory_inputs(tensordict)
            with float32_context(tensordict.device), torch.no_grad():
                params = self.critic_network_params.detach() if self.functional else None
                self.value_estimator(tensordict, params=params)
        return (self._per_sample(tensordict, keys.advantage).float(),
                self._per_sample(tensordict, keys.value_target).float())

    @staticmethod
    def _per_sample(tensordict: TensorDictBase, key: NestedKey) -> torch.Tensor:
        """Read a per-transition scalar stored as ``[*B]`` or ``[*B, 1]`` and return it as ``[*B]``."""
        value = tensordict.get(key)
        batch = tensordict.batch_size
        if value.shape == batch + (1,):
            value = value.squeeze(-1)
        if value.shape != batch:
            raise ValueError(
                f"AWRLoss: {key!r} has shape {tuple(value.shape)}; expected {tuple(batch)} or "
                f"{tuple(batch) + (1,)} (one value per transition of the batch)."
            )
        return value

    def _actor_loss(self, tensordict: TensorDictBase, advantage: torch.Tensor, value_target: torch.Tensor,
                    priority_weight: torch.Tensor | None, valid: torch.Tensor | None) -> TensorDictBase:
        keys = self.tensor_keys
        batch_dims = tensordict.batch_dims
        if self.normalize_advantage:
            advantage = standardize_advantage(advantage, valid)
        weight = self.weights(advantage)

        with _parameters_in(self.actor_network_params, self.actor_network):
            dist = self.actor_network.get_dist(tensordict)
        log_prob = _per_transition(dist.log_prob(tensordict.get(keys.action)), batch_dims)
        if self.check_inputs:
            self._check_finite(log_prob, "log pi(a|s) of the stored action (is the action inside the support?)")
        entropy = _per_transition(_entropy(dist), batch_dims)

        sample_weight = torch.ones_like(weight) if self.samples_by_weight else weight
        loss_actor = -sample_weight * log_prob + self._regularization(dist, entropy, batch_dims)
        if priority_weight is not None:
            loss_actor = loss_actor * priority_weight
        out = TensorDict({"loss_actor": self._reduce_loss(loss_actor, tensordict)}, batch_size=[])
        out.update(self._diagnostics(tensordict, weight, advantage, log_prob, entropy, valid))
        return out

    def _regularization(self, dist: d.Distribution, entropy: torch.Tensor, batch_dims: int) -> torch.Tensor:
        """The actor's penalties and bonus per transition: bound penalty + action L2 - entropy bonus."""
        terms = torch.zeros_like(entropy)
        if self._penalize_action_bound:
            mean = _base(dist).loc
            excursion = mean - mean.clamp(-1.0, 1.0)
            terms = terms + self.action_bound_penalty * _per_transition(0.5 * excursion.pow(2), batch_dims)
        if self._penalize_action_l2:
            terms = terms + self.action_l2_coeff * _per_transition(0.5 * self._action_parameters(dist).pow(2),
                                                                   batch_dims)
        if self._entropy_bonus:
            terms = terms - self.entropy_coeff * entropy
        return terms

    @staticmethod
    def _action_parameters(dist: d.Distribution) -> torch.Tensor:
        """The Gaussian mean, or centred categorical logits.

        A categorical only keeps normalised logits; centred ones (the logits up to the constant
        that does not change the policy) stand in for the network's raw logits.
        """
        base = _base(dist)
        if isinstance(base, (d.Categorical, d.OneHotCategorical)):
            return base.logits - base.logits.mean(-1, keepdim=True)
        return base.loc

    def _value_loss(self, tensordict: TensorDictBase, advantage: torch.Tensor, value_target: torch.Tensor,
                    priority_weight: torch.Tensor | None, valid: torch.Tensor | None) -> TensorDictBase:
        keys = self.tensor_keys
        with _parameters_in(self.critic_network_params, self.critic_network):
            value = self.critic_network(tensordict.select(*self.critic_network.in_keys, strict=False)).get(keys.value)
        value = value.reshape(tensordict.batch_size).float()
        value_error = value - value_target
        loss_value = 0.5 * (value_error / self.value_scale).pow(2)
        tensordict.set(keys.priority, value_error.detach().abs())
        if priority_weight is not None:
            loss_value = loss_value * priority_weight
        return TensorDict({"loss_value": self._reduce_loss(loss_value, tensordict)}, batch_size=[])

    def _diagnostics(self, tensordict: TensorDictBase, weight: torch.Tensor, advantage: torch.Tensor,
                     log_prob: torch.Tensor, entropy: torch.Tensor,
                     valid: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Detached summaries of the batch's valid rows (the ``DIAGNOSTICS`` of :attr:`out_keys`)."""
        weight, advantage, log_prob = weight.detach(), advantage.detach(), log_prob.detach()
        weight_mean = _masked_mean(weight, valid)
        advantage_mean, advantage_std = mean_and_std(advantage, valid)
        behaviour_log_prob = tensordict.get(self.tensor_keys.sample_log_prob, None)
        if behaviour_log_prob is None:
            kl_behaviour = torch.full_like(weight_mean, float("nan"))
        else:
            kl_behaviour = _masked_mean(behaviour_log_prob.reshape(log_prob.shape).float() - log_prob, valid)
        clipped = (weight >= self.max_weight * (1 - 1e-6)).float()
        return {
            "weight_mean": weight_mean,
            "weight_max": (weight if valid is None else torch.where(valid, weight, torch.zeros_like(weight))).max(),
            "weight_clip_fraction": _masked_mean(clipped, valid),
            "weight_ess": weight_mean.pow(2) / _masked_mean(weight.pow(2), valid),  # (sum w)^2 / (n sum w^2)
            "advantage_mean": advantage_mean,
            "advantage_std": advantage_std,
            "log_prob_mean": _masked_mean(log_prob, valid),
            "entropy": _masked_mean(entropy.detach(), valid),
            "kl_behaviour": kl_behaviour,
        }

    # --------------------------------------------------------------- checks
    def check_batch(self, tensordict: TensorDictBase) -> None:
        """Raise a clear error if ``tensordict`` lacks a key the loss reads or holds non-finite advantages
        or behaviour log-probs.

        What ``check_inputs=True`` runs on every call; a training loop that draws its minibatches
        from one refreshed buffer can instead check the whole buffer once (one host sync) and
        construct the loss with ``check_inputs=False``.
        """
        present = tensordict.keys(True)
        needed = [self.tensor_keys.action, *self.actor_network.in_keys, *self.critic_network.in_keys]
        missing = [key for key in dict.fromkeys(needed) if key not in present]
        if missing:
            raise KeyError(
                f"AWRLoss: the batch lacks {missing}; it has {sorted(map(str, present))}. "
                f"Rename keys with loss.set_keys(...) or fix the networks' in_keys."
            )
        for key in (self.tensor_keys.advantage, self.tensor_keys.sample_log_prob):
            if key in present:
                self._check_finite(tensordict.get(key), repr(key))

    def _check_trajectory_inputs(self, tensordict: TensorDictBase) -> None:
        keys = self.tensor_keys
        needed = [("next", keys.reward), ("next", keys.done), ("next", keys.terminated)]
        missing = [key for key in needed if key not in tensordict.keys(True)]
        if missing:
            raise KeyError(
                f"AWRLoss: the batch has no {keys.advantage!r}/{keys.value_target!r}, so the value estimator "
                f"must compute them, but it lacks {missing}. Pass trajectory-shaped data [*B, T] with 'next', "
                f"or refresh targets over the buffer with awr_modules.refresh_value_targets first."
            )
        if self.check_inputs:
            self._check_finite(tensordict.get(("next", keys.reward)), repr(("next", keys.reward)))

    @staticmethod
    def _check_finite(value: torch.Tensor, what: str) -> None:
        if not torch.isfinite(value).all():
            bad = (~torch.isfinite(value)).sum().item()
            raise ValueError(f"AWRLoss: {what} has {bad} non-finite entries (nan or inf) out of {value.numel()}.")

