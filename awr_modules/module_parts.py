"""The parts an :class:`~awr_modules.module.AWRModule` is composed of: their defaults and their type checks.

LightningCLI shows and builds each default through ``lazy_instance`` (a fresh part per run); a Python caller who
leaves a default in place gets a fresh instance too, since parts hold state (buffers, workers, a tuned
temperature).
"""

from __future__ import annotations

import inspect
import sys
from functools import partial
from typing import Any
from unittest import mock

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


def _frames_without_source(context: int = 1) -> list[inspect.FrameInfo]:
    """The caller's stack as ``inspect.stack`` gives it, without reading any source lines (``context`` is ignored)."""
    frames, frame = [], sys._getframe(1)
    while frame is not None:
        frames.append(inspect.FrameInfo(frame, frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name, None, None))
        frame = frame.f_back
    return frames


def _lazy_defaults() -> dict[str, Any]:
    """``lazy_instance`` of each part's default class.

    jsonargparse's ``lazy_instance`` finds the module to register its class in from ``inspect.stack()[1]``, and
    ``inspect.stack`` reads source context for every frame on the stack. At import time that stack runs through
    importlib's frozen frames, for which ``inspect`` scans all of ``sys.modules`` again per frame: about a second
    per call, several seconds of every ``awr`` start. The caller's frame is all it uses, so for these calls the stack
    is built without source.
    """
    with mock.patch.object(inspect, "stack", _frames_without_source):
        return {name: lazy_instance(default) for name, (_, default) in PART_TYPES.items()}


DEFAULT_PARTS = _lazy_defaults()
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
