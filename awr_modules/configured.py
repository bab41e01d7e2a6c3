"""What every ``awr`` command shares: Lightning's CLI over a config, and how a refused input is reported.

- :class:`AWRCLI` and :func:`cli_main`: ``LightningCLI`` over :class:`~awr_modules.AWRModule` with the
  project's trainer defaults (checkpoints per experiment, the RL progress bar, ``--num_threads``).
- :func:`module_from_config` and :func:`load_trained_module`: the module a config builds, with or
  without a checkpoint's networks (``awr export``, ``awr dataset``).
- :func:`run_reporting_refusals`: runs a command and turns a *refused input* into its message and exit
  status 1, without a traceback (:func:`is_refusal` says which errors count).

This module sits below :mod:`awr_modules.cli`, :mod:`awr_modules.dataset_cli` and :mod:`awr_modules.export`
and imports none of them, so the commands' imports form no cycle.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import linecache
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from awr_modules.checkpointing import IterationCheckpoint
from awr_modules.cpu_worker import hide_gpus, trains_on_cpu_only
from awr_modules.environment import environment_variable
from awr_modules.module import AWRModule
from awr_modules.offline_data import DatasetError

TRAINER_DEFAULTS = {
    "num_sanity_val_steps": 0,  # an untrained policy's evaluation tells nothing and costs episodes
    "log_every_n_steps": 1,
    "enable_model_summary": False,
}
PROGRESS_BAR = "awr_modules.progress.AWRProgressBar"  # the default bar (see AWRCLI.before_instantiate_classes)
TRACEBACK_FLAG = "--traceback"
TRACEBACK_ENV = "AWR_TRACEBACK"

T = TypeVar("T")


class AWRCLI(LightningCLI):
    """LightningCLI with ``--num_threads``, per-experiment checkpoints and the RL progress bar by default.

    A command line that names its subcommand (``awr fit ...``) gets that subcommand's parser alone: LightningCLI
    builds one parser per subcommand from the trainer's and the module's signatures (the slowest part of a
    command's start after the imports) before it reads which one was asked for. Without one (``awr --help``) every
    subcommand is built.
    """

    def __init__(self, *cli_args: Any, **kwargs: Any) -> None:
        requested = _requested_subcommand(kwargs.get("args"))  # LightningCLI's ``args``
        if requested is not None:  # shadows the class's staticmethod for this instance's parser alone
            self.subcommands = lambda: {requested: LightningCLI.subcommands()[requested]}  # type: ignore[method-assign]
        super().__init__(*cli_args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(IterationCheckpoint, "checkpoint")  # saves the run's end too
        parser.set_defaults({
            # `--ckpt_path last` resumes from it; a link to the iteration's checkpoint, not a second copy of the buffer
            "checkpoint.save_last": "link",
            # after every iteration, not only after evaluations (Lightning's choice when check_val_every_n_epoch > 1)
            "checkpoint.save_on_train_epoch_end": True,
            # a fresh run into an existing folder overwrites `last.ckpt` instead of writing `last-v1.ckpt`, so the
            # README's `validate --ckpt_path .../last.ckpt` loads the newest run, not an older one
            "checkpoint.enable_version_counter": False,
            "trainer.logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
        })
        # One seed per run: seed_everything seeds torch, numpy and Python and is the module's seed too
        # (True, a random seed, leaves the module to read the one Lightning drew).
        parser.link_arguments("seed_everything", "model.seed", compute_fn=_module_seed)
        parser.add_argument(
            "--num_threads",
            type=int,
            default=int(os.environ.get("AWR_NUM_THREADS", "1")),
            help="torch intra-op threads per process. These MLPs are tiny: one thread per process is the "
            "fastest setting on small CPUs (several times faster than the default when processes share cores).",
        )

    def _parse_ckpt_path(self) -> None:
        """Keep the config's parts with ``--ckpt_path``: Lightning's CLI would apply a checkpoint's saved
        hyperparameters over the config, but ``AWRModule`` saves none (its parts are the config, which a run saves
        beside its logs), and the flat hyperparameters a 0.1.0 checkpoint holds name no field of this version's
        config. The file is read here all the same, so that an unreadable one fails before anything is built; its
        contents are checked when it loads (:func:`~awr_modules.run_state.checked_run_state`)."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            torch.load(ckpt_path, weights_only=True, map_location="cpu")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.config.get("subcommand"), self.config) if "subcommand" in self.config \
            else self.config
        if config.get("num_threads", 0) <= 0:
            raise ValueError(f"num_threads must be >= 1 (torch threads per process), got {config.get('num_threads')}; "
                             f"pass --num_threads 1 or more (or set AWR_NUM_THREADS).")
        torch.set_num_threads(config["num_threads"])
        if trains_on_cpu_only(config.trainer.accelerator):
            hide_gpus()  # cheaper device checks where synchronous collection steps envs; undone by cli_main
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = _experiment_checkpoint_dir(config.trainer.logger)
        _add_default_progress_bar(config.trainer)


def _requested_subcommand(args: Any) -> str | None:
    """The subcommand a command line names (its first word that is one), or ``None``; ``args`` is ``cli_main``'s
    (``None`` reads ``sys.argv``; a dict of settings names none)."""
    words = sys.argv[1:] if args is None else args
    if not isinstance(words, (list, tuple)):
        return None
    names = LightningCLI.subcommands()
    return next((word for word in words if isinstance(word, str) and word in names), None)


def _module_seed(seed_everything: bool | int | None) -> int | None:
    """``model.seed`` from ``seed_everything``: the same integer, or ``None`` (read when set) for ``True``/``False``."""
    return None if seed_everything is None or isinstance(seed_everything, bool) else int(seed_everything)


def _experiment_checkpoint_dir(logger: Any) -> str | None:
    """``<save_dir>/<name>/checkpoints`` of the configured logger: one folder per experiment, not per version.

    Lightning's default puts checkpoints under the logger's ``version_N``, and every run starts a
    new version, so ``--ckpt_path last`` would look in the new run's empty folder and silently
    start over. ``None`` (Lightning's default) when the config has no single logger with a
    ``save_dir``.
    """
    init_args = getattr(logger, "init_args", None)
    save_dir = getattr(init_args, "save_dir", None)
    if save_dir is None:
        return None
    name = getattr(init_args, "name", "lightning_logs")
    return os.path.join(save_dir, name, "checkpoints") if name else os.path.join(save_dir, "checkpoints")


def _add_default_progress_bar(trainer: Namespace) -> None:
    """Put :class:`~awr_modules.progress.AWRProgressBar` in ``trainer.callbacks`` unless the bar is off or the config
    names a progress bar of its own.

    Not through ``trainer_defaults``: Lightning adds those callbacks always, and refuses a progress bar callback
    beside ``enable_progress_bar=False``; Lightning's own default bar shows ``it/s`` of one-batch epochs.
    """
    if trainer.get("enable_progress_bar") is False:
        return
    callbacks = trainer.get("callbacks")
    callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, list) else [callbacks]
    if any(_is_progress_bar(callback) for callback in callbacks):
        return
    trainer.callbacks = [*callbacks, Namespace(class_path=PROGRESS_BAR, init_args=Namespace())]


