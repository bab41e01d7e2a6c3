"""The AWR loss as a TorchRL ``LossModule``.

Advantage-Weighted Regression (Peng, Kumar, Zhang, Levine, 2019) maximises
``E_{s~d_mu}[E_{a~pi} A_mu(s, a)] - alpha KL(pi || mu)``. Its solution is
``pi*(a|s) ~ mu(a|s) exp(A(s, a) / beta)``; projecting it onto the policy class
gives a weighted maximum-likelihood regression on replay data (paper, Eq. 10):

    max_pi E_{(s,a)~D}[ log pi(a|s) * min(exp(A(s, a) / beta), max_weight) ]

and the critic regresses the return (Eq. 9): ``min_V E[(R - V(s))^2]``.
"""

from __future__ import annotations

from typing import Literal

import torch
from tensordict import TensorDictBase, TensorDictParams
from tensordict.nn import (
    ProbabilisticTensorDictSequential,
    TensorDictModule,
    dispatch,
)
from torchrl.modules import TanhNormal
from torchrl.objectives import LossModule
from torchrl.objectives.utils import ValueEstimators

from awr_modules._torchrl_compat import (
    LossModuleFallbacks,
    actor_distribution,
    critic_value,
    direct_call,
    direct_distribution,
    unchecked_tensordict,
    validity_mask,
)
from awr_modules.batch_checks import check_finite, check_keys_and_values, check_trajectory_inputs, per_sample
from awr_modules.diagnostics import batch_diagnostics
from awr_modules.distributions import (
    action_bound_penalty_for,
    closed_form_or_sampled_entropy,
    distribution_class,
    log_prob_per_transition,
    penalized,
    per_transition,
)
from awr_modules.loss_conventions import AcceptedKeys, AWRLossConventions
from awr_modules.precision import float32_context
from awr_modules.value_targets import standardize_advantage

_WEIGHTINGS = ("loss", "sampling", "uniform")
_REDUCTIONS = ("mean", "sum", "none")
_NETWORK_PARAMS = ("actor_network_params", "critic_network_params",
                   "target_actor_network_params", "target_critic_network_params")


