"""The Q critic targets part: AWR's advantage from twin Q networks trained off-policy (the AWAC / CRR family).

AWR's own critic regresses ``V(s)`` to returns recomputed over the stored paths, the value of the mixture of
policies that filled the buffer. A Q critic instead learns ``Q(s, a)`` of the *current* policy by TD on
single transitions, so the buffer may hold far older data, and the advantage of a stored action is
``A(s, a) = Q(s, a) - V_pi(s)``, with ``V_pi`` taken under the current policy (Nair et al., 2020, AWAC;
Wang et al., 2020, CRR).

- :class:`TwinQLoss`: a TorchRL ``LossModule``, the TD loss of twin Q networks against soft target copies
  (usable outside this project, with TorchRL's ``SoftUpdate``).
- :class:`QCritic`: the targets part (``--model.targets=awr_modules.q_critic.QCritic``): its recipe builds the
  Q networks (``Recipe.make_q_networks``), the value phase steps them on :class:`TwinQLoss` with a
  ``SoftUpdate`` after each optimizer step, and step 5 writes ``A = Q(s, a) - V_pi(s)`` for every stored row.
- :class:`LeafwiseSoftUpdate`: TorchRL's ``SoftUpdate``, stepped tensor by tensor (the same update, cheaper).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from tensordict.nn import ProbabilisticTensorDictSequential, TensorDictModuleBase
from tensordict.utils import NestedKey
from torch import nn
from torchrl.data import ReplayBuffer
from torchrl.objectives import LossModule, SoftUpdate

from awr_modules._torchrl_compat import DirectCall, actor_distribution, critic_value, direct_call, direct_distribution
from awr_modules.batch_checks import check_finite
from awr_modules.phases import OwnValuePhase
from awr_modules.precision import float32_context
from awr_modules.targets import ValueTargets
from awr_modules.value_targets import standardize_stored_advantages

Q_NETWORKS = "qvalue_network"  # TorchRL's naming: qvalue_network_params, target_qvalue_network_params


def _at_least_float32(values: torch.Tensor) -> torch.Tensor:
    """``values`` in float32 or wider: half-precision outputs of mixed precision are not averaged or regressed."""
    return values.to(torch.promote_types(values.dtype, torch.float32))


class _NetworkCall(nn.Module):
    """A Q network's output tensor for a tensordict of states (``critic_value``), as a module whose parameters
    ``torch.func.functional_call`` can swap (the target copies')."""

    def __init__(self, network: TensorDictModuleBase, direct: DirectCall | None) -> None:
        super().__init__()
        self.network = network
        self.direct = direct

    def forward(self, states: TensorDictBase) -> torch.Tensor:
        return critic_value(self.network, None, self.direct, states, self.network.out_keys[0])


class TwinQLoss(LossModule):
    r"""TD loss of ``n`` independent Q networks (twins for ``n = 2``) with soft target copies, off-policy.

    For a minibatch of transitions ``(s, a, r, s', terminated)`` and the actor ``pi``:

    .. math::

        y &= r + \gamma\,(1 - \mathrm{terminated})\,V_{target}(s'), \qquad
        V_{target}(s') = \mathbb{E}_{a' \sim \pi(\cdot|s')}\big[\min_i Q^{target}_i(s', a')\big] \\
        \mathcal{L} &= \sum_i \tfrac12 \operatorname{mean}\big(((Q_i(s, a) - y) / s_v)^2\big)

    Continuous actions: ``V_target`` is the mean over ``policy_samples`` actions drawn from ``pi(.|s')``;
    discrete (one-hot) actions: the exact ``sum_a pi(a|s') min_i Q^target_i(s', a)``. A time-limit cut
    bootstraps (only ``terminated`` stops it). ``s_v`` (``value_scale``) divides the error as ``AWRLoss`` does
    for ``V``, so the critic's step sizes fit any return scale.

    The target parameters (``target_qvalue_network_params``, buffers) start as copies of the online ones and
    follow them by TorchRL's ``SoftUpdate(loss, tau=tau)``: ``target <- (1 - tau) target + tau online`` after
    each optimizer step. Only parameters have target copies: a module without parameters (an observation
    normaliser whose statistics are kept outside the optimiser) is the same for online and target networks.
    The networks are called as they are (``functional`` is ``False``); the actor is read, never trained.

    Args:
        qvalue_networks: ``ValueOperator`` s writing ``state_action_value`` ``[*B, 1]`` from the state and
            ``action`` (continuous), or ``action_value`` ``[*B, actions]`` from the state (discrete).
        actor_network: the policy ``pi`` (a TorchRL ``ProbabilisticActor`` reading the state's keys).

    Keyword Args:
        gamma: discount, ``0 <= gamma < 1``.
        policy_samples: actions drawn per state for ``V_pi`` of continuous actions (``>= 1``).
        value_scale: ``s_v > 0``.

    Returns (from :meth:`forward`): ``loss_qvalue``, and the detached ``q_value`` (the mean of ``min_i Q_i(s, a)``)
    and ``td_target`` (the mean of ``y``).
    """

    @dataclass
    class _AcceptedKeys:
        """Keys the loss reads (renamable with ``set_keys``); states are read under the networks' ``in_keys``."""

        action: NestedKey = "action"
        reward: NestedKey = "reward"
        terminated: NestedKey = "terminated"
        state_action_value: NestedKey = "state_action_value"
        action_value: NestedKey = "action_value"

    default_keys = _AcceptedKeys
    tensor_keys: _AcceptedKeys

    def __init__(self, qvalue_networks: Sequence[TensorDictModuleBase],
                 actor_network: ProbabilisticTensorDictSequential, *, gamma: float = 0.99, policy_samples: int = 4,
                 value_scale: float = 1.0) -> None:
        networks = list(qvalue_networks)
        if not networks:
            raise ValueError("TwinQLoss: give at least one Q network.")
        if not 0 <= gamma < 1:
            raise ValueError(f"TwinQLoss: gamma must be in [0, 1), got {gamma}.")
        if policy_samples < 1:
            raise ValueError(f"TwinQLoss: policy_samples must be >= 1, got {policy_samples}.")
        if not value_scale > 0:
            raise ValueError(f"TwinQLoss: value_scale must be > 0, got {value_scale}.")
        super().__init__()
        self.qvalue_networks = nn.ModuleList(networks)
        self.__dict__["actor_network"] = actor_network  # read, not owned: its parameters stay the actor's
        self.discrete = networks[0].out_keys[0] == self.tensor_keys.action_value
        self.gamma, self.policy_samples = gamma, policy_samples
        self.register_buffer("value_scale", torch.tensor(float(value_scale)))
        online = self.qvalue_network_params
        self.target_qvalue_network_params = TensorDictParams(online.apply(lambda p: p.data.clone()), no_convert=True)
        self._has_update_associated[Q_NETWORKS] = False  # until a SoftUpdate takes it on
        # the networks called on states (not registered: their parameters are the networks')
        self.__dict__["_q_calls"] = [_NetworkCall(network, direct_call(network)) for network in networks]
        self._direct_actor = direct_distribution(actor_network)

    @property
    def functional(self) -> bool:
        return False

    @property
    def qvalue_network_params(self) -> TensorDictBase:
        """The online networks' parameters (the tensors themselves), keyed as the target copies: ``SoftUpdate``'s
        sources."""
        names = [tuple(name.split(".")) for name, _ in self.qvalue_networks.named_parameters()]
        return TensorDict.from_module(self.qvalue_networks).select(*names)

    @property
    def state_keys(self) -> list[NestedKey]:
        """The keys of a state that the Q networks and the actor read."""
        action = self.tensor_keys.action
        keys = [key for network in self.qvalue_networks for key in network.in_keys if key != action]
        return list(dict.fromkeys([*keys, *self.actor_network.in_keys]))

    @property
    def in_keys(self) -> list[NestedKey]:
        """Every key a minibatch must hold: ``s``, ``a``, ``r``, ``terminated`` and ``s'``."""
        keys = self.tensor_keys
        states = self.state_keys
        return [*states, keys.action, ("next", keys.reward), ("next", keys.terminated), *(("next", k) for k in states)]

    # ----------------------------------------------------------------- math
    def q_values(self, states: TensorDictBase, *, target: bool = False) -> torch.Tensor:
        """Each network's output, stacked: ``[n, *B, 1]`` (``Q(s, a)``) or ``[n, *B, actions]`` (discrete)."""
        values = []
        for i, call in enumerate(self.__dict__["_q_calls"]):
            if target:  # functional_call, not TensorDictParams.to_module: it also traces inside fused steps' graph
                weights = {".".join(("network", *key)): value
                           for key, value in self.target_qvalue_network_params.get(str(i)).items(True, True)}
                values.append(torch.func.functional_call(call, weights, (states,), strict=False))
            else:
                values.append(call(states))
        return torch.stack(values)

    def stored_action_values(self, tensordict: TensorDictBase, *, target: bool = False) -> torch.Tensor:
        """``Q_i(s, a)`` of the batch's actions, ``[n, *B]``."""
        values = _at_least_float32(self.q_values(tensordict, target=target))
        if self.discrete:
            return (values * tensordict.get(self.tensor_keys.action).to(values.dtype)).sum(-1)
        return values.squeeze(-1)

    def policy_value(self, states: TensorDictBase, *, target: bool = False) -> torch.Tensor:
        """``V_pi(s) = E_{a~pi(.|s)}[min_i Q_i(s, a)]`` ``[*B]``: exact over the actions (discrete), else the mean
        over ``policy_samples`` drawn actions."""
        dist = actor_distribution(self.actor_network, None, self._direct_actor, states)
        if self.discrete:
            q = _at_least_float32(self.q_values(states, target=target)).min(0).values
            return (dist.probs.to(q.dtype) * q).sum(-1)
        samples, batch = self.policy_samples, states.batch_size
        actions = dist.sample((samples,))
        inputs = TensorDict({key: states.get(key).expand(samples, *states.get(key).shape) for key in self.state_keys},
                            batch_size=[samples, *batch])
        inputs.set(self.tensor_keys.action, actions)
        q = _at_least_float32(self.q_values(inputs, target=target)).min(0).values
        return q.reshape(samples, *batch).mean(0)

    def value_target(self, tensordict: TensorDictBase) -> torch.Tensor:
        """``y = r + gamma (1 - terminated) V_target(s')`` ``[*B]``, without gradient."""
        keys, batch = self.tensor_keys, tensordict.batch_size
        with torch.no_grad():
            next_value = self.policy_value(tensordict.get("next"), target=True)
        reward = tensordict.get(("next", keys.reward)).reshape(batch).to(next_value.dtype)
        terminated = tensordict.get(("next", keys.terminated)).reshape(batch)
        return reward + self.gamma * torch.where(terminated, torch.zeros_like(next_value), next_value)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """The TD loss of every Q network on ``tensordict``'s transitions, summed."""
        target = self.value_target(tensordict)
        values = self.stored_action_values(tensordict)
        loss = 0.5 * ((values - target) / self.value_scale).pow(2).reshape(values.shape[0], -1).mean(-1).sum()
        return TensorDict({"loss_qvalue": loss, "q_value": values.detach().min(0).values.mean(),
                           "td_target": target.mean()}, batch_size=[])

    # --------------------------------------------------------------- checks
    def check_batch(self, tensordict: TensorDictBase) -> None:
        """Refuse a batch without a key the loss reads, or with a non-finite reward, naming what it has."""
        present = tensordict.keys(True)
        missing = [key for key in self.in_keys if key not in present]
        if missing:
            raise KeyError(f"TwinQLoss: the batch lacks {missing}; it has {sorted(map(str, present))}. A Q critic "
                           f"trains on stored transitions (s, a, r, s', terminated).")
        check_finite(tensordict.get(("next", self.tensor_keys.reward)), "the reward")


class LeafwiseSoftUpdate(SoftUpdate):
    r"""TorchRL's ``SoftUpdate`` (``target <- (1 - tau) target + tau online``), stepped over the parameter tensors.

    ``SoftUpdate.step`` runs ``lerp_`` on the nested TensorDicts of online and target parameters, whose
    per-call overhead is most of a step's cost for small networks: on the twin Q networks of a MuJoCo recipe
    (12 tensors) 0.8-1.0 ms per call, beside 0.2-0.3 ms here (``benchmarks/q_critic_step.py``), and a Q critic
    steps it after every one of its hundreds of Q steps per iteration. The tensors and the update
    (``Tensor.lerp_`` with weight ``tau``) are ``SoftUpdate``'s own, read from the same TensorDicts at every step,
    so a move of the loss module (``.to(device)``, ``.double()``) is followed as ``SoftUpdate`` follows it.
    """

    def __init__(self, loss_module: LossModule, *, tau: float) -> None:
        super().__init__(loss_module, tau=tau)
        sources = list(self._sources.keys(True, True, sort=True))
        targets = [(key[0].removeprefix("target_"), *key[1:]) for key in self._targets.keys(True, True, sort=True)]
        if sources != targets:
            raise ValueError(f"LeafwiseSoftUpdate: the target parameters {targets} do not pair with the online "
                             f"ones {sources}.")

    def step(self) -> None:
        if not self.initialized:
            raise RuntimeError("LeafwiseSoftUpdate: call init_() before step().")
        weight = 1 - self.eps
        targets = self._targets.values(True, True, sort=True)
        for target, source in zip(targets, self._sources.values(True, True, sort=True), strict=True):
            if target.requires_grad:
                raise RuntimeError("LeafwiseSoftUpdate: a target parameter is part of a graph.")
            target.data.lerp_(source.data, weight)


class QCritic(ValueTargets):
    r"""A twin Q critic for AWR's advantage (the AWAC / CRR family), trained off-policy on the whole buffer.

    Step 3 (targets over stored paths) has nothing to do: each minibatch brings its own TD target. Step 4, the
    value phase, steps the Q networks on :class:`TwinQLoss`,

    .. math::

        y = r + \gamma (1 - \mathrm{terminated})\, \mathbb{E}_{a' \sim \pi(\cdot|s')}[\min_i Q^{target}_i(s', a')],
        \qquad \mathcal{L} = \sum_{i=1}^{2} \tfrac12 \operatorname{mean}\big(((Q_i(s, a) - y) / s_v)^2\big),

    with TorchRL's ``SoftUpdate`` (``target <- (1 - tau) target + tau online``) after every optimizer step, so
    the phase runs one step at a time (never fused). Step 5 writes, for every stored row,

    .. math::

        A(s, a) = Q(s, a) - V_\pi(s), \quad Q = \min_i Q_i, \quad
        V_\pi(s) = \tfrac1m \sum_{j=1}^{m} \min_i Q_i(s, a_j),\ a_j \sim \pi(\cdot|s)

    (discrete actions: the exact ``sum_a pi(a|s) min_i Q_i(s, a)``), standardised over the buffer with
    ``normalize_advantage``; ``value_target`` holds ``Q(s, a)`` and ``state_value`` ``V_pi(s)``. The policy phase
    is AWR's, on these advantages.

    ``V_pi`` is CRR's mean over ``m = policy_samples`` actions, not AWAC's single sample: one sample adds
    to every row's advantage a noise as large as ``Q``'s spread under ``pi``, which ``exp(A / beta)`` turns into
    weights that are noise; ``m`` samples divide its variance by ``m`` for ``m`` more passes of the small Q
    networks over the buffer (``policy_samples: 1`` is AWAC's estimate). ``Q`` is the *minimum* of the twins
    in both terms, as AWAC takes it: the same function the TD targets bootstrap from, at the stored and at
    the sampled actions, so the advantage compares actions under one critic (mixing min and mean would add
    the twins' state-dependent gap to ``A``), and actions on which the twins disagree (rare in the data)
    are not favoured.

    The buffer and the update-to-data ratio keep their one home each: the buffer is ``model.data``'s
    (``buffer_size``, which a Q critic can make far larger than V targets' 50,000), the Q steps per iteration
    are ``model.value_phase.steps`` (UTD = ``steps / frames_per_iteration``; 1 means as many Q steps as env
    steps collected), and ``model.critic_optimizer`` configures the Q networks' optimizer.

    Args:
        gamma: discount.
        tau: soft target update rate, ``0 < tau <= 1`` (AWAC and SAC: 0.005).
        policy_samples: ``m``, actions drawn per state for ``V_pi`` (continuous actions), ``>= 1``.
        hidden_sizes: hidden layers of the Q networks (``None``: the recipe's).

    Other keywords: see :class:`ValueTargets` (``value_scale`` scales the Q networks' outputs and TD error as
    it does ``V``'s).
    """

    def __init__(self, gamma: float = 0.99, *, tau: float = 0.005, policy_samples: int = 4,
                 hidden_sizes: list[int] | None = None, value_scale: float | None = None,
                 normalize_advantage: bool = True, refresh_every: int = 1, chunk_size: int | None = None) -> None:
        super().__init__(gamma, value_scale=value_scale, normalize_advantage=normalize_advantage,
                         refresh_every=refresh_every, chunk_size=chunk_size)
        if not 0 < tau <= 1:
            raise ValueError(f"QCritic: tau must be in (0, 1], got {tau}.")
        if policy_samples < 1:
            raise ValueError(f"QCritic: policy_samples must be >= 1, got {policy_samples}.")
        if hidden_sizes is not None and (not hidden_sizes or min(hidden_sizes) <= 0):
            raise ValueError(f"QCritic: hidden_sizes must be positive (or null for the recipe's), got {hidden_sizes}.")
        self.tau, self.policy_samples = tau, policy_samples
        self.hidden_sizes = list(hidden_sizes) if hidden_sizes is not None else None
        self.q_loss: TwinQLoss | None = None
        self.target_update: LeafwiseSoftUpdate | None = None

    # ------------------------------------------------------------ networks
    def make_networks(self, recipe: Any, env: Any, actor: Any, critic: Any) -> TwinQLoss:
        """Twin Q networks from ``recipe.make_q_networks`` (sharing ``critic``'s normaliser), ready to train."""
        networks = recipe.make_q_networks(env, 2, critic=critic, value_scale=self.value_scale,
                                          hidden_sizes=self.hidden_sizes)
        return self.use(networks, actor)

    def use(self, qvalue_networks: Sequence[TensorDictModuleBase], actor: ProbabilisticTensorDictSequential
            ) -> TwinQLoss:
        """Train ``qvalue_networks`` (built elsewhere, for a loop of one's own) for ``actor``'s advantages."""
        self.q_loss = TwinQLoss(qvalue_networks, actor, gamma=self.gamma, policy_samples=self.policy_samples,
                                value_scale=self.value_scale)
        self.target_update = LeafwiseSoftUpdate(self.q_loss, tau=self.tau)
        return self.q_loss

    # -------------------------------------------------------------- checks
    def check(self, data: Any, loss: LossModule) -> None:
        if self._trained().actor_network is not loss.actor_network:
            raise ValueError("QCritic: its Q networks' V_pi samples another actor than model.loss trains.")
        for buffer in data.buffers:  # buffers filled before training (given, or a dataset); collected rows later
            self._check_stored(buffer.storage.get(slice(0, 1)), type(data).__name__)

    def _trained(self) -> TwinQLoss:
        if self.q_loss is None:
            raise ValueError("model.targets (QCritic) has no Q networks: the module builds them with "
                             "model.recipe's make_q_networks (QCritic.make_networks), a loop of one's own with "
                             "QCritic.use(q_networks, actor).")
        return self.q_loss

    def _check_stored(self, stored: TensorDictBase, source: str = "the buffer") -> None:
        try:
            self.q_loss.check_batch(stored)
        except KeyError as error:
            raise ValueError(f"model.targets (QCritic) trains Q(s, a) on stored actions, rewards, terminations and "
                             f"next states, which model.data ({source}) does not store: {error.args[0]}") from error

    def attach(self, loss: LossModule) -> None:
        """Nothing to give ``loss``: every stored row carries ``advantage`` and ``value_target`` from step 5."""

    # -------------------------------------------------------------- phases
    def value_phase(self) -> OwnValuePhase:
        """Step 4 on the Q networks: :class:`TwinQLoss` per minibatch, ``SoftUpdate.step()`` after each step."""
        q_loss = self._trained()
        return OwnValuePhase(loss=self._minibatch_loss, network=q_loss.qvalue_networks, keys=tuple(q_loss.in_keys),
                             check=self._check_stored, after_step=self.target_update.step)

    def _minibatch_loss(self, minibatch: TensorDictBase) -> TensorDictBase:
        out = self.q_loss(minibatch)
        return TensorDict({"loss_value": out.get("loss_qvalue"), "q_value": out.get("q_value"),
                           "q_td_target": out.get("td_target")}, batch_size=[])

    def refresh_targets(self, buffers: list[ReplayBuffer], loss: LossModule,
                        written: list[torch.Tensor | None]) -> None:
        """Step 3: nothing (each value-phase minibatch computes its own TD target)."""
        self._refreshed = True

    def refresh_advantages(self, buffers: list[ReplayBuffer], loss: LossModule,
                           critic_moves_in_policy_phase: bool) -> None:
        """Step 5: ``A = min_i Q_i(s, a) - V_pi(s)`` for every stored row, ``chunk_size`` rows at a time, then
        standardised over ``buffers`` together (``normalize_advantage``)."""
        keys, reward = loss.tensor_keys, ("next", self.q_loss.tensor_keys.reward)
        for buffer in buffers:
            storage = buffer.storage
            for rows in torch.arange(len(buffer)).split(self.chunk_size or max(len(buffer), 1)):
                data = storage.get(rows)
                with torch.no_grad(), float32_context(data.device):
                    q = self.q_loss.stored_action_values(data).min(0).values
                    value = self.q_loss.policy_value(data)
                shape = data.get(reward).shape
                refreshed = {keys.value: value.reshape(shape), keys.value_target: q.reshape(shape),
                             keys.advantage: (q - value).reshape(shape)}
                storage.set(rows, data.select().update(refreshed), set_cursor=False)
        if self.normalize_advantage:
            standardize_stored_advantages(buffers, keys.advantage, self.chunk_size)
