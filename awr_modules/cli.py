"""The ``awr`` console script: Lightning's CLI over :class:`~awr_modules.AWRModule`, ``awr dataset`` and ``awr export``.

    awr fit -c configs/pendulum.yaml
    awr validate -c configs/pendulum.yaml --ckpt_path runs/pendulum/checkpoints/last.ckpt
    awr fit -c configs/pendulum.yaml --ckpt_path last      # resume after a crash
    awr dataset random -c configs/pendulum.yaml --episodes 10 --id pendulum/random-v0   # see dataset_cli
    awr export -c configs/pendulum.yaml --checkpoint runs/pendulum/checkpoints/last.ckpt --out policy.pt2
    awr --help                                             # every subcommand; `awr fit --help` its options

The config is the signature: every field is a constructor argument of
``AWRModule``, its recipe, or Lightning's ``Trainer``; unknown fields are errors.

A refused input prints its message and where it was raised, and exits with status 1 (2 for
``awr dataset`` and ``awr export`` options argparse rejects), without a traceback. Add ``--traceback``
anywhere on the command line, or set ``AWR_TRACEBACK=1`` (which DDP workers and ``torchrun`` inherit), to
get Python's traceback instead. Refusals are the config errors of the parser, Lightning's
``MisconfigurationException``, dataset faults, missing files, and the ``ValueError``/``TypeError`` that this
project's argument checks raise; anything else is treated as a bug and always shows its traceback
(:func:`~awr_modules.configured.is_refusal` says why).

The CLI's parts live in :mod:`awr_modules.configured` (the Lightning CLI and the module a config
builds), which the subcommands import; this module only dispatches, so the imports form no cycle.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import warnings

from lightning.pytorch import Trainer

from awr_modules import dataset_cli, export
from awr_modules.configured import (  # noqa: F401  (AWRCLI, module_from_config... stay importable from here)
    AWRCLI,
    TRACEBACK_ENV,
    TRACEBACK_FLAG,
    TRAINER_DEFAULTS,
    cli_main,
    load_trained_module,
    module_from_config,
    run_reporting_refusals,
)

OWN_SUBCOMMANDS = {"dataset": dataset_cli.run, "export": export.run}
SUBCOMMAND_HELP = {
    "fit": "train: one epoch is one AWR iteration (collect, refresh targets, value and policy steps); "
           "--ckpt_path last resumes",
    "validate": "evaluate a checkpoint's deterministic policy (--ckpt_path), logged as eval/return",
    "test": "the same evaluation as validate, logged as test/return",
    "predict": "deterministic episodes of a checkpoint's policy, returned as rollouts",
    "dataset": "write a Minari dataset: a checkpoint's policy, random actions, or a run's recorded history",
    "export": "write a checkpoint's deterministic policy as a torch.export file that needs torch alone",
}


def _short_doc(thing: object) -> str:
    """The first line of ``thing``'s docstring (a subcommand's one-line help)."""
    lines = (inspect.getdoc(thing) or "").strip().splitlines()
    return lines[0] if lines else ""


def _parser() -> argparse.ArgumentParser:
    """``awr``'s top level: every subcommand with its one-line help (each subcommand parses its own options)."""
    parser = argparse.ArgumentParser(
        prog="awr", description="Advantage-Weighted Regression on TorchRL and Lightning.",
        epilog=f"`awr SUBCOMMAND --help` lists a subcommand's options. A refused input prints its message without "
               f"a traceback; {TRACEBACK_FLAG} or {TRACEBACK_ENV}=1 shows it.")
    parser.add_argument(TRACEBACK_FLAG, action="store_true", help="show the traceback of a refused input")
    commands = parser.add_subparsers(title="subcommands", metavar="SUBCOMMAND")
    for name in [*AWRCLI.subcommands(), *OWN_SUBCOMMANDS]:
        commands.add_parser(name, help=SUBCOMMAND_HELP.get(name) or _short_doc(getattr(Trainer, name)), add_help=False)
    return parser


def _dispatch(args: list[str]) -> None:
    """Run the subcommand that ``args`` starts with (``--traceback`` already taken out)."""
    if not args or args[0] in ("-h", "--help"):
        _parser().print_help()
        if not args:
            raise SystemExit(2)
        return
    command, rest = args[0], args[1:]
    if command in OWN_SUBCOMMANDS:
        OWN_SUBCOMMANDS[command](rest)
    elif command in AWRCLI.subcommands() or command.startswith("-"):  # Lightning's, or its top-level options
        with warnings.catch_warnings():  # the arguments are sys.argv's, passed on without --traceback on purpose
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            cli_main(args, exit_on_error=False)
    else:
        _parser().error(f"unknown subcommand {command!r}; choose from {[*AWRCLI.subcommands(), *OWN_SUBCOMMANDS]}.")


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``awr`` console script (``args`` replaces ``sys.argv[1:]``): Lightning's subcommands,
    ``awr dataset`` (Minari datasets) and ``awr export`` (a policy file that runs with torch alone), with refused
    inputs reported as messages (see the module doc)."""
    argv = list(sys.argv[1:] if args is None else args)
    command = next((arg for arg in argv if arg != TRACEBACK_FLAG), "-")
    run_reporting_refusals("awr" if command.startswith("-") else f"awr {command}", _dispatch, argv)


if __name__ == "__main__":
    main()
