"""What one Q-critic step costs, part by part, with TorchRL's ``SoftUpdate`` or ``LeafwiseSoftUpdate`` and Adam's
for-loop or fused implementation, side by side.

    python benchmarks/q_critic_step.py                  # HalfCheetah-v5's networks, configs/halfcheetah.yaml's sizes
    python benchmarks/q_critic_step.py --env-id Humanoid-v5 --clock cpu

A Q critic (``awr_modules.q_critic.QCritic``) takes hundreds of Q steps per AWR iteration, each followed by a soft
update of the target networks: the update and the optimizer step cost as much as a quarter of a step on the small
networks of the MuJoCo recipe. Each way builds the recipe's twin Q networks (same initial weights), a
``TwinQLoss`` (4 policy samples, as ``configs/reference/q_critic.yaml``) and Adam (lr 3e-4), and times a value-phase
step on minibatches of 256 from 50,000 stored random transitions (one torch thread): the compiled minibatch loss
(``torch.compile`` of the gather and the loss, as ``model.execution: Compiled`` runs it, or eager with
``--eager``), ``backward()``, ``optimizer.step()`` and the soft update, each timed on its own. Ways:

- ``SoftUpdate, Adam``: 0.3.5's step, TorchRL's ``SoftUpdate`` on the nested TensorDicts;
- ``LeafwiseSoftUpdate, Adam``: the soft update tensor by tensor (the Q critic's since 0.3.6);
- ``LeafwiseSoftUpdate, Adam fused``: also ``torch.optim.Adam(fused=True)`` (the Q critic's one by one since 0.3.6);
- ``FusedAdamSteps, k per graph``: the same step (fused Adam's state, ``LeafwiseSoftUpdate``) as one compiled graph of
  gradient, Adam's update and soft update, ``k`` steps per graph call (``--fused``), as ``model.execution: Compiled``
  runs the Q critic's value phase since 0.3.7 (``awr_modules.fused_steps.FusedAdamSteps``); timed as a whole.

The ways run in rounds of ``--steps`` steps, each round starting one way later, so that drift of the machine's
speed hits all alike; a way's ``ratio`` is the median over rounds of its step time over the first way's of the
same round. ``--clock cpu`` times this thread's CPU time instead of the wall clock (steadier beside other
processes). Prints a markdown table and writes ``benchmarks/results/q_critic_step_<env>.csv``.
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torchrl.objectives import SoftUpdate

from awr_modules.fused_steps import FusedAdamSteps
from awr_modules.phases import for_compiled_phases, minibatch
from awr_modules.q_critic import QCritic
from awr_recipes.mujoco import MuJoCo

PARTS = ("loss", "backward", "optimizer", "soft_update")
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}
RESULTS = Path(__file__).resolve().parent / "results"


class QStep:
    """One way of taking a Q-critic step: its own networks, optimizer and soft update, one step per call."""

    def __init__(self, recipe: MuJoCo, stored: TensorDictBase, *, leafwise: bool, fused: bool, eager: bool) -> None:
        torch.manual_seed(0)  # every way starts from the same weights
        env = recipe.make_env(0, 1)
        actor, critic = recipe.make_networks(env)
        targets = QCritic(0.99, policy_samples=4)
        q_loss = targets.make_networks(recipe, env, actor, critic)
        if not leafwise:
            targets.target_update = SoftUpdate(q_loss, tau=targets.tau)
        phase = targets.value_phase()
        self.stored = for_compiled_phases(stored.select(*phase.keys))

        def value_loss(stored: TensorDictBase, index: torch.Tensor) -> TensorDictBase:
            return phase.loss(minibatch(stored, index))

        self.loss = value_loss if eager else torch.compile(value_loss)
        self.optimizer = torch.optim.Adam(phase.network.parameters(), lr=3e-4, fused=fused or None)
        self.soft_update = targets.target_update.step
        self.network = phase.network

    def run(self, indices: torch.Tensor, clock: Callable[[], float]) -> dict[str, float]:
        """Seconds per part, summed over the steps of ``indices`` ``[steps, batch]``."""
        spent = dict.fromkeys(PARTS, 0.0)
        for index in indices:
            start = clock()
            out = self.loss(self.stored, index)
            loss_done = clock()
            self.optimizer.zero_grad(set_to_none=True)
            out["loss_value"].backward()
            backward_done = clock()
            self.optimizer.step()
            optimizer_done = clock()
            self.soft_update()
            end = clock()
            for part, (a, b) in zip(PARTS, ((start, loss_done), (loss_done, backward_done),
                                            (backward_done, optimizer_done), (optimizer_done, end)), strict=True):
                spent[part] += b - a
        return spent


class FusedQSteps(QStep):
    """``steps_per_call`` Q-critic steps per call of one compiled graph (``FusedAdamSteps``), fused Adam's state."""

    def __init__(self, recipe: MuJoCo, stored: TensorDictBase, *, steps_per_call: int) -> None:
        super().__init__(recipe, stored, leafwise=True, fused=True, eager=True)  # the eager loss is traced
        self.fused = FusedAdamSteps(self.loss, "loss_value", self.network, self.optimizer, steps_per_call,
                                    after_step=self.soft_update)

    def run(self, indices: torch.Tensor, clock: Callable[[], float]) -> dict[str, float]:
        start = clock()
        self.fused(self.stored, indices)
        return {"whole": clock() - start}


