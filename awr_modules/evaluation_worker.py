"""Evaluation in a worker process, on a snapshot of the policy, while training goes on.

An evaluation of 10 MuJoCo episodes is 1,000 batched env steps with a policy call each: seconds
in which an in-process evaluation stops training. :class:`EvaluationWorker` instead sends a copy
of the actor's weights (normaliser included) to one spawned process that keeps the recipe's
evaluator (:meth:`~awr_modules.recipe.Recipe.make_evaluator`) and runs it there, with the same
episodes and returns as that evaluator in the process. Gymnasium recipes step their vector env
directly: the episodes of TorchRL's evaluation at about a third of the CPU, which training shares.
Results come back in submission order, each tagged with the env step and optimizer step of its
snapshot, so a logger draws them where the policy was.

The standard library's ``ProcessPoolExecutor`` carries requests, results and errors, and notices
a worker that died (its futures fail with ``BrokenProcessPool``); a failure is re-raised naming
the evaluation worker. TorchRL's ``Evaluator`` is not used: it keeps the first ``N`` trajectories
to finish in a batched env, which favours short episodes where lengths vary (CartPole, Hopper);
``evaluate`` keeps each sub-env's first episode.
"""

from __future__ import annotations

import copy
import multiprocessing
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import torch
from tensordict.nn import TensorDictModuleBase

from awr_modules.cpu_worker import hide_gpus
from awr_modules.evaluation import EpisodeEvaluator

_worker: tuple[EpisodeEvaluator, TensorDictModuleBase] | None = None  # the worker process's evaluator and policy


class EvaluationWorkerError(RuntimeError):
    """The evaluation worker process died, or an evaluation in it raised."""


@dataclass(frozen=True)
class EvaluatedSnapshot:
    """One finished evaluation: where its snapshot was taken, and the episodes' returns and lengths."""

    env_steps: int
    global_step: int
    returns: list[float]
    lengths: list[int]


class EvaluationWorker:
    """One spawned process that evaluates snapshots of ``policy`` with the evaluator ``make_evaluator`` builds there.

    Args:
        make_evaluator: builds the evaluator in the worker (picklable: a recipe's ``make_evaluator`` with its
            seed and episodes bound; or :class:`~awr_modules.evaluation.TorchRLEvaluator` over a ``make_env``).
        policy: the actor; a CPU copy of it goes to the worker once, later snapshots send weights only.
        num_threads: torch threads in the worker (one: it shares the machine with training).
    """

    def __init__(self, make_evaluator: Callable[[], EpisodeEvaluator], policy: TensorDictModuleBase, num_threads: int = 1) -> None:
        self._executor = ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker, initargs=(make_evaluator, copy.deepcopy(policy).cpu(), num_threads),
        )
        self._pending: deque[tuple[int, int, Future]] = deque()

    def submit(self, policy: TensorDictModuleBase, env_steps: int, global_step: int) -> None:
        """Queue an evaluation of ``policy``'s weights as they are now (copied before returning)."""
        weights = {name: tensor.detach().cpu().clone() for name, tensor in policy.state_dict().items()}
        try:
            future = self._executor.submit(_evaluate_snapshot, weights)
        except BrokenProcessPool as error:  # the worker died since the last submission
            raise EvaluationWorkerError(f"the evaluation worker process died before the evaluation of env step "
                                        f"{env_steps:,} ({error}).") from error
        self._pending.append((env_steps, global_step, future))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def finished(self, *, wait: bool = False) -> list[EvaluatedSnapshot]:
        """The evaluations finished so far, oldest first (with ``wait``, all of them, once they finish).

        Raises :class:`EvaluationWorkerError` if an evaluation failed or the worker died.
        """
        results = []
        while self._pending and (wait or self._pending[0][2].done()):
            env_steps, global_step, future = self._pending.popleft()
            try:
                returns, lengths = future.result()
            except Exception as error:
                raise EvaluationWorkerError(
                    f"the evaluation worker process failed evaluating the policy of env step {env_steps:,} "
                    f"({type(error).__name__}: {error})."
                ) from error
            results.append(EvaluatedSnapshot(env_steps, global_step, returns, lengths))
        return results

    def shutdown(self) -> None:
        """Drop queued evaluations; the worker exits after the one it is running."""
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _start_worker(make_evaluator: Callable[[], EpisodeEvaluator], policy: TensorDictModuleBase,
                  num_threads: int) -> None:
    global _worker
    hide_gpus()  # the worker evaluates on the CPU, and its per-step device checks get cheaper
    torch.set_num_threads(num_threads)
    _worker = (make_evaluator(), policy)


def _evaluate_snapshot(weights: dict[str, torch.Tensor]) -> tuple[list[float], list[int]]:
    evaluator, policy = _worker
    policy.load_state_dict(weights)
    return evaluator(policy)
