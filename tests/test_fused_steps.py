"""FusedSteps: several optimizer steps in one compiled graph take the steps ``torch.optim`` takes.

Pinned: after fused steps, the parameters and the optimizer's state (SGD's momentum buffers; Adam's step counts
and moments) equal those of the same minibatches stepped one by one with ``loss.backward()`` and the optimizer's
``step()`` (policy phase with a Gaussian actor, value phase; Adam's three implementations), from a fresh optimizer
and from one that has stepped before; a learning-rate change reaches the next call; a per-step hook runs after
every update inside the graph (a Q critic's soft target update, its targets equal too); optimizers none of them
writes out are refused; the clipped optimizers' fused steps equal their own steps one by one.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tensordict import TensorDict

from awr_modules import AWRLoss
from awr_modules.fused_steps import (
    FusedAdamSteps,
    FusedClippedAdamSteps,
    FusedClippedSGDSteps,
    FusedSGDSteps,
    fused_steps_class,
)
from awr_modules.phases import minibatch, minibatch_losses
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


ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


@pytest.mark.parametrize("implementation", [{"fused": True}, {"foreach": True}, {"foreach": False}],
                         ids=["fused", "foreach", "for-loop"])
def test_fused_adam_steps_equal_adam_steps_one_by_one(implementation):
    """Adam's update written out: the parameters, step counts and both moments equal ``torch.optim.Adam``'s, for its
    three implementations, from a fresh Adam, after unfused steps, and after a change of lr and betas."""
    loss, stored = _setup()
    _, value_loss = minibatch_losses(loss)
    network = loss.critic_network
    reference_loss = copy.deepcopy(loss)
    reference_value_loss = minibatch_losses(reference_loss)[1]
    reference_network = reference_loss.critic_network
    optimizer = torch.optim.Adam(network.parameters(), lr=0.01, **implementation)
    reference_optimizer = torch.optim.Adam(reference_network.parameters(), lr=0.01, **implementation)
    fused = FusedAdamSteps(value_loss, "loss_value", network, optimizer, steps_per_call=4)
    torch.manual_seed(1)
    for call in range(3):
        indices = torch.randint(ROWS, (STEPS, BATCH))
        if call == 1:  # Adam stepped unfused before: the fused steps continue its state
            _step_one_by_one(value_loss, "loss_value", optimizer, stored, indices[:4])
            _step_one_by_one(reference_value_loss, "loss_value", reference_optimizer, stored, indices[:4])
            indices = indices[4:]
        if call == 2:
            for opt in (optimizer, reference_optimizer):
                opt.param_groups[0].update(lr=0.003, betas=(0.8, 0.99))
        fused(stored, indices)
        _step_one_by_one(reference_value_loss, "loss_value", reference_optimizer, stored, indices)
    for (name, parameter), reference_parameter in zip(network.named_parameters(), reference_network.parameters(),
                                                      strict=True):
        torch.testing.assert_close(parameter, reference_parameter, rtol=1e-4, atol=1e-6, msg=name)
        state, reference_state = optimizer.state[parameter], reference_optimizer.state[reference_parameter]
        assert float(state["step"]) == float(reference_state["step"]) == STEPS + 4 + 4 + STEPS
        assert state["step"].device == reference_state["step"].device
        for key in ADAM_STATE[1:]:
            torch.testing.assert_close(state[key], reference_state[key], rtol=1e-4, atol=1e-7, msg=f"{name} {key}")


def test_a_hook_runs_after_every_fused_step_inside_the_graph():
    """A Q critic's fused steps (discrete actions: no sampling, so both ways draw nothing) with its soft target
    update as the hook: the Q networks, their targets and Adam's moments equal those of one step, one update at a
    time."""
    from test_q_critic import _categorical_actor, _discrete_q, _transitions

    from awr_modules.q_critic import QCritic

    parts = [QCritic(0.9, tau=0.3) for _ in range(2)]
    losses = [targets.use(_discrete_q(), _categorical_actor()) for targets in parts]
    phases = [targets.value_phase() for targets in parts]
    optimizers = [torch.optim.Adam(phase.network.parameters(), lr=0.05, fused=True) for phase in phases]
    stored = _transitions(32, discrete=True)

    def minibatch_loss(phase):
        return lambda data, index: phase.loss(minibatch(data, index))

    fused = FusedAdamSteps(minibatch_loss(phases[0]), "loss_value", phases[0].network, optimizers[0],
                           steps_per_call=3, after_step=phases[0].after_step)
    indices = torch.randint(32, (6, 8), generator=torch.Generator().manual_seed(0))
    fused(stored, indices)
    for index in indices:
        optimizers[1].zero_grad()
        minibatch_loss(phases[1])(stored, index)["loss_value"].backward()
        optimizers[1].step()
        phases[1].after_step()
    for name in ("qvalue_network_params", "target_qvalue_network_params"):
        fused_tensors, reference = (getattr(q_loss, name).detach() for q_loss in losses)
        for key, value in reference.items(True, True):
            torch.testing.assert_close(fused_tensors.get(key), value, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
    lag = losses[0].target_qvalue_network_params - losses[0].qvalue_network_params.detach()
    assert max(float(d.abs().max()) for d in lag.values(True, True)) > 1e-3  # tau < 1: the targets lag behind


def test_optimizers_that_cannot_be_written_out_are_refused():
    loss, _ = _setup()
    actor_loss, _ = minibatch_losses(loss)
    parameters = list(loss.actor_network.parameters())
    assert fused_steps_class(torch.optim.SGD(parameters, lr=0.1, momentum=0.9)) is FusedSGDSteps
    assert fused_steps_class(torch.optim.Adam(parameters, fused=True)) is FusedAdamSteps
    for optimizer in (torch.optim.AdamW(parameters), torch.optim.Adam(parameters, amsgrad=True),
                      torch.optim.Adam(parameters, weight_decay=0.1),
                      torch.optim.SGD(parameters, lr=0.1, momentum=0.9, nesterov=True),
                      torch.optim.SGD(parameters, lr=0.1, weight_decay=0.1)):
        assert fused_steps_class(optimizer) is None
        with pytest.raises(ValueError, match="plain torch.optim.SGD"):
            FusedSGDSteps(actor_loss, "loss_actor", loss.actor_network, optimizer)
        with pytest.raises(ValueError, match="torch.optim.Adam without AMSGrad"):
            FusedAdamSteps(actor_loss, "loss_actor", loss.actor_network, optimizer)
    with pytest.raises(ValueError, match="steps_per_call"):
        FusedSGDSteps(actor_loss, "loss_actor", loss.actor_network, torch.optim.SGD(parameters, lr=0.1), steps_per_call=1)


@pytest.mark.parametrize(("clipped", "options"), [("ClippedSGD", {"lr": 0.01, "momentum": 0.9}),
                                                  ("ClippedAdam", {"lr": 0.01, "fused": True})])
def test_fused_clipped_steps_equal_the_clipped_optimizer_one_by_one(clipped, options):
    """The policy phase with a gradient-norm clip that bites on every step: fused steps equal the clipped
    optimizer's steps one by one, and differ from the unclipped optimizer's (the clip is in the graph)."""
    from awr_modules import optimizers

    loss, stored = _setup()
    network = loss.actor_network
    copies = [copy.deepcopy(loss) for _ in range(2)]
    indices = torch.randint(ROWS, (STEPS, BATCH), generator=torch.Generator().manual_seed(2))
    actor_loss = minibatch_losses(loss)[0]
    actor_loss(stored, indices[0])["loss_actor"].backward()
    first_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in network.parameters()])))
    network.zero_grad(set_to_none=True)
    max_grad_norm = first_norm / 4

    optimizer_class = getattr(optimizers, clipped)
    optimizer = optimizer_class(network.parameters(), max_grad_norm=max_grad_norm, **options)
    assert fused_steps_class(optimizer) is {"ClippedSGD": FusedClippedSGDSteps,
                                            "ClippedAdam": FusedClippedAdamSteps}[clipped]
    fused_steps_class(optimizer)(actor_loss, "loss_actor", network, optimizer, steps_per_call=4)(stored, indices)
    one_by_one, unclipped = copies
    _step_one_by_one(minibatch_losses(one_by_one)[0], "loss_actor",
                     optimizer_class(one_by_one.actor_network.parameters(), max_grad_norm=max_grad_norm, **options),
                     stored, indices)
    _step_one_by_one(minibatch_losses(unclipped)[0], "loss_actor",
                     optimizer_class.base_optimizer(unclipped.actor_network.parameters(), **options), stored, indices)
    for parameter, reference, plain in zip(network.parameters(), one_by_one.actor_network.parameters(),
                                           unclipped.actor_network.parameters(), strict=True):
        torch.testing.assert_close(parameter, reference, rtol=1e-4, atol=1e-6)
    assert not all(torch.allclose(p, q, rtol=1e-3, atol=1e-5)
                   for p, q in zip(network.parameters(), unclipped.actor_network.parameters(), strict=True))