def _is_progress_bar(callback: Any) -> bool:
    """Whether a configured callback (an instance, or a ``class_path`` spec not yet built) is a progress bar."""
    if isinstance(callback, ProgressBar):
        return True
    class_path = getattr(callback, "class_path", None) if isinstance(callback, Namespace) else None
    if not isinstance(class_path, str) or "." not in class_path:
        return False
    module_name, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), name, None)
    return isinstance(cls, type) and issubclass(cls, ProgressBar)


def cli_main(args: list[str] | None = None, *, run: bool = True, exit_on_error: bool = True) -> AWRCLI:
    """Run the CLI; ``args`` replaces ``sys.argv`` (tests and notebooks). Returns the CLI with its trainer.

    With ``run=False`` the config is parsed and the module and trainer are built, nothing more
    (then ``args`` has no subcommand). ``exit_on_error=False`` raises a config error as
    ``argparse.ArgumentError`` instead of printing the parser's usage and exiting (``awr`` prints the
    message alone).

    A run on the CPU hides GPUs from its process while the CLI runs (see :mod:`awr_modules.cpu_worker`); the
    process's ``CUDA_VISIBLE_DEVICES`` is restored on return, so a later run in the same process sees its GPUs.
    """
    with environment_variable("CUDA_VISIBLE_DEVICES"):
        return AWRCLI(
            AWRModule,
            trainer_defaults=TRAINER_DEFAULTS,
            args=args,
            run=run,
            parser_kwargs={"prog": "awr", "exit_on_error": exit_on_error},
            # AWRModule saves no hyperparameters (its parts are the config, saved beside the run's logs), so the
            # config's YAML dump that this would hand to ``save_hyperparameters`` is never read
            load_from_checkpoint_support=False,
        )


#: One config file, or several layered in order (a later file overrides an earlier one, as ``awr fit -c A -c B``).
Configs = str | os.PathLike | Sequence[str | os.PathLike]


def module_from_config(config: Configs) -> AWRModule:
    """The ``AWRModule`` a config builds, without a logger or a run (``awr export``, ``awr dataset``).

    ``config`` is a task's config (``configs/*.yaml``) or the ``config.yaml`` a run saved beside its metrics: the
    latter names the subcommand's own arguments (``ckpt_path``, ...), which are left out here. Several configs are
    layered in order, as ``awr fit`` layers its ``-c`` files (a task's config, then an overlay such as
    ``configs/reference/q_critic.yaml``).
    """
    files = [config] if isinstance(config, (str, os.PathLike)) else list(config)
    layered = [arg for file in files for arg in ("-c", _without_subcommand_arguments(file))]
    return cli_main([*layered, "--trainer.logger=false"], run=False).model


def load_trained_module(config: Configs, checkpoint: str | os.PathLike) -> AWRModule:
    """The config's ``AWRModule`` with a checkpoint's networks, after checking that it fits the config's task and
    network sizes (``awr export``, ``awr dataset policy``)."""
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"no checkpoint file {str(checkpoint)!r}; runs write them to "
                                f"<save_dir>/<name>/checkpoints/ (last.ckpt is the newest).")
    module = module_from_config(config)
    module.load_networks(checkpoint)
    return module


