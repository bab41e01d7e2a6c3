"""Pins :func:`awr_modules.refresh_value_targets`: returns over the paths stored in a FIFO ring buffer.

The buffer (capacity 16) receives 22 transitions in three ``extend`` calls, so the ring has
wrapped and holds transitions 6..21. The stored sequence contains, oldest first:

- a path that starts mid-episode (its start was overwritten) and runs on across the first
  ``extend`` boundary with the same trajectory id, then is truncated (done, not terminated);
- a path whose collection batch ended mid-episode: the next ``extend`` carries another
  ``("collector", "traj_ids")``, so the path is cut there and bootstraps from ``V(s')``;
- a path that terminates (no bootstrap), and the newest path, cut at the write cursor.

Expected returns are a plain-Python TD(lambda) computed path by path with a linear critic
``V(s) = s . w``. Also pinned: advantage normalisation over the buffer, unchanged length and
write position, priorities written by ``priority_fn`` (through sampling frequencies), and
float32 targets under bfloat16 autocast.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_linear_critic, td_lambda_reference
from tensordict import TensorDict
from torchrl.objectives.value import GAE, TDLambdaEstimator

from awr_modules import KStepReturnEstimator, make_replay_buffer, refresh_value_targets, value_targets
from awr_modules.precision import float32_context

GAMMA = 0.9
LMBDA = 0.8
WEIGHT = [1.5, -0.5, 0.25]
CAPACITY = 16
EXTENDS = [(0, 8), (8, 16), (16, 22)]  # three collection batches of the 22 transitions
TRAJ_IDS = [0, 0, 0, 1, 1, 1, 1, 1] + [1, 1, 2, 2, 2, 2, 2, 2] + [3, 3, 3, 3, 4, 4]
TERMINATED_AT = {2, 19}
TRUNCATED_AT = {9}
OLDEST = 22 - CAPACITY  # transitions 0..5 were overwritten


def _obs(t: int) -> list[float]:
    return [math.sin(t), 0.5 * math.cos(t), 0.1 * t]


def _next_obs(t: int) -> list[float]:
    """s'_t: the next row's state inside a trajectory, a fresh state where the trajectory stops."""
    continues = t + 1 < len(TRAJ_IDS) and TRAJ_IDS[t + 1] == TRAJ_IDS[t]
    continues = continues and t not in TERMINATED_AT | TRUNCATED_AT
    return _obs(t + 1) if continues else [2.0 - 0.1 * t, 1.0, -0.3]


def _reward(t: int) -> float:
    return math.cos(1.3 * t) + 0.1 * t


def _value(s: list[float]) -> float:
    return sum(si * wi for si, wi in zip(s, WEIGHT, strict=True))


def _transitions(start: int, stop: int) -> TensorDict:
    steps = range(start, stop)
    done = [t in TERMINATED_AT | TRUNCATED_AT for t in steps]
    return TensorDict(
        {
            "observation": torch.tensor([_obs(t) for t in steps]),
            "step": torch.tensor(list(steps)),
            "collector": {"traj_ids": torch.tensor(TRAJ_IDS[start:stop])},
            "next": {
                "observation": torch.tensor([_next_obs(t) for t in steps]),
                "reward": torch.tensor([[_reward(t)] for t in steps]),
                "done": torch.tensor(done).unsqueeze(-1),
                "terminated": torch.tensor([t in TERMINATED_AT for t in steps]).unsqueeze(-1),
                "truncated": torch.tensor([t in TRUNCATED_AT for t in steps]).unsqueeze(-1),
            },
        },
        [stop - start],
    )


def _filled_buffer(**kwargs):
    buffer = make_replay_buffer(CAPACITY, **kwargs)
    for start, stop in EXTENDS:
        buffer.extend(_transitions(start, stop))
    return buffer


def _ends(steps: range, cut_on_traj_id: bool = True) -> list[bool]:
    ends = []
    for t in steps:
        end = t in TERMINATED_AT | TRUNCATED_AT or t == steps[-1]
        if cut_on_traj_id and t != steps[-1]:
            end = end or TRAJ_IDS[t + 1] != TRAJ_IDS[t]
        ends.append(end)
    return ends


def _expected_returns(lmbda: float = LMBDA, cut_on_traj_id: bool = True) -> list[float]:
    """TD(lambda) of the stored transitions OLDEST..21, oldest first, path by path."""
    steps = range(OLDEST, len(TRAJ_IDS))
    return td_lambda_reference(
        reward=[_reward(t) for t in steps],
        next_value=[_value(_next_obs(t)) for t in steps],
        end=_ends(steps, cut_on_traj_id),
        terminated=[t in TERMINATED_AT for t in steps],
        gamma=GAMMA,
        lmbda=lmbda,
    )


def _chronological_storage(buffer) -> TensorDict:
    """Storage rows of transitions OLDEST..21: storage index of transition t is t % CAPACITY."""
    return buffer.storage.get(torch.tensor([t % CAPACITY for t in range(OLDEST, len(TRAJ_IDS))]))


ESTIMATORS = {
    "td_lambda": (lambda critic: TDLambdaEstimator(gamma=GAMMA, lmbda=LMBDA, value_network=critic), LMBDA),
    "gae": (lambda critic: GAE(gamma=GAMMA, lmbda=LMBDA, value_network=critic), LMBDA),
    "kstep_monte_carlo": (lambda critic: KStepReturnEstimator(gamma=GAMMA, horizon=100, value_network=critic), 1.0),
}


def test_scenario_exercises_every_cut() -> None:
    """The ring wrapped, and the stored sequence holds every kind of path end, each worked out by hand here.

    Stored, oldest first: transitions 6..21. Paths: 6..9 (trajectory 1, begun before the oldest stored row, written
    by two ``extend`` calls, truncated at 9), 10..15 (trajectory 2, cut at 15 by the next row's trajectory id only:
    no done flag), 16..19 (terminated at 19) and 20..21 (cut at the write cursor).
    """
    buffer = _filled_buffer(prioritized=False)
    assert len(buffer) == CAPACITY
    stored = _chronological_storage(buffer)
    steps = range(OLDEST, len(TRAJ_IDS))
    assert stored["step"].tolist() == list(steps) == list(range(6, 22))
    assert stored["collector", "traj_ids"].tolist() == [1] * 4 + [2] * 6 + [3] * 4 + [4] * 2
    assert TRAJ_IDS[OLDEST - 1] == 1  # the oldest stored path's start was overwritten
    flagged = {key: [t for t, flag in zip(steps, stored["next", key].reshape(-1).tolist(), strict=True) if flag]
               for key in ("done", "terminated", "truncated")}
    assert flagged == {"done": [9, 19], "terminated": [19], "truncated": [9]}
    assert EXTENDS[0][1] == 8 and TRAJ_IDS[7] == TRAJ_IDS[8]  # an extend boundary inside a path: not a cut

    assert [t for t, end in zip(steps, _ends(steps), strict=True) if end] == [9, 15, 19, 21]
    assert [t for t, end in zip(steps, _ends(steps, cut_on_traj_id=False), strict=True) if end] == [9, 19, 21]
    returns = dict(zip(steps, _expected_returns(), strict=True))
    # each path's last step by hand: s' of a stopped trajectory is [2 - 0.1 t, 1, -0.3], V(s) = 1.5 s0 - 0.5 s1 + 0.25 s2
    assert returns[9] == pytest.approx(math.cos(11.7) + 0.9 + GAMMA * (1.5 * 1.1 - 0.5 + 0.25 * -0.3))  # truncated
    assert returns[15] == pytest.approx(math.cos(19.5) + 1.5 + GAMMA * (1.5 * 0.5 - 0.5 + 0.25 * -0.3))  # id cut
    assert returns[19] == pytest.approx(math.cos(24.7) + 1.9)  # terminated: no bootstrap
    assert returns[21] == pytest.approx(math.cos(27.3) + 2.1 + GAMMA * (1.5 * -0.1 - 0.5 + 0.25 * -0.3))  # cursor
    # across the extend boundary the path runs on: s'_7 = s_8 = [sin 8, 0.5 cos 8, 0.8]
    value_8 = 1.5 * math.sin(8) - 0.25 * math.cos(8) + 0.2
    assert returns[7] == pytest.approx(math.cos(9.1) + 0.7 + GAMMA * ((1 - LMBDA) * value_8 + LMBDA * returns[8]))
    # without the id cut, transition 15 would run on into trajectory 3 (its s' is still the fresh state)
    without_cut = dict(zip(steps, _expected_returns(cut_on_traj_id=False), strict=True))
    assert without_cut[15] == pytest.approx(math.cos(19.5) + 1.5 + GAMMA * (
        (1 - LMBDA) * (1.5 * 0.5 - 0.5 + 0.25 * -0.3) + LMBDA * returns[16]))
    assert without_cut[15] != pytest.approx(returns[15])
    # the next transition overwrites the oldest row (transition 6, storage index 6): the ring's cursor
    assert buffer.extend(_transitions(0, 1)).tolist() == [OLDEST % CAPACITY] == [6]


@pytest.mark.parametrize("prioritized", [False, True], ids=["uniform", "prioritized"])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_refresh_matches_per_path_td_lambda(name: str, prioritized: bool) -> None:
    make_estimator, lmbda = ESTIMATORS[name]
    buffer = _filled_buffer(prioritized=prioritized)
    out = refresh_value_targets(buffer, make_estimator(make_linear_critic(WEIGHT)))

    expected = torch.tensor(_expected_returns(lmbda)).unsqueeze(-1)
    expected_value = torch.tensor([[_value(_obs(t))] for t in range(OLDEST, len(TRAJ_IDS))])
    stored = _chronological_storage(buffer)
    torch.testing.assert_close(stored["value_target"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(stored["advantage"], expected - expected_value, atol=1e-5, rtol=0)
    torch.testing.assert_close(stored["state_value"], expected_value, atol=1e-5, rtol=0)
    # The stored done flags are the collected ones, not the cuts used for the estimate.
    expected_done = [[t in TERMINATED_AT | TRUNCATED_AT] for t in range(OLDEST, len(TRAJ_IDS))]
    assert stored["next", "done"].tolist() == expected_done
    # The returned data is the same sequence, oldest first, with its storage indices.
    assert out["index"].tolist() == [t % CAPACITY for t in range(OLDEST, len(TRAJ_IDS))]
    torch.testing.assert_close(out["value_target"], expected, atol=1e-5, rtol=0)


def _count_critic_rows(critic) -> list[int]:
    rows: list[int] = []
    critic.module.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    return rows


@pytest.mark.parametrize("name", ["td_lambda", "kstep_monte_carlo"])
def test_refresh_runs_the_critic_once_per_stored_state(name: str) -> None:
    """V(s') is the next row's V(s) wherever the next row starts from s'; the critic runs on s' only elsewhere."""
    critic = make_linear_critic(WEIGHT)
    rows = _count_critic_rows(critic)
    refresh_value_targets(_filled_buffer(prioritized=False), ESTIMATORS[name][0](critic))
    steps = range(OLDEST, len(TRAJ_IDS))
    own_next_state = [t for t in steps if t == len(TRAJ_IDS) - 1 or _next_obs(t) != _obs(t + 1)]
    assert 0 < len(own_next_state) < CAPACITY // 2
    assert sum(rows) == CAPACITY + len(own_next_state)  # two passes would be 2 * CAPACITY


@pytest.mark.parametrize("name", ["td_lambda", "kstep_monte_carlo"])
def test_the_critic_runs_in_blocks_and_gives_the_same_targets(name: str, monkeypatch) -> None:
    monkeypatch.setattr(value_targets, "CRITIC_BLOCK_ROWS", 4)
    make_estimator, lmbda = ESTIMATORS[name]
    critic = make_linear_critic(WEIGHT)
    rows = _count_critic_rows(critic)
    buffer = _filled_buffer(prioritized=False)
    refresh_value_targets(buffer, make_estimator(critic))
    assert max(rows) == 4 and sum(rows) > CAPACITY  # every stored state, four at a time
    stored = _chronological_storage(buffer)
    torch.testing.assert_close(stored["value_target"], torch.tensor(_expected_returns(lmbda)).unsqueeze(-1),
                               atol=1e-5, rtol=0)


def test_a_refresh_with_the_critic_unchanged_runs_it_on_the_rows_written_since_only() -> None:
    """Stored V(s) of the older rows are the unchanged critic's: the critic runs on the new batch (and s' at cuts),
    and the targets equal the per-path TD(lambda) of a full refresh."""
    critic = make_linear_critic(WEIGHT)
    estimator = TDLambdaEstimator(gamma=GAMMA, lmbda=LMBDA, value_network=critic)
    buffer = make_replay_buffer(CAPACITY, prioritized=False)
    for start, stop in EXTENDS[:2]:
        buffer.extend(_transitions(start, stop))
    refresh_value_targets(buffer, estimator)
    written = buffer.extend(_transitions(*EXTENDS[2]))  # overwrites rows 0..5, which still hold older V(s)
    rows = _count_critic_rows(critic)
    refresh_value_targets(buffer, estimator, stale_values=written)

    steps = range(OLDEST, len(TRAJ_IDS))
    own_next_state = [t for t in steps if t == len(TRAJ_IDS) - 1 or _next_obs(t) != _obs(t + 1)]
    assert sorted(written.tolist()) == list(range(6)) and rows == [len(written), len(own_next_state)]
    stored = _chronological_storage(buffer)
    torch.testing.assert_close(stored["value_target"], torch.tensor(_expected_returns()).unsqueeze(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(stored["state_value"], torch.tensor([[_value(_obs(t))] for t in steps]), atol=1e-5, rtol=0)

    stale_claimed_current = _filled_buffer(prioritized=False)  # the overwritten rows' V(s) were never refreshed
    stale_claimed_current.storage.set(torch.arange(CAPACITY), stale_claimed_current.storage.get(torch.arange(CAPACITY))
                                      .select().set("state_value", torch.zeros(CAPACITY, 1)), set_cursor=False)
    refresh_value_targets(stale_claimed_current, estimator, stale_values=torch.empty(0, dtype=torch.long))
    assert not torch.allclose(_chronological_storage(stale_claimed_current)["value_target"], stored["value_target"])


def test_one_pass_equals_the_estimators_two_passes_where_states_do_not_chain() -> None:
    """A next state that is not the next row's state (no done, same trajectory id) gets its own value."""
    torch.manual_seed(0)
    n = 12
    data = TensorDict({"observation": torch.randn(n, 3), "collector": {"traj_ids": torch.zeros(n, dtype=torch.long)},
                       "next": {"observation": torch.randn(n, 3), "reward": torch.randn(n, 1),
                                "done": torch.zeros(n, 1, dtype=torch.bool),
                                "terminated": torch.zeros(n, 1, dtype=torch.bool)}}, [n])
    data["next", "observation"][:5] = data["observation"][1:6]  # the first five rows chain, the rest do not
    buffer = make_replay_buffer(n, prioritized=False)
    buffer.extend(data.clone())
    critic = make_linear_critic(WEIGHT)
    refresh_value_targets(buffer, TDLambdaEstimator(gamma=GAMMA, lmbda=LMBDA, value_network=critic))
    expected = data.clone()
    expected["next", "done"][-1] = True  # the newest row is a cut, as the refresh makes it
    expected = TDLambdaEstimator(gamma=GAMMA, lmbda=LMBDA, value_network=critic)(expected.unsqueeze(0)).squeeze(0)
    stored = buffer.storage.get(torch.arange(n))
    for key in ("state_value", "value_target", "advantage"):
        torch.testing.assert_close(stored[key], expected[key], atol=1e-6, rtol=0)


