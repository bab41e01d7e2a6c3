"""``torch.compile`` of a full AWR update step (loss forward, backward, optimiser step) matches eager.

Two copies of one tiny actor/critic/optimiser take one step on the same batch, one eager and
one compiled with the default inductor backend; the losses of the step and the parameters
after it must agree to 1e-5. ``check_inputs=False`` keeps host syncs (finiteness checks) out
of the loss, and with it the loss's forward must compile into a single graph (no graph
breaks), which is what CUDA-graph capture of a training step needs.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from conftest import ACTOR_KINDS, make_actor, make_batch, make_critic

from awr_modules import AWRLoss
from awr_modules.phases import for_compiled_phases, minibatch_losses


def _update_step(loss: AWRLoss, optimizer: torch.optim.Optimizer, batch):
    out = loss(batch)
    objective = out["loss_actor"] + out["loss_value"]
    optimizer.zero_grad()
    objective.backward()
    optimizer.step()
    return out["loss_actor"].detach(), out["loss_value"].detach()


def test_compiled_update_step_matches_eager() -> None:
    loss = AWRLoss(make_actor("normal"), make_critic(), max_weight=5.0, action_bound_penalty=1.0, entropy_coeff=0.01,
                   check_inputs=False)
    optimizer = torch.optim.SGD(loss.parameters(), lr=0.1, momentum=0.9)
    loss_compiled = copy.deepcopy(loss)
    optimizer_compiled = torch.optim.SGD(loss_compiled.parameters(), lr=0.1, momentum=0.9)
    initial = [p.detach().clone() for p in loss.parameters()]
    batch = make_batch("normal", n=16)

    eager = _update_step(loss, optimizer, batch.clone())
    compiled = torch.compile(_update_step)(loss_compiled, optimizer_compiled, batch.clone())

    for value_eager, value_compiled in zip(eager, compiled, strict=True):
        torch.testing.assert_close(value_compiled, value_eager, atol=1e-5, rtol=1e-5)
    params = zip(loss.named_parameters(), loss_compiled.parameters(), initial, strict=True)
    for (name, p_eager), p_compiled, p_initial in params:
        torch.testing.assert_close(p_compiled, p_eager, atol=1e-5, rtol=1e-5, msg=name)
        assert not torch.equal(p_eager, p_initial), f"{name} did not move: the comparison would be trivial"


@pytest.mark.parametrize("functional", [True, False], ids=["functional", "stateful"])
@pytest.mark.parametrize("kind", ACTOR_KINDS)
def test_forward_has_no_graph_break(kind: str, functional: bool) -> None:
    loss = AWRLoss(make_actor(kind), make_critic(), check_inputs=False, functional=functional,
                   action_bound_penalty=1.0 if kind in ("normal", "plain_normal") else 0.0)
    explanation = torch._dynamo.explain(loss)(make_batch(kind))
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]


def test_minibatch_losses_gather_and_loss_in_one_graph_compiled_once_as_the_buffer_grows() -> None:
    """What ``awr_modules.execution.Compiled`` compiles: ``loss(stored[index])`` per phase, equal to eager, one
    graph each.

    The stored data grows by one collection per iteration until the buffer is full; prepared by
    ``for_compiled_phases``, its first length already compiles a dynamic size, and no later length
    recompiles.
    """
    kind = "normal"
    loss = AWRLoss(make_actor(kind), make_critic(), check_inputs=False, functional=False)
    eager, compiled = minibatch_losses(loss), minibatch_losses(loss, compile=True)
    stored_all = make_batch(kind, n=256)
    index = torch.randint(64, (16,))
    for phase in (0, 1):
        explanation = torch._dynamo.explain(eager[phase])(stored_all[:64], index)
        assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]

    torch._dynamo.utils.counters.clear()
    for length in (64, 128, 192, 256, 256):
        stored = for_compiled_phases(stored_all[:length])
        for phase, key in ((0, "loss_actor"), (1, "loss_value")):
            torch.testing.assert_close(compiled[phase](stored, index)[key], eager[phase](stored, index)[key],
                                       atol=1e-5, rtol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # one per phase, for every length
