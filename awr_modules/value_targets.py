"""Refresh ``value_target`` and ``advantage`` over the trajectories stored in a replay buffer.

TD(lambda), GAE and k-step returns run along trajectories. A minibatch sampled
from a buffer is not one: estimating over it silently chains unrelated
transitions. The reference instead recomputes the return of every stored path
with the current critic before each phase (steps 2-3 and 5 of an AWR iteration);
:func:`refresh_value_targets` does that for a flat FIFO TorchRL buffer, in one
vectorised pass of any TorchRL value estimator. V-trace (TorchRL's ``VTrace``) also needs the current
policy's log-likelihood of each stored action, ``log pi(a|s)``, beside the behaviour's stored ``log mu(a|s)``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
from tensordict import TensorDictBase
from tensordict.nn import TensorDictModuleBase
from tensordict.utils import NestedKey
from torchrl.data import ReplayBuffer
from torchrl.objectives.value import ValueEstimatorBase, VTrace
from torchrl.objectives.value.functional import vtrace_advantage_estimate

from awr_modules.distributions import per_transition
from awr_modules.precision import float32_context

ADVANTAGE_NORMALIZATION_EPS = 1e-5  # the reference's epsilon
DEFAULT_TRAJ_ID_KEY = ("collector", "traj_ids")

LogProb = Callable[[TensorDictBase], torch.Tensor]
"""The current policy's ``log pi(a|s)`` of the stored actions of rows ``[N]``, shaped ``[N]``."""