def test_refresh_normalizes_advantage_over_the_buffer() -> None:
    buffer = _filled_buffer(prioritized=False)
    refresh_value_targets(buffer, TDLambdaEstimator(gamma=GAMMA, lmbda=LMBDA, value_network=make_linear_critic(WEIGHT)),
                          normalize_advantage=True)
    stored = _chronological_storage(buffer)
    advantage = stored["advantage"]
    assert advantage.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert advantage.std().item() == pytest.approx(1.0, abs=1e-4)  # std + 1e-5 in the denominator
    # Only the advantage is standardised; the critic's regression target keeps its scale.
    torch.testing.assert_close(stored["value_target"], torch.tensor(_expected_returns()).unsqueeze(-1),
                               atol=1e-5, rtol=0)


def test_refresh_keeps_length_and_write_position() -> None:
    buffer = _filled_buffer(prioritized=False)
    before = _chronological_storage(buffer).exclude("value_target", "advantage", "state_value")
    refresh_value_targets(buffer, TDLambdaEstimator(gamma=GAMMA, lmbda=LMBDA, value_network=make_linear_critic(WEIGHT)))
    assert len(buffer) == CAPACITY
    after = _chronological_storage(buffer).select(*before.keys(True, True))
    assert (after == before).all()
    # The next transition overwrites the oldest one (transition 6 sits at storage index 6).
    assert buffer.extend(_transitions(0, 1)).tolist() == [OLDEST % CAPACITY]


