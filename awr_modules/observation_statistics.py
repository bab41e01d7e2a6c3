"""The training env's running observation statistics, kept in the networks' normaliser.

The reference normalises states inside its networks with the mean and std of the states
collected so far, recorded for the first ``normalizer_samples`` samples and frozen after.
Here TorchRL's ``VecNormV2`` keeps the moments, fed with each collected batch's states (the
states the policy acted in) rather than as an env transform: one vectorised update per
iteration instead of one per env step (the transform cost more per step than a MuJoCo step),
and the env stays free of the learner's state, so it can step in another process.
:class:`~awr_modules.normalizer.ObservationNormalizer` applies the moments at the front of
actor and critic. :class:`ObservationStatistics` is the one link between the two: a recipe
that normalises hands it over (:meth:`~awr_modules.recipe.Recipe.observation_statistics`), and
``AWRModule`` updates it after every collection, pools it across DDP ranks and saves it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tensordict import TensorDictBase
from torchrl.envs import VecNormV2

from awr_modules.normalizer import ObservationNormalizer


class ObservationStatistics:
    """Running observation moments (``recorder``) loaded into the networks' ``normalizer``.

    Args:
        recorder: a ``VecNormV2`` over the observation key (``decay=1``: moments of every recorded
            state; ``reduce_batch_dims=True``: a batch's rows are samples), outside any env.
        normalizer: the networks' shared normaliser.
        freeze_after: env steps (all ranks) after which the statistics stop changing
            (the reference's ``normalizer_samples``).
    """

    def __init__(self, recorder: VecNormV2, normalizer: ObservationNormalizer, freeze_after: int) -> None:
        if len(recorder.in_keys) != 1:
            raise ValueError(f"ObservationStatistics: the recorder must watch one key, got {recorder.in_keys}.")
        self.recorder = recorder
        self.normalizer = normalizer
        self.freeze_after = freeze_after

    @property
    def frozen(self) -> bool:
        return self.recorder.frozen

    def update(self, batch: TensorDictBase, env_steps: int,
               mean_across_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """After a collection: record the ``batch``'s states, pool the moments across ranks, load them into
        the networks, and freeze them once ``env_steps`` reaches ``freeze_after``.

        ``VecNormV2`` keeps running first and second moments (``E[x]``, ``E[x^2]``); every rank saw
        the same number of samples, so the mean over ranks of each moment is the pooled moment.
        """
        if self.frozen:
            return
        (key,) = self.recorder.in_keys
        states = batch.select(key).reshape(-1)
        self.recorder._step(states, states)  # the transform's own update, as an env step of a batch of envs
        if mean_across_ranks is not None:
            state = self.recorder.get_extra_state()
            self.recorder.set_extra_state({name: value if name.startswith("count") else mean_across_ranks(value)
                                           for name, value in state.items()})
        self.normalizer.load_statistics(self.recorder.loc[key], self.recorder.scale[key])
        self._freeze_if_due(env_steps)

    def state_dict(self) -> dict[str, Any]:
        """The recorder's moments and counts (the normaliser's own values are saved with the networks)."""
        return self.recorder.get_extra_state()

    def load_state_dict(self, state: dict[str, Any], env_steps: int) -> None:
        """Restore the moments of a run that had collected ``env_steps``, frozen if that was past the limit.

        ``VecNormV2.set_extra_state`` sets the moments but leaves the recorder's ``initialized`` flag down, so its
        next update would start the moments afresh from that one batch (a run resumed before ``freeze_after``
        would then normalise with the statistics of the states collected after the resume only): raise it."""
        self.recorder.set_extra_state(state)
        if state:
            self.recorder.initialized.fill_(True)
        self._freeze_if_due(env_steps)

    def _freeze_if_due(self, env_steps: int) -> None:
        if env_steps >= self.freeze_after and not self.frozen:
            self.recorder.freeze()
