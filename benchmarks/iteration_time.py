"""Wall-clock of one AWR iteration per phase, eager and compiled (``model.execution``), beside plain PyTorch.

    python benchmarks/iteration_time.py --config configs/lunarlander.yaml

For each mode (an execution part: ``awr_modules.execution.Eager``, ``Compiled`` with its default fused steps,
and on a GPU ``CudaGraphs``, compiled or not), one ``awr fit`` process (one torch thread) trains
``--iterations`` iterations of the config without evaluation, and the median over the last ``--timed`` of
them is taken from the ``time/*`` columns the module logs: by default iterations 25-29, when the 50k buffer
is full (the target refresh scales with the buffer; compilation happens in the first iteration). Beside it,
in this process with one thread, a hand-written PyTorch loop runs the same number of value and policy steps
on the same network sizes, batch sizes, optimizers (class and settings), value scale and AWR math (uniform
minibatches from 50k stored transitions, ``w = min(exp(A), 20)``, categorical or fixed-std Gaussian
log-likelihood), with no TensorDict, TorchRL or Lightning. ``--accelerator gpu`` times the runs on one GPU, adds
the CUDA-graph rows (``--model.execution=awr_modules.execution.CudaGraphs``), and runs the plain loop on CUDA,
eagerly and with each whole step captured as one CUDA graph. ``--baseline-checkout DIR`` adds the eager and
compiled rows of another checkout of this repository (e.g. an older commit, ``git worktree add DIR COMMIT``);
a checkout from before the config's parts (no ``awr_modules/execution.py``) gets the flat flags of its time,
``--model.compile=false`` and ``--model.compile=true``.
Every row is measured ``--rounds`` times, the rows alternating within each round, so that drift
of the machine's speed during the run hits all rows alike; the CSV holds the median over rounds
(and the policy phase's range). Writes ``benchmarks/results/iteration_time_<task>[_gpu].csv``
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from awr_modules.module import AWRModule

PHASES = ("collect", "refresh", "value_phase", "policy_phase")
BUFFER = 50_000


def awr_fit_seconds(config: Path, iterations: int, timed: int, extra: list[str],
                    checkout: Path | None = None) -> dict[str, float]:
    """Median seconds per phase over the last ``timed`` iterations of one ``awr fit`` run of ``checkout``."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "awr_modules.cli", "fit", "-c", str(config),
                   f"--trainer.max_epochs={iterations}", "--trainer.check_val_every_n_epoch=100000",
                   "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp}",
                   f"--checkpoint.dirpath={tmp}/checkpoints", *extra]
        env = ({**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))}
               if checkout is not None else None)
        result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=checkout, env=env)
        if result.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
        rows = [row for path in Path(tmp).rglob("metrics.csv") for row in csv.DictReader(path.open())]
    rows = sorted((row for row in rows if row.get("time/policy_phase")), key=lambda row: float(row["env_steps"]))
    return {phase: float(np.median([float(row[f"time/{phase}"]) for row in rows[-timed:]])) for phase in PHASES}


