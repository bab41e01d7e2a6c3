"""Gymnasium tasks through TorchRL: env transforms and MLP actor/critic as in the reference.

Env: ``GymEnv(env_id)`` (or a synchronous vector of ``num_envs``) -> ``DoubleToFloat`` (gymnasium returns float64) ->
for continuous actions an affine map from the policy's normalised box ``[-1, 1]``
to the env's bounds -> ``StepCounter`` -> ``RewardSum``. The env keeps raw observations: the
networks normalise them in their first layer, as the reference does, with the running mean/std
of the collected states (a ``VecNormV2`` with infinite memory fed with each collected batch,
frozen after ``normalizer_samples``; :meth:`GymRecipe.observation_statistics`).

Networks: MLP ``hidden_sizes`` (reference ``[128, 64]``, ReLU) for actor and
critic. Continuous actions: a diagonal Gaussian in normalised units with a
fixed std ``action_std`` (the reference), or a learned std, or a TanhNormal;
the mean head is initialised uniform(+-0.01) as in the reference. Discrete
actions: a categorical over logits (one-hot actions).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import gymnasium as gym
import torch
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.data import Bounded, OneHot
from torchrl.envs import (
    DoubleToFloat,
    EnvBase,
    GymEnv,
    GymWrapper,
    ObservationNorm,
    RewardSum,
    StepCounter,
    TransformedEnv,
    VecNormV2,
)
from torchrl.modules import MLP, IndependentNormal, OneHotCategorical, ProbabilisticActor, TanhNormal, ValueOperator

from awr_modules.normalizer import ObservationNormalizer
from awr_modules.observation_statistics import ObservationStatistics
from awr_modules.recipe import Recipe
from awr_recipes.gym_evaluation import GymnasiumEvaluator

STATISTICS_KEY = "observation_vecnorm"  # the recorder's (unused) normalised output: the networks read raw observations
MEAN_HEAD_INIT = 0.01  # the reference initialises the policy's output layer uniform(+-0.01)
PolicyKind = Literal["fixed_std", "learned_std", "bounded_std", "tanh_normal"]


class FixedStd(nn.Module):
    """Pairs a Gaussian mean with a constant std: the reference's policy does not learn its std."""

    constant_scale = True  # its entropy cannot move: awr_modules.entropy refuses to tune a bonus on it

    def __init__(self, std: float) -> None:
        super().__init__()
        self.std = std

    def forward(self, loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return loc, torch.full_like(loc, self.std)


class BoundedStd(nn.Module):
    """Splits a head's output into a Gaussian mean and a learned std kept inside ``[0.01, 1]``, at most the half-width
    of the actor's normalised action box: ``std = 0.01 + 0.99 sigmoid(u + b)`` of the head's scale output ``u``.

    Why: a state-dependent learned std (``biased_softplus``) has no upper end. States the actor has rarely seen
    (on Ant-v5, contact forces that are almost always 0, normalised to 100) can make it output any std, and the
    env's control cost ``c |a|^2`` of such actions is unbounded too: with an entropy bonus pushing the std up, one
    screened Ant run's std reached 19 on a stored state in one iteration and its value targets went non-finite in
    the next (benchmarks/README.md). A std below the box's half-width explores the whole box and stops there. The
    lower end, ``0.01`` (TorchRL's ``biased_softplus`` floor), keeps ``log pi(a|s)`` finite: a sigmoid alone reaches 0
    in float32, and a weighted log-likelihood rewards a std that shrinks to 0 on a state seen once.
    ``u = 0`` gives ``std_0`` (``action_std``; ``b`` is chosen so), as the other learned stds start.
    """

    min_std = 0.01

    def __init__(self, initial_std: float) -> None:
        super().__init__()
        if not self.min_std < initial_std < 1:
            raise ValueError(f"BoundedStd (policy bounded_std): the initial std (action_std) must be inside "
                             f"({self.min_std}, 1), 1 being the action box's half-width, got {initial_std}.")
        share = (initial_std - self.min_std) / (1 - self.min_std)
        self.bias = math.log(share / (1 - share))

    def forward(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, scale = output.chunk(2, dim=-1)
        return loc, self.min_std + (1 - self.min_std) * torch.sigmoid(scale + self.bias)


class ScaleOutput(nn.Module):
    """Multiplies by a constant: the critic predicts ``V / s_v`` and this restores ``V``."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class StateActionValue(nn.Module):
    """``Q(s, a) = s_v * mlp([normalise(s), a])``: a Q network's head on the raw observation and the action (in the
    policy's units), through the normaliser shared with the actor and critic."""

    def __init__(self, normalizer: ObservationNormalizer, mlp: nn.Module, scale: float) -> None:
        super().__init__()
        self.normalizer, self.mlp, self.scale = normalizer, mlp, scale

    def forward(self, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([self.normalizer(observation), action.to(observation.dtype)], -1)) * self.scale


class DeterministicPolicy(nn.Module):
    """Raw observation -> the env action of a recipe actor's deterministic mode (see ``GymRecipe.deterministic_policy``)."""

    def __init__(self, head: nn.Module, *, discrete: bool = False, squash: bool = False,
                 low: torch.Tensor | None = None, high: torch.Tensor | None = None, first_action: int = 0) -> None:
        super().__init__()
        self.head, self.discrete, self.squash, self.first_action = head, discrete, squash, first_action
        if not discrete:
            self.register_buffer("center", (high + low) / 2)
            self.register_buffer("half_range", (high - low) / 2)

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        if self.discrete:
            return self.head(observation).argmax(-1) + self.first_action
        loc = self.head(observation)[0]
        if self.squash:
            loc = torch.tanh(loc)
        return loc * self.half_range + self.center


class GymRecipe(Recipe):
    """A gymnasium task with the reference's state normalisation and MLP networks.

    Args:
        env_id: gymnasium id, e.g. ``"Pendulum-v1"``.

    Keyword Args:
        env_kwargs: keyword arguments of ``gymnasium.make`` (e.g. ``{"continuous": True}``).
        hidden_sizes: hidden layers of actor and critic (reference ``[128, 64]``).
        policy: ``"fixed_std"`` (reference), ``"learned_std"``, ``"bounded_std"`` (a learned std below the
            action box's half-width: :class:`BoundedStd`) or ``"tanh_normal"``; ignored for discrete actions.
        action_std: std of the fixed-std Gaussian in normalised action units; with a learned std (``learned_std``,
            ``bounded_std``, ``tanh_normal``) the std it starts from (the scale head's ``biased_softplus``, or
            :class:`BoundedStd`'s sigmoid, is ``action_std`` at 0), so that a learned std starts where the
            reference's fixed one stays.
        normalizer_samples: transitions after which observation statistics freeze.
    """

    families: tuple[str, ...] = ()

    def __init__(
        self,
        env_id: str,
        *,
        env_kwargs: dict | None = None,
        hidden_sizes: list[int] | None = None,
        policy: PolicyKind = "fixed_std",
        action_std: float = 0.4,
        normalizer_samples: int = 300_000,
    ) -> None:
        self.env_id = env_id
        self.env_kwargs = dict(env_kwargs or {})
        self.hidden_sizes = list(hidden_sizes or [128, 64])
        self.policy = policy
        self.action_std = action_std
        self.normalizer_samples = normalizer_samples
        self._validate()

    def _validate(self) -> None:
        if self.env_id not in gym.registry:
            raise ValueError(
                f"{type(self).__name__}: unknown env id {self.env_id!r}; gymnasium knows e.g. "
                f"{sorted(k for k in gym.registry if k.split('-')[0] in self.families)[:8] or sorted(gym.registry)[:8]}."
            )
        if self.families and self.env_id.split("-")[0] not in self.families:
            raise ValueError(
                f"{type(self).__name__}: env id {self.env_id!r} is not in this recipe's family {self.families}; "
                f"pick the recipe of its family in the config (model.recipe.class_path)."
            )
        if self.policy not in get_args(PolicyKind):
            raise ValueError(f"{type(self).__name__}: policy must be one of {', '.join(get_args(PolicyKind))}, "
                             f"got {self.policy!r}.")
        if self.policy == "bounded_std":
            BoundedStd(self.action_std)  # refuses a start outside its bounds now, not when the networks are built
        if not self.action_std > 0:
            raise ValueError(f"{type(self).__name__}: action_std must be > 0, got {self.action_std}.")
        if self.normalizer_samples < 0:
            raise ValueError(f"{type(self).__name__}: normalizer_samples must be >= 0, got {self.normalizer_samples}.")
        if not self.hidden_sizes or min(self.hidden_sizes) <= 0:
            raise ValueError(f"{type(self).__name__}: hidden_sizes must be positive, got {self.hidden_sizes}.")

    # ------------------------------------------------------------------ env
    def make_env(self, seed: int, num_envs: int = 1) -> TransformedEnv:
        env = TransformedEnv(self._base_env(num_envs), DoubleToFloat())
        spec = env.action_spec
        if not isinstance(spec, OneHot):
            self._check_bounded(spec)
            low, high = spec.space.low, spec.space.high
            env.append_transform(
                ObservationNorm(loc=(high + low) / 2, scale=(high - low) / 2, in_keys=[], in_keys_inv=["action"],
                                standard_normal=True)
            )
        env.append_transform(StepCounter())
        env.append_transform(RewardSum())
        env.set_seed(seed)
        return env

    def _base_env(self, num_envs: int) -> EnvBase:
        """One gymnasium env, or ``num_envs`` stepped in lock-step in this process.

        A synchronous gymnasium vector env amortises TorchRL's per-step overhead over
        the batch (6x more steps/s at 8 envs on one core, measured on Pendulum); TorchRL
        resets finished sub-envs itself (gymnasium autoreset disabled), so the
        ``"next"`` observation of a finished episode is its true final state.
        The env states its device (the CPU): TorchRL's collectors and rollouts move a
        GPU policy's actions to the env's device only when it has one.
        """
        if num_envs == 1:
            return GymEnv(self.env_id, device="cpu", **self.env_kwargs)
        vector_env = gym.make_vec(self.env_id, num_envs=num_envs, vectorization_mode="sync",
                                  vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.DISABLED},
                                  **self.env_kwargs)
        return GymWrapper(vector_env, device="cpu")

    def _check_bounded(self, spec) -> None:
        if not isinstance(spec, Bounded) or not (torch.isfinite(spec.space.low).all()
                                                 and torch.isfinite(spec.space.high).all()):
            raise ValueError(
                f"{type(self).__name__}: {self.env_id!r} has an action space this recipe cannot handle "
                f"({type(spec).__name__}); it needs a discrete space or a bounded box."
            )

    # -------------------------------------------------------------- actions
    def action_space(self) -> gym.Space:
        """The gymnasium env's own action space (a dataset's actions live in it)."""
        if not hasattr(self, "_action_space"):
            env = gym.make(self.env_id, **self.env_kwargs)
            self._action_space = env.action_space
            env.close()
        return self._action_space

    def policy_actions(self, env_actions: torch.Tensor) -> torch.Tensor:
        """Env actions in the actor's units: a box's bounds mapped to ``[-1, 1]`` (the inverse of the env's
        affine action map), a discrete choice as a one-hot vector."""
        space = self.action_space()
        if isinstance(space, gym.spaces.Discrete):
            index = env_actions.long().reshape(-1) - int(space.start)
            return torch.nn.functional.one_hot(index, int(space.n)).to(torch.long)
        low, high = (torch.as_tensor(bound, dtype=torch.float32) for bound in (space.low, space.high))
        return (env_actions.float() - (high + low) / 2) / ((high - low) / 2)

    def env_actions(self, policy_actions: torch.Tensor) -> torch.Tensor:
        """The actor's actions as the gymnasium env takes them (the env's affine map; one-hot to an index)."""
        space = self.action_space()
        if isinstance(space, gym.spaces.Discrete):
            return policy_actions.argmax(-1) + int(space.start)
        low, high = (torch.as_tensor(bound, dtype=torch.float32) for bound in (space.low, space.high))
        return policy_actions.float() * ((high - low) / 2) + (high + low) / 2

    def deterministic_policy(self, actor: ProbabilisticActor) -> nn.Module:
        """The actor's deterministic action, the one evaluation takes, as a plain ``nn.Module``: raw observations
        ``[B, obs]`` in, env actions out (the Gaussian mean, ``tanh`` of it for a TanhNormal, mapped to the env's
        box without clipping, as the env's transform does; the argmax index for discrete actions). It holds the
        actor's own layers, normaliser included, and nothing of TensorDict or TorchRL: ``awr export`` saves it."""
        head = actor.module[0].module  # observation -> (loc, scale) or logits (see _make_actor)
        space = self.action_space()
        if isinstance(space, gym.spaces.Discrete):
            return DeterministicPolicy(head, discrete=True, first_action=int(space.start))
        low, high = (torch.as_tensor(bound, dtype=torch.float32) for bound in (space.low, space.high))
        return DeterministicPolicy(head, squash=self.policy == "tanh_normal", low=low, high=high)

    def make_evaluator(self, seed: int, episodes: int) -> GymnasiumEvaluator:
        """The evaluation worker's episodes, stepped in the gymnasium vector env with :meth:`deterministic_policy`:
        the episodes of TorchRL's evaluation at about a third of its cost."""
        return GymnasiumEvaluator(self.env_id, self.env_kwargs, seed, episodes, self.deterministic_policy)

    # ------------------------------------------------------------- networks
    def make_networks(self, env: EnvBase, value_scale: float = 1.0) -> tuple[ProbabilisticActor, ValueOperator]:
        obs_dim = env.observation_spec["observation"].shape[-1]
        normalizer = ObservationNormalizer(obs_dim)  # shared: actor and critic see the same states
        critic_mlp = MLP(in_features=obs_dim, out_features=1, num_cells=self.hidden_sizes, activation_class=nn.ReLU)
        critic = ValueOperator(nn.Sequential(normalizer, critic_mlp, ScaleOutput(value_scale)),
                               in_keys=["observation"])
        return self._make_actor(env, normalizer), critic

    def make_q_networks(self, env: EnvBase, count: int = 2, *, critic: ValueOperator | None = None,
                        value_scale: float = 1.0, hidden_sizes: list[int] | None = None) -> list[ValueOperator]:
        """``count`` Q networks of ``hidden_sizes`` (the recipe's when ``None``): an MLP on ``[normalised s, a]`` to
        ``Q(s, a)`` (continuous actions, ``state_action_value``), or on the normalised ``s`` to one ``Q(s, a)`` per
        action (discrete, ``action_value``); the normaliser is ``critic``'s, the one :meth:`make_networks` shares."""
        normalizer = self._shared_normalizer(critic, "make_q_networks")
        obs_dim, spec = env.observation_spec["observation"].shape[-1], env.action_spec
        cells = list(hidden_sizes or self.hidden_sizes)
        if isinstance(spec, OneHot):
            return [ValueOperator(nn.Sequential(normalizer, MLP(in_features=obs_dim, out_features=spec.shape[-1],
                                                                num_cells=cells, activation_class=nn.ReLU),
                                                ScaleOutput(value_scale)),
                                  in_keys=["observation"], out_keys=["action_value"]) for _ in range(count)]
        return [ValueOperator(StateActionValue(normalizer, MLP(in_features=obs_dim + spec.shape[-1], out_features=1,
                                                               num_cells=cells, activation_class=nn.ReLU),
                                               value_scale),
                              in_keys=["observation", "action"], out_keys=["state_action_value"]) for _ in range(count)]

    def _shared_normalizer(self, critic: ValueOperator | None, caller: str) -> ObservationNormalizer:
        """The normaliser :meth:`make_networks` put at the front of ``critic`` (and of the actor)."""
        normalizer = critic.module[0] if critic is not None and isinstance(critic.module, nn.Sequential) else None
        if not isinstance(normalizer, ObservationNormalizer):
            raise TypeError(f"{type(self).__name__}.{caller}: pass the critic from make_networks (its first "
                            f"module is the shared ObservationNormalizer), got {critic!r:.80}.")
        return normalizer

    def _make_actor(self, env: EnvBase, normalizer: ObservationNormalizer) -> ProbabilisticActor:
        obs_dim = env.observation_spec["observation"].shape[-1]
        spec = env.action_spec
        if isinstance(spec, OneHot):
            logits = nn.Sequential(normalizer, self._policy_mlp(obs_dim, spec.shape[-1]))
            module = TensorDictModule(logits, in_keys=["observation"], out_keys=["logits"])
            return ProbabilisticActor(module, in_keys=["logits"], spec=spec, distribution_class=OneHotCategorical,
                                      return_log_prob=True)
        act_dim = spec.shape[-1]
        if self.policy == "fixed_std":
            head = nn.Sequential(normalizer, self._policy_mlp(obs_dim, act_dim), FixedStd(self.action_std))
            distribution, kwargs = IndependentNormal, {}
        elif self.policy == "bounded_std":
            head = nn.Sequential(normalizer, self._policy_mlp(obs_dim, 2 * act_dim), BoundedStd(self.action_std))
            distribution, kwargs = IndependentNormal, {}
        else:
            head = nn.Sequential(normalizer, self._policy_mlp(obs_dim, 2 * act_dim),
                                 NormalParamExtractor(scale_mapping=f"biased_softplus_{self.action_std}"))
            distribution, kwargs = (IndependentNormal, {}) if self.policy == "learned_std" else (
                TanhNormal, {"low": -torch.ones(act_dim), "high": torch.ones(act_dim)})
        module = TensorDictModule(head, in_keys=["observation"], out_keys=["loc", "scale"])
        return ProbabilisticActor(module, in_keys=["loc", "scale"], distribution_class=distribution,
                                  distribution_kwargs=kwargs, return_log_prob=True)

    def observation_statistics(self, actor: ProbabilisticActor, critic: ValueOperator) -> ObservationStatistics:
        """A ``VecNormV2`` recorder of the raw observations (infinite memory) linked to the normaliser that
        :meth:`make_networks` puts at the front of both networks."""
        normalizer = critic.module[0]
        if not isinstance(normalizer, ObservationNormalizer):
            raise TypeError(f"{type(self).__name__}.observation_statistics: pass the networks from make_networks "
                            f"(the critic starts with {type(normalizer).__name__}).")
        recorder = VecNormV2(in_keys=["observation"], out_keys=[STATISTICS_KEY], decay=1.0, reduce_batch_dims=True)
        return ObservationStatistics(recorder, normalizer, self.normalizer_samples)

    def _policy_mlp(self, in_features: int, out_features: int) -> MLP:
        mlp = MLP(in_features=in_features, out_features=out_features, num_cells=self.hidden_sizes,
                  activation_class=nn.ReLU)
        last = [m for m in mlp.modules() if isinstance(m, nn.Linear)][-1]
        nn.init.uniform_(last.weight, -MEAN_HEAD_INIT, MEAN_HEAD_INIT)
        nn.init.zeros_(last.bias)
        return mlp
