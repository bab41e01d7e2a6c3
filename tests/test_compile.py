"""``torch.compile`` of a full AWR update step (loss forward, backward, optimiser step) matches eager.

Two copies of the same tiny actor/critic/optimiser run one step on the same batch, one eager
and one compiled; the losses of the step and the parameters after it must agree to 1e-5.
``check_inputs=False`` keeps host syncs (finiteness checks) out of the compiled graph.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_actor, make_batch, make_critic

from awr_modules import AWRLoss


def _update_step(loss: AWRLoss, optimizer: torch.optim.Optimizer, batch):
    out = loss(batch)
    objective = out["loss_actor"] + out["loss_value"]
    optimizer.zero_grad()
    objective.backward()
    optimizer.step()
    return out["loss_actor"].detach(), out["loss_value"].detach()


@pytest.mark.parametrize("kind", ["normal", "categorical"])
def test_compiled_update_step_matches_eager(kind: str) -> None:
    loss = AWRLoss(make_actor(kind), make_critic(), max_weight=5.0, check_inputs=False)
    optimizer = torch.optim.SGD(loss.parameters(), lr=0.1, momentum=0.9)
    loss_c = copy.deepcopy(loss)
    optimizer_c = torch.optim.SGD(loss_c.parameters(), lr=0.1, momentum=0.9)
    batch = make_batch(kind, n=16)

    eager = _update_step(loss, optimizer, batch.clone())
    compiled = torch.compile(_update_step)(loss_c, optimizer_c, batch.clone())

    for e, c in zip(eager, compiled, strict=True):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5)
    for (name, p), (_, p_c) in zip(loss.named_parameters(), loss_c.named_parameters(), strict=True):
        torch.testing.assert_close(p_c, p, atol=1e-5, rtol=1e-5, msg=name)
    # The step moved the parameters, so the comparison above is not trivial.
    assert any((p != q).any() for p, q in zip(loss.parameters(), AWRLoss(make_actor(kind), make_critic()).parameters()))