def _mlp(inputs: int, outputs: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(inputs, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                               torch.nn.ReLU(), torch.nn.Linear(64, outputs))


def configured_optimizers(model: AWRModule) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """The actor's and the critic's optimizers as the config builds them (``model.actor_optimizer`` and
    ``model.critic_optimizer``): their class and ``defaults`` (step size, momentum, ...) are the plain loop's."""
    (actor_optimizer, critic_optimizer), _ = model.configure_optimizers()
    return actor_optimizer, critic_optimizer


def env_sizes(model: AWRModule) -> tuple[int, int, bool]:
    """Observation size, action size (or number of actions) and whether actions are discrete, from the recipe's env."""
    env = model.recipe.make_env(0)
    spec = env.action_spec
    sizes = env.observation_spec["observation"].shape[-1], spec.shape[-1], not spec.dtype.is_floating_point
    env.close()
    return sizes


class PlainAWR:
    """The AWR value and policy losses written in plain PyTorch over stored tensors (no TensorDict, TorchRL, Lightning).

    The config's network sizes, step sizes and weight clip; uniform minibatches from ``BUFFER``
    random stored transitions, ``w = min(exp(A), max_weight)``, categorical or fixed-std
    Gaussian log-likelihood.
    """

    def __init__(self, model: AWRModule, *, device: str = "cpu") -> None:
        observation_size, action_size, self.discrete = env_sizes(model)
        self.observation = torch.randn(BUFFER, observation_size, device=device)
        self.action = (torch.randint(action_size, (BUFFER,), device=device) if self.discrete
                       else torch.rand(BUFFER, action_size, device=device) * 2 - 1)
        self.advantage = torch.randn(BUFFER, device=device)
        self.value_target = torch.randn(BUFFER, device=device)
        self.actor = _mlp(observation_size, action_size).to(device)
        self.critic = _mlp(observation_size, 1).to(device)
        actor_optimizer, critic_optimizer = configured_optimizers(model)
        self.actor_optimizer = type(actor_optimizer)(self.actor.parameters(), **actor_optimizer.defaults)
        self.critic_optimizer = type(critic_optimizer)(self.critic.parameters(), **critic_optimizer.defaults)
        self.value_scale = model.awr.targets.value_scale
        self.log_max_weight = float(np.log(float(model.loss_module.max_weight)))
        self.std = 0.2

    def value_loss(self, index: torch.Tensor) -> torch.Tensor:
        value = self.critic(self.observation[index]).squeeze(-1)
        return 0.5 * ((value - self.value_target[index]) / self.value_scale).pow(2).mean()

    def policy_loss(self, index: torch.Tensor) -> torch.Tensor:
        out = self.actor(self.observation[index])
        if self.discrete:
            log_prob = torch.log_softmax(out, -1).gather(-1, self.action[index].unsqueeze(-1)).squeeze(-1)
        else:
            log_prob = torch.distributions.Normal(out, self.std).log_prob(self.action[index]).sum(-1)
        weight = torch.exp(self.advantage[index].clamp(max=self.log_max_weight))
        return -(weight * log_prob).mean()

    def phases(self) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], torch.optim.Optimizer]]:
        """Each phase's loss and the optimizer of its network."""
        return {"value_phase": (self.value_loss, self.critic_optimizer),
                "policy_phase": (self.policy_loss, self.actor_optimizer)}