def masked_mean(values: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the ``valid`` entries (all if ``None``); invalid ones are selected away, not multiplied."""
    if valid is None:
        return values.mean()
    return torch.where(valid, values, torch.zeros_like(values)).sum() / valid.sum().clamp_min(1)


def mean_and_std(values: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased std of ``values`` (std 0 for a single value), over the ``valid`` entries if given.

    ``valid`` is a boolean mask of ``values``' shape (e.g. the unpadded rows of a batch); invalid
    entries are selected away, never multiplied, so a nan there does not spread.
    """
    if valid is None:
        std = values.std() if values.numel() > 1 else torch.zeros_like(values.sum())
        return values.mean(), std
    mean = masked_mean(values, valid)
    variance = torch.where(valid, values - mean, torch.zeros_like(values)).pow(2).sum() / (valid.sum() - 1).clamp_min(1)
    return mean, variance.sqrt()


def standardize_advantage(advantage: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``(A - mean(A)) / (std(A) + 1e-5)``, the reference's normalisation of advantages before weighting.

    ``valid`` restricts the mean and std to the valid entries (see :func:`mean_and_std`); every
    entry is still standardised.
    """
    mean, std = mean_and_std(advantage, valid)
    return (advantage - mean) / (std + ADVANTAGE_NORMALIZATION_EPS)


def chronological_indices(buffer: ReplayBuffer) -> torch.Tensor:
    """Storage indices of a FIFO ring buffer, oldest transition first.

    Until the ring is full the order is the storage order; once it wraps, the
    oldest transition sits at the write cursor.
    """
    size = len(buffer)
    # the ring's write position, as the writer's own state holds it (restored with a checkpoint's buffer on every
    # torchrl this project supports, where the total write count is not restored on 0.12)
    cursor = int(buffer.writer.state_dict()["_cursor"]) % max(size, 1)
    return (cursor + torch.arange(size)) % max(size, 1)


def trajectory_ends(data: TensorDictBase, done_key: NestedKey, traj_id_key: NestedKey | None) -> torch.Tensor:
    """Where a stored path stops, for chronologically ordered transitions ``[N]``.

    A path ends at ``done`` (termination or truncation), where the trajectory id
    changes (a collection batch ended mid-episode, or the next env of a batch
    starts), and at the newest transition (the ring's write cursor).
    """
    done = data.get(("next", done_key))
    ends = done.reshape(data.shape[0], -1).any(-1).clone()
    ends[-1] = True
    if traj_id_key is not None:
        traj_ids = data.get(traj_id_key, None)
        if traj_ids is not None:
            traj_ids = traj_ids.reshape(data.shape[0])
            ends[:-1] |= traj_ids[1:] != traj_ids[:-1]
    return ends.reshape(done.shape)


def _takes_next_value(estimator: ValueEstimatorBase) -> bool:
    """Whether ``estimator.value_estimate`` accepts precomputed ``V(s')`` (TD0, TD1, TD(lambda), k-step)."""
    return estimator.value_network is not None and "next_value" in inspect.signature(estimator.value_estimate).parameters


def _values_in_one_pass(estimator: ValueEstimatorBase, data: TensorDictBase, params: TensorDictBase | None,
                        known: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``V(s)`` of every stored state ``[N]`` in one critic pass, and ``V(s')``: the next row's ``V(s)``
    wherever the next row starts from ``s'``, else (cuts, the newest row) the critic's value of ``s'``.

    ``known`` is ``(values, stale)``: the stored ``V(s)`` of each row and which of them are out of date; the
    critic then runs on the stale rows only."""
    network = estimator.value_network
    in_keys, value_key = network.in_keys, estimator.tensor_keys.value
    following = data.get("next")
    own = torch.ones(data.shape[0], dtype=torch.bool, device=data.device)  # rows whose s' needs its own pass
    own[:-1] = False
    for key in in_keys:
        state, next_state = data.get(key), following.get(key)
        own[:-1] |= (next_state[:-1] != state[1:]).reshape(data.shape[0] - 1, -1).any(-1)
    with params.to_module(network) if params is not None else nullcontext():
        if known is None:
            value = _critic_values(network, data.select(*in_keys), value_key)
        else:
            value, stale = known[0].clone(), known[1].nonzero().squeeze(-1)
            value[stale] = _critic_values(network, data[stale].select(*in_keys), value_key)
        next_value = torch.roll(value, -1, dims=0)
        rows = own.nonzero().squeeze(-1)
        next_value[rows] = _critic_values(network, following[rows].select(*in_keys), value_key)
    return value, next_value


CRITIC_BLOCK_ROWS = 8192
"""States per critic call in a refresh. The hidden activations of a block stay in the CPU's caches: at
49,152 HalfCheetah states, the [128, 64] critic takes about half the time in blocks of 8,192 as in one call."""


def _critic_values(network: TensorDictModuleBase, states: TensorDictBase, value_key: NestedKey) -> torch.Tensor:
    """The critic's values of ``states`` ``[N]``, :data:`CRITIC_BLOCK_ROWS` states per call."""
    blocks = states.split(CRITIC_BLOCK_ROWS) if states.shape[0] else [states]
    return torch.cat([network(block.copy()).get(value_key) for block in blocks])


def actor_log_prob(actor: TensorDictModuleBase, action_key: NestedKey | None = None) -> LogProb:
    """``log pi(a|s)`` of the stored actions under ``actor`` (a TorchRL probabilistic actor), read under
    ``action_key`` (``None``: the key the actor samples to)."""
    if action_key is None:
        action_key = (getattr(actor, "dist_sample_keys", None) or ["action"])[0]

    def log_prob(rows: TensorDictBase) -> torch.Tensor:
        return per_transition(actor.get_dist(rows).log_prob(rows.get(action_key)), rows.batch_dims)

    return log_prob


def _vtrace_targets(estimator: VTrace, data: TensorDictBase, value: torch.Tensor, next_value: torch.Tensor,
                    log_prob: LogProb | None) -> tuple[torch.Tensor, torch.Tensor]:
    """V-trace targets ``v_s`` of the stored rows ``[N]`` (oldest first, ``("next", done)`` marking every cut) by
    TorchRL's ``vtrace_advantage_estimate``, with the estimator's gamma and truncation levels, and the advantage of
    each stored action, ``q_s - V(s)`` with ``q_s = r_s + gamma v_{s+1}`` (see :class:`~awr_modules.targets.VTrace`).

    TorchRL's ``VTrace`` module computes ``log pi`` of an action it draws (or of the mode), not of the stored
    action; the ratios ``pi(a_s|x_s) / mu(a_s|x_s)`` need the stored one, so ``log pi`` comes from ``log_prob``
    (``None``: the estimator's actor, :func:`actor_log_prob`)."""
    keys = estimator.tensor_keys
    if keys.sample_log_prob not in data.keys(True):
        raise KeyError(f"refresh_value_targets: V-trace needs the behaviour policy's log-probs log mu(a|s), stored "
                       f"under {keys.sample_log_prob!r}; the stored transitions have none.")
    log_prob = log_prob if log_prob is not None else actor_log_prob(estimator.actor_network)
    log_pi = torch.cat([log_prob(block) for block in data.split(CRITIC_BLOCK_ROWS)]).reshape(value.shape)
    log_mu = per_transition(data.get(keys.sample_log_prob), data.batch_dims).reshape(value.shape).to(value.dtype)
    reward = data.get(("next", keys.reward)).to(value.dtype)
    done, terminated = data.get(("next", keys.done)), data.get(("next", keys.terminated))
    gamma = estimator.gamma.to(value.device)
    # one sequence [1, N, 1], time at dimension -2; TorchRL's advantage rho_s (q_s - V(s)) is not the one AWR uses
    _, value_target = vtrace_advantage_estimate(
        gamma, *(x.unsqueeze(0) for x in (log_pi, log_mu, value, next_value, reward, done, terminated)),
        rho_thresh=estimator.rho_thresh, c_thresh=estimator.c_thresh, time_dim=-2)
    value_target = value_target.squeeze(0)
    following = torch.where(done, next_value, torch.roll(value_target, -1, dims=0))  # v_{s+1}; V(s') at a cut
    action_value = reward + gamma * (~terminated).to(value.dtype) * following
    return value_target, action_value - value


def refresh_value_targets(
    buffer: ReplayBuffer,
    estimator: ValueEstimatorBase,
    *,
    normalize_advantage: bool = False,
    traj_id_key: NestedKey | None = DEFAULT_TRAJ_ID_KEY,
    params: TensorDictBase | None = None,
    priority_fn: Callable[[TensorDictBase], torch.Tensor] | None = None,
    stale_values: torch.Tensor | None = None,
    chunk_size: int | None = None,
    log_prob: LogProb | None = None,
) -> TensorDictBase | None:
    """Recompute ``value_target`` and ``advantage`` of every stored transition with the current critic.

    The buffer's transitions are laid out oldest first as one long sequence and
    cut into paths by :func:`trajectory_ends`. At a cut the estimator bootstraps
    from ``V(s')`` unless the transition *terminated* (``V = 0`` after a failure),
    which is exactly the reference's treatment of time limits and failures. The
    estimator (TD(0), TD(1), TD(lambda), GAE or :class:`~awr_modules.KStepReturnEstimator`)
    runs once over the whole buffer, in float32 even under autocast. The critic runs once
    per stored state: ``V(s')`` is the next row's ``V(s)``, except where the next row does not
    start from ``s'`` (the path's cuts), where the critic runs on ``s'`` itself (GAE, which
    calls its critic itself, takes two passes).

    Args:
        buffer: a FIFO TorchRL replay buffer of transitions (e.g. from
            :func:`~awr_modules.make_replay_buffer`), each with ``"next"``
            reward/done/terminated and the critic's inputs.

    Keyword Args:
        estimator: any TorchRL value estimator; its ``tensor_keys`` name the keys.
        normalize_advantage: standardise advantages over the whole buffer
            (zero mean, unit std, eps 1e-5), as the reference does before weighting.
        traj_id_key: key of the collector's trajectory ids, used to find the cut
            where one collection batch ends and the next begins; ``None`` to rely
            on ``done`` only (then mark batch ends as truncated, e.g. with the
            collector's ``set_truncated=True``).
        params: critic parameters for a functional estimator (e.g.
            ``loss.critic_network_params``); ``None`` uses the module's own.
        priority_fn: maps the refreshed data to one priority per transition,
            written to the buffer's sampler (e.g. AWR weights for
            ``weighting="sampling"``). Ignored by non-prioritized buffers.
        stale_values: storage indices whose stored ``V(s)`` is out of date, when every other stored
            ``V(s)`` is the current critic's (the critic and its observation normaliser unchanged since
            the last refresh; then these are the rows written since). The critic runs on these rows
            only (and on ``s'`` at the cuts); ``None`` runs it on every row. An AWR iteration's first
            refresh needs only the newly collected rows: the critic changes in the value phase alone.
        chunk_size: refresh about this many transitions at a time, in runs of whole paths (a path
            longer than it is one run), so that a buffer larger than memory (a memory-mapped dataset)
            is never read at once; advantages are then standardised in a second pass over the stored
            advantages alone. ``None``: the whole buffer at once.
        log_prob: for a V-trace estimator, the current policy's ``log pi(a|s)`` of the stored actions
            (e.g. the loss's actor, as :class:`~awr_modules.targets.VTrace` passes it); ``None``: the
            estimator's actor (:func:`actor_log_prob`). The stored ``log mu(a|s)`` is read under the
            estimator's ``sample_log_prob`` key. Ignored by the other estimators.

    Returns:
        The stored transitions, oldest first, with the refreshed keys and ``index``
        (their storage indices); ``None`` with ``chunk_size`` (the transitions stay where they are).
    """
    if len(buffer) == 0:
        raise ValueError("refresh_value_targets: the replay buffer is empty; extend it with collected data first.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"refresh_value_targets: chunk_size must be >= 1, got {chunk_size}.")
    keys = estimator.tensor_keys
    index = chronological_indices(buffer)
    stale = None
    if stale_values is not None:
        stale = torch.zeros(len(buffer), dtype=torch.bool, device=index.device)
        stale[stale_values.to(index.device)] = True
        stale = stale[index]
    if chunk_size is None or chunk_size >= len(buffer):
        data = _refresh_rows(buffer, index, estimator, traj_id_key, params, stale, log_prob,
                             standardize=normalize_advantage)
        if priority_fn is not None and hasattr(buffer, "update_priority"):
            buffer.update_priority(index, priority_fn(data).reshape(-1).float())
        return data
    ends = trajectory_ends(_stored(buffer).select(("next", keys.done), *_present(buffer, traj_id_key))[index],
                           keys.done, traj_id_key)
    for rows in path_aligned_chunks(ends.reshape(ends.shape[0], -1).any(-1), chunk_size):
        _refresh_rows(buffer, index[rows], estimator, traj_id_key, params, None if stale is None else stale[rows],
                      log_prob)
    if normalize_advantage:
        standardize_stored_advantages([buffer], keys.advantage, chunk_size)
    if priority_fn is not None:
        write_priorities(buffer, priority_fn, chunk_size)
    return None


def write_priorities(buffer: ReplayBuffer, priority_fn: Callable[[TensorDictBase], torch.Tensor],
                     chunk_size: int | None = None) -> None:
    """Write ``priority_fn`` of the stored transitions to the buffer's sampler, ``chunk_size`` rows at a time
    (all at once with ``None``). Ignored by non-prioritized buffers."""
    if not hasattr(buffer, "update_priority"):
        return
    for rows in torch.arange(len(buffer)).split(chunk_size or max(len(buffer), 1)):
        buffer.update_priority(rows, priority_fn(buffer.storage.get(rows)).reshape(-1).float())


def _stored(buffer: ReplayBuffer) -> TensorDictBase:
    """Every stored row in storage order, as a view of the storage (nothing is copied)."""
    return buffer.storage.get(slice(0, len(buffer)))


def _present(buffer: ReplayBuffer, key: NestedKey | None) -> list[NestedKey]:
    return [key] if key is not None and key in _stored(buffer).keys(True) else []


def path_aligned_chunks(ends: torch.Tensor, chunk_size: int) -> list[slice]:
    """Consecutive slices of a sequence ``[N]`` whose path ends are ``ends``: each stops at a path end and holds at
    most ``chunk_size`` rows, unless a single path is longer (then that path alone). The last row ends a path."""
    stops = (ends.reshape(-1).nonzero().squeeze(-1) + 1).tolist()  # exclusive stops of the paths
    chunks, start, previous = [], 0, None
    for stop in stops:
        if stop - start > chunk_size and previous is not None and previous > start:
            chunks.append(slice(start, previous))
            start = previous
        previous = stop
    chunks.append(slice(start, stops[-1]))
    return chunks


def standardize_stored_advantages(buffers: list[ReplayBuffer], key: NestedKey, chunk_size: int | None = None) -> None:
    """Standardise the stored ``key`` over all rows of ``buffers`` together (as :func:`standardize_advantage`),
    reading ``chunk_size`` rows at a time: one pass for the moments (chunk moments combined in float64, Chan et
    al.'s pairwise update), one for the writes."""
    count, mean, squares = 0, 0.0, 0.0
    for buffer in buffers:
        for rows in torch.arange(len(buffer)).split(chunk_size or max(len(buffer), 1)):
            values = buffer.storage.get(rows).get(key).double().reshape(-1)
            n, chunk_mean = values.numel(), float(values.mean())
            chunk_squares = float((values - chunk_mean).pow(2).sum())
            delta, total = chunk_mean - mean, count + n
            mean += delta * n / total
            squares += chunk_squares + delta**2 * count * n / total
            count = total
    std = math.sqrt(squares / max(count - 1, 1))
    for buffer in buffers:
        for rows in torch.arange(len(buffer)).split(chunk_size or max(len(buffer), 1)):
            stored = buffer.storage.get(rows).get(key)
            standardized = ((stored.double() - mean) / (std + ADVANTAGE_NORMALIZATION_EPS)).to(stored.dtype)
            buffer.storage.set(rows, buffer.storage.get(rows).select().set(key, standardized), set_cursor=False)


def _refresh_rows(buffer: ReplayBuffer, index: torch.Tensor, estimator: ValueEstimatorBase,
                  traj_id_key: NestedKey | None, params: TensorDictBase | None,
                  stale: torch.Tensor | None, log_prob: LogProb | None = None, *,
                  standardize: bool = False) -> TensorDictBase:
    """Refresh the rows at storage ``index`` (whole paths, oldest first) and write value, target and advantage back;
    returns them with ``index``. ``stale``: which of these rows' stored ``V(s)`` is out of date (``None``: all);
    ``log_prob``: V-trace's current ``log pi(a|s)`` (see :func:`refresh_value_targets`); ``standardize``:
    standardise the advantages over these rows before the write."""
    keys = estimator.tensor_keys
    refreshed = [keys.advantage, keys.value_target, keys.value]
    data = buffer.storage.get(index)
    known = None
    if stale is not None and keys.value in data.keys():  # noqa: SIM118 - a TensorDict refuses `in`
        known = (data.get(keys.value), stale)
    data = data.exclude(*refreshed)  # outputs of the previous critic
    done_key = ("next", keys.done)
    if done_key not in data.keys(True):
        raise KeyError(f"refresh_value_targets: stored transitions lack {done_key!r}; the estimator needs it.")
    stored_done = data.get(done_key)
    data.set(done_key, trajectory_ends(data, keys.done, traj_id_key))
    if ("next", keys.terminated) not in data.keys(True):
        data.set(("next", keys.terminated), stored_done.clone())

    sequence = data.unsqueeze(0)  # one sequence [1, N]: the estimators' time dimension is the last one
    with torch.no_grad(), float32_context(data.device):
        if isinstance(estimator, VTrace):  # the critic as for TD(lambda); the ratios with the stored actions
            value, next_value = _values_in_one_pass(estimator, data, params, known)
            value_target, advantage = _vtrace_targets(estimator, data, value, next_value, log_prob)
            data.update({keys.value: value, keys.value_target: value_target, keys.advantage: advantage})
        elif _takes_next_value(estimator):
            value, next_value = _values_in_one_pass(estimator, data, params, known)
            value_target = estimator.value_estimate(sequence, next_value=next_value.unsqueeze(0)).squeeze(0)
            data.update({keys.value: value, keys.value_target: value_target, keys.advantage: value_target - value})
        else:  # GAE computes its values itself: two critic passes, V(s) and V(s')
            estimator(sequence, params=params)
            data = sequence.squeeze(0)
    data.set(done_key, stored_done)
    if standardize:
        data.set(keys.advantage, standardize_advantage(data.get(keys.advantage)))

    buffer.storage.set(index, data.select(*refreshed), set_cursor=False)  # rewrite in place, length unchanged
    stored_keys = buffer.storage.get(index[:1]).keys(True)
    missing = [key for key in refreshed if key not in stored_keys]
    if missing:
        raise KeyError(
            f"refresh_value_targets: the buffer's storage did not accept the new keys {missing} "
            f"(memmap storages have a fixed layout). Add them before extending, e.g. "
            f"batch.set('advantage', torch.zeros_like(batch['next', 'reward'])), for each of {refreshed}."
        )
    data.set("index", index)
    return data


def refresh_value_targets_over(
    buffers: list[ReplayBuffer],
    estimator: ValueEstimatorBase,
    *,
    normalize_advantage: bool = False,
    priority_fn: Callable[[TensorDictBase], torch.Tensor] | None = None,
    stale_values: list[torch.Tensor] | None = None,
    chunk_size: int | None = None,
    log_prob: LogProb | None = None,
) -> None:
    """:func:`refresh_value_targets` over several buffers whose paths are separate (a dataset's and a FIFO
    buffer of collected transitions), with advantages standardised over all of them together.

    One buffer is refreshed exactly as by :func:`refresh_value_targets`. Prioritized sampling (``priority_fn``)
    needs a single buffer. ``stale_values``, if given, holds each buffer's ``stale_values``; ``chunk_size``
    bounds the rows read at once, and ``log_prob`` is V-trace's current policy, as there.
    """
    stale_values = stale_values if stale_values is not None else [None] * len(buffers)
    if len(buffers) == 1:
        refresh_value_targets(buffers[0], estimator, normalize_advantage=normalize_advantage, priority_fn=priority_fn,
                              stale_values=stale_values[0], chunk_size=chunk_size, log_prob=log_prob)
        return
    if priority_fn is not None:
        raise ValueError("refresh_value_targets_over: priorities are per buffer; prioritized sampling needs one buffer.")
    for buffer, stale in zip(buffers, stale_values, strict=True):
        refresh_value_targets(buffer, estimator, stale_values=stale, chunk_size=chunk_size, log_prob=log_prob)
    if normalize_advantage:
        standardize_stored_advantages(buffers, estimator.tensor_keys.advantage, chunk_size)
