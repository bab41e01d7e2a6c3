"""The clipped optimizers: each step uses the gradient scaled to at most ``max_grad_norm``, then the base update.

Pinned on hand numbers: a gradient (3, 4) (norm 5) clipped to norm 1 is (0.6, 0.8), and SGD moves by ``lr`` times it;
a gradient under the cap is not touched; Adam, whose step depends on the gradients' relative sizes, takes the steps
of ``torch.optim.Adam`` fed the clipped gradients; the closure runs before the clip; step hooks run once per step;
``max_grad_norm`` is saved and restored with the optimizer's state; each phase's last gradient norm, before the
clip, reaches the loss output the log shows (eager and fused steps).
"""

from __future__ import annotations

import pytest
import torch

from awr_modules.optimizers import ClippedAdam, ClippedSGD


def _parameter() -> torch.Tensor:
    return torch.zeros(2, requires_grad=True)


def test_a_gradient_above_the_cap_is_scaled_to_it_and_one_under_it_is_not():
    parameter = _parameter()
    optimizer = ClippedSGD([parameter], lr=0.1, max_grad_norm=1.0)
    parameter.grad = torch.tensor([3.0, 4.0])
    optimizer.step()
    torch.testing.assert_close(parameter.detach(), torch.tensor([-0.06, -0.08]))
    torch.testing.assert_close(parameter.grad, torch.tensor([0.6, 0.8]))
    parameter.grad = torch.tensor([0.3, -0.4])  # norm 0.5 < 1: SGD's own step
    optimizer.step()
    torch.testing.assert_close(parameter.detach(), torch.tensor([-0.09, -0.04]))


def test_momentum_accumulates_the_clipped_gradients():
    parameter = _parameter()
    optimizer = ClippedSGD([parameter], lr=1.0, momentum=0.5, max_grad_norm=2.0)
    for gradient in ([0.0, 10.0], [0.0, 10.0]):  # clipped to (0, 2) each time: b = 2, then 0.5 * 2 + 2 = 3
        parameter.grad = torch.tensor(gradient)
        optimizer.step()
    torch.testing.assert_close(parameter.detach(), torch.tensor([0.0, -5.0]))


def test_clipped_adam_takes_adams_steps_on_the_clipped_gradients():
    clipped, reference = _parameter(), _parameter()
    optimizer = ClippedAdam([clipped], lr=0.1, max_grad_norm=1.0)
    reference_optimizer = torch.optim.Adam([reference], lr=0.1)
    unclipped = _parameter()
    unclipped_optimizer = torch.optim.Adam([unclipped], lr=0.1)
    for gradient in ([0.1, 0.2], [30.0, -40.0], [0.5, 0.5], [-6.0, 8.0]):
        gradient = torch.tensor(gradient)
        clipped.grad, unclipped.grad = gradient.clone(), gradient.clone()
        reference.grad = gradient * min(1.0, 1.0 / (float(gradient.norm()) + 1e-6))
        for opt in (optimizer, reference_optimizer, unclipped_optimizer):
            opt.step()
    torch.testing.assert_close(clipped.detach(), reference.detach())
    assert not torch.allclose(clipped.detach(), unclipped.detach(), atol=1e-3)


def test_the_closure_computes_the_gradients_before_they_are_clipped():
    parameter = _parameter()
    optimizer = ClippedSGD([parameter], lr=0.1, max_grad_norm=1.0)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        objective = (parameter * torch.tensor([3.0, 4.0])).sum()
        objective.backward()
        return objective

    assert float(optimizer.step(closure).detach()) == 0.0
    torch.testing.assert_close(parameter.detach(), torch.tensor([-0.06, -0.08]))


@pytest.mark.parametrize("optimizer_class", [ClippedSGD, ClippedAdam])
def test_step_hooks_run_once_per_step(optimizer_class):
    torch.optim.SGD([_parameter()])
    torch.optim.Adam([_parameter()])  # torch wraps the base optimizers' own steps with the hooks too
    parameter = _parameter()
    optimizer = optimizer_class([parameter], max_grad_norm=1.0)
    calls = []
    optimizer.register_step_pre_hook(lambda *_: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *_: calls.append("post"))
    parameter.grad = torch.ones(2)
    optimizer.step()
    assert calls == ["pre", "post"]


def test_max_grad_norm_is_a_group_setting_saved_with_the_state():
    parameter = _parameter()
    optimizer = ClippedSGD([parameter], lr=0.1, momentum=0.9, max_grad_norm=0.5)
    parameter.grad = torch.ones(2)
    optimizer.step()
    restored = ClippedSGD([parameter], lr=0.1, momentum=0.9, max_grad_norm=7.0)
    restored.load_state_dict(optimizer.state_dict())
    assert restored.param_groups[0]["max_grad_norm"] == 0.5
    other = _parameter()
    restored.add_param_group({"params": [other]})
    assert restored.param_groups[1]["max_grad_norm"] == 7.0  # a new group takes the constructor's cap


@pytest.mark.parametrize("max_grad_norm", [0.0, -1.0])
def test_a_cap_that_is_not_positive_is_refused(max_grad_norm):
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        ClippedSGD([_parameter()], max_grad_norm=max_grad_norm)


@pytest.mark.parametrize(("execution", "clipped"), [("eager", False), ("eager", True), ("fused", True)],
                         ids=["sgd-eager", "clipped_sgd-eager", "clipped_sgd-fused"])
def test_each_phase_logs_its_last_gradients_norm_before_the_clip(execution, clipped):
    """With a step size of 0 the parameters stay put, so the logged norm is the norm of the last minibatch's
    gradient at the initial parameters, computed here by hand; a clipped optimizer logs it unclipped. (Fused steps
    compute the norm in the graph for every optimizer alike: one compiled case.)"""
    from test_fused_steps import BATCH, ROWS, _setup

    from awr_modules.execution import Compiled, Eager, PlainSteps
    from awr_modules.phases import minibatch_losses

    loss, stored = _setup()
    network = loss.actor_network
    indices = torch.randint(ROWS, (8, BATCH), generator=torch.Generator().manual_seed(3))
    minibatch_losses(loss)[0](stored, indices[-1])["loss_actor"].backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in network.parameters()]))
    network.zero_grad(set_to_none=True)

    optimizer = (ClippedSGD(network.parameters(), lr=0.0, max_grad_norm=float(expected) / 10) if clipped
                 else torch.optim.SGD(network.parameters(), lr=0.0))
    runner = Eager() if execution == "eager" else Compiled(fused_steps=4)  # Compiled's unfused steps are Eager's
    value_optimizer = torch.optim.SGD(loss.critic_network.parameters(), lr=0.0)
    runner.bind(loss, {"policy": network, "value": loss.critic_network},
                {"policy": optimizer, "value": value_optimizer}, PlainSteps(),
                device=torch.device("cpu"), world_size=1)
    out = runner.run_phase("policy", stored, indices, optimizer, network)
    torch.testing.assert_close(out["gradient_norm_actor"], expected, rtol=1e-4, atol=1e-6)
