"""Callbacks that dump each DDP rank's state, for ``test_ddp.py``'s runs.

The runs name them on the command line (``--trainer.callbacks+=ddp_probe.DumpRankState``), so every rank's
process imports this module while jsonargparse parses, which also makes each rank record its own observation
moments before they are pooled across ranks.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from awr_modules.observation_statistics import ObservationStatistics

LOCAL_STATISTICS: dict = {}  # this rank's own recorded moments, before the last pooling across ranks
_update = ObservationStatistics.update


def _recording_update(self, batch, env_steps, mean_across_ranks=None):
    def mean(tensor):  # at the first pooled moment the rank's own recorded moments are still in place
        if not LOCAL_STATISTICS:
            LOCAL_STATISTICS.update({key: value.clone() for key, value in self.state_dict().items()})
        return mean_across_ranks(tensor)

    LOCAL_STATISTICS.clear()
    _update(self, batch, env_steps, None if mean_across_ranks is None else mean)


ObservationStatistics.update = _recording_update


def rank_state(module: pl.LightningModule) -> dict:
    buffer = module.awr.data.fifo
    return {
        "parameters": [p.detach().clone() for p in module.parameters()],
        "observations": buffer[: len(buffer)]["observation"].clone(),
        "normalizer": module.awr.statistics.state_dict(),
        "local_statistics": dict(LOCAL_STATISTICS),
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
    }


class DumpRankState(pl.Callback):
    """Save this rank's parameters, buffer observations and RNG state after the first iteration."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        torch.save(rank_state(module), self.out_dir / f"rank{trainer.global_rank}.pt")


class DumpRestoredState(DumpRankState):
    """Save the same, as restored from the checkpoint: right after the module and Lightning loaded it (callbacks'
    ``on_load_checkpoint`` runs then), before anything else draws random numbers."""

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        pass

    def on_load_checkpoint(self, trainer: pl.Trainer, module: pl.LightningModule, checkpoint: dict) -> None:
        torch.save(rank_state(module), self.out_dir / f"resumed{trainer.global_rank}.pt")
