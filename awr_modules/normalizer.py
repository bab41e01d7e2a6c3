"""State normalisation inside the networks, as the reference does it.

The reference normalises states *in the networks* with running statistics of
the collected states, recorded for the first ``normalizer_samples`` samples and
frozen after. The replay buffer therefore keeps raw observations, and every
minibatch is normalised with the current statistics: a buffer that spans many
iterations never mixes observations normalised with different statistics.

The statistics themselves are TorchRL's: a ``VecNormV2`` fed with the collected
states keeps the running moments (:mod:`awr_modules.observation_statistics`);
:class:`ObservationNormalizer` is the affine layer at the front of actor and critic
that receives them.
"""

from __future__ import annotations

import torch
from torch import nn

MIN_STD = 0.01
"""Floor of the normaliser's std, the reference's normaliser ``eps``. ``VecNormV2`` floors at 1e-4: a state
dimension that stayed constant while the statistics were recorded (Ant's contact forces before the first
contact) would then blow a later value of 1 up to 10,000 and the critic's regression diverges; the
reference's floor bounds it at 100."""


class ObservationNormalizer(nn.Module):
    """``(x - loc) / scale``, with ``loc`` and ``scale`` as buffers (saved with the networks).

    Starts as the identity; :meth:`load_statistics` sets the running mean and std.
    One instance is shared by actor and critic so that both see the same inputs.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("loc", torch.zeros(size))
        self.register_buffer("scale", torch.ones(size))

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return (observation - self.loc) / self.scale

    @torch.no_grad()
    def load_statistics(self, loc: torch.Tensor, scale: torch.Tensor) -> None:
        """Set mean and std (floored at :data:`MIN_STD`; a nan std counts as 0).

        ``VecNormV2`` computes the std as ``sqrt(E[x^2] - E[x]^2)``: for a dimension that is constant
        (Humanoid-v5 has some), rounding can make the difference negative and the std nan.
        Copies in place, so functional copies of the parameters (``AWRLoss``) see the new values.
        """
        self.loc.copy_(loc.to(self.loc))
        self.scale.copy_(torch.nan_to_num(scale.to(self.scale), nan=0.0).clamp_min(MIN_STD))