class AWRLoss(AWRLossConventions, LossModule, LossModuleFallbacks):
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
        actor_network: a TorchRL actor whose ``get_dist`` returns a distribution (Normal,
            IndependentNormal, TanhNormal, Categorical, OneHotCategorical; fixed or learned scale).
        value_network: a ``ValueOperator`` writing ``state_value``.

    Keyword Args:
        temperature: ``beta``, the Lagrange multiplier of the KL constraint: smaller means greedier
            weights. Reference: 1.0 (on normalised advantages).
        max_weight: the weight clip ``w_max``, which bounds one sample's gradient. Reference: 20.
        normalize_advantage: standardise ``A`` over the batch before weighting, for pipelines
            that feed raw advantages (the reference standardises over the whole buffer, as
            :func:`~awr_modules.refresh_value_targets` does).
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
            ``"uniform"``: weight 1 everywhere, uniform sampling: behaviour cloning with the same
            loss, the baseline AWR's weighting has to beat (the limit ``beta -> inf``).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-sample losses, the batch shape).
        check_inputs: check keys and finiteness of the inputs before computing
            (one host sync per call). ``False`` leaves no data-dependent Python control flow,
            as ``torch.func.vmap``, ``torch.compile`` and CUDA graphs need.
        functional: TorchRL's default: the parameters live in ``actor_network_params`` /
            ``critic_network_params`` and are swapped into the networks on every call, so a
            caller can pass others (``vmap`` over stacked parameters). ``False`` (as PPO's option)
            calls the networks as they are, without that per-call cost.
        diagnostics: compute and return the :attr:`DIAGNOSTICS` (only those :attr:`out_keys` names, see
            ``select_out_keys``). An attribute: a loop that logs every n-th step sets it for that step.

    An eager loop of one's own that neither checks nor logs every step is fastest with ``functional=False,
    check_inputs=False, diagnostics=False`` (``benchmarks/step_overhead.py``). Plain TorchRL networks are
    called on the batch's tensors (:class:`~awr_modules._torchrl_compat.DirectCall`): their outputs
    (``loc``, ``state_value``) are not written into the batch.

    A penalty or bonus whose coefficient is 0 at construction is not computed at all (as PPO's
    ``entropy_bonus``); the coefficient of a term that is on can be changed at any time.

    Keys (renamable with :meth:`set_keys`, see :class:`AWRLoss._AcceptedKeys`): :attr:`in_keys`
    lists every key the loss may read; it writes ``td_error = |R - V(s)|`` into the input.

    Returns (from :meth:`forward`): a TensorDict with the :attr:`out_keys`: ``loss_actor``,
    ``loss_value`` and the detached :attr:`DIAGNOSTICS` (:mod:`awr_modules.diagnostics`).

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

    _AcceptedKeys = AcceptedKeys
    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys
    default_value_estimator = ValueEstimators.TDLambda
    SUPPORTED_VALUE_ESTIMATORS = (ValueEstimators.TD0, ValueEstimators.TD1, ValueEstimators.TDLambda,
                                  ValueEstimators.GAE, ValueEstimators.VTrace)
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
        weighting: Literal["loss", "sampling", "uniform"] = "loss",
        reduction: Literal["mean", "sum", "none"] = "mean",
        check_inputs: bool = True,
        functional: bool = True,
        diagnostics: bool = True,
    ) -> None:
        action_bound_penalty = action_bound_penalty_for(actor_network, action_bound_penalty)
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
        self._direct_actor = direct_distribution(self.actor_network)  # None: called through TensorDict
        self._direct_critic = direct_call(self.critic_network)
        for name, value in (("temperature", temperature), ("max_weight", max_weight), ("value_scale", value_scale),
                            ("action_bound_penalty", action_bound_penalty), ("entropy_coeff", entropy_coeff),
                            ("action_l2_coeff", action_l2_coeff)):
            self.register_coeff_buffer(name, float(value))
        # Python flags fixed at construction: branching on a buffer would sync the device and break graphs
        self._penalize_action_bound = action_bound_penalty > 0
        self._penalize_action_l2 = action_l2_coeff > 0
        self._entropy_bonus = entropy_coeff > 0
        if distribution_class(actor_network) is TanhNormal:  # its entropy (a diagnostic) is a one-sample estimate
            self._vmap_randomness = "same"  # one draw shared by vmapped parameter sets
        self.normalize_advantage = normalize_advantage
        self._weighting = weighting
        self.reduction = reduction
        self.check_inputs = check_inputs
        self.diagnostics = diagnostics

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

    @property
    def weighs_by_advantage(self) -> bool:
        """Whether samples count by their AWR weight (in the loss or in sampling): ``False`` for behaviour cloning
        (``weighting="uniform"``), which has no temperature."""
        return self._weighting != "uniform"

    @property
    def entropy_bonus(self) -> bool:
        """Whether the actor loss subtracts ``entropy_coeff * H(pi(.|s))``: on when built with ``entropy_coeff > 0``,
        or turned on by a part that tunes the coefficient (:mod:`awr_modules.entropy`). A Python flag: set it before
        the loss is compiled or captured."""
        return self._entropy_bonus

    @entropy_bonus.setter
    def entropy_bonus(self, on: bool) -> None:
        self._entropy_bonus = bool(on)

    def sampling_priority(self, tensordict: TensorDictBase) -> torch.Tensor:
        """The priorities a buffer that samples by weight needs: ``w`` of the stored advantages."""
        return self.weights(tensordict.get(self.tensor_keys.advantage))

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
        return self._output(tensordict, out)

    def actor_loss(self, tensordict: TensorDictBase) -> TensorDictBase:
        """``loss_actor = -mean(w log pi(a|s))`` (+ penalties, - entropy bonus) and the diagnostics.

        Runs only the actor: the policy phase of an AWR iteration calls this alone.
        """
        return self._output(tensordict, self._actor_loss(tensordict, *self._prepare(tensordict)))

    def value_loss(self, tensordict: TensorDictBase) -> TensorDictBase:
        """``loss_value = 0.5 mean(((V(s) - R) / s_v)^2)``; writes ``|R - V(s)|`` as the priority.

        Runs only the critic: the value phase of an AWR iteration calls this alone.
        """
        return self._output(tensordict, self._value_loss(tensordict, *self._prepare(tensordict)))

    def _output(self, tensordict: TensorDictBase, entries: dict[str, torch.Tensor]) -> TensorDictBase:
        """One TensorDict of the losses and diagnostics, built once."""
        out = unchecked_tensordict(entries, torch.Size([]))
        self._clear_weakrefs(tensordict, out, *_NETWORK_PARAMS)
        return out

    def _prepare(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                             torch.Tensor | None]:
        """Advantage and value target as ``[*B]`` float32, the importance weights and the validity mask.

        Rows a validity mask drops get advantage 0, value target 0 and importance weight 0: whatever a
        padded row holds (nan included), its loss is selected away and its gradient stays finite. Its
        observation and action must still be finite (TorchRL pads with zeros). Without a mask here, the
        reductions do not look for one again.
        """
        if self.check_inputs:
            self.check_batch(tensordict)
        advantage, value_target = self._advantage_and_target(tensordict)
        priority_weight = self._maybe_get_priority_weight(tensordict)
        if priority_weight is not None:
            priority_weight = priority_weight.reshape(tensordict.batch_size).float()
        valid = validity_mask(tensordict, self._loss_mask_keys(), tensordict.batch_size)
        if valid is not None:
            advantage, value_target = (torch.where(valid, x, torch.zeros_like(x)) for x in (advantage, value_target))
            if priority_weight is not None:
                priority_weight = torch.where(valid, priority_weight, torch.zeros_like(priority_weight))
        return advantage, value_target, priority_weight, valid

    def _advantage_and_target(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.tensor_keys
        advantage, value_target = tensordict.get(keys.advantage, None), tensordict.get(keys.value_target, None)
        if advantage is None or value_target is None:
            keys_needed = [("next", keys.reward), ("next", keys.done), ("next", keys.terminated)]
            check_trajectory_inputs(tensordict, keys_needed, keys.advantage, keys.value_target,
                                    check_values=self.check_inputs)
            with float32_context(tensordict.device), torch.no_grad():
                params = self.critic_network_params.detach() if self.functional else None
                self.value_estimator(tensordict, params=params)
            advantage, value_target = tensordict.get(keys.advantage), tensordict.get(keys.value_target)
        batch_size = tensordict.batch_size
        return (per_sample(advantage, batch_size, keys.advantage).float(),
                per_sample(value_target, batch_size, keys.value_target).float())

    def _actor_loss(self, tensordict: TensorDictBase, advantage: torch.Tensor, value_target: torch.Tensor,
                    priority_weight: torch.Tensor | None, valid: torch.Tensor | None) -> dict[str, torch.Tensor]:
        keys = self.tensor_keys
        batch_dims = tensordict.batch_dims
        if self.normalize_advantage:
            advantage = standardize_advantage(advantage, valid)
        weight = self.weights(advantage)

        dist = actor_distribution(self.actor_network, self.actor_network_params, self._direct_actor, tensordict)
        log_prob = log_prob_per_transition(dist, tensordict.get(keys.action), batch_dims)
        if self.check_inputs:
            check_finite(log_prob, "log pi(a|s) of the stored action (is the action inside the support?)")
        diagnostics = [key for key in self.out_keys if key in self.DIAGNOSTICS]
        entropy = None
        if self._entropy_bonus or diagnostics:
            entropy = per_transition(closed_form_or_sampled_entropy(dist), batch_dims)

        unweighted = self._weighting in ("sampling", "uniform")  # drawn by weight, or behaviour cloning
        loss_actor = penalized(log_prob if unweighted else weight * log_prob, dist, batch_dims,
                               self.action_bound_penalty if self._penalize_action_bound else None,
                               self.action_l2_coeff if self._penalize_action_l2 else None)
        if self._entropy_bonus:
            loss_actor = loss_actor - self.entropy_coeff * entropy
        if priority_weight is not None:
            loss_actor = loss_actor * priority_weight
        out = {"loss_actor": self._reduce_loss(loss_actor, tensordict if valid is not None else None)}
        if diagnostics:
            behaviour_log_prob = tensordict.get(keys.sample_log_prob, None)
            summaries = batch_diagnostics(weight, advantage, log_prob, entropy, behaviour_log_prob, self.max_weight,
                                          valid)
            out.update((key, summaries[key]) for key in diagnostics)
        return out

    def _value_loss(self, tensordict: TensorDictBase, advantage: torch.Tensor, value_target: torch.Tensor,
                    priority_weight: torch.Tensor | None, valid: torch.Tensor | None) -> dict[str, torch.Tensor]:
        keys = self.tensor_keys
        value = critic_value(self.critic_network, self.critic_network_params, self._direct_critic, tensordict, keys.value)
        value = value.reshape(tensordict.batch_size).float()
        value_error = value - value_target
        loss_value = 0.5 * (value_error / self.value_scale).pow(2)
        tensordict.set(keys.priority, value_error.detach().abs())
        if priority_weight is not None:
            loss_value = loss_value * priority_weight
        return {"loss_value": self._reduce_loss(loss_value, tensordict if valid is not None else None)}

    # --------------------------------------------------------------- checks
    def check_batch(self, tensordict: TensorDictBase) -> None:
        """Raise a clear error if ``tensordict`` lacks a key the loss reads or holds non-finite advantages
        or behaviour log-probs.

        What ``check_inputs=True`` runs on every call; a training loop that draws its minibatches
        from one refreshed buffer can instead check the whole buffer once (one host sync) and
        construct the loss with ``check_inputs=False``.
        """
        keys = self.tensor_keys
        check_keys_and_values(tensordict, [keys.action, *self.actor_network.in_keys, *self.critic_network.in_keys],
                              finite=[keys.advantage, keys.sample_log_prob])