def test_priority_fn_sets_sampling_priorities() -> None:
    buffer = _filled_buffer(prioritized=True, priority="weight")
    out = refresh_value_targets(
        buffer,
        TDLambdaEstimator(gamma=GAMMA, lmbda=LMBDA, value_network=make_linear_critic(WEIGHT)),
        priority_fn=lambda data: data["value_target"].abs() + 0.1,
    )
    priority = torch.tensor([abs(g) + 0.1 for g in _expected_returns()])
    expected = torch.zeros(CAPACITY)
    expected[out["index"]] = priority / priority.sum()
    draws = 20_000
    frequency = torch.bincount(buffer.sample(draws)["index"], minlength=CAPACITY).float() / draws
    # 20k draws: the standard error of each frequency is below sqrt(0.25 / 20000) = 0.0035.
    assert (frequency - expected).abs().max().item() < 0.012


def test_refresh_under_bfloat16_autocast_stays_float32() -> None:
    buffer = _filled_buffer(prioritized=False)
    estimator = TDLambdaEstimator(gamma=GAMMA, lmbda=LMBDA, value_network=make_linear_critic(WEIGHT))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = refresh_value_targets(buffer, estimator, normalize_advantage=False)
    for key in ("value_target", "advantage", "state_value"):
        assert out[key].dtype == torch.float32, key
    # bfloat16 would be off by ~1e-2 on these returns.
    torch.testing.assert_close(out["value_target"], torch.tensor(_expected_returns()).unsqueeze(-1),
                               atol=1e-5, rtol=0)


