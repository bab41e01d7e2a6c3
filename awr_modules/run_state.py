"""What an AWR checkpoint holds besides Lightning's own: enough to resume a run exactly.

Lightning saves the networks, optimizers and loops. A run also needs the env-step and
iteration counters, the observation statistics, and for every DDP rank its replay buffer
and RNG states; and a checkpoint must be refused, before any weight is loaded, when it was
written for another env or other network sizes. Everything here is in types that
``torch.load(weights_only=True)`` accepts.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tensordict import TensorDictBase
from torchrl.data import ReplayBuffer
from torchrl.envs import EnvBase

CHECKPOINT_KEY = "awr"
"""The checkpoint section ``AWRModule`` writes: ``version``, ``env_id``, ``signature``, ``env_steps``,
``iteration``, ``normalizers`` (observation statistics), ``entropy`` (a tuned entropy coefficient's state; absent
from checkpoints written before it), ``ranks`` (each rank's ``buffer`` and ``rng``) and ``dataset`` (the identity of
a dataset the run read)."""

TARGETS_NETWORKS = "targets_networks."
"""The state-dict prefix of the networks a targets part trains itself (``AWRModule.targets_networks``: a Q
critic's), present in a checkpoint only when its run had them."""

FORMAT_VERSION = "0.2.0"
"""The torchrl-awr version whose checkpoint layout this is. 0.1.0 wrote no version; its networks load (the
state dict's keys are unchanged), but its runs do not resume: their configs name flags that became parts."""


def env_signature(env: EnvBase) -> dict[str, Any]:
    """What a checkpoint must match besides the env id: the shapes of its spaces."""
    spec = env.action_spec
    return {
        "observation_shape": list(env.observation_spec["observation"].shape),
        "action_shape": list(spec.shape),
        "discrete": not spec.dtype.is_floating_point,
    }


def checked_run_state(checkpoint: dict[str, Any], env_id: str, signature: dict[str, Any],
                      own_state: dict[str, torch.Tensor], *, resume: bool = False) -> dict[str, Any]:
    """The checkpoint's AWR section, after checking that it fits this env and these networks; with ``resume``,
    also that its layout is this version's (a run resumes from a checkpoint of the same format only)."""
    state = checkpoint.get(CHECKPOINT_KEY)
    if state is None:
        raise ValueError(
            f"AWRModule: the checkpoint has no {CHECKPOINT_KEY!r} section; it was not written by AWRModule "
            f"(or is corrupt). Pass a checkpoint from `awr fit`."
        )
    version = state.get("version", "0.1.0")
    if resume and version != FORMAT_VERSION:
        raise ValueError(
            f"AWRModule: the checkpoint was written by torchrl-awr {version}, whose runs this version "
            f"({FORMAT_VERSION}) cannot resume (its config's flags became parts). Its networks load: start a new "
            f"run from them with `--model.init_from <checkpoint>`, or evaluate them with `awr validate`."
        )
    if state["env_id"] != env_id or state["signature"] != signature:
        raise ValueError(
            f"AWRModule: checkpoint is for env {state['env_id']!r} with spaces {state['signature']}, but the "
            f"config builds {env_id!r} with {signature}. Use the config it was trained with."
        )
    _check_state_shapes(own_state, checkpoint.get("state_dict", {}))
    return state


def check_same_dataset(saved: dict[str, Any] | None, current: Any) -> None:
    """Refuse to resume on a dataset that changed since the checkpoint named it (same id, other transitions).

    ``saved`` is the checkpoint's record, ``current`` the :class:`~awr_modules.offline_data.DatasetIdentity` the
    run read. Another id (or none) is a new stage, e.g. online fine-tuning of an offline checkpoint, and passes.
    """
    if saved is None or current is None or saved["dataset_id"] != current.dataset_id:
        return
    if saved["fingerprint"] != current.fingerprint or saved["transitions"] != current.transitions:
        raise ValueError(
            f"AWRModule: the checkpoint was trained on dataset {saved['dataset_id']!r} with {saved['transitions']} "
            f"transitions (fingerprint {saved['fingerprint']}), but that id now holds {current.transitions} "
            f"(fingerprint {current.fingerprint}): the dataset was rewritten. Restore it or write it under a new version."
        )


def _check_state_shapes(own: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> None:
    """Fail with one clear message on mismatched network sizes, instead of a partial load."""
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in own.items()
                  if isinstance(v, torch.Tensor) and k in saved and saved[k].shape != v.shape]
    q_networks = [key for key in (*missing, *unexpected) if key.startswith(TARGETS_NETWORKS)]
    if q_networks:
        has, lacks = ("this config", "the checkpoint") if q_networks[0] in missing else ("the checkpoint", "this config")
        raise ValueError(
            f"AWRModule: {has} has a Q critic's networks and {lacks} has not ({q_networks[0]}, ...): a Q critic "
            "(model.targets QCritic) and V targets do not share networks. Use the critic the checkpoint was trained "
            "with, e.g. -c configs/reference/td_lambda_critic.yaml (AWR's V critic) or "
            "-c configs/reference/q_critic.yaml after the task's config."
        )
    if missing or unexpected or mismatched:
        raise ValueError(
            "AWRModule: the checkpoint's networks do not match this config (hidden sizes, policy kind?): "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}, shape mismatches {mismatched[:4]}."
        )


