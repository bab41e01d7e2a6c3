"""TorchRL collectors over an env that already holds every transform the policy needs, and the weights an
asynchronous collector's worker acts with.

torchrl 0.14 warns that from 0.15 on the collector will append the transforms a policy asks for
(``InitTracker``) unless told not to, through a keyword that torchrl 0.12-0.13 do not have (they
never append anything). AWR's feed-forward policies need no such transform, and the recipes' envs
are complete as built, so :func:`make_collector` passes that keyword where it exists: the same call
runs without the warning on torchrl 0.14 and without the unknown keyword on 0.12 (both tested), and
keeps the env as built on 0.15.

An asynchronous collector's worker holds its own copy of the policy. Its weights travel through a TorchRL
weight-sync scheme (``torchrl.weight_update``), the API that replaces the deprecated ``WeightUpdaterBase``
classes: :func:`make_collector` names the scheme instead of relying on the collector's default, so a change of
that default cannot change how (or whether) the learner's weights reach the worker. torchrl 0.14 still warns
"Creating VanillaWeightUpdater which inherits from WeightUpdaterBase is deprecated" (and the same for its other
legacy updaters) in each process that imports ``torchrl.collectors``, as that import defines those classes: no
call made here causes it, and building, running and updating the collector warn nothing (tested).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torchrl.collectors import AsyncCollector, Collector
from torchrl.envs import EnvBase

try:
    from torchrl.weight_update import SharedMemWeightSyncScheme
except ImportError:  # a torchrl without weight-sync schemes: its collectors move weights their own way
    SharedMemWeightSyncScheme = None

_KEEP_ENV_AS_BUILT: dict[str, bool] = (
    {"auto_register_policy_transforms": False}
    if "auto_register_policy_transforms" in inspect.signature(Collector.__init__).parameters
    else {}
)

# Whether AsyncCollector takes ``weight_sync_schemes=`` (declared by one of the classes it derives from:
# AsyncCollector itself forwards ``**kwargs``). Every torchrl this package supports (0.12-0.14) does.
TAKES_WEIGHT_SYNC_SCHEMES: bool = SharedMemWeightSyncScheme is not None and any(
    "weight_sync_schemes" in inspect.signature(cls.__init__).parameters
    for cls in AsyncCollector.__mro__ if "__init__" in vars(cls)
)


def weight_sync_kwargs(collector_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword that gives an :class:`AsyncCollector` a fresh shared-memory weight-sync scheme for its policy,
    or nothing where torchrl has no such keyword or the caller chose a scheme or updater itself.

    Shared memory is what torchrl 0.12-0.14 pick by default for a module policy: the worker's policy
    reads its parameters and buffers from tensors that the learner's publication overwrites in place, and
    the worker acknowledges each one, so nothing is pickled per publication. A scheme holds its own
    queues and worker threads, hence one per collector.
    """
    if not TAKES_WEIGHT_SYNC_SCHEMES or {"weight_sync_schemes", "weight_updater"} & collector_kwargs.keys():
        return {}
    return {"weight_sync_schemes": {"policy": SharedMemWeightSyncScheme()}}


def make_collector(env: EnvBase | Callable[[], EnvBase], policy: Any, *, asynchronous: bool = False,
                   **collector_kwargs: Any) -> Collector | AsyncCollector:
    """``Collector(env, policy, **collector_kwargs)`` that keeps ``env``'s transforms as they are; with
    ``asynchronous``, TorchRL's ``AsyncCollector`` over ``env``, then a function that builds the env, in a
    worker process that collects the next batch while the caller works, with its own copy of ``policy``
    whose weights :func:`publish_weights` replaces through a weight-sync scheme."""
    if asynchronous:  # TorchRL lowers this process's torch threads by one per worker unless told how many to keep
        return AsyncCollector(env, policy, num_threads=torch.get_num_threads(), **collector_kwargs,
                              **weight_sync_kwargs(collector_kwargs))
    return Collector(env, policy, **collector_kwargs, **_KEEP_ENV_AS_BUILT)


def publish_weights(collector: AsyncCollector, policy: torch.nn.Module) -> None:
    """Send ``policy``'s weights, its parameters and its buffers (an observation normaliser's statistics), to an
    asynchronous collector's worker, which acts with them from the next batch it starts at the latest.

    The batch the worker is collecting meanwhile may straddle the publication: its earlier rows were
    collected with the weights published before (and a step taken while the shared tensors are being overwritten
    may see part of each). With the collector's weight-sync scheme the call returns once the worker has
    acknowledged the new weights, so every batch the worker starts afterwards uses them; on a torchrl without
    schemes the same call goes to the collector's own weight updater.
    """
    collector.update_policy_weights_(policy)
