"""A TorchRL ``Collector`` over an env that already holds every transform the policy needs.

torchrl 0.14 warns that from 0.15 on the collector will append the transforms a policy asks for
(``InitTracker``) unless told not to, through a keyword that torchrl 0.12-0.13 do not have (they
never append anything). AWR's feed-forward policies need no such transform, and the recipes' envs
are complete as built, so :func:`make_collector` passes that keyword where it exists: the same call
runs without the warning on torchrl 0.14 and without the unknown keyword on 0.12 (both tested), and
keeps the env as built on 0.15.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torchrl.collectors import AsyncCollector, Collector
from torchrl.envs import EnvBase

_KEEP_ENV_AS_BUILT: dict[str, bool] = (
    {"auto_register_policy_transforms": False}
    if "auto_register_policy_transforms" in inspect.signature(Collector.__init__).parameters
    else {}
)


def make_collector(env: EnvBase | Callable[[], EnvBase], policy: Any, *, asynchronous: bool = False,
                   **collector_kwargs: Any) -> Collector | AsyncCollector:
    """``Collector(env, policy, **collector_kwargs)`` that keeps ``env``'s transforms as they are; with
    ``asynchronous``, TorchRL's ``AsyncCollector`` over ``env``, then a function that builds the env, in a
    worker process that collects the next batch while the caller works (``update_policy_weights_()`` sends
    it the policy's current weights)."""
    if asynchronous:  # TorchRL lowers this process's torch threads by one per worker unless told how many to keep
        return AsyncCollector(env, policy, num_threads=torch.get_num_threads(), **collector_kwargs)
    return Collector(env, policy, **collector_kwargs, **_KEEP_ENV_AS_BUILT)


def publish_weights(collector: AsyncCollector, policy: torch.nn.Module) -> None:
    """Send ``policy``'s weights to an asynchronous collector's worker, which acts with them from its next batch."""
    collector.update_policy_weights_(policy)
