"""Run one tiny AWR iteration under DDP (2 CPU processes, gloo) and dump each rank's state.

Launched by ``test_ddp.py`` as a script, because Lightning's ``ddp`` strategy
starts the other ranks by re-running this command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lightning_helpers import tiny_args

from awr_modules.cli import cli_main


class DumpRankState(pl.Callback):
    """After the first iteration, save this rank's parameters and collected observations."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        buffer = module.runtime.buffer
        torch.save(
            {
                "parameters": [p.detach().clone() for p in module.parameters()],
                "observations": buffer[: len(buffer)]["observation"].clone(),
                "normalizer": module.runtime.train_env.transform[1].get_extra_state(),
            },
            self.out_dir / f"rank{trainer.global_rank}.pt",
        )


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    cli = cli_main(["fit", *tiny_args(out_dir, epochs=1, extra=[
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
        "--model.recipe.init_args.normalizer_samples=100000"]), "--trainer.callbacks+=ddp_probe.DumpRankState",
        f"--trainer.callbacks.out_dir={out_dir}"])
