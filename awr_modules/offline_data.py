"""Offline data: a local Minari dataset read as the transitions AWR trains on, checked before use.

A Minari dataset (package ``minari``, folder ``MINARI_DATASETS_PATH``, default ``~/.minari/datasets``)
stores episodes: ``T + 1`` observations, ``T`` actions, rewards, terminations and truncations each.
:func:`read_minari_dataset` turns them into one TensorDict of ``N`` transitions in the layout a
TorchRL collector writes (``observation``, ``action``, ``("next", ...)`` reward, done, terminated,
truncated and observation, and ``("collector", "traj_ids")``), so the target refresh cuts paths at
episode ends exactly as for collected data: time limits bootstrap, terminations do not.

Why not TorchRL's ``MinariExperienceReplay``: torchrl 0.12.0 and 0.14.1 build the dataset in
memory, then keep ``td_data.memmap_like(...)`` of it, which has the layout but not the content,
so every loaded field is zero (``tests/test_offline_data.py`` pins this: once TorchRL keeps the
content, that test fails and this reader can hand over). Minari's own reader is used instead,
one episode at a time, written straight into the rows (a memmap folder with ``memmap_dir``).

Every fault a dataset can have is refused here, with a message naming it, before any training
step: an unknown id, a data file that is truncated or unreadable (h5py's ``OSError``, e.g. "truncated
file: eof = ..."), another env or other spaces than the recipe's, a missing field, no transitions,
a non-finite value.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict
from tensordict.utils import NestedKey

from awr_modules.environment import environment_variable

TRAJ_ID_KEY = ("collector", "traj_ids")
EPISODE_FIELDS = ("observations", "actions", "rewards", "terminations", "truncations")


class DatasetError(ValueError):
    """A dataset that cannot train this recipe; the message names the dataset and the fault."""


@dataclass(frozen=True)
class DatasetIdentity:
    """What a checkpoint records of the dataset it trained on, instead of its transitions.

    ``dataset_id`` carries Minari's version suffix (``.../medium-v0``); ``fingerprint`` is a hash
    of the transitions as read, so a dataset rewritten under the same id is told apart.
    """

    dataset_id: str
    env_id: str
    episodes: int
    transitions: int
    fingerprint: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def datasets_root(root: str | os.PathLike | None = None) -> Path:
    """The Minari datasets folder: ``root``, else ``MINARI_DATASETS_PATH``, else ``~/.minari/datasets``."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets")).expanduser()


@contextmanager
def minari_datasets_path(root: str | os.PathLike | None) -> Iterator[Path]:
    """Point Minari (which reads ``MINARI_DATASETS_PATH``) at ``root`` for the duration of the block."""
    folder = datasets_root(root)
    with environment_variable("MINARI_DATASETS_PATH", str(folder)):
        yield folder


def local_dataset_ids(root: str | os.PathLike | None = None) -> list[str]:
    """Ids of the datasets stored under ``root`` (folders holding ``data/metadata.json``)."""
    folder = datasets_root(root)
    if not folder.is_dir():
        return []
    return sorted(str(path.parent.parent.relative_to(folder)) for path in folder.rglob("data/metadata.json"))


def open_minari_dataset(dataset_id: str, root: str | os.PathLike | None = None) -> Any:
    """``minari.MinariDataset`` of a local dataset; an unknown id is refused with the ids that exist, an
    unreadable one with its files (:func:`readable_dataset`)."""
    import minari

    with minari_datasets_path(root) as folder:
        if not (folder / dataset_id / "data" / "metadata.json").is_file():
            known = local_dataset_ids(folder)
            raise DatasetError(
                f"offline data: no Minari dataset {dataset_id!r} under {folder} (MINARI_DATASETS_PATH); "
                f"datasets there: {known[:10] or 'none'}. Write one with `awr dataset ...` or set dataset_root."
            )
        with readable_dataset(dataset_id, folder):
            return minari.load_dataset(dataset_id)


def dataset_files(dataset_id: str, root: str | os.PathLike | None = None) -> list[Path]:
    """The files of a local dataset's ``data`` folder (its HDF5 file and ``metadata.json``)."""
    folder = datasets_root(root) / dataset_id / "data"
    return sorted(path for path in folder.iterdir() if path.is_file()) if folder.is_dir() else []


@contextmanager
def readable_dataset(dataset_id: str, root: str | os.PathLike | None = None) -> Iterator[None]:
    """Refuse, naming the dataset and its files, a read that fails in the storage (h5py raises a bare ``OSError``
    such as "truncated file: eof = ..." for a file cut short by a copy or a full disk)."""
    try:
        yield
    except OSError as error:
        files = dataset_files(dataset_id, root)
        data = [str(path) for path in files if path.suffix != ".json"] or [str(datasets_root(root) / dataset_id)]
        raise DatasetError(
            f"offline data: dataset {dataset_id!r} cannot be read from {', '.join(data)}: {error}. The file is "
            f"truncated or damaged; write the dataset again (`awr dataset ... --overwrite`) or copy it again."
        ) from error