def update_step(loss_fn: Callable[[torch.Tensor], torch.Tensor], optimizer: Any,
                backward: Callable[[torch.Tensor], Any] = torch.Tensor.backward) -> Callable[[torch.Tensor], torch.Tensor]:
    """One SGD update on the minibatch at ``index``: loss, zeroed gradients, ``backward(loss)``, optimizer step."""

    def step(index: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(index)
        optimizer.zero_grad()
        backward(loss)
        optimizer.step()
        return loss.detach()

    return step


def time_steps(step: Callable[[torch.Tensor], Any], steps: int, batch: int, device: str = "cpu",
               warmup: int = 20) -> float:
    """Seconds of ``steps`` calls of ``step`` on fresh uniform indices into ``BUFFER``, after ``warmup`` calls."""
    for _ in range(warmup):
        step(torch.randint(BUFFER, (batch,), device=device))
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step(torch.randint(BUFFER, (batch,), device=device))
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def plain_pytorch_seconds(model: AWRModule, *, device: str = "cpu", cuda_graph: bool = False) -> dict[str, float]:
    """Seconds of the value and policy phases written as a plain PyTorch loop over stored tensors, with the
    config's steps and batch size of each phase (``model.value_phase``, ``model.policy_phase``).

    With ``cuda_graph`` each whole step (gather, forward, backward, SGD step) is one captured
    CUDA graph (tensordict's ``CudaGraphModule``), replayed with fresh indices each step.
    """
    plain = PlainAWR(model, device=device)
    seconds = {}
    for phase_name, phase in (("value_phase", model.awr.value_phase), ("policy_phase", model.awr.policy_phase)):
        loss_fn, optimizer = plain.phases()[phase_name]
        step = update_step(loss_fn, optimizer)
        if cuda_graph:
            from tensordict.nn import CudaGraphModule

            step = CudaGraphModule(step)
        seconds[phase_name] = time_steps(step, phase.steps, phase.batch_size, device)
    return seconds


EXECUTION = "--model.execution=awr_modules.execution."
MODES = {  # row name -> extra `awr fit` arguments (the CUDA-graph rows only with --accelerator gpu)
    "awr fit, Eager": [f"{EXECUTION}Eager"],
    "awr fit, CudaGraphs (compile: false)": [f"{EXECUTION}CudaGraphs", "--model.execution.init_args.compile=false"],
    "awr fit, CudaGraphs (compile: true)": [f"{EXECUTION}CudaGraphs", "--model.execution.init_args.compile=true"],
    "awr fit, Compiled": [f"{EXECUTION}Compiled"],
}
LEGACY_MODES = {"awr fit, Eager": ["--model.compile=false"], "awr fit, Compiled": ["--model.compile=true"]}
"""The eager and compiled rows' arguments for a checkout from before the config's parts (its flat flags)."""


def baseline_modes(checkout: Path) -> dict[str, list[str]]:
    """The eager and compiled rows' arguments that ``checkout``'s ``awr fit`` takes: the execution part, or the
    flat ``--model.compile`` flag of a checkout without ``awr_modules/execution.py``."""
    if (checkout / "awr_modules" / "execution.py").exists():
        return {name: extra for name, extra in MODES.items() if "CudaGraphs" not in name}
    return LEGACY_MODES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--iterations", type=int, default=29)
    parser.add_argument("--timed", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="times every row is measured, in alternation")
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu",
                        help="gpu: `awr fit` on one GPU (also the CUDA-graph rows), the plain loop on CUDA")
    parser.add_argument("--baseline-checkout", type=Path, help="another checkout whose `awr fit` to time")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    from awr_modules.cli import cli_main

    model = cli_main(["-c", str(args.config), "--trainer.logger=false"], run=False).model  # sizes, steps, optimizers
    actor_steps = model.awr.policy_phase.steps
    gpu = args.accelerator == "gpu"
    device_args = ["--trainer.accelerator=gpu", "--trainer.devices=1"] if gpu else []
    modes = MODES if gpu else {name: extra for name, extra in MODES.items() if "CudaGraphs" not in name}
    task = args.config.stem + ("_gpu" if gpu else "")
    machine = torch.cuda.get_device_name() if gpu else f"{os.cpu_count()} CPU cores, 1 torch thread"
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if gpu else "cpu"
    measurements: dict[str, Callable[[], dict[str, float]]] = {
        "plain PyTorch loop": lambda: plain_pytorch_seconds(model, device=device)}
    if gpu:
        measurements["plain PyTorch loop, one CUDA graph per step"] = lambda: plain_pytorch_seconds(
            model, device=device, cuda_graph=True)
    for name, extra in modes.items():
        measurements[name] = partial(awr_fit_seconds, args.config, args.iterations, args.timed, [*device_args, *extra])
    if args.baseline_checkout is not None:
        checkout = args.baseline_checkout.resolve()
        commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], check=True,
                                capture_output=True, text=True).stdout.strip()
        config = args.config if args.config.is_absolute() else checkout / args.config  # the checkout's own config
        for name, extra in baseline_modes(checkout).items():
            measurements[f"{name} at {commit}"] = partial(awr_fit_seconds, config, args.iterations, args.timed,
                                                          [*device_args, *extra], checkout)

    runs: dict[str, list[dict[str, float]]] = {}
    for _ in range(args.rounds):  # each round measures every row once: drift of the machine's speed hits all rows
        for name, measure in measurements.items():
            runs.setdefault(name, []).append(measure())
            write_csv(args.out / f"iteration_time_{task}.csv", runs, actor_steps, machine)
    print(f"| {task} ({machine}), median of {args.rounds} round(s) | " + " | ".join(PHASES) + " | policy steps/s |")
    print("|---" * (len(PHASES) + 2) + "|")
    for mode, seconds in median_rows(runs).items():
        cells = [f"{seconds[p]:.2f} s" if p in seconds else "-" for p in PHASES]
        print(f"| {mode} | " + " | ".join(cells) + f" | {actor_steps / seconds['policy_phase']:.0f} |")


def median_rows(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per row, the median over rounds of each phase's seconds."""
    return {name: {phase: float(np.median([run[phase] for run in row])) for phase in row[0]}
            for name, row in runs.items()}


def write_csv(path: Path, runs: dict[str, list[dict[str, float]]], actor_steps: int, machine: str) -> None:
    """The rows measured so far (median over their rounds), rewritten after each, so a stopped run keeps them."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["mode", *PHASES, "policy_steps_per_second", "policy_phase_min", "policy_phase_max",
                         "rounds", "machine"])
        for name, row in median_rows(runs).items():
            policy = [run["policy_phase"] for run in runs[name]]
            writer.writerow([name, *(f"{row[p]:.3f}" if p in row else "" for p in PHASES),
                             f"{actor_steps / row['policy_phase']:.0f}", f"{min(policy):.3f}", f"{max(policy):.3f}",
                             len(policy), machine])


if __name__ == "__main__":
    main()
