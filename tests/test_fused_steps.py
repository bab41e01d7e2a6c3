"""FusedSGDSteps: several SGD steps in one compiled graph take the steps ``torch.optim.SGD`` takes.

Pinned: after fused steps, the parameters and momentum buffers equal those of the same minibatches
stepped one by one with ``loss.backward()`` and ``SGD.step()`` (policy phase with a Gaussian actor,
value phase), from a fresh optimizer and from one that has stepped before; a learning-rate change
reaches the next call; optimizers it cannot write out are refused.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tensordict import TensorDict

from awr_modules import AWRLoss
from awr_modules.fused_steps import FusedSGDSteps, fusable
from awr_modules.phases import minibatch_losses
from awr_recipes.classic_control import ClassicControl

ROWS, BATCH, STEPS = 64, 16, 8


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    recipe = ClassicControl("Pendulum-v1", hidden_sizes=[16, 16])
    actor, critic = recipe.make_networks(recipe.make_env(0), 100.0)
    loss = AWRLoss(actor, critic, value_scale=100.0, action_bound_penalty=10.0, check_inputs=False, functional=False)
    stored = TensorDict({
        "observation": torch.randn(ROWS, 3), "action": torch.randn(ROWS, 1) * 1.5,
        "advantage": torch.randn(ROWS, 1), "value_target": torch.randn(ROWS, 1) * 50,
    }, [ROWS])
    return loss, stored


def _step_one_by_one(minibatch_loss, loss_key, optimizer, stored, indices):
    for index in indices:
        out = minibatch_loss(stored, index)
        optimizer.zero_grad()
        out[loss_key].backward()
        optimizer.step()


@pytest.mark.parametrize(("phase", "loss_key"), [("actor", "loss_actor"), ("critic", "loss_value")])
def test_fused_steps_equal_sgd_steps_one_by_one(phase, loss_key):
    loss, stored = _setup()
    actor_loss, value_loss = minibatch_losses(loss)
    minibatch_loss = actor_loss if phase == "actor" else value_loss
    network = loss.actor_network if phase == "actor" else loss.critic_network
    initial = copy.deepcopy(network)
    reference = copy.deepcopy((loss, network))
    reference_loss, reference_network = reference
    reference_minibatch_loss = minibatch_losses(reference_loss)[0 if phase == "actor" else 1]

    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9)
    reference_optimizer = torch.optim.SGD(reference_network.parameters(), lr=0.01, momentum=0.9)
    fused = FusedSGDSteps(minibatch_loss, loss_key, network, optimizer, steps_per_call=4)
    torch.manual_seed(1)
    rounds = [torch.randint(ROWS, (STEPS, BATCH)) for _ in range(3)]
    for call, indices in enumerate(rounds):
        if call == 2:  # a learning-rate change (a scheduler's) reaches the next call
            for opt in (optimizer, reference_optimizer):
                opt.param_groups[0]["lr"] = 0.003
        if call == 1:  # an optimizer that stepped unfused before: the fused steps continue its momentum
            _step_one_by_one(minibatch_loss, loss_key, optimizer, stored, indices[:2])
            _step_one_by_one(reference_minibatch_loss, loss_key, reference_optimizer, stored, indices[:2])
            indices = indices[2:6]
        out = fused(stored, indices)
        _step_one_by_one(reference_minibatch_loss, loss_key, reference_optimizer, stored, indices)
    assert torch.isfinite(out[loss_key])
    for (name, parameter), reference_parameter in zip(network.named_parameters(), reference_network.parameters(),
                                                      strict=True):
        torch.testing.assert_close(parameter, reference_parameter, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(optimizer.state[parameter]["momentum_buffer"],
                                   reference_optimizer.state[reference_parameter]["momentum_buffer"],
                                   rtol=1e-4, atol=1e-6)
    assert all(not torch.equal(p, q) for p, q in zip(network.parameters(), initial.parameters(), strict=True))


def test_optimizers_that_cannot_be_written_out_are_refused():
    loss, _ = _setup()
    actor_loss, _ = minibatch_losses(loss)
    parameters = list(loss.actor_network.parameters())
    assert fusable(torch.optim.SGD(parameters, lr=0.1, momentum=0.9))
    for optimizer in (torch.optim.Adam(parameters), torch.optim.SGD(parameters, lr=0.1, momentum=0.9, nesterov=True),
                      torch.optim.SGD(parameters, lr=0.1, weight_decay=0.1)):
        assert not fusable(optimizer)
        with pytest.raises(ValueError, match="plain torch.optim.SGD"):
            FusedSGDSteps(actor_loss, "loss_actor", loss.actor_network, optimizer)
    with pytest.raises(ValueError, match="steps_per_call"):
        FusedSGDSteps(actor_loss, "loss_actor", loss.actor_network, torch.optim.SGD(parameters, lr=0.1), steps_per_call=1)