def read_minari_dataset(dataset_id: str, *, env_id: str, observation_shape: tuple[int, ...],
                        action_shape: tuple[int, ...], root: str | os.PathLike | None = None,
                        memmap_dir: str | os.PathLike | None = None,
                        policy_actions: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        extra_columns: Sequence[NestedKey] = ()) -> tuple[TensorDict, DatasetIdentity]:
    """All transitions of a local Minari dataset as rows ``[N]``, after checking it fits the recipe.

    Args:
        dataset_id: Minari id, e.g. ``"halfcheetah/medium-v0"``.

    Keyword Args:
        env_id: the recipe's gymnasium id; the dataset's env must be the same (version included).
        observation_shape: the env's observation shape; ``action_shape``: its action space's shape
            (``()`` for a discrete space, whose actions Minari stores as integers).
        root: the Minari datasets folder (default ``MINARI_DATASETS_PATH``).
        memmap_dir: write the rows as memory-mapped files there instead of keeping them in memory: the
            dataset is read one episode at a time and checked in chunks, so it may be larger than memory.
        policy_actions: maps a batch of stored actions (the env's units) to the actor's (e.g. a recipe's
            ``policy_actions``), applied episode by episode; the rows then hold the mapped actions.
        extra_columns: keys of float columns ``[N, 1]`` of zeros to add (e.g. the value targets a refresh
            writes: a memory-mapped layout cannot grow later). The fingerprint leaves them out.

    Returns:
        The rows (actions as stored unless ``policy_actions``) and the dataset's identity.
    """
    dataset = open_minari_dataset(dataset_id, root)
    with readable_dataset(dataset_id, root):  # reads the metadata and every episode's length from the storage
        _check_env(dataset, dataset_id, env_id, observation_shape, action_shape)
        lengths = _episode_lengths(dataset)
    total = int(sum(lengths))
    if total == 0:
        raise DatasetError(f"offline data: dataset {dataset_id!r} holds no transitions; there is nothing to train on.")
    rows = _empty_rows(total, observation_shape, _row_action(action_shape, policy_actions), extra_columns,
                       device="meta" if memmap_dir is not None else None)
    if memmap_dir is not None:
        rows = rows.memmap_like(memmap_dir)  # files of the rows' layout, nothing allocated in memory
    start = 0
    episodes = dataset.iterate_episodes()
    for number, length in enumerate(lengths):
        try:
            with readable_dataset(dataset_id, root):
                episode = next(episodes)
        except KeyError as error:  # Minari's reader names the field its storage lacks
            raise DatasetError(f"offline data: episode {number} of dataset {dataset_id!r} lacks a field ({error}); "
                               f"AWR needs {list(EPISODE_FIELDS)}.") from error
        _fill_episode(rows[start:start + length], episode, dataset_id, number, policy_actions)
        start += length
    _check_finite(rows, dataset_id)
    identity = DatasetIdentity(dataset_id, env_id, len(lengths), total, _fingerprint(rows.exclude(*extra_columns)))
    return rows, identity


