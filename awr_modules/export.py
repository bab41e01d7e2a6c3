"""``awr export``: a trained policy as a file that runs with torch alone.

    awr export -c configs/halfcheetah.yaml --checkpoint runs/halfcheetah/checkpoints/last.ckpt \\
        --out halfcheetah_policy.pt2

The file is a ``torch.export`` program of the actor's deterministic action (the one evaluation
takes), observation normaliser included: raw observations ``[B, obs]`` in (float32), env actions
``[B, act]`` out (an index per row for discrete actions). Loading it needs neither this package nor
TensorDict or TorchRL:

    policy = torch.export.load("halfcheetah_policy.pt2").module()
    action = policy(torch.as_tensor(observation, dtype=torch.float32)[None])[0].numpy()

The config may be the task's (``configs/*.yaml``, with the run's network sizes) or the ``config.yaml``
the run saved beside its metrics. A checkpoint of another task or other network sizes is refused
with a message naming the mismatch (``--traceback`` shows the traceback, see :mod:`awr_modules.cli`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from awr_modules.configured import load_trained_module, run_reporting_refusals


def export_policy(module, path: str | os.PathLike) -> torch.export.ExportedProgram:
    """Export ``module``'s (an ``AWRModule``) deterministic policy to ``path`` with ``torch.export`` (dynamic batch)."""
    policy = module.recipe.deterministic_policy(module.actor).cpu().eval()
    example = torch.zeros(2, _observation_size(module.recipe))
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(policy, (example,), dynamic_shapes={"observation": {0: batch}})
    torch.export.save(program, str(path))
    return program


def _observation_size(recipe) -> int:
    """The length of the recipe env's flat ``observation`` (the exported program's input width)."""
    env = recipe.make_env(0)
    try:
        return int(env.observation_spec["observation"].shape[-1])
    finally:
        env.close()


def main(args: list[str] | None = None) -> None:
    """``awr export ARGS`` (default ``sys.argv[1:]``); a refused input exits with its message (``SystemExit``)."""
    run_reporting_refusals("awr export", run, args)


def run(args: list[str]) -> None:
    """Parse ``args``, load the checkpoint's policy and write the program; errors propagate (``awr`` reports them)."""
    parser = argparse.ArgumentParser(prog="awr export", description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", type=Path, action="append", required=True,
                        help="the config the checkpoint was trained with; repeat it to layer overlays in order")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="the program's file, e.g. policy.pt2")
    options = parser.parse_args(args)
    export_policy(load_trained_module(options.config, options.checkpoint), options.out)
    print(f"awr export: wrote {options.out} (load with torch.export.load(path).module()).")