def rank_state(buffer: ReplayBuffer | None) -> dict[str, Any]:
    """This rank's replay buffer (storage and cursor) and RNG states, on the CPU.

    The sampler's priorities are left out (TorchRL's segment trees are not ``weights_only``-safe):
    they are a function of the stored advantages, and :func:`restore_rank_state` rewrites them.
    """
    stored = None if buffer is None else {k: v for k, v in buffer.state_dict().items() if k != "_sampler"}
    return to_device({"buffer": stored, "rng": rng_state()}, "cpu")


def own_rank_state(ranks: list[dict[str, Any]], world_size: int, rank: int) -> dict[str, Any]:
    """This rank's saved state; a run with another world size reuses the saved ranks' states in turn."""
    if len(ranks) != world_size:
        from lightning.pytorch.utilities import rank_zero_warn  # DDP only: the parts import no Lightning

        rank_zero_warn(
            f"AWRModule: the checkpoint holds the replay buffers of {len(ranks)} rank(s), this run has "
            f"{world_size}; rank r resumes with the buffer of saved rank r % {len(ranks)}."
        )
    return ranks[rank % len(ranks)]


def restore_rank_state(state: dict[str, Any], buffer: ReplayBuffer | None,
                       priority_fn: Callable[[TensorDictBase], torch.Tensor] | None = None) -> None:
    """Load a saved rank state: the buffer (moved to its storage's device), its priorities recomputed
    from the stored data by ``priority_fn`` (e.g. ``AWRLoss.sampling_priority``), and the RNG states."""
    if state["buffer"] is not None and buffer is not None:
        buffer.load_state_dict({**buffer.state_dict(), **to_device(state["buffer"], buffer.storage.device)})
        if priority_fn is not None and len(buffer):
            index = torch.arange(len(buffer), device=buffer.storage.device)
            buffer.update_priority(index, priority_fn(buffer.storage.get(index)).reshape(-1).float())
    set_rng_state(state["rng"])


def rng_state() -> dict[str, Any]:
    """Torch (CPU and, once used, CUDA), NumPy and Python generator states, in ``weights_only``-safe types."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position,
             has_gauss, cached], "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    random.setstate(state["python"])


def to_device(state: Any, device: torch.device | str) -> Any:
    """``state`` with every tensor in its nested dicts, lists and tuples moved to ``device``.

    Dicts are copied with their type and attributes: a TensorDict state dict is an
    ``OrderedDict`` whose ``_metadata`` attribute holds the batch size, which Lightning's
    ``move_data_to_device`` drops (it rebuilds mappings).
    """
    if isinstance(state, torch.Tensor):
        return state.to(device)
    if isinstance(state, dict):
        moved = copy.copy(state)
        for key, value in state.items():
            moved[key] = to_device(value, device)
        return moved
    if isinstance(state, (list, tuple)):
        return type(state)(to_device(value, device) for value in state)
    return state