def stored_transitions(env_id: str, rows: int) -> TensorDict:
    """``rows`` random transitions with the env's observation and action sizes (a step's cost ignores values)."""
    env = MuJoCo(env_id=env_id).make_env(0, 1)
    obs, act = env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1]
    return TensorDict({"observation": torch.randn(rows, obs), "action": torch.rand(rows, act) * 2 - 1,
                       "next": {"observation": torch.randn(rows, obs), "reward": torch.randn(rows, 1),
                                "terminated": torch.rand(rows, 1) < 0.01}}, [rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env-id", default="HalfCheetah-v5")
    parser.add_argument("--hidden-sizes", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--steps", type=int, default=96, help="steps per way and round (a multiple of every --fused)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=48, help="untimed steps per way first (compilation)")
    parser.add_argument("--eager", action="store_true", help="the minibatch loss uncompiled")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--fused", type=int, nargs="*", default=[2, 8], help="steps per graph of the fused ways")
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = MuJoCo(env_id=args.env_id, hidden_sizes=args.hidden_sizes)
    stored = stored_transitions(args.env_id, 50_000)
    ways = {"SoftUpdate, Adam": QStep(recipe, stored, leafwise=False, fused=False, eager=args.eager),
            "LeafwiseSoftUpdate, Adam": QStep(recipe, stored, leafwise=True, fused=False, eager=args.eager),
            "LeafwiseSoftUpdate, Adam fused": QStep(recipe, stored, leafwise=True, fused=True, eager=args.eager),
            **{f"FusedAdamSteps, {k} per graph": FusedQSteps(recipe, stored, steps_per_call=k) for k in args.fused}}
    clock = CLOCKS[args.clock]
    for way in ways.values():
        way.run(torch.randint(0, len(stored), (args.warmup, 256)), clock)  # a multiple of every --fused
    names = list(ways)
    per_round: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        indices = torch.randint(0, len(stored), (args.steps, 256))
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            per_round[name].append({part: seconds / args.steps for part, seconds in ways[name].run(indices, clock).items()})
    first = [sum(r.values()) for r in per_round[names[0]]]
    rows = []
    for name in names:
        totals = [sum(r.values()) for r in per_round[name]]
        row = {"way": name, "ms_per_step": f"{np.median(totals) * 1e3:.3f}",
               **{f"{part}_ms": f"{np.median([r[part] for r in per_round[name]]) * 1e3:.3f}" if part in per_round[name][0]
                  else "" for part in PARTS},
               "ratio": f"{np.median(np.divide(totals, first)):.3f}", "rounds": args.rounds, "clock": args.clock,
               "compiled": not args.eager}
        rows.append(row)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"q_critic_step_{args.env_id.split('-')[0].lower()}.csv"
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    columns = ["way", "ms_per_step", *(f"{part}_ms" for part in PARTS), "ratio"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    print(f"\n{out}")


if __name__ == "__main__":
    main()
