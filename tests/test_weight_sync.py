"""An asynchronous collector's worker gets the learner's weights through TorchRL's weight-sync scheme.

Pinned: the worker acts with the weights :func:`publish_weights` sent, the actor's parameters and its observation
normaliser's statistics (buffers) alike, from the batch after the one that may straddle the publication; building
the collector, collecting and publishing raise no deprecation warning; and the scheme is one per collector and
yields to a caller's own choice.
"""

from __future__ import annotations

import copy
import warnings
from functools import partial

import pytest
import torch
from tensordict import TensorDictBase

from awr_modules import collector as collector_module
from awr_modules.collector import make_collector, publish_weights, weight_sync_kwargs
from awr_recipes.classic_control import ClassicControl

FRAMES = 16


def _acted_with(policy: torch.nn.Module, batch: TensorDictBase) -> torch.Tensor:
    """Per row: whether ``policy`` gives the row's stored log-prob for its action (the row was collected with it)."""
    with torch.no_grad():
        log_prob = policy.get_dist(batch.select("observation")).log_prob(batch["action"])
    return torch.isclose(batch["action_log_prob"], log_prob, rtol=1e-5, atol=1e-5)


def test_worker_acts_with_published_parameters_and_buffers_and_nothing_is_deprecated() -> None:
    recipe = ClassicControl(env_id="Pendulum-v1", hidden_sizes=[8])
    actor, _ = recipe.make_networks(recipe.make_env(0))
    initial = copy.deepcopy(actor)
    assert dict(actor.named_buffers())  # the normaliser's statistics: what a parameters-only sync would miss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        collector = make_collector(partial(recipe.make_env, 0, 1), copy.deepcopy(actor), asynchronous=True,
                                   frames_per_batch=FRAMES, total_frames=-1)
        try:
            batches = iter(collector)
            first = next(batches).clone()
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():  # the learner's update: new parameters and new normaliser statistics
                for parameter in actor.parameters():
                    parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
                for buffer in actor.buffers():
                    buffer.mul_(1.5).add_(0.25)
            publish_weights(collector, actor)
            next(batches)  # collected while the publication arrived: it may straddle it
            after = next(batches).clone()
        finally:
            collector.shutdown()

    deprecations = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
                    if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning))]
    assert deprecations == []
    assert collector.weight_updater is None  # the weights travelled through the scheme, not a legacy updater

    assert _acted_with(initial, first).all()
    assert _acted_with(actor, after).all()
    assert not _acted_with(initial, after).any()
    stale_buffers = copy.deepcopy(actor)  # the published parameters with the statistics the worker started with
    for stale, old in zip(stale_buffers.buffers(), initial.buffers(), strict=True):
        stale.copy_(old)
    assert not _acted_with(stale_buffers, after).any()  # so the buffers reached the worker too


def test_every_supported_torchrl_takes_a_weight_sync_scheme() -> None:
    """torchrl 0.12-0.14 all declare ``weight_sync_schemes=``: the fallback to the collector's own weight
    updater is for a torchrl without it."""
    assert collector_module.TAKES_WEIGHT_SYNC_SCHEMES


def test_weight_sync_kwargs_give_a_fresh_scheme_unless_the_caller_chose_or_torchrl_has_none(
        monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = weight_sync_kwargs({}), weight_sync_kwargs({"frames_per_batch": FRAMES})
    assert list(first) == ["weight_sync_schemes"] and list(first["weight_sync_schemes"]) == ["policy"]
    assert first["weight_sync_schemes"]["policy"] is not second["weight_sync_schemes"]["policy"]
    assert weight_sync_kwargs({"weight_sync_schemes": {}}) == {}
    assert weight_sync_kwargs({"weight_updater": None}) == {}
    monkeypatch.setattr(collector_module, "TAKES_WEIGHT_SYNC_SCHEMES", False)
    assert weight_sync_kwargs({}) == {}