def _row_action(action_shape: tuple[int, ...],
                policy_actions: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """One row's action as the rows hold it (shape and dtype): as stored, or mapped by ``policy_actions``."""
    stored = torch.zeros(1, *action_shape) if action_shape else torch.zeros(1, dtype=torch.long)
    return stored[0] if policy_actions is None else policy_actions(stored)[0]


def _check_env(dataset: Any, dataset_id: str, env_id: str, observation_shape: tuple[int, ...],
               action_shape: tuple[int, ...]) -> None:
    spec = dataset.spec.env_spec
    dataset_env = None if spec is None else spec.id
    if dataset_env is not None and dataset_env != env_id:
        raise DatasetError(f"offline data: dataset {dataset_id!r} was recorded in {dataset_env!r}, but the recipe "
                           f"builds {env_id!r}; pick the recipe of that env or another dataset.")
    spaces = {"observation": (tuple(dataset.observation_space.shape or ()), tuple(observation_shape)),
              "action": (tuple(dataset.action_space.shape or ()), tuple(action_shape))}
    for name, (stored, expected) in spaces.items():
        if stored != expected:
            raise DatasetError(f"offline data: dataset {dataset_id!r} has {name}s of shape {stored}, the recipe's "
                               f"env {env_id!r} has {expected}.")


def _episode_lengths(dataset: Any) -> list[int]:
    """Each episode's number of transitions, from the episodes' metadata (no data is read)."""
    return [int(meta["total_steps"]) for meta in dataset.storage.get_episode_metadata(dataset.episode_indices)]


def _empty_rows(total: int, observation_shape: tuple[int, ...], action: torch.Tensor,
                extra_columns: Sequence[NestedKey], device: str | None) -> TensorDict:
    """Zeroed rows (on ``"meta"``: the layout only, for ``memmap_like``)."""
    flag = torch.zeros(total, 1, dtype=torch.bool, device=device)
    rows = TensorDict({
        "observation": torch.zeros(total, *observation_shape, device=device),
        "action": torch.zeros(total, *action.shape, dtype=action.dtype, device=device),
        "next": {"observation": torch.zeros(total, *observation_shape, device=device),
                 "reward": torch.zeros(total, 1, device=device),
                 "done": flag, "terminated": flag.clone(), "truncated": flag.clone()},
        TRAJ_ID_KEY: torch.zeros(total, dtype=torch.long, device=device),
    }, batch_size=[total], device=device)
    for key in extra_columns:
        rows.set(key, torch.zeros(total, 1, device=device))
    return rows


def _fill_episode(rows: TensorDict, episode: Any, dataset_id: str, number: int,
                  policy_actions: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
    """Write one episode's transitions; its trajectory id is ``-1 - number``, apart from any collector's ids."""
    missing = [name for name in EPISODE_FIELDS if getattr(episode, name, None) is None]
    if missing:
        raise DatasetError(f"offline data: episode {episode.id} of dataset {dataset_id!r} lacks {missing}; "
                           f"AWR needs {list(EPISODE_FIELDS)}.")
    steps = rows.shape[0]
    if steps == 0:
        raise DatasetError(f"offline data: episode {episode.id} of dataset {dataset_id!r} has no steps; drop it.")
    if len(episode.actions) != steps:
        raise DatasetError(f"offline data: episode {episode.id} of dataset {dataset_id!r} has {len(episode.actions)} "
                           f"actions, its metadata says {steps} steps.")
    observations = np.asarray(episode.observations, dtype=np.float32)
    if observations.shape[0] != steps + 1:
        raise DatasetError(f"offline data: episode {episode.id} of dataset {dataset_id!r} has "
                           f"{observations.shape[0]} observations for {steps} actions (Minari stores T + 1).")
    terminated = torch.as_tensor(np.asarray(episode.terminations, dtype=bool)).reshape(steps, 1)
    truncated = torch.as_tensor(np.asarray(episode.truncations, dtype=bool)).reshape(steps, 1)
    truncated[-1] |= ~terminated[-1]  # the stored episode stops here: a path end either way
    action = torch.as_tensor(np.asarray(episode.actions))
    if policy_actions is not None:
        action = policy_actions(action)
    rows.update_(TensorDict({  # in place: ``rows`` is a slice of the dataset's rows
        "observation": torch.from_numpy(observations[:-1]),
        "action": action.reshape(rows["action"].shape).to(rows["action"].dtype),
        "next": {"observation": torch.from_numpy(observations[1:]),
                 "reward": torch.as_tensor(np.asarray(episode.rewards, dtype=np.float32)).reshape(steps, 1),
                 "terminated": terminated, "truncated": truncated, "done": terminated | truncated},
        TRAJ_ID_KEY: torch.full((steps,), -1 - number, dtype=torch.long),
    }, batch_size=[steps]))


def _check_finite(rows: TensorDict, dataset_id: str, chunk: int = 1 << 16) -> None:
    """Refuse non-finite values, ``chunk`` rows at a time (a memory-mapped dataset is never read whole)."""
    for key in ("observation", "action", ("next", "observation"), ("next", "reward")):
        value = rows[key]
        if not value.is_floating_point():
            continue
        bad = []
        for start in range(0, value.shape[0], chunk):
            part = value[start:start + chunk]
            bad += (start + (~torch.isfinite(part)).reshape(part.shape[0], -1).any(-1).nonzero()[:3, 0]).tolist()
            if bad:
                break
        if bad:
            raise DatasetError(f"offline data: dataset {dataset_id!r} has non-finite {key} (transitions {bad}...); "
                               f"clean the dataset or drop those episodes.")


def _fingerprint(rows: TensorDict) -> str:
    """A hash of every stored field's bytes (not of sums, whose last bits depend on threads and CPU)."""
    digest = hashlib.sha256(str(rows.shape[0]).encode())
    for key in sorted(rows.keys(True, True), key=str):
        value = rows[key]
        digest.update(str(key).encode())
        for chunk in value.reshape(value.shape[0], -1).split(1 << 16):
            digest.update(chunk.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
