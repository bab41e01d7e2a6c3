"""The policy's std over the states a checkpoint stores: what a learned std does where the actor has rarely been.

    python benchmarks/policy_std.py --config benchmarks/results/screens/ant_entropy_floor/seed0/version_0/config.yaml \\
        --checkpoint benchmarks/results/screens/ant_entropy_floor/seed0/checkpoints/last.ckpt

Loads the run's networks (``config.yaml`` is the one the run saved beside its metrics, overrides included) and
the replay buffer its checkpoint holds, and prints a markdown table: quantiles of ``|o - mu| / sigma`` (the
observation normaliser's output, the networks' input), of the std ``pi(.|s)`` puts on each action dimension, and
the mean entropy ``H(pi(.|s))`` over the stored states, for the actor as it was saved (after that iteration's
policy phase) and for the behaviour policies that collected the rows (the ``scale`` stored with each action).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from awr_modules.configured import load_trained_module

QUANTILES = (0.0, 0.01, 0.5, 0.99, 1.0)


def stored_rows(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The first rank's replay-buffer columns that a checkpoint of ``awr fit`` holds (observation, scale, ...)."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    storage = saved["awr"]["ranks"][0]["buffer"]["_storage"]
    return {key: value[: storage["_len"]] for key, value in storage["_storage"].items() if torch.is_tensor(value)}


def gaussian_entropy(std: torch.Tensor) -> torch.Tensor:
    """The entropy of a diagonal Gaussian with these stds, one per row (the mean does not enter it)."""
    return torch.distributions.Normal(torch.zeros_like(std), std).entropy().sum(-1)


def std_table(config: Path, checkpoint: Path) -> str:
    """The markdown table of the module docstring."""
    module = load_trained_module(config, checkpoint)
    rows = stored_rows(checkpoint)
    head = module.actor.module[0].module  # observation -> (loc, scale): the recipes' actor head
    with torch.no_grad():
        normalised = head[0](rows["observation"])
        _, std = head(rows["observation"])
    columns = {
        "normalised observation, absolute": normalised.abs(),
        "std, saved actor": std,
        "std, behaviour policies": rows["scale"],
    }
    quantiles = torch.tensor(QUANTILES)
    lines = ["| over the stored states (" + f"{len(std):,}" + ") | " + " | ".join(
        f"q{q:g}" for q in QUANTILES) + " |", "|---" * (len(QUANTILES) + 1) + "|"]
    for name, values in columns.items():
        found = torch.quantile(values.flatten().float(), quantiles)
        lines.append(f"| {name} | " + " | ".join(f"{value:.3g}" for value in found.tolist()) + " |")
    lines.append("")
    lines.append(f"Mean entropy: saved actor {gaussian_entropy(std).mean():.3f} nats, behaviour policies "
                 f"{gaussian_entropy(rows['scale']).mean():.3f} nats.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="the run's saved config.yaml")
    parser.add_argument("--checkpoint", type=Path, required=True)
    options = parser.parse_args()
    torch.set_num_threads(1)
    print(std_table(options.config, options.checkpoint))


if __name__ == "__main__":
    main()