def _without_subcommand_arguments(config: str | os.PathLike) -> str:
    """``config`` itself, or its YAML without the top-level keys that only a subcommand takes (``Trainer.fit``'s
    ``ckpt_path``, ...) where it has some."""
    if not os.path.isfile(config):
        raise FileNotFoundError(f"no config file {str(config)!r}; pass a task's config (configs/*.yaml) or the "
                                f"config.yaml a run saved beside its metrics.")
    with open(config) as file:
        content = yaml.safe_load(file) or {}
    if not isinstance(content, dict):
        return str(config)  # not a mapping of fields: the parser refuses it, naming the file
    method_arguments = {name for subcommand, skipped in AWRCLI.subcommands().items()  # skipped: model, datamodule...
                        for name in inspect.signature(getattr(Trainer, subcommand)).parameters
                        if name not in skipped and name != "self"}
    if not method_arguments & content.keys():
        return str(config)  # as a path: jsonargparse resolves relative paths in it from the file's folder
    return yaml.safe_dump({key: value for key, value in content.items() if key not in method_arguments})


# --------------------------------------------------------------------------------------------- refused inputs
#: Errors that are refusals wherever they are raised: a dataset's fault, a config the parser rejects, a Trainer
#: setting Lightning rejects, a file that is not there.
REFUSED_ANYWHERE: tuple[type[BaseException], ...] = (
    DatasetError, argparse.ArgumentError, MisconfigurationException, FileNotFoundError)
#: Errors that are refusals when a ``raise`` statement of this project raised them (its argument checks).
REFUSED_FROM_PROJECT: tuple[type[BaseException], ...] = (ValueError, TypeError, NotImplementedError)
PROJECT_PACKAGES = ("awr_modules", "awr_recipes")


def is_refusal(error: BaseException) -> bool:
    """Whether ``error`` is a refused input (reported as its message) rather than a bug (reported with a traceback).

    A refusal is what the user can fix from the message alone: :data:`REFUSED_ANYWHERE`, or a
    ``ValueError``/``TypeError``/``NotImplementedError`` that a ``raise`` statement in this project's own
    code raised (its checks name the field and what to do). The same types raised elsewhere, e.g. a
    ``ValueError`` inside torch or a ``TypeError`` from a call with wrong arguments, are most likely bugs:
    those keep Python's traceback, and so does every other type.
    """
    if isinstance(error, REFUSED_ANYWHERE):
        return True
    return isinstance(error, REFUSED_FROM_PROJECT) and _raised_by_a_project_raise(error.__traceback__)


def _innermost(traceback: TracebackType | None) -> TracebackType | None:
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback


def _raised_by_a_project_raise(traceback: TracebackType | None) -> bool:
    """Whether the innermost frame is this project's code at a ``raise`` statement (not a failing call or operation)."""
    site = _innermost(traceback)
    if site is None:
        return False
    module = site.tb_frame.f_globals.get("__name__", "")
    if module.split(".")[0] not in PROJECT_PACKAGES:
        return False
    line = linecache.getline(site.tb_frame.f_code.co_filename, site.tb_lineno)
    return re.match(r"\s*(?:(?:if|elif|else)\b[^:]*:\s*)?raise\b", line) is not None


def refusal_message(prog: str, error: BaseException) -> str:
    """The text a refusal prints: ``prog: message``, then where to look next."""
    if isinstance(error, argparse.ArgumentError):
        hint = f"`{prog} --help` lists the accepted options."
    else:
        site = _innermost(error.__traceback__)
        where = "" if site is None else \
            f" at {site.tb_frame.f_globals.get('__name__', '?')}:{site.tb_lineno}"
        hint = (f"({type(error).__name__}{where}; add {TRACEBACK_FLAG} or set {TRACEBACK_ENV}=1 "
                f"to see the traceback.)")
    return f"{prog}: {error}\n{hint}"


def traceback_requested(args: list[str]) -> tuple[bool, list[str]]:
    """Whether ``--traceback`` (anywhere in ``args``) or ``AWR_TRACEBACK`` (not empty or 0) asks for tracebacks, and
    ``args`` without the flag."""
    from_environment = os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return from_environment or TRACEBACK_FLAG in args, [arg for arg in args if arg != TRACEBACK_FLAG]


def run_reporting_refusals(prog: str, command: Callable[[list[str]], T], args: list[str] | None = None) -> T:
    """``command(args)`` (default ``sys.argv[1:]``), with a refused input raised as ``SystemExit(message)``.

    Python prints that message and exits with status 1, without a traceback; ``--traceback`` or
    ``AWR_TRACEBACK=1`` lets the original error through, and errors that are not refusals
    (:func:`is_refusal`) always pass.
    """
    show_traceback, args = traceback_requested(list(sys.argv[1:] if args is None else args))
    try:
        return command(args)
    except Exception as error:
        if show_traceback or not is_refusal(error):
            raise
        raise SystemExit(refusal_message(prog, error)) from error
