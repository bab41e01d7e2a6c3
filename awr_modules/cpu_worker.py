"""Worker processes that step envs on the CPU: hiding GPUs makes their per-step bookkeeping cheaper.

Lightning sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` when it is imported, and spawned workers inherit
it. Under it, ``torch.cuda.is_available()`` asks NVML, and on a CUDA build of torch without a
visible GPU it loads NVML anew on every call (the answer is cached only once CUDA is initialised).
tensordict asks on every device cast, so a TorchRL env step paid it once per step: about a sixth of
a HalfCheetah collection batch on this project's 2-core machine. A worker that collects or
evaluates on the CPU hides the GPUs first, and the question is answered without NVML. A run whose
trainer is on the CPU does the same in its training process (``awr``'s CLI), where synchronous
collection steps the envs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torchrl.envs import EnvBase


def hide_gpus() -> None:
    """Make this process see no GPU; call it before CUDA is initialised (a worker's first act)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def trains_on_cpu_only(accelerator: object) -> bool:
    """Whether a trainer configured with ``accelerator`` runs on the CPU: ``"cpu"`` (or Lightning's
    ``CPUAccelerator``), or ``"auto"`` with no GPU visible.

    Hiding GPUs from such a run changes no device it uses (CUDA is never initialised for it), and
    its processes, DDP's included, inherit the hiding.
    """
    if isinstance(accelerator, str):
        return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    class_path = getattr(accelerator, "class_path", None) or type(accelerator).__qualname__
    return str(class_path).rsplit(".", 1)[-1] == "CPUAccelerator"


@dataclass(frozen=True)
class CpuWorkerEnv:
    """A picklable env factory for a worker process that steps on the CPU: hides GPUs, then builds."""

    make_env: Callable[[], EnvBase]

    def __call__(self) -> EnvBase:
        hide_gpus()
        return self.make_env()
