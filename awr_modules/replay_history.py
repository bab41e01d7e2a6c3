"""``ReplayHistory``: a Lightning callback that keeps every batch a run collects, for datasets made later.

The replay buffer is a FIFO of the last ``buffer_size`` transitions; a "replay" dataset (everything
a run saw up to some point, e.g. D4RL's medium-replay) needs all of them. This callback saves each
iteration's collected batch (``[envs, T]``, the fields a dataset needs, actions in the actor's units)
to ``dirpath/batch_<iteration>[_rank<r>].pt``; :func:`~awr_modules.dataset_writer.write_history_dataset`
turns them into a Minari dataset.

    awr fit -c configs/halfcheetah.yaml \\
        --trainer.callbacks+=awr_modules.replay_history.ReplayHistory \\
        --trainer.callbacks.dirpath=runs/halfcheetah/history
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

HISTORY_KEYS = ("observation", "action", ("next", "observation"), ("next", "reward"), ("next", "done"),
                ("next", "terminated"), ("next", "truncated"), ("collector", "traj_ids"))


class ReplayHistory(pl.Callback):
    """Saves each iteration's collected batch under ``dirpath`` (about 0.2 MB per HalfCheetah iteration).

    Args:
        dirpath: folder of the batch files (created; a resumed run continues numbering by iteration).
    """

    def __init__(self, dirpath: str | os.PathLike) -> None:
        self.dirpath = Path(dirpath)
        self.segment = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """This process's segment: the iteration it starts at. A resumed run's collector counts its trajectory
        ids from 0 again, so a trajectory is (segment, id)."""
        self.segment = pl_module.iteration

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        collected = pl_module.last_iteration.batch  # the AWR iteration's collected batch, None offline
        if collected is None:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        rank = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        batch = collected.select(*HISTORY_KEYS).cpu().clone()
        batch.set(("collector", "segment"), torch.full(batch.shape, self.segment, dtype=torch.long))
        torch.save(batch, self.dirpath / f"batch_{pl_module.iteration:06d}{rank}.pt")
