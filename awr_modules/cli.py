"""The ``awr`` console script: Lightning's CLI over :class:`~awr_modules.AWRModule`.

    awr fit -c configs/pendulum.yaml
    awr validate -c configs/pendulum.yaml --ckpt_path runs/pendulum/checkpoints/last.ckpt
    awr fit -c configs/pendulum.yaml --ckpt_path last      # resume after a crash
    awr dataset random -c configs/pendulum.yaml --episodes 10 --id pendulum/random-v0   # see dataset_cli
    awr export -c configs/pendulum.yaml --checkpoint runs/pendulum/checkpoints/last.ckpt --out policy.pt2

The config is the signature: every field is a constructor argument of
``AWRModule``, its recipe, or Lightning's ``Trainer``; unknown fields are errors.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from awr_modules.checkpointing import IterationCheckpoint
from awr_modules.cpu_worker import hide_gpus, trains_on_cpu_only
from awr_modules.environment import environment_variable
from awr_modules.module import AWRModule

TRAINER_DEFAULTS = {
    "num_sanity_val_steps": 0,  # an untrained policy's evaluation tells nothing and costs episodes
    "log_every_n_steps": 1,
    "enable_model_summary": False,
}


class AWRCLI(LightningCLI):
    """LightningCLI with a ``--num_threads`` option applied before anything is built."""

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

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.config.get("subcommand"), self.config) if "subcommand" in self.config \
            else self.config
        if config.get("num_threads", 0) <= 0:
            raise ValueError(f"awr: --num_threads must be >= 1, got {config.get('num_threads')}.")
        torch.set_num_threads(config["num_threads"])
        if trains_on_cpu_only(config.trainer.accelerator):
            hide_gpus()  # cheaper device checks where synchronous collection steps envs; undone by cli_main
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = _experiment_checkpoint_dir(config.trainer.logger)


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


def cli_main(args: list[str] | None = None, *, run: bool = True) -> AWRCLI:
    """Run the CLI; ``args`` replaces ``sys.argv`` (tests and notebooks). Returns the CLI with its trainer.

    With ``run=False`` the config is parsed and the module and trainer are built, nothing more
    (then ``args`` has no subcommand).

    A run on the CPU hides GPUs from its process while the CLI runs (see :mod:`awr_modules.cpu_worker`); the
    process's ``CUDA_VISIBLE_DEVICES`` is restored on return, so a later run in the same process sees its GPUs.
    """
    with environment_variable("CUDA_VISIBLE_DEVICES"):
        return AWRCLI(
            AWRModule,
            trainer_defaults=TRAINER_DEFAULTS,
            args=args,
            run=run,
        )


def module_from_config(config: str | os.PathLike) -> AWRModule:
    """The ``AWRModule`` a config builds, without a logger or a run (``awr export``, ``awr dataset``)."""
    return cli_main(["-c", str(config), "--trainer.logger=false"], run=False).model


def load_trained_module(config: str | os.PathLike, checkpoint: str | os.PathLike) -> AWRModule:
    """The config's ``AWRModule`` with a checkpoint's networks, after checking that it fits the config's task and
    network sizes (``awr export``, ``awr dataset policy``)."""
    module = module_from_config(config)
    module.load_networks(checkpoint)
    return module


def main() -> None:
    """Entry point of the ``awr`` console script: Lightning's subcommands, ``awr dataset`` (Minari datasets) and
    ``awr export`` (a policy file that runs with torch alone)."""
    if sys.argv[1:2] == ["dataset"]:
        from awr_modules.dataset_cli import main as dataset_main

        dataset_main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["export"]:
        from awr_modules.export import main as export_main

        export_main(sys.argv[2:])
        return
    cli_main()


if __name__ == "__main__":
    main()
