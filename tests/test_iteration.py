"""The AWR iteration without Lightning: plain buffers, plain optimizers, plain steps.

- one :meth:`AWRIteration.run` equals the paper's numbered steps written out by hand (refresh, value phase,
  refresh, policy phase), draw for draw;
- the temperature part sets the loss's ``beta`` after the advantages' refresh, and the priorities of a buffer
  that samples by weight follow it;
- the stale-row tracking: a second refresh runs the critic on nothing but what changed;
- the counters and the phases' step counts.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import OBS_DIM, make_actor, make_critic
from tensordict import TensorDict

from awr_modules import AWRLoss, make_replay_buffer
from awr_modules.data import GivenBuffers
from awr_modules.execution import Eager, PlainSteps
from awr_modules.iteration import AWRIteration
from awr_modules.phases import Phase, phase_inputs
from awr_modules.targets import TDLambda
from awr_modules.temperature import Fixed, TunedToESS, effective_sample_size
from awr_modules.value_targets import refresh_value_targets_over

ROWS = 40


def _buffer(prioritized: bool = False):
    """ROWS transitions of four 10-step paths (the last one truncated, the others terminated)."""
    generator = torch.Generator().manual_seed(1)
    observation = torch.randn(ROWS, OBS_DIM, generator=generator)
    done = torch.zeros(ROWS, 1, dtype=torch.bool)
    done[9::10] = True
    terminated = done.clone()
    terminated[-1] = False
    rows = TensorDict({
        "observation": observation,
        "action": torch.randn(ROWS, 2, generator=generator).clamp(-0.9, 0.9),
        "action_log_prob": -torch.rand(ROWS, generator=generator),
        "next": TensorDict({"observation": torch.roll(observation, -1, 0),
                            "reward": torch.randn(ROWS, 1, generator=generator),
                            "done": done, "terminated": terminated, "truncated": done & ~terminated}, [ROWS]),
    }, [ROWS])
    buffer = make_replay_buffer(ROWS, prioritized=prioritized, priority="weight")
    buffer.extend(rows)
    return buffer


def _parts(prioritized: bool = False, temperature=None):
    torch.manual_seed(0)
    actor, critic = make_actor("normal"), make_critic()
    loss = AWRLoss(actor, critic, weighting="sampling" if prioritized else "loss", check_inputs=False,
                   functional=False, value_scale=2.0)
    optimizers = (torch.optim.SGD(actor.parameters(), lr=0.05, momentum=0.9),
                  torch.optim.SGD(critic.parameters(), lr=0.05, momentum=0.9))
    iteration = AWRIteration(loss, GivenBuffers(_buffer(prioritized)), TDLambda(0.9, 0.8),
                             temperature or Fixed(0.7), Phase(4, 8), Phase(5, 8), Eager())
    iteration.bind(*optimizers, PlainSteps())
    return iteration, optimizers


def test_one_run_is_the_numbered_steps_by_hand():
    iteration, _ = _parts()
    by_hand, (actor_optimizer, critic_optimizer) = copy.deepcopy(_parts())
    loss, buffers = by_hand.loss, by_hand.data.buffers
    torch.manual_seed(3)
    result = iteration.run()

    torch.manual_seed(3)
    refresh_value_targets_over(buffers, loss.value_estimator)                          # 3. R
    stored, indices = phase_inputs(buffers, loss, 4, 8, prioritized=False)
    for index in indices:                                                               # 4. value phase
        critic_optimizer.zero_grad()
        loss.value_loss(stored[index])["loss_value"].backward()
        critic_optimizer.step()
    refresh_value_targets_over(buffers, loss.value_estimator, normalize_advantage=True)  # 5. A
    stored, indices = phase_inputs(buffers, loss, 5, 8, prioritized=False)
    for index in indices:                                                               # 6. policy phase
        actor_optimizer.zero_grad()
        loss.actor_loss(stored[index])["loss_actor"].backward()
        actor_optimizer.step()

    for ran, expected in zip(iteration.loss.parameters(), loss.parameters(), strict=True):
        torch.testing.assert_close(ran, expected, rtol=0, atol=0)
    stored = iteration.data.buffers[0].storage.get(torch.arange(ROWS))
    torch.testing.assert_close(stored["advantage"], buffers[0].storage.get(torch.arange(ROWS))["advantage"])
    assert abs(float(stored["advantage"].mean())) < 1e-5  # standardised over the buffer (TDLambda's default)
    assert iteration.iteration == 1 and iteration.env_steps == 0  # nothing collected
    assert [set(out.keys()) >= {k} for out, k in zip(result.outputs, ("loss_value", "loss_actor"), strict=True)]
    assert result.weights["train/temperature"] == pytest.approx(0.7)
    assert result.weights["train/buffer_weight_ess"] == pytest.approx(
        effective_sample_size(stored["advantage"], 0.7, 20.0))


def test_eager_steps_compute_the_diagnostics_on_each_phases_last_step_only():
    """Only a phase's last output is logged: the steps before it run with the loss's diagnostics off, and the
    parameters move exactly as with the diagnostics on every step (the previous test's by-hand steps)."""
    iteration, _ = _parts()
    loss, seen = iteration.loss, []
    actor_loss = loss.actor_loss
    loss.actor_loss = lambda td: seen.append(loss.diagnostics) or actor_loss(td)
    result = iteration.run()
    assert seen == [False] * 4 + [True] and loss.diagnostics
    assert set(AWRLoss.DIAGNOSTICS) <= set(result.outputs[-1].keys())


def test_a_tuned_temperature_is_set_after_the_refresh_and_the_priorities_follow_it():
    iteration, _ = _parts(prioritized=True, temperature=TunedToESS(0.5, beta=3.0))
    assert float(iteration.loss.temperature) == 3.0  # the first iteration's beta, before any refresh
    result = iteration.run()
    beta = float(iteration.loss.temperature)
    assert beta != pytest.approx(3.0) and result.weights["train/temperature"] == pytest.approx(beta)
    assert result.weights["train/buffer_weight_ess"] == pytest.approx(0.5, abs=1e-4)
    buffer = iteration.data.buffers[0]
    index = torch.arange(ROWS)
    weights = iteration.loss.weights(buffer.storage.get(index)["advantage"]).reshape(-1)
    torch.testing.assert_close(torch.as_tensor(buffer.sampler._sum_tree[index]), weights + buffer.sampler._eps)


def test_the_second_refresh_of_an_unchanged_critic_runs_it_on_the_newest_next_state_only(monkeypatch):
    """After the advantages' refresh every stored V(s) is the critic's: with no value step in between, the next
    iteration's target refresh runs the critic only where ``s'`` is not the next row's ``s``: here the newest row."""
    iteration, _ = _parts()
    iteration.value_phase = Phase(0, 8)
    iteration.run()
    rows = []
    forward = type(iteration.loss.critic_network).forward
    monkeypatch.setattr(type(iteration.loss.critic_network), "forward",
                        lambda self, td, *a, **k: rows.append(td.shape[0]) or forward(self, td, *a, **k))
    before = copy.deepcopy(iteration.data.buffers[0].storage.get(torch.arange(ROWS)))
    iteration.targets.refresh_targets(iteration.data.buffers, iteration.loss, [None])
    assert sum(rows) == 1  # V(s') of the newest row, no V(s)
    after = iteration.data.buffers[0].storage.get(torch.arange(ROWS))
    torch.testing.assert_close(after["state_value"], before["state_value"])
    iteration.targets.values_moved()  # e.g. the observation normaliser moved: everything is stale again
    rows.clear()
    iteration.targets.refresh_targets(iteration.data.buffers, iteration.loss, [None])
    assert sum(rows) == ROWS + 1


def test_zero_steps_take_no_step_and_the_counters_resume():
    iteration, _ = _parts()
    iteration.value_phase, iteration.policy_phase = Phase(0), Phase(0)
    before = [p.clone() for p in iteration.loss.parameters()]
    assert iteration.run().outputs == []
    for a, b in zip(before, iteration.loss.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    state = iteration.state_dict()
    other, _ = _parts()
    other.load_state_dict(state)
    assert (other.env_steps, other.iteration) == (0, 1)
    assert state["rank"]["buffer"] is None and state["dataset"] is None  # given buffers are the caller's to save
