"""Pins :func:`awr_modules.make_replay_buffer`: sampling laws, argument checks, state round trips, memmap.

- ``priority="weight"`` (alpha 1, beta 0) samples transition ``i`` with probability
  ``w_i / sum_j w_j`` and returns importance weights of 1;
- ``priority="td_error"`` (alpha 0.6, beta 0.4) returns the importance weights
  ``(p_i^alpha / min_j p_j^alpha)^-beta`` for the ``td_error`` the loss writes;
- the unprioritized buffer walks epochs without replacement;
- storage, priorities and write cursor survive ``state_dict``/``load_state_dict`` and
  ``dumps``/``loads`` into a fresh buffer;
- a memmap storage lives in ``scratch_dir`` and takes refreshed targets when they were
  laid out before the first ``extend``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_actor, make_linear_critic
from tensordict import TensorDict
from torchrl.objectives.value import TD0Estimator

from awr_modules import AWRLoss, make_replay_buffer, refresh_value_targets

CAPACITY = 8


def _items(start: int, stop: int) -> TensorDict:
    n = stop - start
    return TensorDict({"step": torch.arange(start, stop), "x": torch.arange(start, stop).float().unsqueeze(-1) * 0.5},
                      [n])


def _frequencies(buffer, draws: int = 20_000) -> torch.Tensor:
    return torch.bincount(buffer.sample(draws)["index"], minlength=len(buffer)).double() / draws


def test_weight_priority_samples_proportionally_to_weight() -> None:
    buffer = make_replay_buffer(CAPACITY, priority="weight")
    index = buffer.extend(_items(0, CAPACITY))
    weight = [0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 1.5, 8.0]
    buffer.update_priority(index, torch.tensor(weight))
    expected = torch.tensor([w / sum(weight) for w in weight], dtype=torch.double)
    frequency = _frequencies(buffer)
    # 20k draws: each frequency's standard error is at most sqrt(0.25 / 20000) = 0.0035; 0.01 is ~3 of them.
    assert (frequency - expected).abs().max().item() < 0.01
    # beta = 0: no importance correction, every sampled transition weighs 1.
    assert (buffer.sample(64)["priority_weight"] == 1).all()


def test_td_error_priority_weights_follow_the_loss_td_error() -> None:
    """The loss writes |R - V| under the key the buffer reads its priorities from."""
    buffer = make_replay_buffer(CAPACITY, priority="td_error")
    obs = torch.tensor([[0.1 * i, 1.0, -0.2 * i] for i in range(CAPACITY)])
    target = torch.tensor([[1.0 - 0.3 * i] for i in range(CAPACITY)])
    data = TensorDict({"observation": obs, "action": torch.zeros(CAPACITY, 2), "advantage": torch.zeros(CAPACITY, 1),
                       "value_target": target}, [CAPACITY])
    buffer.extend(data)
    loss = AWRLoss(make_actor("normal"), make_linear_critic([1.0, 0.5, 2.0]))
    batch = buffer.sample(256)
    assert set(batch["index"].tolist()) == set(range(CAPACITY))  # every transition gets a new priority
    loss(batch)
    buffer.update_tensordict_priority(batch)

    td_error = [abs(1.0 - 0.3 * i - (0.1 * i + 0.5 - 0.4 * i)) for i in range(CAPACITY)]
    alpha, beta, eps = 0.6, 0.4, 1e-8
    tree = [(p + eps) ** alpha for p in td_error]
    sample = buffer.sample(64)
    expected = torch.tensor([(tree[i] / min(tree)) ** -beta for i in sample["index"].tolist()])
    torch.testing.assert_close(sample["priority_weight"].double(), expected.double(), atol=1e-5, rtol=1e-5)


def test_uniform_buffer_walks_epochs_without_replacement() -> None:
    buffer = make_replay_buffer(12, prioritized=False, batch_size=4)
    buffer.extend(_items(0, 12))
    seen = torch.cat([buffer.sample()["step"] for _ in range(3)])
    assert sorted(seen.tolist()) == list(range(12))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"priority": "weight", "beta": 0.4}, "beta"),
        ({"priority": "weight", "alpha": -1.0}, "alpha"),
        ({"priority": "rank"}, "priority"),
        ({"storage": "disk"}, "storage"),
        ({"capacity": 0}, "capacity"),
    ],
    ids=["weight_with_beta", "negative_alpha", "unknown_priority", "unknown_storage", "zero_capacity"],
)
def test_invalid_arguments_raise(kwargs: dict, match: str) -> None:
    kwargs = {"capacity": CAPACITY} | kwargs
    with pytest.raises(ValueError, match=match):
        make_replay_buffer(kwargs.pop("capacity"), **kwargs)


def _seeded_sample(buffer, seed: int = 3) -> TensorDict:
    torch.manual_seed(seed)
    np.random.seed(seed)
    return buffer.sample(32)


@pytest.mark.parametrize("prioritized", [True, False], ids=["weight", "uniform"])
@pytest.mark.parametrize("via", ["state_dict", "dumps"])
def test_state_round_trips_into_a_fresh_buffer(via: str, prioritized: bool, tmp_path) -> None:
    source = make_replay_buffer(CAPACITY, prioritized=prioritized)
    source.extend(_items(0, 6))
    source.extend(_items(6, 11))  # wrapped: transitions 3..10, next write at storage index 3
    if prioritized:
        source.update_priority(torch.arange(CAPACITY), torch.tensor([1.0, 9.0, 2.0, 0.5, 4.0, 3.0, 7.0, 0.1]))
    else:
        source.sample(4)  # the without-replacement sampler is mid-epoch

    target = make_replay_buffer(CAPACITY, prioritized=prioritized)
    if via == "state_dict":
        target.load_state_dict(source.state_dict())
    else:
        source.dumps(tmp_path / "buffer")
        target.loads(tmp_path / "buffer")

    assert len(target) == len(source) == CAPACITY
    everything = torch.arange(CAPACITY)
    assert (target.storage.get(everything) == source.storage.get(everything)).all()
    assert target.storage.get(everything)["step"].tolist() == [8, 9, 10, 3, 4, 5, 6, 7]
    if prioritized:
        torch.testing.assert_close(_frequencies(target), _frequencies(source), atol=0.02, rtol=0)
        assert (_seeded_sample(target)["step"] == _seeded_sample(source)["step"]).all()
    else:
        assert (target.sample(4)["step"] == source.sample(4)["step"]).all()  # the same epoch goes on
    assert target.extend(_items(11, 12)).tolist() == source.extend(_items(11, 12)).tolist() == [3]


def _transitions(n: int, with_targets: bool) -> TensorDict:
    td = TensorDict(
        {
            "observation": torch.arange(3 * n).float().reshape(n, 3) / 10,
            "next": {
                "observation": torch.arange(3, 3 * n + 3).float().reshape(n, 3) / 10,
                "reward": torch.ones(n, 1),
                "done": torch.zeros(n, 1, dtype=torch.bool),
                "terminated": torch.zeros(n, 1, dtype=torch.bool),
            },
        },
        [n],
    )
    if with_targets:
        for key in ("advantage", "value_target", "state_value"):
            td.set(key, torch.zeros(n, 1))
    return td


def test_memmap_storage_in_scratch_dir(tmp_path) -> None:
    buffer = make_replay_buffer(CAPACITY, storage="memmap", scratch_dir=tmp_path, prioritized=False, batch_size=4)
    data = _transitions(5, with_targets=True)
    buffer.extend(data)
    assert any(tmp_path.rglob("*.memmap"))
    stored = buffer.storage.get(torch.arange(5))
    torch.testing.assert_close(stored["observation"], data["observation"])

    # TD(0) with V(s) = s . [1, 1, 1]: R_t = 1 + 0.5 * sum(s'_t), written into the memmap files.
    estimator = TD0Estimator(gamma=0.5, value_network=make_linear_critic([1.0, 1.0, 1.0]))
    refresh_value_targets(buffer, estimator)
    expected = [[1.0 + 0.5 * sum((3 * t + 3 + j) / 10 for j in range(3))] for t in range(5)]
    torch.testing.assert_close(buffer.storage.get(torch.arange(5))["value_target"], torch.tensor(expected))


def test_memmap_without_target_layout_raises(tmp_path) -> None:
    buffer = make_replay_buffer(CAPACITY, storage="memmap", scratch_dir=tmp_path, prioritized=False)
    buffer.extend(_transitions(5, with_targets=False))
    estimator = TD0Estimator(gamma=0.5, value_network=make_linear_critic([1.0, 1.0, 1.0]))
    with pytest.raises(KeyError, match="advantage"):
        refresh_value_targets(buffer, estimator)


def test_a_torchrl_built_for_another_torch_is_refused_with_the_versions_named(monkeypatch):
    """Instead of TorchRL's "SumSegmentTreeFp32 is not available" at the first prioritized sample."""
    from torchrl.data.replay_buffers.samplers import prioritized

    monkeypatch.setattr(prioritized, "SumSegmentTreeFp32", None)  # what a mismatched torch leaves
    with pytest.raises(RuntimeError, match=r"built with torch .* tested pairs: torch 2.14.x with torchrl 0.14.1"):
        make_replay_buffer(100, prioritized=True)
    make_replay_buffer(100, prioritized=False)  # uniform sampling needs no extension
