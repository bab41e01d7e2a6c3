"""``AWRProgressBar``: a progress bar that shows what an RL run is watched for.

    Epoch 12: 100%|██████████| 1/1 [00:04, env_steps=26624/200000, env_steps/s=5421, eval/return=-141.3, iteration=13]

One Lightning epoch is one AWR iteration of a single batch, so Lightning's own bar says little
(``0.00it/s``, ``v_num``, ``env_steps: 6144.000``). This one shows the env steps collected toward the
budget (``max_env_steps``, when the module has one), env steps per second of wall-clock time since
this fit started (evaluations included, so it tells when the budget will be reached), the last
evaluation's mean return (``eval/return`` as the module logs it in process; an evaluation worker's
results go to the loggers at their snapshot's step and reach the bar only if the module also logs them
through Lightning), and the module's other progress-bar metrics; whole numbers print as integers. ``awr fit`` uses it unless ``--trainer.enable_progress_bar=false`` or the config names a
progress bar callback of its own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar

EVAL_RETURN = "eval/return"
HIDDEN = ("v_num", "env_steps", EVAL_RETURN)  # the logger's version, and what the bar shows its own way


def format_number(value: Any) -> str:
    """A metric as the bar prints it: whole numbers as integers, others to 4 significant digits (1 decimal from 100)."""
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4g}"


def progress_metrics(env_steps: int, max_env_steps: int | None, env_steps_per_second: float | None,
                     eval_return: float | None, others: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The bar's postfix: env steps (``collected/budget``), env steps per second, the last evaluation return, then
    ``others`` (the module's progress-bar metrics, less ``v_num`` and the ones shown here); each as text.

    A rate or return that is not known yet (``None``) is left out rather than shown as 0.
    """
    metrics = {"env_steps": f"{int(env_steps)}" if max_env_steps is None else f"{int(env_steps)}/{int(max_env_steps)}"}
    if env_steps_per_second is not None:
        rate = round(env_steps_per_second) if env_steps_per_second >= 10 else env_steps_per_second
        metrics["env_steps/s"] = format_number(rate)
    if eval_return is not None:
        metrics[EVAL_RETURN] = format_number(eval_return)
    for key, value in (others or {}).items():
        if key not in HIDDEN:
            metrics[key] = value if isinstance(value, str) else format_number(value)
    return metrics


class EnvStepRate:
    """Env steps per second since :meth:`start`, from a clock (``time.monotonic`` unless given)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started: tuple[float, int] | None = None

    def start(self, env_steps: int) -> None:
        """Count from now and ``env_steps`` (a resumed run's steps so far do not count toward the rate)."""
        self.started = (self.clock(), int(env_steps))

    def rate(self, env_steps: int) -> float | None:
        """Steps per second since :meth:`start`; ``None`` before it, or before any step or time has passed."""
        if self.started is None:
            return None
        start_time, start_steps = self.started
        elapsed, steps = self.clock() - start_time, int(env_steps) - start_steps
        return steps / elapsed if elapsed > 0 and steps > 0 else None


class AWRProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with env steps toward the budget, env steps per second and the last evaluation return.

    Args:
        refresh_rate: update the bar every this many batches (one batch is one iteration).
        process_position: the bar's line, for several bars at once.
        leave: keep each epoch's bar on screen.
    """

    #: without ``it/s`` (one batch per epoch makes it ``0.00it/s``) and without the epoch's remaining time
    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self.env_step_rate = EnvStepRate()
        self.eval_return: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.env_step_rate.start(_env_steps(pl_module))

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, str]:
        """The postfix of :func:`progress_metrics` for the module's state now (see the module doc)."""
        logged = trainer.callback_metrics.get(EVAL_RETURN)
        if logged is not None:
            self.eval_return = float(logged)  # kept: the bar shows the last evaluation until the next one
        env_steps = _env_steps(pl_module)
        return progress_metrics(env_steps, getattr(pl_module, "max_env_steps", None),
                                self.env_step_rate.rate(env_steps), self.eval_return,
                                trainer.progress_bar_metrics)


def _env_steps(pl_module: pl.LightningModule) -> int:
    """The module's env steps so far (all ranks); 0 for a module that does not count them."""
    return int(getattr(pl_module, "env_steps", 0))
