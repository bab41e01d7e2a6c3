"""Cost of one evaluation (one episode per sub-env): TorchRL's env and actor against gymnasium stepped directly.

Both evaluators run the same episodes of the same deterministic policy (tested in
``tests/test_evaluation.py``): ``TorchRLEvaluator`` over the recipe's TorchRL env (transforms, the
probabilistic actor, TensorDict bookkeeping per batched step) and the recipe's ``GymnasiumEvaluator``
(the gymnasium vector env and the exported deterministic policy). They alternate, one torch thread, and
each evaluation's CPU time is recorded (the evaluation worker shares the cores with training, so CPU
time is what it costs training).

    python benchmarks/evaluation.py --env HalfCheetah-v5 --episodes 10 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from markdown_table import print_table

from awr_modules.cpu_worker import hide_gpus
from awr_modules.evaluation import TorchRLEvaluator
from awr_recipes.mujoco import MuJoCo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    hide_gpus()  # as in the evaluation worker
    torch.set_num_threads(1)
    torch.manual_seed(0)
    recipe = MuJoCo(args.env)
    actor, _ = recipe.make_networks(recipe.make_env(0))
    evaluators = {"TorchRL env and actor": TorchRLEvaluator(recipe.make_env(500, args.episodes)),
                  "gymnasium vector env, exported policy": recipe.make_evaluator(500, args.episodes)}
    seconds: dict[str, list[float]] = {name: [] for name in evaluators}
    steps: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, evaluator in evaluators.items():
            start = time.process_time()
            _, lengths = evaluator(actor)
            seconds[name].append(time.process_time() - start)
            steps[name] = sum(lengths)
    baseline = statistics.median(seconds["TorchRL env and actor"])
    rows = [[name, f"{steps[name]:,}", f"{statistics.median(times):.2f}", f"{statistics.median(times) / baseline:.2f}"]
            for name, times in seconds.items()]
    print(f"{args.env}, {args.episodes} episodes side by side, median of {args.rounds} rounds (CPU seconds)\n")
    print_table(["evaluator", "env steps", "CPU s per evaluation", "ratio to TorchRL"], rows)


if __name__ == "__main__":
    main()
