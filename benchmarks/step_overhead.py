"""What a policy step costs with ``AWRLoss`` in an eager loop of one's own, compiled and fused, beside plain PyTorch.

    python benchmarks/step_overhead.py                  # HalfCheetah-v5's networks and the shipped settings
    python benchmarks/step_overhead.py --config configs/lunarlander.yaml

Times one policy-phase minibatch step (the batch size of the task, from 50k stored random
transitions, one torch thread) in several ways, in rounds that alternate them (each round starting
one way later) so that drift of the machine's speed hits all alike. Each way's time is divided by
the ``plain`` step's time of the same round; the median of those ratios over the rounds is the
``ratio`` column, beside the median milliseconds per step:

- ``plain``: a policy step in plain PyTorch over stored tensors: gather, an MLP of the same sizes,
  ``Normal`` (or categorical) log-likelihood weighted by ``min(exp(A), w_max)``, ``loss.backward()``,
  an SGD step (the plain loop of ``iteration_time.py``);
- ``plain + normaliser, bound penalty``: the same with the recipe's observation normaliser in front
  of the MLP and the action-bound penalty of the settings, the arithmetic ``AWRLoss`` adds on the
  recipe's networks (shown when the penalty is on);
- ``plain, Lightning calls``: the plain step inside a running ``Trainer`` with ``manual_backward`` and
  the ``LightningOptimizer``'s ``step()``, as ``AWRModule`` takes its steps;
- ``AWRLoss eager, defaults``: the gather ``stored[index]`` (``awr_modules.phases.minibatch``) and
  ``AWRLoss.actor_loss`` built with the task's coefficients and nothing else: TorchRL's functional
  parameters, input checks and diagnostics on every call;
- ``AWRLoss eager``: built as ``AWRModule`` builds it, ``functional=False, check_inputs=False``;
- ``AWRLoss eager, diagnostics=False``: also without the diagnostics, the fast settings of a loop that
  does not log every step (rows the checkout's ``AWRLoss`` has no option for are left out);
- ``AWRLoss compiled`` (and ``, Lightning calls``): the gather and the loss as one ``torch.compile``
  graph, as with ``--model.compile true`` under a precision plugin, DDP or a step hook;
- ``AWRLoss fused, 8 steps per graph``: ``awr_modules.fused_steps.FusedSGDSteps`` over that loss.

``--config`` reads the task from an ``awr fit`` config through the CLI (the recipe, the loss's
coefficients, the policy phase's batch size and the actor's SGD settings: see :func:`from_config`); without it the
HalfCheetah-v5 networks are built from the recipe directly with ``configs/halfcheetah.yaml``'s
settings. ``--skip-compiled`` leaves out the rows that need ``torch.compile``; ``--clock cpu`` times this
thread's CPU time instead of the wall clock (steadier on a machine shared with other processes). Rows are written to
``benchmarks/results/step_overhead_<task>_ratios.csv`` under ``--label`` (rows of other labels in the
file are kept, so that runs of two checkouts sit side by side) and printed as a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from iteration_time import update_step  # the plain loop's step, shared with the per-iteration benchmark
from lightning.pytorch.callbacks import ModelCheckpoint
from tensordict import TensorDict, TensorDictBase
from torch.utils.data import DataLoader

from awr_modules import AWRLoss
from awr_modules.normalizer import ObservationNormalizer

try:  # the module's gather; the same one-liner where a checkout keeps it elsewhere
    from awr_modules.phases import minibatch
except ImportError:  # pragma: no cover - other layouts

    def minibatch(stored: TensorDictBase, index: torch.Tensor) -> TensorDictBase:
        return stored.apply(lambda tensor: tensor[index], batch_size=index.shape)

BUFFER = 50_000
FUSED = 8  # steps per graph of the fused way: AWRModule's default fused_steps
PLAIN_STD = 0.2  # the plain loop's fixed std (iteration_time.py)
Step = Callable[[torch.Tensor], Any]


@dataclass
class Task:
    """What the ways share: the recipe's networks, the loss's coefficients, the batch and the actor's SGD."""

    name: str
    recipe: Any
    batch_size: int
    lr: float
    momentum: float
    loss_kwargs: dict[str, Any] = field(default_factory=dict)


