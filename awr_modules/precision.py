"""Float32 islands inside mixed-precision training.

Value targets, advantages and AWR weights are exponentiated and summed over
long horizons: in bfloat16 (8 bits of mantissa) ``exp(A / beta)`` and
discounted sums lose most of their digits, so they are always computed in
float32, also under ``torch.autocast``.
"""

from __future__ import annotations

import torch


def float32_context(device: torch.device | str | None) -> torch.autocast:
    """An autocast region that is switched off, so that ops inside run in their input dtype (float32)."""
    device_type = torch.device(device).type if device is not None else "cpu"
    return torch.autocast(device_type=device_type, enabled=False)
