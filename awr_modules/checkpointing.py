"""The ``awr`` CLI's checkpoint callback: Lightning's ``ModelCheckpoint``, with the run's end always saved.

An AWR checkpoint holds the replay buffer (for HalfCheetah about 14 MB) so that a resumed run continues
with the data it had. Written after every iteration, it costs a 1M-sample MuJoCo run close to 10% of its
wall-clock, so the MuJoCo configs save every ``every_n_epochs: 10`` iterations. Lightning's callback then
leaves the last iterations of a run unsaved when the run's length is not a multiple of that period (with
``save_last="link"``, ``last.ckpt`` keeps pointing at the older save). :class:`IterationCheckpoint` writes
the final iteration's checkpoint too, so ``last.ckpt`` is always the end of training.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


class IterationCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also saves when training ends on an iteration ``every_n_epochs`` skipped.

    The arguments are ``ModelCheckpoint``'s; the ``awr`` CLI sets its defaults (``save_last="link"``, saving at
    the end of each training epoch, i.e. each AWR iteration).
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Same rule as Lightning's epoch-end save (every rank calls it: the module gathers every rank's buffer).
        # Lightning's private helpers are used as ModelCheckpoint itself uses them (Lightning 2.x).
        if self.every_n_epochs and self._should_save_on_train_epoch_end(trainer) \
                and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)