def halfcheetah() -> Task:
    """HalfCheetah-v5 with ``configs/halfcheetah.yaml``'s networks, batch, actor SGD and loss coefficients."""
    from awr_recipes.mujoco import MuJoCo

    recipe = MuJoCo(env_id="HalfCheetah-v5", hidden_sizes=[128, 64], policy="fixed_std", action_std=0.4)
    return Task("halfcheetah", recipe, batch_size=256, lr=5e-5, momentum=0.9,
                loss_kwargs={"temperature": 1.0, "max_weight": 20.0, "value_scale": 1.0 / (1.0 - 0.99),
                             "action_bound_penalty": 10.0, "entropy_coeff": 0.0, "action_l2_coeff": 0.0,
                             "weighting": "loss"})


def _first(obj: Any, *paths: str) -> Any:
    """The first of the dotted attribute ``paths`` that ``obj`` has."""
    for path in paths:
        value = obj
        try:
            for name in path.split("."):
                value = getattr(value, name)
        except AttributeError:
            continue
        return value
    raise AttributeError(f"the module has none of {paths}; run without --config to build the networks directly")


def from_config(config: Path) -> Task:
    """The task of an ``awr fit`` config, read from the ``AWRModule`` the CLI builds (nothing is trained).

    Reads ``model.recipe``; ``model.loss_module`` (an ``AWRLoss``) for the loss's coefficients; the policy
    phase's batch size (``model.awr.policy_phase.batch_size``, or ``model.hparams.actor_batch_size`` of 0.1.0's
    module); and the actor's learning rate and momentum from the first optimizer ``model.configure_optimizers()``
    returns (or ``model.hparams.actor_lr`` / ``model.hparams.momentum`` of 0.1.0's module).
    """
    from awr_modules.cli import cli_main

    model = cli_main(["-c", str(config)], run=False).model
    loss = model.loss_module
    coefficients = {name: float(getattr(loss, name)) for name in
                    ("temperature", "max_weight", "value_scale", "action_bound_penalty", "entropy_coeff",
                     "action_l2_coeff")}
    batch_size = int(_first(model, "awr.policy_phase.batch_size", "hparams.actor_batch_size"))
    try:
        lr, momentum = float(model.hparams.actor_lr), float(model.hparams.momentum)
    except (AttributeError, KeyError):
        optimizers = model.configure_optimizers()
        optimizers = optimizers[0] if isinstance(optimizers, tuple) else optimizers
        group = optimizers[0].param_groups[0]
        lr, momentum = float(group["lr"]), float(group.get("momentum", 0.0))
    return Task(config.stem, model.recipe, batch_size, lr, momentum, {**coefficients, "weighting": loss.weighting})


