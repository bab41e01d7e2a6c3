"""The Q critic targets part (``awr_modules.q_critic``): its TD loss, soft targets and advantages by hand, its
integration in the iteration, its refusals, and ``awr fit`` with it (continuous, discrete, compiled, resumed).

Linear Q networks with set weights (``Q_i(s, a) = [s, a] . w_i``, or ``Q_i(s) = W_i s`` per action) and actors whose
``pi`` is known (a deterministic ``Delta`` policy, a categorical with fixed probabilities) give numbers a test can
recompute in plain Python.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import ACT_DIM, N_ACTIONS, OBS_DIM, make_actor
from lightning_helpers import CONFIG, FRAMES, checkpoint_dir, load_checkpoint, tiny_args
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.modules import OneHotCategorical, ProbabilisticActor, ValueOperator
from torchrl.modules.distributions import Delta
from torchrl.objectives import SoftUpdate

from awr_modules import AWRLoss, make_replay_buffer
from awr_modules.cli import cli_main
from awr_modules.data import GivenBuffers
from awr_modules.execution import Eager, PlainSteps
from awr_modules.iteration import AWRIteration
from awr_modules.phases import Phase, phase_inputs
from awr_modules.q_critic import LeafwiseSoftUpdate, QCritic, TwinQLoss
from awr_modules.recipe import Recipe
from awr_modules.temperature import Fixed
from awr_recipes.classic_control import ClassicControl

REPO = Path(__file__).resolve().parent.parent
QCRITIC = "--model.targets=awr_modules.q_critic.QCritic"
GAMMA = 0.9
W = [[0.5, -1.0, 0.25, 2.0, -0.5], [-0.3, 0.8, 1.0, -1.5, 0.7]]  # Q_i(s, a) = [s, a] . W[i]
M = [[0.6, -0.2], [0.1, 0.4], [-0.5, 0.3]]  # the Delta policy's action mu(s) = s M
P = [0.1, 0.2, 0.3, 0.4]  # the categorical policy's probabilities, the same in every state
WD = [[[0.5, -1.0, 0.2], [1.0, 0.3, -0.4], [-0.6, 0.9, 0.1], [0.2, 0.2, 0.2]],  # Q_i(s)_a = W_i[a] . s
      [[0.1, -0.5, 0.7], [0.8, -0.2, 0.3], [-0.1, 0.4, -0.9], [0.6, 0.0, -0.3]]]


class LinearQ(nn.Module):
    """``Q(s, a) = [s, a] . w``."""

    def __init__(self, weight: list[float]) -> None:
        super().__init__()
        self.linear = nn.Linear(len(weight), 1, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([weight]))

    def forward(self, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([observation, action], -1))


def _continuous_q() -> list[ValueOperator]:
    return [ValueOperator(LinearQ(w), in_keys=["observation", "action"], out_keys=["state_action_value"]) for w in W]


def _discrete_q() -> list[ValueOperator]:
    networks = []
    for weight in WD:
        linear = nn.Linear(OBS_DIM, N_ACTIONS, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.tensor(weight))
        networks.append(ValueOperator(linear, in_keys=["observation"], out_keys=["action_value"]))
    return networks


def _delta_actor() -> ProbabilisticActor:
    """``pi(.|s)`` puts all its mass on ``mu(s) = s M``."""
    linear = nn.Linear(OBS_DIM, ACT_DIM, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(M).T)
    return ProbabilisticActor(TensorDictModule(linear, in_keys=["observation"], out_keys=["param"]),
                              in_keys=["param"], distribution_class=Delta, return_log_prob=False)


def _categorical_actor() -> ProbabilisticActor:
    """``pi(a|s) = P[a]`` in every state."""
    linear = nn.Linear(OBS_DIM, N_ACTIONS)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor(P).log())
    return ProbabilisticActor(TensorDictModule(linear, in_keys=["observation"], out_keys=["logits"]),
                              in_keys=["logits"], distribution_class=OneHotCategorical, return_log_prob=True)


def _transitions(n: int = 6, *, discrete: bool = False) -> TensorDict:
    generator = torch.Generator().manual_seed(2)
    if discrete:
        action = nn.functional.one_hot(torch.randint(N_ACTIONS, (n,), generator=generator), N_ACTIONS)
    else:
        action = torch.randn(n, ACT_DIM, generator=generator)
    terminated = torch.zeros(n, 1, dtype=torch.bool)
    terminated[1] = terminated[4] = True
    truncated = torch.zeros(n, 1, dtype=torch.bool)
    truncated[2] = True  # a time-limit cut: bootstraps
    return TensorDict({
        "observation": torch.randn(n, OBS_DIM, generator=generator), "action": action,
        "action_log_prob": -torch.rand(n, generator=generator),
        "next": TensorDict({"observation": torch.randn(n, OBS_DIM, generator=generator),
                            "reward": torch.randn(n, 1, generator=generator), "terminated": terminated,
                            "truncated": truncated, "done": terminated | truncated}, [n]),
    }, [n])


def _q_by_hand(i: int, s: list[float], a: list[float]) -> float:
    return sum(w * x for w, x in zip(W[i], [*s, *a], strict=True))


def _mu(s: list[float]) -> list[float]:
    return [sum(s[k] * M[k][j] for k in range(OBS_DIM)) for j in range(ACT_DIM)]


def _discrete_q_by_hand(i: int, s: list[float]) -> list[float]:
    return [sum(w * x for w, x in zip(WD[i][a], s, strict=True)) for a in range(N_ACTIONS)]


def _v_by_hand(s: list[float], *, discrete: bool) -> float:
    if discrete:  # sum_a pi(a|s) min_i Q_i(s, a)
        return sum(p * min(q0, q1) for p, q0, q1 in zip(P, _discrete_q_by_hand(0, s), _discrete_q_by_hand(1, s),
                                                        strict=True))
    return min(_q_by_hand(0, s, _mu(s)), _q_by_hand(1, s, _mu(s)))


def _stored_q_by_hand(i: int, s: list[float], a: list[float], *, discrete: bool) -> float:
    return _discrete_q_by_hand(i, s)[a.index(1)] if discrete else _q_by_hand(i, s, a)


@pytest.mark.parametrize("discrete", [False, True], ids=["continuous", "discrete"])
def test_td_targets_and_the_loss_equal_hand_numbers_on_linear_q_networks(discrete):
    """``y = r + gamma (1 - terminated) E_pi[min_i Q_target_i(s', a')]`` (a time-limit cut bootstraps) and
    ``L = sum_i 0.5 mean(((Q_i(s, a) - y) / s_v)^2)``; the targets start as copies of the online networks."""
    actor = _categorical_actor() if discrete else _delta_actor()
    loss = TwinQLoss(_discrete_q() if discrete else _continuous_q(), actor, gamma=GAMMA, value_scale=2.0)
    batch = _transitions(discrete=discrete)
    s, a = batch["observation"].tolist(), batch["action"].tolist()
    s_next, r = batch["next", "observation"].tolist(), batch["next", "reward"].reshape(-1).tolist()
    terminated = batch["next", "terminated"].reshape(-1).tolist()
    y = [r[t] + (0.0 if terminated[t] else GAMMA * _v_by_hand(s_next[t], discrete=discrete)) for t in range(6)]
    torch.testing.assert_close(loss.value_target(batch), torch.tensor(y))
    q = [[_stored_q_by_hand(i, s[t], a[t], discrete=discrete) for t in range(6)] for i in range(2)]
    expected = sum(0.5 * sum(((q[i][t] - y[t]) / 2.0) ** 2 for t in range(6)) / 6 for i in range(2))
    out = loss(batch)
    assert out["loss_qvalue"].item() == pytest.approx(expected, rel=1e-5)
    assert out["q_value"].item() == pytest.approx(sum(min(q[0][t], q[1][t]) for t in range(6)) / 6, rel=1e-5)


def test_discrete_v_pi_is_the_exact_expectation_over_the_actions():
    loss = TwinQLoss(_discrete_q(), _categorical_actor(), gamma=GAMMA)
    states = _transitions(discrete=True).select("observation")
    by_hand = [_v_by_hand(s, discrete=True) for s in states["observation"].tolist()]
    torch.testing.assert_close(loss.policy_value(states), torch.tensor(by_hand))
    before = torch.get_rng_state()
    loss.policy_value(states)
    assert torch.equal(torch.get_rng_state(), before)  # an expectation: no action was drawn


def test_continuous_v_pi_is_the_mean_over_policy_samples_of_the_twins_minimum():
    """With a Gaussian policy: the same ``m`` draws recomputed by hand (reseeded), ``mean_j min_i Q_i(s, a_j)``."""
    actor = make_actor("normal")
    loss = TwinQLoss(_continuous_q(), actor, policy_samples=3)
    states = _transitions().select("observation")
    torch.manual_seed(7)
    value = loss.policy_value(states)
    torch.manual_seed(7)
    draws = actor.get_dist(states.clone()).sample((3,))  # [m, B, act]
    s = states["observation"].tolist()
    by_hand = [sum(min(_q_by_hand(0, s[t], a), _q_by_hand(1, s[t], a)) for a in draws[:, t].tolist()) / 3
               for t in range(6)]
    torch.testing.assert_close(value, torch.tensor(by_hand))
    assert draws[0].ne(draws[1]).any()  # m distinct actions


def test_targets_move_by_exactly_tau_per_optimizer_step():
    """``target_after = (1 - tau) target_before + tau online_after`` after each step of the value phase."""
    torch.manual_seed(0)
    targets = QCritic(GAMMA, tau=0.3)
    q_loss = targets.use(_continuous_q(), _delta_actor())
    phase = targets.value_phase()
    optimizer = torch.optim.SGD(phase.network.parameters(), lr=0.5)
    batch = _transitions()
    for _ in range(3):
        before = q_loss.target_qvalue_network_params.clone()
        optimizer.zero_grad()
        phase.loss(batch)["loss_value"].backward()
        optimizer.step()
        phase.after_step()
        online = q_loss.qvalue_network_params.detach().clone()
        assert max(float(d.abs().max()) for d in (online - before).values(True, True)) > 1e-3  # the step moved
        expected = before * 0.7 + online * 0.3
        for key, value in expected.items(True, True):
            torch.testing.assert_close(q_loss.target_qvalue_network_params.get(key), value, rtol=1e-6, atol=1e-7)


def test_the_leafwise_soft_update_is_torchrls_soft_update():
    """``LeafwiseSoftUpdate`` (the Q critic's) leaves the targets bit for bit where TorchRL's ``SoftUpdate`` does."""
    losses = [TwinQLoss(_continuous_q(), _delta_actor()) for _ in range(2)]
    updates = [SoftUpdate(losses[0], tau=0.3), LeafwiseSoftUpdate(losses[1], tau=0.3)]
    for step in range(3):
        for q_loss, update in zip(losses, updates, strict=True):
            with torch.no_grad():
                for i, parameter in enumerate(q_loss.qvalue_networks.parameters()):
                    parameter.add_(0.1 * (i + 1) * (step + 1))
            update.step()
    moved = losses[1].target_qvalue_network_params
    lag = moved - losses[1].qvalue_network_params.detach()
    assert max(float(d.abs().max()) for d in lag.values(True, True)) > 0.1  # the targets lag behind: tau < 1
    for key, value in losses[0].target_qvalue_network_params.items(True, True):
        torch.testing.assert_close(moved.get(key), value, rtol=0, atol=0)


def test_soft_updates_follow_the_networks_when_the_module_moves():
    """A move of the loss (``.to(device)``, here ``.double()``) keeps ``SoftUpdate``'s sources and targets the
    networks' own tensors: the targets still follow the online networks by tau."""
    targets = QCritic(GAMMA, tau=0.5)
    q_loss = targets.use(_continuous_q(), _delta_actor().double())
    q_loss.double()
    with torch.no_grad():
        for parameter in q_loss.qvalue_networks.parameters():
            parameter.add_(1.0)
    before = q_loss.target_qvalue_network_params.clone()
    targets.target_update.step()
    for key, value in (before * 0.5 + q_loss.qvalue_network_params.detach() * 0.5).items(True, True):
        after = q_loss.target_qvalue_network_params.get(key)
        assert after.dtype == torch.float64
        torch.testing.assert_close(after, value)
    batch = _transitions().apply(lambda tensor: tensor.double() if tensor.is_floating_point() else tensor)
    assert q_loss(batch)["loss_qvalue"].dtype == torch.float64


@pytest.mark.parametrize("discrete", [False, True], ids=["continuous", "discrete"])
def test_the_advantage_refresh_writes_q_minus_v_pi_for_every_stored_row(discrete):
    """Step 5: ``A = min_i Q_i(s, a) - V_pi(s)`` in chunks, ``value_target = Q``, ``state_value = V_pi``; with
    ``normalize_advantage`` standardised over the buffer."""
    actor = _categorical_actor() if discrete else _delta_actor()
    rows = _transitions(discrete=discrete)
    buffer = make_replay_buffer(6)
    buffer.extend(rows)
    s, a = rows["observation"].tolist(), rows["action"].tolist()
    q = [min(_stored_q_by_hand(i, s[t], a[t], discrete=discrete) for i in range(2)) for t in range(6)]
    v = [_v_by_hand(s[t], discrete=discrete) for t in range(6)]
    for normalize in (False, True):
        targets = QCritic(GAMMA, normalize_advantage=normalize, chunk_size=4)
        targets.use(_discrete_q() if discrete else _continuous_q(), actor)
        awr_loss = AWRLoss(actor, _discrete_q()[0], functional=False)
        targets.refresh_advantages([buffer], awr_loss, False)
        stored = buffer.storage.get(torch.arange(6))
        torch.testing.assert_close(stored["value_target"].reshape(-1), torch.tensor(q))
        torch.testing.assert_close(stored["state_value"].reshape(-1), torch.tensor(v))
        advantage = torch.tensor(q) - torch.tensor(v)
        if normalize:
            advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-5)
        torch.testing.assert_close(stored["advantage"].reshape(-1), advantage)


