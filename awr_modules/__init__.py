"""awr_modules: Advantage-Weighted Regression (Peng et al., 2019) as TorchRL parts.

Public API:

- :class:`AWRLoss` -- the AWR actor/critic loss, a TorchRL ``LossModule``.
- :class:`KStepReturnEstimator` -- the paper's k-step return as a TorchRL value estimator.
- :func:`refresh_value_targets` -- returns and advantages over the trajectories stored in a buffer.
- :func:`make_replay_buffer` -- the FIFO (prioritized) TorchRL replay buffer.
- :class:`AWRIteration` -- one AWR iteration over its parts (:mod:`awr_modules.data`, :mod:`~awr_modules.targets`,
  :mod:`~awr_modules.temperature`, :mod:`~awr_modules.entropy`, :mod:`~awr_modules.execution`,
  :class:`~awr_modules.phases.Phase`), without Lightning (imported on first use).
- :class:`AWRModule` -- the Lightning module around it, composed of the parts a config injects (imported on first
  use, so that ``import awr_modules`` does not load Lightning).
"""

from typing import Any

from awr_modules.kstep import KStepReturnEstimator
from awr_modules.loss import AWRLoss
from awr_modules.replay_buffer import make_replay_buffer
from awr_modules.value_targets import refresh_value_targets

__all__ = ["AWRIteration", "AWRLoss", "AWRModule", "KStepReturnEstimator", "make_replay_buffer", "refresh_value_targets"]


def __getattr__(name: str) -> Any:
    if name == "AWRModule":
        from awr_modules.module import AWRModule

        return AWRModule
    if name == "AWRIteration":
        from awr_modules.iteration import AWRIteration

        return AWRIteration
    raise AttributeError(f"module 'awr_modules' has no attribute {name!r}")