def _mlp(inputs: int, outputs: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(inputs, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                               torch.nn.ReLU(), torch.nn.Linear(64, outputs))


class PlainPolicyStep:
    """The AWR policy loss in plain PyTorch over stored tensors, as ``iteration_time.py``'s plain loop writes it:

    ``-mean(min(exp(A), w_max) log pi(a|s))`` with ``pi`` a fixed-std ``Normal`` or a categorical; with
    ``normalizer`` the network starts with it, and ``bound_penalty`` adds ``c 0.5 |mu - clip(mu, -1, 1)|^2``.
    """

    def __init__(self, stored: TensorDictBase, discrete: bool, task: Task, *, normalizer: torch.nn.Module | None = None,
                 bound_penalty: float = 0.0) -> None:
        self.observation, self.advantage = stored["observation"], stored["advantage"].squeeze(-1)
        self.action = stored["action"].argmax(-1) if discrete else stored["action"]
        self.discrete = discrete
        outputs = stored["action"].shape[-1]
        network = _mlp(self.observation.shape[-1], outputs)
        self.actor = network if normalizer is None else torch.nn.Sequential(normalizer, network)
        self.optimizer = torch.optim.SGD(self.actor.parameters(), lr=task.lr, momentum=task.momentum)
        self.log_max_weight = math.log(task.loss_kwargs["max_weight"])
        self.bound_penalty = bound_penalty

    def __call__(self, index: torch.Tensor) -> torch.Tensor:
        out = self.actor(self.observation[index])
        if self.discrete:
            log_prob = torch.log_softmax(out, -1).gather(-1, self.action[index].unsqueeze(-1)).squeeze(-1)
        else:
            log_prob = torch.distributions.Normal(out, PLAIN_STD).log_prob(self.action[index]).sum(-1)
        weight = torch.exp(self.advantage[index].clamp(max=self.log_max_weight))
        loss = -(weight * log_prob)
        if self.bound_penalty:
            excursion = out - out.clamp(-1.0, 1.0)
            loss = loss + self.bound_penalty * (0.5 * excursion.pow(2)).sum(-1)
        return loss.mean()


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def time_steps(step: Step, steps: int, batch: int, clock: Callable[[], float], warmup: int = 30) -> float:
    """Seconds of ``steps`` calls of ``step`` on fresh uniform indices into ``BUFFER``, after ``warmup`` calls."""
    for _ in range(warmup):
        step(torch.randint(BUFFER, (batch,)))
    indices = [torch.randint(BUFFER, (batch,)) for _ in range(steps)]
    start = clock()
    for index in indices:
        step(index)
    return clock() - start


def _loss_options() -> set[str]:
    return set(inspect.signature(AWRLoss).parameters)


class _Steps(pl.LightningModule):
    """Times each way of stepping in its ``training_step``: one Lightning step per round."""

    def __init__(self, task: Task, steps: int, rounds: int, compiled: bool, clock: Callable[[], float]) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.task, self.steps, self.rounds, self.compiled, self.clock = task, steps, rounds, compiled, clock
        env = task.recipe.make_env(0)
        self.stored, discrete = self._stored(env)
        self.actor, self.critic = task.recipe.make_networks(env, task.loss_kwargs["value_scale"])
        env.close()
        self.plain = PlainPolicyStep(self.stored, discrete, task)
        penalty = task.loss_kwargs.get("action_bound_penalty") or 0.0
        normalizer = ObservationNormalizer(self.stored["observation"].shape[-1])  # the recipes' first layer
        self.plain_same_math = (PlainPolicyStep(self.stored, discrete, task, normalizer=normalizer,
                                                bound_penalty=penalty) if penalty else None)
        settings = {"defaults": {}, "module": {"functional": False, "check_inputs": False},
                    "no diagnostics": {"functional": False, "check_inputs": False, "diagnostics": False}}
        available = _loss_options()
        self.losses = {name: AWRLoss(self.actor, self.critic, **task.loss_kwargs, **options)
                       for name, options in settings.items() if set(options) <= available}
        self.compiled_loss = self._actor_loss(self.losses["module"], compile=True) if compiled else None
        self.milliseconds: dict[str, list[float]] = {}

    @staticmethod
    def _stored(env) -> tuple[TensorDict, bool]:
        """``BUFFER`` random transitions with the keys the AWR loss reads, as in ``AWRModule``'s storage."""
        observation_size = env.observation_spec["observation"].shape[-1]
        spec = env.action_spec
        stored = TensorDict({"observation": torch.randn(BUFFER, observation_size), "action": spec.rand((BUFFER,)),
                             "advantage": torch.randn(BUFFER, 1), "value_target": torch.randn(BUFFER, 1)}, [BUFFER])
        return stored, not spec.dtype.is_floating_point

    def _actor_loss(self, loss: AWRLoss, compile: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
        """The AWR policy loss on ``stored[index]`` as a function of the indices (one graph with ``compile``)."""

        def minibatch_loss(stored: TensorDictBase, index: torch.Tensor) -> TensorDictBase:
            return loss.actor_loss(minibatch(stored, index))

        function = torch.compile(minibatch_loss) if compile else minibatch_loss
        stored = self.stored
        return lambda index: function(stored, index)["loss_actor"]

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        self.awr_optimizer = torch.optim.SGD(self.actor.parameters(), lr=self.task.lr, momentum=self.task.momentum)
        optimizers = [self.plain.optimizer, self.awr_optimizer]
        self.fused = None
        if self.compiled:
            from awr_modules.fused_steps import FusedSGDSteps

            def minibatch_loss(stored: TensorDictBase, index: torch.Tensor) -> TensorDictBase:
                return self.losses["module"].actor_loss(minibatch(stored, index))

            self.fused = FusedSGDSteps(minibatch_loss, "loss_actor", self.actor, self.awr_optimizer, FUSED)
        if self.plain_same_math is not None:
            optimizers.append(self.plain_same_math.optimizer)
        return optimizers

    def train_dataloader(self) -> DataLoader:
        return DataLoader(range(self.rounds), batch_size=1)

    def _ways(self) -> dict[str, Step | None]:
        """Each way's step (``None``: the fused way, timed by its own loop)."""
        plain_lightning, awr_lightning, *_ = self.optimizers()
        plain_raw, awr_raw = plain_lightning.optimizer, awr_lightning.optimizer
        lightning_backward = self.manual_backward
        ways: dict[str, Step | None] = {"plain": update_step(self.plain, plain_raw)}
        if self.plain_same_math is not None:
            ways["plain + normaliser, bound penalty"] = update_step(self.plain_same_math,
                                                                    self.plain_same_math.optimizer)
        ways["plain, Lightning calls"] = update_step(self.plain, plain_lightning, lightning_backward)
        names = {"defaults": "AWRLoss eager, defaults", "module": "AWRLoss eager",
                 "no diagnostics": "AWRLoss eager, diagnostics=False"}
        for setting, loss in self.losses.items():
            ways[names[setting]] = update_step(self._actor_loss(loss), awr_raw)
        if self.compiled:
            ways["AWRLoss compiled"] = update_step(self.compiled_loss, awr_raw)
            ways["AWRLoss compiled, Lightning calls"] = update_step(self.compiled_loss, awr_lightning,
                                                                    lightning_backward)
            ways[f"AWRLoss fused, {FUSED} steps per graph"] = None
        return ways

    def training_step(self, batch: Any, batch_idx: int) -> None:
        ways = self._ways()
        names = list(ways)
        start = batch_idx % len(names)  # each round starts one way later: no way always follows the same one
        for name in names[start:] + names[:start]:
            step = ways[name]
            seconds = (self._time_fused() if step is None
                       else time_steps(step, self.steps, self.task.batch_size, self.clock))
            self.milliseconds.setdefault(name, []).append(1e3 * seconds / self.steps)

    def _time_fused(self) -> float:
        """Seconds of ``steps`` fused steps on fresh uniform indices, after a warm-up call (whose indices are
        drawn alike)."""
        batch = self.task.batch_size
        self.fused(self.stored, torch.randint(BUFFER, (4 * FUSED, batch)))
        index = torch.randint(BUFFER, (self.steps - self.steps % FUSED, batch))
        start = self.clock()
        self.fused(self.stored, index)
        return (self.clock() - start) * self.steps / index.shape[0]


def summary(milliseconds: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Per way: median ms per step, the median over rounds of its ratio to the same round's ``plain``, and ranges."""
    plain = np.asarray(milliseconds["plain"])
    rows = []
    for name, values in milliseconds.items():
        values = np.asarray(values)
        ratios = values / plain
        rows.append({"way": name, "median_ms_per_step": f"{np.median(values):.3f}",
                     "ratio_to_plain": f"{np.median(ratios):.3f}", "ratio_min": f"{ratios.min():.3f}",
                     "ratio_max": f"{ratios.max():.3f}", "min_ms": f"{values.min():.3f}",
                     "max_ms": f"{values.max():.3f}", "rounds": len(values)})
    return rows


def write(path: Path, label: str, machine: str, rows: list[dict[str, Any]]) -> None:
    """Replace ``label``'s rows of the CSV at ``path`` with ``rows``; other labels' rows stay."""
    kept = []
    if path.exists():
        with path.open(newline="") as f:
            kept = [row for row in csv.DictReader(f) if row["label"] != label]
    fields = ["label", "way", "median_ms_per_step", "ratio_to_plain", "ratio_min", "ratio_max", "min_ms", "max_ms",
              "rounds", "machine"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(kept)
        writer.writerows({"label": label, **row, "machine": machine} for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="an awr fit config (default: HalfCheetah-v5, built directly)")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--steps", type=int, default=1000, help="timed steps per way and round")
    parser.add_argument("--skip-compiled", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall-clock time, or this thread's CPU time (steadier beside other processes)")
    parser.add_argument("--label", default="this checkout", help="the rows' label in the CSV")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    task = from_config(args.config) if args.config is not None else halfcheetah()
    steps = _Steps(task, args.steps, args.rounds, compiled=not args.skip_compiled, clock=CLOCKS[args.clock])
    with tempfile.TemporaryDirectory() as tmp:  # the callbacks of `awr fit` with --trainer.enable_progress_bar=false
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[ModelCheckpoint(dirpath=tmp)])
        trainer.fit(steps)

    machine = f"{os.cpu_count()} CPU cores, 1 torch thread, {args.clock} clock"
    rows = summary(steps.milliseconds)
    path = args.out / f"step_overhead_{task.name}_ratios.csv"
    write(path, args.label, machine, rows)
    print(f"{args.label} ({task.name}, batch {task.batch_size}, {machine}, {args.rounds} rounds of {args.steps} "
          f"steps; ratio: median over rounds of the way's time / plain's) -> {path}")
    print("| policy step | median ms | ratio to plain | ratio range |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['way']} | {row['median_ms_per_step']} | {row['ratio_to_plain']}x | "
              f"{row['ratio_min']}-{row['ratio_max']} |")


if __name__ == "__main__":
    main()
