"""The evaluator part: the deterministic policy's episodes (step 7 of an AWR iteration), here or in a worker.

Both parts run the same episode code: the recipe's :meth:`~awr_modules.recipe.Recipe.make_evaluator`, which
steps ``episodes`` envs side by side, seeded once per run so that successive evaluations continue one random
stream.

- :class:`InProcess`: training waits for each evaluation;
- :class:`InWorker`: during ``fit``, rank 0 hands a snapshot of the actor's weights to a worker process that
  evaluates it while training goes on (:class:`~awr_modules.evaluation_worker.EvaluationWorker`); each result
  comes back with the env steps and optimizer step of its snapshot. ``awr validate`` and ``awr test``
  evaluate in the process either way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tensordict.nn import TensorDictModuleBase

from awr_modules.evaluation import EpisodeEvaluator
from awr_modules.evaluation_worker import EvaluatedSnapshot, EvaluationWorker, EvaluationWorkerError


class InProcess:
    """Evaluations in this process: ``episodes`` deterministic episodes, side by side.

    Args:
        episodes: episodes of the deterministic policy per evaluation (the envs stepped side by side).
    """

    in_process = True

    def __init__(self, episodes: int = 10) -> None:
        if episodes < 1:
            raise ValueError(f"{type(self).__name__}: episodes must be >= 1, got {episodes}.")
        self.episodes = episodes
        self._make: Callable[[], EpisodeEvaluator] | None = None
        self._evaluator: EpisodeEvaluator | None = None

    def setup(self, make_evaluator: Callable[[], EpisodeEvaluator]) -> None:
        """``make_evaluator`` (picklable) builds the episode runner, on first use (and in a worker)."""
        self._make, self._evaluator = make_evaluator, None

    def start(self, actor: TensorDictModuleBase, *, fitting: bool, rank: int) -> None:
        """Training begins (``fitting``) or an evaluation-only run does, on process ``rank``."""

    def evaluate(self, actor: TensorDictModuleBase, env_steps: int, global_step: int) -> list[EvaluatedSnapshot]:
        """Evaluate ``actor`` as it is now; returns the evaluations that have finished (this one, here)."""
        if self._evaluator is None:
            self._evaluator = self._make()
        returns, lengths = self._evaluator(actor)
        return [EvaluatedSnapshot(env_steps, global_step, returns, lengths)]

    def finished(self, *, wait: bool = False) -> list[EvaluatedSnapshot]:
        """Evaluations finished since the last call (none here: each is returned by :meth:`evaluate`)."""
        return []

    def stop(self) -> None:
        """Release workers (none here)."""


class InWorker(InProcess):
    """During ``fit``, evaluations of actor snapshots in a worker process while training goes on (rank 0 only;
    other ranks do not evaluate). Elsewhere (``awr validate``, ``awr test``) as :class:`InProcess`.

    Args:
        episodes: episodes of the deterministic policy per evaluation.
    """

    def __init__(self, episodes: int = 10) -> None:
        super().__init__(episodes)
        self._worker: EvaluationWorker | None = None
        self._fitting = False

    @property
    def in_process(self) -> bool:
        return not self._fitting

    def start(self, actor: TensorDictModuleBase, *, fitting: bool, rank: int) -> None:
        self._fitting = fitting
        if fitting and rank == 0:
            self._worker = EvaluationWorker(self._make, actor)

    def evaluate(self, actor: TensorDictModuleBase, env_steps: int, global_step: int) -> list[EvaluatedSnapshot]:
        if not self._fitting:
            return super().evaluate(actor, env_steps, global_step)
        if self._worker is None:  # a rank other than 0
            return []
        with _naming_the_worker():
            self._worker.submit(actor, env_steps, global_step)
        return self.finished()

    def finished(self, *, wait: bool = False) -> list[EvaluatedSnapshot]:
        if self._worker is None:
            return []
        with _naming_the_worker():
            return self._worker.finished(wait=wait)

    def stop(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.shutdown()


@contextmanager
def _naming_the_worker() -> Iterator[None]:
    """Re-raise an evaluation worker's failure with the way to resume."""
    try:
        yield
    except EvaluationWorkerError as error:
        raise RuntimeError(f"InWorker: {error} Resume from the last checkpoint with "
                           "`awr fit ... --ckpt_path last`.") from error
