"""Writing Minari datasets: episodes of a policy (a checkpoint's or uniform random), or a run's history.

Each writer makes an ordinary local Minari dataset (HDF5, under ``MINARI_DATASETS_PATH``) that
Minari's tools and :func:`~awr_modules.offline_data.read_minari_dataset` read alike. Actions are
stored in the env's own units, inside its action space (the actor's samples are clipped to the
bounds, as a dataset's actions are expected to lie in its space). An existing dataset is never
replaced unless ``overwrite`` says so.

- :func:`write_policy_dataset` steps the gymnasium env through ``minari.DataCollector`` with any
  ``observation -> action`` function: :func:`checkpoint_policy` (stochastic, deterministic, or
  deterministic plus Gaussian noise) or :func:`random_policy`.
- :func:`write_history_dataset` turns the batches a run recorded with
  :class:`~awr_modules.replay_history.ReplayHistory` (everything collected, not only what the
  FIFO buffer still holds) into episodes, up to a number of env steps.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch
from tensordict import TensorDict
from torchrl.envs import ExplorationType, set_exploration_type

from awr_modules.offline_data import DatasetError, datasets_root, minari_datasets_path
from awr_modules.recipe import Recipe

Act = Callable[[np.ndarray], np.ndarray]
PolicyMode = Literal["stochastic", "deterministic", "noisy"]


def prepare_dataset_id(dataset_id: str, root: str | os.PathLike | None, overwrite: bool) -> None:
    """Refuse to replace an existing dataset unless ``overwrite``; with it, delete the old one first."""
    folder = datasets_root(root) / dataset_id
    if not folder.exists():
        return
    if not overwrite:
        raise DatasetError(f"offline data: dataset {dataset_id!r} already exists under {folder.parent}; "
                           f"pass overwrite (--overwrite) to replace it, or choose another id or version.")
    import minari

    with minari_datasets_path(root):
        minari.delete_dataset(dataset_id)


def write_policy_dataset(dataset_id: str, env: gym.Env, act: Act, *, episodes: int | None = None,
                         steps: int | None = None, seed: int = 0, root: str | os.PathLike | None = None,
                         overwrite: bool = False, algorithm_name: str | None = None,
                         description: str | None = None) -> Any:
    """Step ``env`` with ``act`` and store what happened as Minari dataset ``dataset_id``.

    Exactly one of ``episodes`` (whole episodes) or ``steps`` (transitions; the last episode may stop
    early, and is then read back as a truncated path) says how much. Returns the ``MinariDataset``.
    """
    import minari

    if (episodes is None) == (steps is None) or (episodes or steps or 0) < 1:
        raise ValueError(f"write_policy_dataset: give a positive number of episodes or of steps, not both "
                         f"(got episodes={episodes}, steps={steps}).")
    prepare_dataset_id(dataset_id, root, overwrite)
    with minari_datasets_path(root):
        collector = minari.DataCollector(env, record_infos=False)
        observation, _ = collector.reset(seed=seed)
        env.action_space.seed(seed)
        finished = taken = 0
        while (finished < episodes) if episodes is not None else (taken < steps):
            observation, _, terminated, truncated, _ = collector.step(act(observation))
            taken += 1
            if terminated or truncated:
                finished += 1
                observation, _ = collector.reset(seed=seed + finished)  # every episode's start is reproducible
        dataset = collector.create_dataset(dataset_id=dataset_id, algorithm_name=algorithm_name,
                                           description=description)
        collector.close()
    return dataset


def random_policy(space: gym.Space) -> Act:
    """Uniform random actions from ``space`` (seeded by :func:`write_policy_dataset` through the space)."""
    return lambda observation: space.sample()


def checkpoint_policy(actor: torch.nn.Module, recipe: Recipe, mode: PolicyMode = "stochastic",
                      noise_std: float = 0.1, seed: int = 0) -> Act:
    """A trained actor as an ``observation -> env action`` function.

    ``"stochastic"`` samples the actor's distribution, ``"deterministic"`` takes its mode (as
    evaluation does), ``"noisy"`` adds Gaussian noise of std ``noise_std`` to the mode in the actor's
    units (``[-1, 1]`` boxes; refused for discrete actions). Raw observations go in (the actor's own
    normaliser applies); the action is clipped to the env's bounds.
    """
    if mode not in ("stochastic", "deterministic", "noisy"):
        raise ValueError(f"checkpoint_policy: mode must be stochastic, deterministic or noisy, got {mode!r}.")
    space = recipe.action_space()
    if mode == "noisy" and isinstance(space, gym.spaces.Discrete):
        raise ValueError("checkpoint_policy: noisy mode adds Gaussian noise to continuous actions; "
                         "use stochastic for a discrete policy.")
    generator = torch.Generator().manual_seed(seed)
    exploration = ExplorationType.RANDOM if mode == "stochastic" else ExplorationType.DETERMINISTIC
    device = next(actor.parameters()).device

    def act(observation: np.ndarray) -> np.ndarray:
        state = TensorDict({"observation": torch.as_tensor(observation, dtype=torch.float32, device=device)}, [])
        with torch.no_grad(), set_exploration_type(exploration):
            action = actor(state)["action"].cpu()
        if mode == "noisy":
            action = action + noise_std * torch.randn(action.shape, generator=generator)
        env_action = recipe.env_actions(action).numpy()
        if isinstance(space, gym.spaces.Box):
            env_action = np.clip(env_action, space.low, space.high).astype(space.dtype)
        return env_action

    return act


def write_history_dataset(dataset_id: str, history_dir: str | os.PathLike, recipe: Recipe, *,
                          up_to_env_steps: int | None = None, root: str | os.PathLike | None = None,
                          overwrite: bool = False, algorithm_name: str | None = "AWR replay history",
                          description: str | None = None) -> Any:
    """A run's recorded batches (:class:`~awr_modules.replay_history.ReplayHistory`) as a Minari dataset.

    Batches are taken in order until ``up_to_env_steps`` env steps (all of them if ``None``). A
    trajectory of the collector becomes one episode; one still running at the cut is kept as a
    truncated episode. Returns the ``MinariDataset``.
    """
    import minari
    from minari.data_collector import EpisodeBuffer

    batches = _recorded_batches(Path(history_dir), up_to_env_steps)
    episodes = [_episode_buffer(steps, recipe, number) for number, steps in enumerate(_trajectories(batches))]
    prepare_dataset_id(dataset_id, root, overwrite)
    space = recipe.action_space()
    with minari_datasets_path(root):
        env = gym.make(recipe.env_id, **getattr(recipe, "env_kwargs", {}))
        dataset = minari.create_dataset_from_buffers(
            dataset_id, [EpisodeBuffer(**episode) for episode in episodes], env=env, action_space=space,
            algorithm_name=algorithm_name, description=description)
        env.close()
    return dataset


def _recorded_batches(history_dir: Path, up_to_env_steps: int | None) -> list[TensorDict]:
    files = sorted(history_dir.glob("batch_*.pt"))
    if len({path.stem.partition("_rank")[2] for path in files}) > 1:
        raise DatasetError(f"offline data: {history_dir} holds the batches of several ranks, whose trajectory ids "
                           f"overlap; move one rank's batch_*_rank<r>.pt files to a folder of their own.")
    if not files:
        raise DatasetError(f"offline data: no recorded batches (batch_*.pt) in {history_dir}; record a run with "
                           f"--trainer.callbacks+=awr_modules.replay_history.ReplayHistory.")
    batches, total = [], 0
    for path in files:
        batch = torch.load(path, weights_only=False)
        if up_to_env_steps is not None and total + batch.numel() > up_to_env_steps:
            break
        batches.append(batch)
        total += batch.numel()
    if not batches:
        raise DatasetError(f"offline data: the first recorded batch in {history_dir} is larger than "
                           f"up_to_env_steps={up_to_env_steps}.")
    return batches


def _trajectories(batches: list[TensorDict]) -> list[TensorDict]:
    """Each collector trajectory's steps in time order, across batches (batches are ``[envs, T]``).

    A trajectory is a collector's id within one process's run (a resumed run's collector counts its ids
    from 0 again): batches carry that segment as ``("collector", "segment")``.
    """
    pieces: dict[tuple[int, int], list[TensorDict]] = {}
    for batch in batches:
        for env_steps in batch.reshape(-1, batch.shape[-1]).unbind(0):
            ids = env_steps["collector", "traj_ids"]
            segment = env_steps.get(("collector", "segment"), torch.zeros_like(ids))
            for traj_id in ids.unique(sorted=True).tolist():
                rows = ids == traj_id
                pieces.setdefault((int(segment[rows][0]), traj_id), []).append(env_steps[rows])
    return [torch.cat(parts) for _, parts in sorted(pieces.items())]


def _episode_buffer(steps: TensorDict, recipe: Recipe, number: int) -> dict[str, Any]:
    space = recipe.action_space()
    actions = recipe.env_actions(steps["action"]).numpy()
    if isinstance(space, gym.spaces.Box):
        actions = np.clip(actions, space.low, space.high).astype(space.dtype)
    terminated = steps["next", "terminated"].reshape(-1).numpy().copy()
    truncated = steps["next", "truncated"].reshape(-1).numpy().copy()
    truncated[-1] |= not terminated[-1]  # still running where the history stops
    observations = torch.cat([steps["observation"], steps["next", "observation"][-1:]]).numpy()
    return {"id": number, "observations": observations, "actions": actions,
            "rewards": steps["next", "reward"].reshape(-1).numpy().astype(np.float64),
            "terminations": terminated, "truncations": truncated}
