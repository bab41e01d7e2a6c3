"""TorchRL's conventions of :class:`~awr_modules.AWRLoss`: its declared keys and its value estimator.

Like TorchRL's own losses, the loss declares every TensorDict key it reads or writes (:class:`AcceptedKeys`,
renamable with ``set_keys``), lists them as ``in_keys`` / ``out_keys``, and builds its value estimator with
``make_value_estimator`` (passing renamed keys on to it). The math lives in :mod:`awr_modules.loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tensordict.nn import composite_lp_aggregate
from tensordict.utils import NestedKey
from torchrl.objectives import LossModule
from torchrl.objectives.utils import ValueEstimators
from torchrl.objectives.value import ValueEstimatorBase

from awr_modules._torchrl_compat import build_builtin_estimator

ESTIMATOR_KEYS = ("advantage", "value_target", "value", "reward", "done", "terminated", "sample_log_prob")
"""The keys the loss hands on to its value estimator (those it declares: ``sample_log_prob`` is V-trace's)."""


@dataclass
class AcceptedKeys:
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



class AWRLossConventions:
    """The keys and the value estimator of :class:`~awr_modules.AWRLoss` (mixed in before ``LossModule``)."""

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
        """``loss_actor``, ``loss_value`` and the diagnostics (if :attr:`diagnostics`), in the order
        ``forward(**kwargs)`` returns them; ``select_out_keys`` narrows them."""
        if self._out_keys is not None:
            return self._out_keys
        return ["loss_actor", "loss_value", *(self.DIAGNOSTICS if self.diagnostics else ())]

    @out_keys.setter
    def out_keys(self, values: list[str]) -> None:
        self._out_keys = values

    def _forward_value_estimator_keys(self, **kwargs) -> None:
        """Pass the renamed keys on to the value estimator; other keys it has stay as they are."""
        estimator = self._value_estimator
        renamed = {name: getattr(self.tensor_keys, name) for name in kwargs
                   if name in ESTIMATOR_KEYS and hasattr(getattr(estimator, "tensor_keys", None), name)}
        if estimator is not None and renamed:
            self._value_estimator.set_keys(**renamed)
        self._in_keys = None

    # ------------------------------------------------------- value estimator
    def make_value_estimator(
        self, value_type: ValueEstimators | ValueEstimatorBase | type | None = None, **hyperparams
    ) -> AWRLossConventions:
        """Choose how ``advantage``/``value_target`` are computed when the batch lacks them.

        ``value_type`` is one of :attr:`SUPPORTED_VALUE_ESTIMATORS` (TD0, TD1, TDLambda -- the
        default, with the reference's gamma 0.99 and lambda 0.95 -- GAE, or VTrace, which also gets
        this loss's actor), built through TorchRL's estimator registry on this loss's critic; an
        estimator class such as :class:`~awr_modules.KStepReturnEstimator`, built with ``hyperparams`` on this loss's
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
        else:
            build_builtin_estimator(self, value_type, self.SUPPORTED_VALUE_ESTIMATORS, **hyperparams)
        self._value_estimator.set_keys(**{name: getattr(self.tensor_keys, name) for name in ESTIMATOR_KEYS
                                          if hasattr(self._value_estimator.tensor_keys, name)})
        self._in_keys = None
        return self

