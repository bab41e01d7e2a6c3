"""Worker processes that step envs on the CPU: hiding GPUs makes their per-step bookkeeping cheaper.

Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` when it is imported, and spawned workers inherit
it. Under it, ``torch.cuda.is_available()`` asks NVML, and on a CUDA build of torch without a
visible GPU it loads NVML anew on every call (the answer is cached only once CUDA is initialised).
tensordict asks on every device cast, so a TorchRL env step paid it once per step: about a sixth of
a HalfCheetah collection batch on this project's 2-core machine. A worker that collects or
evaluates on the CPU hides the GPUs first, and the question is answered without NVML.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from torchrl.envs import EnvBase


def hide_gpus() -> None:
    """Make this process see no GPU; call it before CUDA is initialised (a worker's first act)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


@dataclass(frozen=True)
class CpuWorkerEnv:
    """A picklable env factory for a worker process that steps on the CPU: hides GPUs, then builds."""

    make_env: Callable[[], EnvBase]

    def __call__(self) -> EnvBase:
        hide_gpus()
        return self.make_env()
