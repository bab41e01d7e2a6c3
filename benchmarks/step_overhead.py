"""Where a policy-phase step's time goes: Lightning's per-step calls, and the AWR loss against plain PyTorch.

    python benchmarks/step_overhead.py --config configs/lunarlander.yaml

Times one policy-phase minibatch step (batch of the config, from 50k stored transitions, one
torch thread) in six ways, in rounds that alternate them (each round starting one way later)
so that drift of the machine's speed hits all alike, and reports the median milliseconds per
step of each:

- ``plain``: the plain PyTorch step of ``iteration_time.py`` (gather, forward, ``loss.backward()``,
  SGD step);
- ``plain, Lightning calls``: the same step inside a running ``Trainer`` with
  ``self.manual_backward(loss)`` and the ``LightningOptimizer``'s ``step()``, as ``AWRModule``
  takes its steps (the module's and callbacks' ``on_before_backward``, ``on_after_backward``
  and ``on_before_optimizer_step`` hooks run every step);
- ``AWRLoss eager`` / ``AWRLoss compiled``: ``AWRModule``'s own minibatch loss (the gather
  ``stored[index]`` and ``AWRLoss.actor_loss``, eager or ``torch.compile``d as with
  ``--model.compile true``; ``awr_modules.phases.minibatch_losses``) with ``loss.backward()``
  and a raw SGD step, no Lightning;
- ``AWRLoss eager, functional=True``: the same eager step with TorchRL's default functional loss,
  which swaps the parameters into the networks on every call (``AWRModule`` uses ``functional=False``);
- ``AWRLoss compiled, Lightning calls``: that compiled loss with Lightning's calls, i.e. a
  policy step of ``awr fit --model.compile true`` under a precision plugin, DDP or a step hook;
- ``AWRLoss fused, 8 steps per graph``: ``awr_modules.fused_steps.FusedSGDSteps`` over the same loss,
  i.e. a policy step of ``awr fit --model.compile true`` otherwise (``fused_steps`` 8, its default).

Writes ``benchmarks/results/step_overhead_<task>.csv``.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from iteration_time import BUFFER, PlainAWR, time_steps, update_step
from lightning.pytorch.callbacks import ModelCheckpoint
from tensordict import TensorDict
from torch.utils.data import DataLoader

from awr_modules import AWRLoss
from awr_modules.cli import cli_main
from awr_modules.fused_steps import FusedSGDSteps
from awr_modules.phases import minibatch_losses

FUSED = 8  # steps per graph of the fused way: AWRModule's default fused_steps


class _Steps(pl.LightningModule):
    """Times each way of stepping in its ``training_step``: one Lightning step per round."""

    def __init__(self, model, batch: int, steps: int, rounds: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.plain = PlainAWR(model)
        self.actor = model.actor
        self.plain_actor = self.plain.actor
        self.batch, self.steps, self.rounds = batch, steps, rounds
        self.stored = self._stored(model)
        loss = model.loss_module
        functional = AWRLoss(model.actor, model.critic, temperature=float(loss.temperature),
                             max_weight=float(loss.max_weight), value_scale=float(loss.value_scale),
                             action_bound_penalty=float(loss.action_bound_penalty),
                             entropy_coeff=float(loss.entropy_coeff), action_l2_coeff=float(loss.action_l2_coeff),
                             weighting=loss.weighting, check_inputs=False, functional=True)
        self.loss_fns = {"eager": minibatch_losses(loss)[0],
                         "compiled": minibatch_losses(loss, compile=True)[0],
                         "eager, functional": minibatch_losses(functional)[0]}
        self.milliseconds: dict[str, list[float]] = {}

    @staticmethod
    def _stored(model) -> TensorDict:
        """``BUFFER`` random transitions with the keys the AWR loss reads, as in ``AWRModule``'s storage."""
        env = model.recipe.make_env(0)
        observation_size = env.observation_spec["observation"].shape[-1]
        actions = env.action_spec.rand((BUFFER,))
        env.close()
        return TensorDict({"observation": torch.randn(BUFFER, observation_size), "action": actions,
                           "advantage": torch.randn(BUFFER, 1), "value_target": torch.randn(BUFFER, 1)}, [BUFFER])

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        self.awr_optimizer = torch.optim.SGD(self.actor.parameters(), lr=self.plain.actor_optimizer.defaults["lr"],
                                             momentum=self.plain.actor_optimizer.defaults["momentum"])
        self.fused = FusedSGDSteps(self.loss_fns["eager"], "loss_actor", self.actor, self.awr_optimizer, FUSED)
        return [self.plain.actor_optimizer, self.awr_optimizer]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(range(self.rounds), batch_size=1)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        plain_lightning, awr_lightning = self.optimizers()
        plain_raw, awr_raw = plain_lightning.optimizer, awr_lightning.optimizer
        lightning_backward, raw_backward = self.manual_backward, torch.Tensor.backward
        ways = {
            "plain": (self.plain.policy_loss, plain_raw, raw_backward),
            "plain, Lightning calls": (self.plain.policy_loss, plain_lightning, lightning_backward),
            "AWRLoss eager": (self._awr_loss("eager"), awr_raw, raw_backward),
            "AWRLoss compiled": (self._awr_loss("compiled"), awr_raw, raw_backward),
            "AWRLoss compiled, Lightning calls": (self._awr_loss("compiled"), awr_lightning, lightning_backward),
            "AWRLoss eager, functional=True": (self._awr_loss("eager, functional"), awr_raw, raw_backward),
        }
        names = list(ways)
        start = batch_idx % len(names)  # each round starts one way later: no way always follows the same one
        names.append(f"AWRLoss fused, {FUSED} steps per graph")
        for name in names[start:] + names[:start]:
            if name in ways:
                seconds = time_steps(update_step(*ways[name]), self.steps, self.batch, warmup=30)
            else:
                seconds = self._time_fused()
            self.milliseconds.setdefault(name, []).append(1e3 * seconds / self.steps)

    def _time_fused(self) -> float:
        """Seconds of ``steps`` fused steps on fresh uniform indices, after a warm-up call (whose indices are
        drawn alike)."""
        self.fused(self.stored, torch.randint(BUFFER, (4 * FUSED, self.batch)))
        start = time.perf_counter()
        self.fused(self.stored, torch.randint(BUFFER, (self.steps - self.steps % FUSED, self.batch)))
        return time.perf_counter() - start

    def _awr_loss(self, mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The AWR policy loss on ``stored[index]`` as a function of the indices."""
        loss_fn, stored = self.loss_fns[mode], self.stored

        def loss(index: torch.Tensor) -> torch.Tensor:
            return loss_fn(stored, index)["loss_actor"]

        return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--steps", type=int, default=1000, help="timed steps per way and round")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    model = cli_main(["-c", str(args.config)], run=False).model
    steps = _Steps(model, model.hparams.actor_batch_size, args.steps, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:  # the callbacks of `awr fit` with --trainer.enable_progress_bar=false
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False,
                             enable_progress_bar=False, callbacks=[ModelCheckpoint(dirpath=tmp)])
        trainer.fit(steps)

    machine = f"{os.cpu_count()} CPU cores, 1 torch thread"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"step_overhead_{args.config.stem}.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["way", "median_ms_per_step", "min_ms", "max_ms", "rounds", "machine"])
        for name, values in steps.milliseconds.items():
            writer.writerow([name, f"{np.median(values):.3f}", f"{min(values):.3f}", f"{max(values):.3f}",
                             len(values), machine])
    print(f"| policy step ({machine}) | median ms | min-max ms |\n|---|---|---|")
    for name, values in steps.milliseconds.items():
        print(f"| {name} | {np.median(values):.3f} | {min(values):.3f}-{max(values):.3f} |")


if __name__ == "__main__":
    main()