def test_refresh_of_empty_buffer_raises() -> None:
    buffer = make_replay_buffer(CAPACITY, prioritized=False)
    estimator = TDLambdaEstimator(gamma=GAMMA, lmbda=LMBDA, value_network=make_linear_critic(WEIGHT))
    with pytest.raises(ValueError, match="empty"):
        refresh_value_targets(buffer, estimator)


@pytest.mark.parametrize("device_type", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
def test_float32_context_switches_autocast_off_without_knowing_the_device(device_type):
    """A TensorDict's device can be None while its tensors sit on a GPU: the float32 region must not depend on it."""
    with torch.autocast(device_type, dtype=torch.bfloat16):
        with float32_context(None):
            assert not torch.is_autocast_enabled(device_type)
            assert torch.ones(2, 2, device=device_type).matmul(torch.ones(2, 2, device=device_type)).dtype == torch.float32
        assert torch.is_autocast_enabled(device_type)


def test_advantages_over_several_buffers_are_standardised_together():
    from tensordict import TensorDict as _TD
    from torchrl.modules import ValueOperator
    from torchrl.objectives.value import TDLambdaEstimator

    from awr_modules import make_replay_buffer
    from awr_modules.value_targets import refresh_value_targets_over

    critic = ValueOperator(torch.nn.Linear(3, 1), in_keys=["observation"])
    buffers = []
    for size, shift in ((40, 0.0), (60, 5.0)):
        flag = torch.zeros(size, 1, dtype=torch.bool)
        buffer = make_replay_buffer(size, prioritized=False)
        buffer.extend(_TD({"observation": torch.randn(size, 3), "next": {"observation": torch.randn(size, 3),
                           "reward": torch.randn(size, 1) + shift, "done": flag, "terminated": flag}}, [size]))
        buffers.append(buffer)
    refresh_value_targets_over(buffers, TDLambdaEstimator(gamma=0.9, lmbda=0.8, value_network=critic),
                               normalize_advantage=True)
    joint = torch.cat([buffer.storage.get(torch.arange(len(buffer)))["advantage"] for buffer in buffers])
    torch.testing.assert_close(joint.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(joint.std(), torch.tensor(1.0), atol=1e-4, rtol=0)
    assert buffers[1].storage.get(torch.arange(60))["advantage"].mean() > 0.5  # not each buffer on its own


def test_path_aligned_chunks_stop_at_path_ends_and_keep_a_long_path_whole():
    from awr_modules.value_targets import path_aligned_chunks

    ends = torch.zeros(20, dtype=torch.bool)
    ends[[2, 5, 6, 15, 19]] = True  # paths [0, 3) [3, 6) [6, 7) [7, 16) [16, 20)
    assert path_aligned_chunks(ends, 4) == [slice(0, 3), slice(3, 7), slice(7, 16), slice(16, 20)]
    assert path_aligned_chunks(ends, 7) == [slice(0, 7), slice(7, 16), slice(16, 20)]
    assert path_aligned_chunks(ends, 100) == [slice(0, 20)]


@pytest.mark.parametrize("chunk_size", [1, 5, 9])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_a_refresh_in_chunks_of_whole_paths_equals_one_over_the_buffer(name: str, chunk_size: int) -> None:
    """The wrapped ring's paths refreshed a few at a time, advantages standardised in a second pass and the
    priorities written per chunk: the same stored targets, advantages and priorities as at once; the critic never
    reads more than a chunk (or one longer path) at a time."""
    make_estimator = ESTIMATORS[name][0]
    whole, chunked = _filled_buffer(prioritized=True), _filled_buffer(prioritized=True)
    priority = lambda data: data["advantage"].exp()
    refresh_value_targets(whole, make_estimator(make_linear_critic(WEIGHT)), normalize_advantage=True,
                          priority_fn=priority)
    critic = make_linear_critic(WEIGHT)
    rows = _count_critic_rows(critic)
    assert refresh_value_targets(chunked, make_estimator(critic), normalize_advantage=True, priority_fn=priority,
                                 chunk_size=chunk_size) is None
    for key in ("state_value", "value_target", "advantage"):
        torch.testing.assert_close(_chronological_storage(chunked)[key], _chronological_storage(whole)[key],
                                   atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.as_tensor(chunked.sampler._sum_tree[torch.arange(CAPACITY)]),
                               torch.as_tensor(whole.sampler._sum_tree[torch.arange(CAPACITY)]), atol=1e-5, rtol=1e-5)
    longest_path = 6  # transitions 10..15 (trajectory id 2) in the stored sequence
    assert max(rows) <= max(chunk_size, longest_path) and len(rows) > 2
