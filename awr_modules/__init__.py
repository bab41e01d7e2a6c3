"""awr_modules: Advantage-Weighted Regression (Peng et al., 2019) as TorchRL parts.

Public API:

- :class:`AWRLoss` -- the AWR actor/critic loss, a TorchRL ``LossModule``.
- :class:`KStepReturnEstimator` -- the paper's k-step return as a TorchRL value estimator.
- :func:`refresh_value_targets` -- returns and advantages over the trajectories stored in a buffer.
- :func:`make_replay_buffer` -- the FIFO (prioritized) TorchRL replay buffer.
"""

from awr_modules.kstep import KStepReturnEstimator
from awr_modules.loss import AWRLoss
from awr_modules.replay_buffer import make_replay_buffer
from awr_modules.value_targets import refresh_value_targets

__all__ = ["AWRLoss", "KStepReturnEstimator", "make_replay_buffer", "refresh_value_targets"]