def _iteration(targets: QCritic, buffer, *, steps: int = 4):
    torch.manual_seed(0)
    actor = make_actor("normal")
    q_networks = [ValueOperator(LinearQ(w), in_keys=["observation", "action"], out_keys=["state_action_value"])
                  for w in W]
    targets.use(q_networks, actor)
    loss = AWRLoss(actor, _continuous_q()[0], check_inputs=False, functional=False)
    iteration = AWRIteration(loss, GivenBuffers(buffer), targets, Fixed(0.7), Phase(steps, 4), Phase(3, 4), Eager())
    optimizers = (torch.optim.SGD(actor.parameters(), lr=0.05, momentum=0.9),
                  torch.optim.SGD(targets.q_loss.qvalue_networks.parameters(), lr=0.05, momentum=0.9))
    iteration.bind(*optimizers, PlainSteps())
    return iteration, optimizers


def test_one_iteration_is_the_q_critics_steps_by_hand():
    """No step 3; step 4 the TD loss on the Q networks with a soft update after each step; step 5 ``Q - V_pi``;
    step 6 AWR's policy steps on those advantages (the V critic is never stepped)."""
    buffers = [make_replay_buffer(6), make_replay_buffer(6)]
    for buffer in buffers:
        buffer.extend(_transitions())
    iteration, _ = _iteration(QCritic(GAMMA, tau=0.2), buffers[0])
    by_hand, (actor_optimizer, q_optimizer) = _iteration(QCritic(GAMMA, tau=0.2), buffers[1])
    critic_before = [p.clone() for p in iteration.loss.critic_network.parameters()]
    torch.manual_seed(3)
    iteration.run()

    torch.manual_seed(3)
    targets, loss, buffers = by_hand.targets, by_hand.loss, by_hand.data.buffers
    phase = targets.value_phase()
    stored, indices = phase_inputs(buffers, loss, 4, 4, prioritized=False, own=phase)
    for index in indices:
        q_optimizer.zero_grad()
        targets.q_loss(stored[index])["loss_qvalue"].backward()
        q_optimizer.step()
        targets.target_update.step()
    targets.refresh_advantages(buffers, loss, False)
    stored, indices = phase_inputs(buffers, loss, 3, 4, prioritized=False)
    for index in indices:
        actor_optimizer.zero_grad()
        loss.actor_loss(stored[index])["loss_actor"].backward()
        actor_optimizer.step()

    for ran, expected in ((iteration.targets.q_loss, targets.q_loss), (iteration.loss, loss)):
        for (name, a), b in zip(ran.state_dict().items(), expected.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    for before, after in zip(critic_before, iteration.loss.critic_network.parameters(), strict=True):
        torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_a_q_critic_without_stored_actions_or_networks_is_refused_before_any_step():
    buffer = make_replay_buffer(6)
    buffer.extend(_transitions().exclude("action"))
    with pytest.raises(ValueError, match=r"model.targets \(QCritic\).*'action'"):
        _iteration(QCritic(GAMMA), buffer)[0].run()  # refused when built, at the latest before the first step
    actor = make_actor("normal")
    loss = AWRLoss(actor, _continuous_q()[0], functional=False)
    with pytest.raises(ValueError, match=r"QCritic\) has no Q networks"):
        AWRIteration(loss, GivenBuffers(buffer), QCritic(), Fixed(), Phase(1), Phase(1), Eager())


@pytest.mark.parametrize(("kwargs", "message"), [({"tau": 0}, "tau"), ({"policy_samples": 0}, "policy_samples"),
                                                 ({"hidden_sizes": [0]}, "hidden_sizes"), ({"gamma": 1.0}, "gamma")])
def test_bad_q_critic_settings_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QCritic(**kwargs)


def test_a_recipe_without_q_networks_is_refused_naming_it():
    class NoQNetworks(ClassicControl):
        make_q_networks = Recipe.make_q_networks

    from awr_modules import AWRModule

    with pytest.raises(NotImplementedError, match="NoQNetworks.*make_q_networks.*QCritic"):
        AWRModule(NoQNetworks("Pendulum-v1"), targets=QCritic())


def _fit(tmp_path: Path, *, epochs: int = 2, extra: list[str] | None = None, config: Path = CONFIG):
    args = tiny_args(tmp_path, epochs=epochs, extra=[QCRITIC, *(extra or [])])
    args[1] = str(config)
    return cli_main(["fit", *args])


def test_awr_fit_with_the_q_critic_on_pendulum_trains_the_q_networks_and_checkpoints_them(tmp_path):
    cli = _fit(tmp_path)
    module = cli.model
    q_loss = module.awr.targets.q_loss
    assert module.targets_networks is q_loss and module.env_steps == 2 * FRAMES
    (critic_optimizer,) = [o.optimizer for o in module.optimizers()][1:]
    q_parameters = {id(p) for p in q_loss.qvalue_networks.parameters()}
    assert {id(p) for group in critic_optimizer.param_groups for p in group["params"]} == q_parameters
    normalizers = {id(m) for m in module.modules() if type(m).__name__ == "ObservationNormalizer"}
    assert len(normalizers) == 1  # the Q networks read states through the actor's and critic's normaliser
    state = load_checkpoint(checkpoint_dir(tmp_path) / "last.ckpt")["state_dict"]
    online = [k for k in state if k.startswith("targets_networks.qvalue_networks.")]
    target = [k for k in state if k.startswith("targets_networks.target_qvalue_network_params.")]
    assert online and len(target) == len([k for k in online if "normalizer" not in k])
    moved = [not torch.equal(state[t], state[t.replace("target_qvalue_network_params", "qvalue_networks")])
             for t in target]
    assert any(moved)  # 3 soft updates with tau 0.005 leave the targets behind the online networks
    metrics = next(tmp_path.rglob("metrics.csv")).read_text().splitlines()[0]
    for column in ("train/loss_value", "train/q_value", "train/loss_actor", "train/weight_ess"):
        assert column in metrics


def test_awr_fit_with_the_q_critic_on_cartpole_discrete(tmp_path):
    cli = _fit(tmp_path, config=REPO / "configs" / "cartpole.yaml")
    q_loss = cli.model.awr.targets.q_loss
    assert q_loss.discrete and cli.model.iteration == 2
    stored = cli.model.awr.data.fifo.storage.get(torch.arange(2 * FRAMES))
    assert torch.isfinite(stored["advantage"]).all() and abs(float(stored["advantage"].mean())) < 1e-4


def test_awr_fit_with_the_q_critic_compiled(tmp_path):
    cli = _fit(tmp_path, epochs=1, extra=["--model.execution=awr_modules.execution.Compiled"])
    execution = cli.model.awr.execution
    assert "value" in execution._fused  # the Q steps' Adam fuses, the soft update inside the graph
    assert math.isfinite(float(cli.model.last_iteration.outputs[0]["loss_value"]))


def test_fused_q_steps_train_the_q_networks_and_targets_as_one_by_one(tmp_path):
    """``Compiled(fused_steps=2)`` on CartPole (discrete: ``V_pi`` is exact, so neither way draws actions) with
    Adam: of each value phase's 3 Q steps, 2 run fused with their soft updates inside the graph and 1 alone; the Q
    networks, their targets, the actor and ``global_step`` equal those of ``Eager`` steps, one at a time (the
    reference runs eagerly: compiling it too would only add compile time)."""
    adam = ["--model.critic_optimizer=torch.optim.Adam", "--model.critic_optimizer.init_args.lr=0.01"]
    executions = {"fused": ["--model.execution=awr_modules.execution.Compiled",
                            "--model.execution.init_args.fused_steps=2"],
                  "eager": ["--model.execution=awr_modules.execution.Eager"]}
    trained = {}
    for name, execution in executions.items():
        cli = _fit(tmp_path / name, config=REPO / "configs" / "cartpole.yaml", extra=[*execution, *adam])
        execution = cli.model.awr.execution
        assert "value" in execution._fused if name == "fused" else isinstance(execution, Eager)
        assert cli.trainer.global_step == 2 * (3 + 3)
        trained[name] = cli.model.state_dict()
    fused = trained["fused"]
    moved = [not torch.equal(fused[k], fused[k.replace("target_qvalue_network_params", "qvalue_networks")])
             for k in fused if "target_qvalue_network_params" in k]
    assert any(moved)
    for name, one_by_one in trained["eager"].items():
        torch.testing.assert_close(fused[name], one_by_one, rtol=1e-4, atol=1e-5, msg=name)


def test_a_resumed_q_critic_run_goes_on_as_a_run_straight_through(tmp_path, monkeypatch):
    """Checkpoints restore the Q networks, their targets and the Q optimizer's state: 2 + 1 iterations end exactly
    where 3 do, with the overlay's fused Adam. Offline (a Minari dataset, which a Q critic also trains on), since a
    resumed collector restarts its episodes."""
    pytest.importorskip("minari")
    import gymnasium as gym

    from awr_modules.dataset_writer import random_policy, write_policy_dataset

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "datasets"))
    env = gym.make("Pendulum-v1")
    write_policy_dataset("pendulum/random-v0", env, random_policy(env.action_space), episodes=2, seed=0)
    offline = ["--model.data=awr_modules.data.MinariDataset", "--model.data.init_args.dataset_id=pendulum/random-v0",
               "--model.critic_optimizer=torch.optim.Adam", "--model.critic_optimizer.init_args.fused=true"]
    straight = _fit(tmp_path / "straight", epochs=3, extra=offline).model
    _fit(tmp_path / "resumed", epochs=2, extra=offline)
    resumed = cli_main(["fit", *tiny_args(tmp_path / "resumed", epochs=3, extra=[QCRITIC, *offline]),
                        "--ckpt_path=last"]).model
    assert resumed.iteration == 3 and resumed.trainer.global_step == straight.trainer.global_step
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert all(module.optimizers()[1].optimizer.defaults["fused"] for module in (straight, resumed))
    state = [module.optimizers()[1].optimizer.state for module in (straight, resumed)]
    for a, b in zip(state[0].values(), state[1].values(), strict=True):
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=0, atol=0)


def test_the_q_critic_overlay_switches_a_mujoco_task_to_it():
    cli = cli_main(["-c", str(REPO / "configs" / "hopper.yaml"),
                    "-c", str(REPO / "configs" / "reference" / "q_critic.yaml")], run=False)
    awr = cli.model.awr
    assert isinstance(awr.targets, QCritic) and cli.model.targets_networks is awr.targets.q_loss
    hidden = [m.out_features for m in awr.targets.q_loss.qvalue_networks[0].modules() if isinstance(m, nn.Linear)]
    assert hidden == [128, 64, 1]
    assert awr.value_phase.steps * 4 == awr.data.frames_per_iteration  # UTD 0.25, as screened on Hopper
    assert awr.data.buffer_size == 50_000
