"""The parts an :class:`~awr_modules.module.AWRModule` is composed of: their defaults and their type checks.

LightningCLI shows and builds each default through ``lazy_instance`` (a fresh part per run); a Python caller who
leaves a default in place gets a fresh instance too, since parts hold state (buffers, workers, a tuned
temperature).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from jsonargparse import lazy_instance
from lightning.pytorch.cli import OptimizerCallable

from awr_modules.data import Collected, DataSource
from awr_modules.entropy import EntropyCoefficient, FixedCoefficient
from awr_modules.evaluators import InProcess
from awr_modules.execution import Eager, Execution
from awr_modules.targets import TDLambda, ValueTargets
from awr_modules.temperature import Fixed, Temperature

PART_TYPES: dict[str, tuple[type, type]] = {
    "data": (DataSource, Collected), "targets": (ValueTargets, TDLambda), "temperature": (Temperature, Fixed),
    "entropy": (EntropyCoefficient, FixedCoefficient), "evaluator": (InProcess, InProcess),
    "execution": (Execution, Eager)}
"""Each part's field under ``model:``: the type it must have and its default's class."""

DEFAULT_PARTS = {name: lazy_instance(default) for name, (_, default) in PART_TYPES.items()}
"""The parts' defaults, as LightningCLI shows them (``--print_config``) and builds them (a fresh one per run)."""


def own_parts(**parts: Any) -> dict[str, Any]:
    """``parts`` by field, each a fresh default where the shared one was left in place, after checking its type."""
    owned = {}
    for name, part in parts.items():
        kind, default = PART_TYPES[name]
        owned[name] = default() if part is DEFAULT_PARTS[name] else part
        if not isinstance(owned[name], kind):
            raise TypeError(f"AWRModule: model.{name} must be a {kind.__name__} part, got {part!r}.")
    return owned


def reference_sgd(lr: float) -> OptimizerCallable:
    """The reference's optimizer: SGD with momentum 0.9 at step size ``lr``."""
    return partial(torch.optim.SGD, lr=lr, momentum=0.9)
