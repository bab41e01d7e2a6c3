"""Policy-phase update steps per second against torch's intra-op thread count.

    python benchmarks/threads.py --threads 1 2 --steps 300

One AWR policy step as `AWRModule` runs it (sample 256 transitions from a
50k buffer, `AWRLoss.actor_loss`, backward, SGD step) with the reference's
[128, 64] networks on Pendulum-sized data. Writes `benchmarks/results/threads.csv`.
The `awr` CLI's `--num_threads` default comes from this measurement.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from tensordict import TensorDict

from awr_modules import AWRLoss, make_replay_buffer
from awr_recipes.classic_control import ClassicControl

BUFFER = 50_000
BATCH = 256


def steps_per_second(threads: int, steps: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    recipe = ClassicControl("Pendulum-v1")
    env = recipe.make_env(seed=0)
    actor, critic = recipe.make_networks(env, value_scale=100.0)
    loss = AWRLoss(actor, critic, action_bound_penalty=10.0)
    buffer = make_replay_buffer(BUFFER, prioritized=False)
    buffer.extend(TensorDict({"observation": torch.randn(BUFFER, 3), "action": torch.randn(BUFFER, 1),
                              "advantage": torch.randn(BUFFER, 1), "value_target": torch.randn(BUFFER, 1)},
                             [BUFFER]))
    optimizer = torch.optim.SGD(actor.parameters(), lr=1e-4, momentum=0.9)

    def run(n: int) -> None:
        for _ in range(n):
            objective = loss.actor_loss(buffer.sample(BATCH))["loss_actor"]
            optimizer.zero_grad()
            objective.backward()
            optimizer.step()

    run(20)  # warm-up
    start = time.perf_counter()
    run(steps)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/threads.csv"))
    args = parser.parse_args()
    rows = [(threads, steps_per_second(threads, args.steps)) for threads in args.threads]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["threads", "policy_steps_per_second"])
        writer.writerows((t, f"{s:.1f}") for t, s in rows)
    for threads, rate in rows:
        print(f"{threads} thread(s): {rate:.1f} policy steps/s")


if __name__ == "__main__":
    main()
