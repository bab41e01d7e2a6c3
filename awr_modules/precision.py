"""Float32 islands inside mixed-precision training.

Value targets, advantages and AWR weights are exponentiated and summed over
long horizons: in bfloat16 (8 bits of mantissa) ``exp(A / beta)`` and
discounted sums lose most of their digits, and in float16 they overflow, so they
are always computed in float32, also under ``torch.autocast``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch


@contextmanager
def float32_context(device: torch.device | str | None = None) -> Iterator[None]:
    """A region where autocast is off, so that ops inside run in their input dtype (float32).

    Autocast is switched off for the CPU, for CUDA when it is available, and for
    ``device``'s type if given. Every type, not only the data's: a TensorDict's
    ``device`` can be ``None`` while its tensors sit on a GPU, and switching off only
    the CPU's autocast there left value targets in bfloat16 (seen on an H100).
    """
    device_types = {"cpu"}
    if torch.cuda.is_available():
        device_types.add("cuda")
    if device is not None:
        device_types.add(torch.device(device).type)
    with ExitStack() as stack:
        for device_type in sorted(device_types):
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield
