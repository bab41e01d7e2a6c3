"""``awr export``: a trained policy as a file that runs with torch alone.

    awr export -c configs/halfcheetah.yaml --checkpoint runs/halfcheetah/checkpoints/last.ckpt \\
        --out halfcheetah_policy.pt2

The file is a ``torch.export`` program of the actor's deterministic action (the one evaluation
takes), observation normaliser included: raw observations ``[B, obs]`` in (float32), env actions
``[B, act]`` out (an index per row for discrete actions). Loading it needs neither this package nor
TensorDict or TorchRL:

    policy = torch.export.load("halfcheetah_policy.pt2").module()
    action = policy(torch.as_tensor(observation, dtype=torch.float32)[None])[0].numpy()
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


def export_policy(module, path: str | os.PathLike) -> torch.export.ExportedProgram:
    """Export ``module``'s (an ``AWRModule``) deterministic policy to ``path`` with ``torch.export`` (dynamic batch)."""
    policy = module.recipe.deterministic_policy(module.actor).cpu().eval()
    observation_size = module.env_signature["observation_shape"][-1]
    example = torch.zeros(2, observation_size)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(policy, (example,), dynamic_shapes={"observation": {0: batch}})
    torch.export.save(program, str(path))
    return program


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="awr export", description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", type=Path, required=True, help="the config the checkpoint was trained with")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="the program's file, e.g. policy.pt2")
    options = parser.parse_args(args)
    from awr_modules.cli import load_trained_module

    export_policy(load_trained_module(options.config, options.checkpoint), options.out)
    print(f"awr export: wrote {options.out} (load with torch.export.load(path).module()).")
