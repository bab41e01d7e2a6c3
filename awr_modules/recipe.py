"""What :class:`~awr_modules.AWRModule` needs from a recipe: an environment and two networks.

A recipe knows one environment family (classic control, Box2D, MuJoCo, ...):
how to build the TorchRL env with its transforms, and the actor and critic that
fit its observation and action spaces. The module asks for them in ``setup()``
and ``__init__`` and owns everything else (collection, buffer, the AWR phases,
keeping the networks' observation normaliser up to date through the
:class:`~awr_modules.observation_statistics.ObservationStatistics` the recipe hands over).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torchrl.envs import EnvBase
from torchrl.modules import ProbabilisticActor, ValueOperator

from awr_modules.evaluation import EpisodeEvaluator, TorchRLEvaluator
from awr_modules.observation_statistics import ObservationStatistics


class Recipe(ABC):
    """Builds the environment and networks for one task.

    Attributes:
        env_id: the task's id (e.g. a gymnasium id); checkpoints record it so that
            a checkpoint of another task is refused on load.
        normalizer_samples: number of collected transitions after which the
            observation normaliser is frozen (the reference's ``normalizer_samples``).
    """

    env_id: str
    normalizer_samples: int

    @abstractmethod
    def make_env(self, seed: int, num_envs: int = 1) -> EnvBase:
        """A seeded env of batch size ``num_envs`` (1: unbatched) with every transform the networks expect."""

    @abstractmethod
    def make_networks(self, env: EnvBase, value_scale: float = 1.0) -> tuple[ProbabilisticActor, ValueOperator]:
        """The actor (returns a distribution; writes ``action`` and its log-prob) and the critic
        (writes ``state_value``) for ``env``.

        Both read the env's raw ``observation``; a recipe that normalises states does it inside
        the networks with one shared :class:`~awr_modules.normalizer.ObservationNormalizer`,
        which the module keeps up to date. ``value_scale`` multiplies the critic's output: the
        network itself predicts the *normalised* value ``V / s_v`` as the reference's critic
        does (``s_v = 1 / (1 - gamma)``), so its outputs stay O(1) and the reference's step sizes apply.
        """

    def make_q_networks(self, env: EnvBase, count: int = 2, *, critic: ValueOperator | None = None,
                        value_scale: float = 1.0, hidden_sizes: list[int] | None = None) -> list[ValueOperator]:
        """``count`` independent Q networks for ``env``, for a Q critic (:class:`~awr_modules.q_critic.QCritic`).

        Continuous actions: ``ValueOperator`` s on ``observation`` and ``action`` writing ``state_action_value``
        ``Q(s, a)``; discrete (one-hot) actions: on ``observation`` alone writing ``action_value``, one ``Q(s, a)``
        per action. Like the critic they read raw observations through the normaliser shared with
        :meth:`make_networks`' networks (taken from ``critic``, so that the observation statistics keep it
        current) and predict ``Q / s_v`` scaled back by ``value_scale``. ``hidden_sizes``: the recipe's own when
        ``None``. The default refuses: a recipe that supports a Q critic implements it.
        """
        raise NotImplementedError(f"model.recipe ({type(self).__name__}) builds no Q networks (make_q_networks), "
                                  f"which model.targets QCritic needs; use a recipe that does, or V targets.")

    def make_evaluator(self, seed: int, episodes: int) -> EpisodeEvaluator:
        """What an evaluation worker runs: ``episodes`` episodes of an actor's deterministic policy side by side,
        in envs seeded with ``seed``. The default steps :meth:`make_env`'s env through TorchRL
        (:class:`~awr_modules.evaluation.TorchRLEvaluator`); a recipe may step its simulator more cheaply, with the
        same episodes."""
        return TorchRLEvaluator(self.make_env(seed, episodes))

    def observation_statistics(self, actor: ProbabilisticActor,
                               critic: ValueOperator) -> ObservationStatistics | None:
        """The link from the collected states' moments to the networks' normaliser, for a recipe that
        normalises states inside the networks (from :meth:`make_networks`); ``None`` (the default) for one
        that does not."""
        return None

    def policy_actions(self, env_actions: torch.Tensor) -> torch.Tensor:
        """Actions as the env takes them (a dataset's) in the units the actor samples (e.g. ``[-1, 1]``
        boxes, one-hot choices). Recipes that train offline implement it; the default refuses."""
        raise NotImplementedError(f"{type(self).__name__} does not map env actions to its actor's units; "
                                  f"it cannot train on datasets.")

    def env_actions(self, policy_actions: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`policy_actions`: the actor's actions as the env takes them."""
        raise NotImplementedError(f"{type(self).__name__} does not map its actor's actions to env actions; "
                                  f"it cannot write datasets.")

    def deterministic_policy(self, actor: ProbabilisticActor) -> torch.nn.Module:
        """The actor's deterministic action as a plain ``nn.Module`` from raw observations to env actions, for
        ``awr export``. Recipes that can be exported implement it; the default refuses."""
        raise NotImplementedError(f"{type(self).__name__} cannot export its actor as a plain module.")
