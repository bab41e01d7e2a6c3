"""AWRModule through the `awr` CLI: fit, validate, resume, precision, and refusals of bad input."""

from __future__ import annotations

import csv
import importlib
import inspect
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning_helpers import (
    CONFIG,
    FRAMES,
    RecordPriorities,
    checkpoint_dir,
    load_checkpoint,
    subprocess_env,
    tiny_args,
)
from tensordict import TensorDict
from torchrl.data import TensorDictPrioritizedReplayBuffer

from awr_modules import AWRModule
from awr_modules.cli import cli_main
from awr_modules.normalizer import ObservationNormalizer
from awr_modules.phases import Phase
from awr_modules.temperature import Fixed, TunedToESS

REPO = Path(__file__).resolve().parent.parent


def _fit(tmp_path: Path, **kwargs):
    return cli_main(["fit", *tiny_args(tmp_path, **kwargs)])


def test_fit_writes_checkpoint_and_metrics_and_validate_reports_eval_return(tmp_path):
    cli = _fit(tmp_path, epochs=2)
    assert cli.model.env_steps == 2 * FRAMES
    assert cli.model.iteration == 2
    last = checkpoint_dir(tmp_path) / "last.ckpt"
    # the networks normalise raw observations with the statistics recorded at collection
    vecnorm = load_checkpoint(last)["awr"]["normalizers"][0]
    mean = vecnorm["loc.-|-.observation"]
    std = (vecnorm["var.-|-.observation"] - mean.pow(2)).sqrt()
    normalizers = [m for m in cli.model.modules() if isinstance(m, ObservationNormalizer)]
    assert len(normalizers) == 1  # one instance, shared by actor and critic
    torch.testing.assert_close(normalizers[0].loc, mean)
    torch.testing.assert_close(normalizers[0].scale, std, rtol=1e-4, atol=1e-4)
    assert last.exists()
    metrics = next(tmp_path.rglob("metrics.csv")).read_text()
    for column in ("env_steps", "eval/return", "train/loss_actor", "train/loss_value", "train/weight_ess"):
        assert column in metrics.splitlines()[0]

    validated = cli_main(["validate", *tiny_args(tmp_path), f"--ckpt_path={last}"])
    metrics = validated.trainer.callback_metrics
    assert "eval/return" in metrics
    assert -2000 < float(metrics["eval/return"]) <= 0  # Pendulum returns are in [-16.3 * 200, 0]
    assert float(metrics["env_steps"]) == 2 * FRAMES  # the checkpoint's counter was restored


def test_last_checkpoint_holds_the_last_iteration_between_evaluations(tmp_path):
    _fit(tmp_path, epochs=3, extra=["--trainer.check_val_every_n_epoch=2"])
    state = load_checkpoint(checkpoint_dir(tmp_path) / "last.ckpt")["awr"]
    assert state["iteration"] == 3  # not 2, the last evaluation
    assert state["env_steps"] == 3 * FRAMES


def test_checkpoints_every_n_iterations_still_save_the_last_one_and_resume_from_it(tmp_path):
    _fit(tmp_path, epochs=3, extra=["--checkpoint.every_n_epochs=2"])
    saved = sorted(p.name for p in checkpoint_dir(tmp_path).glob("epoch=*.ckpt"))
    assert len(saved) == 1  # top-1: the final save replaced iteration 2's
    state = load_checkpoint(checkpoint_dir(tmp_path) / "last.ckpt")["awr"]
    assert (state["iteration"], state["env_steps"]) == (3, 3 * FRAMES)  # not iteration 2's, the last periodic save

    resumed = cli_main(["fit", *tiny_args(tmp_path, epochs=4, extra=["--checkpoint.every_n_epochs=2"]),
                        "--ckpt_path=last"])
    assert (resumed.model.iteration, resumed.model.env_steps) == (4, 4 * FRAMES)  # one more iteration, not two
    assert load_checkpoint(checkpoint_dir(tmp_path) / "last.ckpt")["awr"]["iteration"] == 4


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize(("accelerator", "precision"), [
    ("cpu", "bf16-mixed"),
    pytest.param("gpu", "bf16-mixed", marks=_CUDA),  # on an H100 these targets once came out in bf16 / fp16
    pytest.param("gpu", "16-mixed", marks=_CUDA),
])
def test_mixed_precision_keeps_value_targets_float32(tmp_path, accelerator, precision):
    _fit(tmp_path, epochs=1, extra=[f"--trainer.precision={precision}", f"--trainer.accelerator={accelerator}"])
    stored = load_checkpoint(checkpoint_dir(tmp_path) / "last.ckpt")["awr"]["ranks"][0]["buffer"]["_storage"]["_storage"]
    for key in ("value_target", "advantage", "state_value"):
        assert stored[key].dtype == torch.float32, key
        assert torch.isfinite(stored[key][:FRAMES]).all()


def _stored(checkpoint: dict) -> tuple[int, dict, torch.Tensor]:
    state = checkpoint["awr"]
    (rank,) = state["ranks"]  # one process: one rank's buffer
    length = rank["buffer"]["_storage"]["_len"]
    observations = rank["buffer"]["_storage"]["_storage"]["observation"][:length]
    return length, state["normalizers"][0], observations


def test_kill_and_resume_continues_from_the_last_checkpoint(tmp_path):
    env = subprocess_env(REPO)
    frozen = ["--model.recipe.init_args.normalizer_samples=128"]  # statistics frozen after the first iteration
    args = tiny_args(tmp_path, epochs=1000, extra=frozen)
    process = subprocess.Popen([sys.executable, "-m", "awr_modules.cli", "fit", *args], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = checkpoint_dir(tmp_path) / "last.ckpt"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if last.exists() and load_checkpoint(last)["awr"]["iteration"] >= 1:
                break
            time.sleep(0.5)
        else:
            pytest.fail("the training subprocess wrote no checkpoint of an iteration within 180 s")
    except Exception:
        process.kill()
        raise
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = load_checkpoint(last)
    iterations = killed["awr"]["iteration"]
    assert killed["awr"]["env_steps"] == iterations * FRAMES
    length, normalizer, observations = _stored(killed)
    assert length == iterations * FRAMES

    cli = cli_main(["fit", *tiny_args(tmp_path, epochs=iterations + 1, extra=frozen), "--ckpt_path=last"])
    assert cli.model.iteration == iterations + 1
    assert cli.model.env_steps == (iterations + 1) * FRAMES
    resumed_length, resumed_normalizer, resumed_observations = _stored(load_checkpoint(last))
    assert resumed_length == length + FRAMES
    torch.testing.assert_close(resumed_observations[:length], observations)  # the buffer came back intact
    for key, value in normalizer.items():  # frozen after 128 samples: statistics unchanged by resuming
        torch.testing.assert_close(resumed_normalizer[key], value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.recipe.init_args.env_id=NoSuchEnv-v0", "NoSuchEnv-v0"),
        ("--model.recipe.init_args.env_id=LunarLander-v3", "family"),
        ("--model.critic_optimizer.init_args.lr=-1", "learning rate"),
        ("--model.temperature.init_args.beta=0", "beta must be > 0"),
        ("--model.data.init_args.frames_per_iteration=0", "frames_per_iteration"),
        ("--model.recipe.init_args.action_std=0", "action_std"),
    ],
)
def test_bad_config_values_fail_before_training_with_the_field_named(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        _fit(tmp_path, extra=[override])
    assert not checkpoint_dir(tmp_path).exists()


def test_unknown_config_field_is_an_error_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _fit(tmp_path, extra=["--model.no_such_field=1"])
    assert "no_such_field" in capsys.readouterr().err


def test_checkpoint_of_other_networks_or_env_is_refused(tmp_path, monkeypatch):
    _fit(tmp_path, epochs=1)
    last = checkpoint_dir(tmp_path) / "last.ckpt"
    with pytest.raises(ValueError, match="do not match"):
        cli_main(["validate", *tiny_args(tmp_path, extra=["--model.recipe.init_args.hidden_sizes=[8, 8]"]),
                  f"--ckpt_path={last}"])
    with pytest.raises(ValueError, match="MountainCarContinuous-v0"):
        cli_main(["validate", *tiny_args(tmp_path, extra=["--model.recipe.init_args.env_id=MountainCarContinuous-v0"]),
                  f"--ckpt_path={last}"])
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(last.read_bytes()[: 1000])
    logged = []
    monkeypatch.setattr(AWRModule, "log", lambda module, name, *args, **kwargs: logged.append(name))
    for subcommand in ("validate", "fit"):
        # torch's own error, raised when LightningCLI reads the checkpoint's hyperparameters: before the module
        # is built, so before any metric is logged and before the run's folder exists
        with pytest.raises(RuntimeError, match="PytorchStreamReader failed reading zip archive"):
            cli_main([subcommand, *tiny_args(tmp_path / subcommand), f"--ckpt_path={corrupt}"])
        assert not (tmp_path / subcommand).exists()
    assert logged == []


def test_action_space_the_recipe_cannot_handle_is_refused():
    import gymnasium as gym
    import numpy as np

    from awr_recipes.gym_recipe import GymRecipe

    class UnboundedActions(gym.Env):
        observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        action_space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float32)

        def __init__(self, **kwargs) -> None:
            super().__init__()

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            return np.zeros(2, np.float32), {}

        def step(self, action):
            return np.zeros(2, np.float32), 0.0, False, False, {}

    gym.register("UnboundedActions-v0", entry_point=UnboundedActions)
    try:
        with pytest.raises(ValueError, match="UnboundedActions-v0.*cannot handle"):
            GymRecipe("UnboundedActions-v0").make_env(seed=0)
    finally:
        gym.registry.pop("UnboundedActions-v0")


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_config_builds_its_module_with_the_reference_networks(config):
    cli = cli_main(["-c", str(config)], run=False)
    hidden = [m.out_features for m in cli.model.critic.modules() if isinstance(m, torch.nn.Linear)][:-1]
    assert hidden == [128, 64]  # the reference's MLP
    assert cli.model.max_env_steps is not None or not cli.model.awr.data.collects  # offline: epochs


# AWR.md's reference table: actor step size and fixed action std per MuJoCo task.
REFERENCE_MUJOCO = {"halfcheetah": (5e-5, 0.4), "hopper": (1e-4, 0.4), "walker2d": (2.5e-5, 0.4),
                    "ant": (5e-5, 0.2), "humanoid": (5e-5, 0.2)}


# The tasks whose config ships a Q critic (where it won side by side); the overlay
# configs/reference/td_lambda_critic.yaml gives them back the reference's V critic.
Q_CRITIC_TASKS = {"ant", "halfcheetah"}


def _layered(*configs: str) -> list[str]:
    """``-c configs/<config>`` for each of ``configs``, layered in order."""
    return [arg for config in configs for arg in ("-c", str(REPO / "configs" / config))]


def _without_files(cli) -> dict:
    """A parsed config's settings, without the list of files given (which differ by any overlay itself)."""
    settings = cli.config.as_dict()
    settings.pop("config")
    return settings


def _settings(*configs: str) -> dict:
    """The settings of ``configs`` layered in order."""
    return _without_files(cli_main(_layered(*configs), run=False))


@pytest.mark.parametrize("task", sorted(REFERENCE_MUJOCO))
def test_mujoco_configs_hold_the_reference_settings(task):
    """The reference's settings (AWR.md), with AWR's V critic: as shipped, or for a Q-critic task with
    ``configs/reference/td_lambda_critic.yaml`` layered over it."""
    configs = [f"{task}.yaml", *(["reference/td_lambda_critic.yaml"] if task in Q_CRITIC_TASKS else [])]
    cli = cli_main(_layered(*configs), run=False)
    module, recipe = cli.model, cli.model.recipe
    awr = module.awr
    actor_optimizer, critic_optimizer = module.configure_optimizers()[0]
    assert (actor_optimizer.defaults["lr"], recipe.action_std) == REFERENCE_MUJOCO[task]
    assert (type(actor_optimizer), type(critic_optimizer)) == (torch.optim.SGD, torch.optim.SGD)
    # the std: the reference's fixed one, or (where it won side by side) learned, its entropy floored at the fixed
    # std's (Hopper's 3 action dims at std 0.4: 3 (0.5 ln(2 pi e) + ln 0.4) = 1.51 nats)
    floored = {"hopper": 1.5}
    assert (recipe.policy, recipe.normalizer_samples, actor_optimizer.defaults["momentum"],
            critic_optimizer.defaults["momentum"]) == (
        "learned_std" if task in floored else "fixed_std", 300_000, 0.9, 0.9)
    assert getattr(module.awr.entropy, "target", None) == floored.get(task)
    assert (critic_optimizer.defaults["lr"], awr.value_phase, awr.policy_phase, awr.data.frames_per_iteration) == (
        0.01, Phase(200, 256), Phase(1000, 256), 2048)
    assert (awr.data.buffer_size, float(module.loss_module.max_weight), awr.targets.lmbda, awr.targets.gamma) == (
        50_000, 20, 0.95, 0.99)
    assert awr.targets.value_scale == pytest.approx(100.0) and awr.targets.normalize_advantage
    # beta: the reference's fixed 1.0, or (where it won side by side) tuned to a weight ESS of 0.35
    tuned = {"halfcheetah"}
    temperature = awr.temperature
    assert (type(temperature), getattr(temperature, "target", None), temperature.beta) == (
        (TunedToESS, 0.35, 1.0) if task in tuned else (Fixed, None, 1.0))
    reference = cli_main(_layered(*configs, "reference/fixed_temperature.yaml"), run=False)
    assert (type(reference.model.awr.temperature), float(reference.model.loss_module.temperature)) == (Fixed, 1.0)


@pytest.mark.parametrize("task", sorted(Q_CRITIC_TASKS))
def test_q_critic_tasks_ship_the_screened_overlay_and_nothing_else(task):
    """A Q-critic task's config is its V-critic config with ``configs/reference/q_critic.yaml`` layered over it, the
    settings its seeds ran with: the overlay changes nothing on it, and the V-critic overlay takes back exactly the
    critic's settings (targets, Q steps, optimizer)."""
    shipped = _settings(f"{task}.yaml")
    assert _settings(f"{task}.yaml", "reference/q_critic.yaml") == shipped
    v_critic = _settings(f"{task}.yaml", "reference/td_lambda_critic.yaml")
    q_critic_again = _settings(f"{task}.yaml", "reference/td_lambda_critic.yaml", "reference/q_critic.yaml")
    assert q_critic_again == shipped
    changed = {key for key in shipped["model"] if shipped["model"][key] != v_critic["model"][key]}
    assert changed == {"targets", "value_phase", "critic_optimizer"}
    assert shipped["model"]["targets"]["class_path"] == "awr_modules.q_critic.QCritic"
    # a switched class keeps the init_args it shares with the old one (the Q critic's chunk_size, Adam's fused):
    # the overlay sets them back, so the V critic's parts hold their defaults but for the reference's settings
    for part, reference in (("targets", {"gamma": 0.99, "lmbda": 0.95}),
                            ("critic_optimizer", {"lr": 0.01, "momentum": 0.9})):
        module, name = v_critic["model"][part]["class_path"].rsplit(".", 1)
        defaults = {key: parameter.default for key, parameter in
                    inspect.signature(getattr(importlib.import_module(module), name)).parameters.items()
                    if parameter.default is not inspect.Parameter.empty}
        assert v_critic["model"][part]["init_args"] == {**defaults, **reference}


def test_humanoid_config_observes_no_contact_forces_as_the_reference_did():
    """The reference's Humanoid-v2 saw the external contact forces as zeros; v5's 78 of them are left out."""
    recipe = cli_main(["-c", str(REPO / "configs" / "humanoid.yaml")], run=False).model.recipe
    env = recipe.make_env(0)
    assert env.observation_spec["observation"].shape[-1] == 348 - 78
    env.close()


def test_ant_overlay_leaves_out_the_contact_forces_and_nothing_else():
    """``configs/reference/ant_without_contact_forces.yaml`` drops Ant-v5's 78 contact forces (105 -> 27 features)."""
    shipped = cli_main(_layered("ant.yaml"), run=False)
    overlaid = cli_main(_layered("ant.yaml", "reference/ant_without_contact_forces.yaml"), run=False)
    sizes = []
    for recipe in (shipped.model.recipe, overlaid.model.recipe):
        env = recipe.make_env(0)
        sizes.append(env.observation_spec["observation"].shape[-1])
        env.close()
    assert sizes == [105, 105 - 78]
    settings = [_without_files(cli) for cli in (shipped, overlaid)]
    assert settings[1]["model"]["recipe"]["init_args"].pop("env_kwargs") == {"include_cfrc_ext_in_observation": False}
    settings[0]["model"]["recipe"]["init_args"].pop("env_kwargs")
    assert settings[0] == settings[1]


def test_ckpt_path_last_finds_the_previous_run_in_a_new_logger_version(tmp_path):
    """``awr fit --ckpt_path last`` resumes a run whose metrics went to an earlier ``version_N``.

    Lightning's default checkpoint folder is per logger version, so a second run would look for
    ``last`` in its own, empty folder and start from zero; ``awr`` keeps one folder per experiment.
    """
    _fit(tmp_path, epochs=1)
    resumed = cli_main(["fit", *tiny_args(tmp_path, epochs=2), "--ckpt_path=last"])
    assert resumed.model.env_steps == 2 * FRAMES
    with (checkpoint_dir(tmp_path).parent / "version_1" / "metrics.csv").open() as f:
        logged = {float(row["env_steps"]) for row in csv.DictReader(f) if row["env_steps"]}
    assert logged == {2 * FRAMES}  # the second run trained only the second iteration: it resumed
    assert resumed.trainer.checkpoint_callback.dirpath == str(checkpoint_dir(tmp_path))

def test_test_and_predict_subcommands_run_deterministic_episodes(tmp_path):
    """Three episodes side by side in a batched eval env: ``test`` logs their mean, ``predict`` returns them.

    The parts come from the config (the checkpoint holds weights and the run's state, not the parts).
    """
    three = ["--model.evaluator.init_args.episodes=3"]
    _fit(tmp_path, epochs=1)
    args = [*tiny_args(tmp_path, extra=three), f"--ckpt_path={checkpoint_dir(tmp_path) / 'last.ckpt'}"]
    tested = cli_main(["test", *args])
    assert tested.model.evaluator.episodes == 3
    assert float(tested.trainer.callback_metrics["test/episode_length"]) == 200
    predicted = cli_main(["predict", *args])
    episodes = predicted.trainer.predict_loop.predictions
    assert len(episodes) == 3
    assert [episode.shape[-1] for episode in episodes] == [200, 200, 200]  # full Pendulum episodes
    assert all(episode["next", "truncated"][-1].all() for episode in episodes)
    assert not torch.equal(episodes[0]["observation"][0], episodes[1]["observation"][0])  # own seeds
    returns = [float(episode["next", "reward"].sum()) for episode in episodes]
    assert -2000 < min(returns) and max(returns) <= 0
    # Same checkpoint, same env seeds, deterministic policy: test's mean is the mean of these episodes.
    assert float(tested.trainer.callback_metrics["test/return"]) == pytest.approx(sum(returns) / 3, rel=1e-5)


def _recorder(cli) -> RecordPriorities:
    (recorder,) = [callback for callback in cli.trainer.callbacks if isinstance(callback, RecordPriorities)]
    return recorder


def test_sampling_weighting_trains_from_a_prioritized_buffer_and_resumes(tmp_path):
    """``weighting=sampling``: the buffer samples with priority ``w = min(exp(A / beta), w_max)`` of the stored
    (normalised) advantages (alpha 1, plus TorchRL's eps), and the priorities survive a resume."""
    sampling = ["--model.loss.init_args.weighting=sampling", "--trainer.callbacks+=lightning_helpers.RecordPriorities"]
    cli = _fit(tmp_path, epochs=1, extra=sampling)
    assert cli.model.loss_module.weighting == "sampling"
    end = _recorder(cli).records["end"]
    assert isinstance(end["buffer"], TensorDictPrioritizedReplayBuffer)
    assert len(end["priority"]) == FRAMES
    eps = end["buffer"].sampler._eps
    weights = cli.model.loss_module.weights(end["advantage"])
    torch.testing.assert_close(end["priority"], weights + eps, rtol=1e-6, atol=0)
    assert weights.max() > 2 * weights.min()  # the priorities differ: not one default priority everywhere
    load_checkpoint(checkpoint_dir(tmp_path) / "last.ckpt")  # weights_only=True still loads it

    resumed = cli_main(["fit", *tiny_args(tmp_path, epochs=2, extra=sampling), "--ckpt_path=last"])
    assert resumed.model.env_steps == 2 * FRAMES
    restored = _recorder(resumed).records["start"]
    torch.testing.assert_close(restored["advantage"], end["advantage"], rtol=0, atol=0)
    torch.testing.assert_close(restored["priority"], end["priority"], rtol=0, atol=0)  # rewritten on restore


def test_max_env_steps_stops_the_run(tmp_path):
    cli = _fit(tmp_path, epochs=100, extra=[f"--model.max_env_steps={2 * FRAMES}"])
    assert (cli.model.iteration, cli.model.env_steps) == (2, 2 * FRAMES)
    assert load_checkpoint(checkpoint_dir(tmp_path) / "last.ckpt")["awr"]["iteration"] == 2


def test_num_threads_sets_torch_threads_and_refuses_zero(tmp_path):
    try:
        cli_main(tiny_args(tmp_path, extra=["--num_threads=2"]), run=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    with pytest.raises(ValueError, match="num_threads must be >= 1.*got 0"):
        cli_main(tiny_args(tmp_path, extra=["--num_threads=0"]), run=False)


def _record_parameters(monkeypatch) -> list[list[torch.Tensor]]:
    """The module's parameters as they are when training starts (after setup), one list per fit."""
    records = []
    original = AWRModule.on_train_start

    def record(module):
        records.append([p.detach().clone() for p in module.parameters()])
        original(module)

    monkeypatch.setattr(AWRModule, "on_train_start", record)
    return records


def test_learned_std_policy_trains_its_std_output(tmp_path, monkeypatch):
    """``policy: learned_std``: the actor's last layer has a std unit per action dimension beside the mean's,
    the std depends on the state, and training moves the std units' weights."""
    initial = _record_parameters(monkeypatch)
    cli = _fit(tmp_path, epochs=1, extra=["--model.recipe.init_args.policy=learned_std"])
    actor = cli.model.actor
    linears = [m for m in actor.modules() if isinstance(m, torch.nn.Linear)]
    head = linears[-1]
    assert head.out_features == 2  # Pendulum: 1 action dimension, mean and std
    (before,) = initial
    head_before = dict(zip([n for n, _ in cli.model.named_parameters()], before, strict=True))
    prefix = next(n for n, p in cli.model.named_parameters() if p is head.weight).removesuffix("weight")
    assert not torch.equal(head.weight[1], head_before[prefix + "weight"][1])  # the std unit was trained
    assert not torch.equal(head.bias[1], head_before[prefix + "bias"][1])
    observations = torch.tensor([[1.0, 0.0, 0.0], [-0.5, 0.8, 3.0]])
    with torch.no_grad():
        scale = actor[0](TensorDict({"observation": observations}, [2]))["scale"]
    assert scale.shape == (2, 1) and (scale > 0).all()
    assert scale[0] != scale[1]  # an output of the network, not a constant


def test_adam_optimizer_by_config(tmp_path, monkeypatch):
    initial = _record_parameters(monkeypatch)
    cli = _fit(tmp_path, epochs=1, extra=["--model.actor_optimizer=torch.optim.Adam",
                                          "--model.actor_optimizer.init_args.lr=0.003",
                                          "--model.critic_optimizer=torch.optim.Adam",
                                          "--model.critic_optimizer.init_args.lr=0.02"])
    actor_optimizer, critic_optimizer = (wrapped.optimizer for wrapped in cli.model.optimizers())
    for optimizer, network, lr in ((actor_optimizer, cli.model.actor, 0.003),
                                   (critic_optimizer, cli.model.critic, 0.02)):
        assert type(optimizer) is torch.optim.Adam
        assert [group["lr"] for group in optimizer.param_groups] == [lr]
        assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(p) for p in network.parameters()}
        assert all(float(optimizer.state[p]["step"]) == 3 for p in network.parameters())  # 3 steps per phase
    (before,) = initial
    changed = [not torch.equal(a, b) for a, b in zip(before, cli.model.parameters(), strict=True)]
    assert all(changed)  # every parameter moved: the actor's and the critic's


def test_a_fresh_run_into_the_same_folder_overwrites_last_ckpt(tmp_path):
    """``awr validate --ckpt_path <folder>/last.ckpt`` must load the newest run, so no ``last-v1.ckpt``."""
    _fit(tmp_path, epochs=1)
    _fit(tmp_path, epochs=2)  # fresh: no --ckpt_path
    folder = checkpoint_dir(tmp_path)
    assert not list(folder.glob("last-v*.ckpt"))
    state = load_checkpoint(folder / "last.ckpt")["awr"]
    assert (state["iteration"], state["env_steps"]) == (2, 2 * FRAMES)


def test_seed_everything_is_the_runs_one_seed(tmp_path):
    """The CLI links ``seed_everything`` to the module's seed; setting the module's seed apart is refused."""
    cli = cli_main(["-c", str(CONFIG), "--seed_everything=5"], run=False)
    assert cli.model.seed == 5 and cli.model._rank_seed() == 5
    with pytest.raises(SystemExit):
        cli_main(["-c", str(CONFIG), "--model.seed=3"], run=False)


def test_optimizers_and_schedulers_are_injected_from_the_config_and_resume(tmp_path):
    """Any torch.optim class and scheduler through the CLI (as in YAML), stepped once per iteration, resumed."""
    injected = ["--model.actor_optimizer=torch.optim.Adam", "--model.actor_optimizer.lr=0.004",
                "--model.actor_scheduler=torch.optim.lr_scheduler.StepLR", "--model.actor_scheduler.step_size=1",
                "--model.actor_scheduler.gamma=0.5", "--model.critic_optimizer=torch.optim.RMSprop",
                "--model.critic_optimizer.lr=0.002"]
    cli = cli_main(["fit", *tiny_args(tmp_path, epochs=2, extra=injected)])
    actor_optimizer, critic_optimizer = (wrapped.optimizer for wrapped in cli.model.optimizers())
    assert isinstance(actor_optimizer, torch.optim.Adam) and isinstance(critic_optimizer, torch.optim.RMSprop)
    assert actor_optimizer.param_groups[0]["lr"] == pytest.approx(0.004 * 0.5**2)
    assert critic_optimizer.param_groups[0]["lr"] == pytest.approx(0.002)
    load_checkpoint(checkpoint_dir(tmp_path) / "last.ckpt")  # still weights_only-safe
    resumed = cli_main(["fit", *tiny_args(tmp_path, epochs=3, extra=injected), "--ckpt_path=last"])
    assert resumed.model.optimizers()[0].optimizer.param_groups[0]["lr"] == pytest.approx(0.004 * 0.5**3)


def test_a_scheduler_that_needs_a_monitored_metric_is_refused(tmp_path):
    with pytest.raises(TypeError, match="ReduceLROnPlateau"):
        cli_main(["fit", *tiny_args(tmp_path, epochs=1, extra=[
            "--model.actor_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau"])])


def test_a_checkpoint_of_version_0_1_0_loads_its_networks_and_is_refused_for_resume(tmp_path):
    """0.1.0 wrote no format version and flat hyperparameters: its networks load for ``validate`` and
    ``init_from``; resuming its run is refused with a message naming the version that wrote it."""
    _fit(tmp_path, epochs=1)
    checkpoint = load_checkpoint(checkpoint_dir(tmp_path) / "last.ckpt")
    assert checkpoint["awr"].pop("version") == "0.2.0"
    checkpoint["hyper_parameters"] = {"frames_per_iteration": FRAMES, "actor_lr": 0.001, "collection": "sync"}
    old = tmp_path / "written_by_0_1_0.ckpt"
    torch.save(checkpoint, old)
    validated = cli_main(["validate", *tiny_args(tmp_path / "validate"), f"--ckpt_path={old}"])
    for key, value in checkpoint["state_dict"].items():
        torch.testing.assert_close(validated.model.state_dict()[key], value)
    assert "eval/return" in validated.trainer.callback_metrics
    started = cli_main(["fit", *tiny_args(tmp_path / "new", epochs=1, extra=[
        f"--model.init_from={old}", "--model.value_phase.steps=0", "--model.policy_phase.steps=0"])])
    for key, value in checkpoint["state_dict"].items():
        if key.startswith("actor."):
            torch.testing.assert_close(started.model.state_dict()[key], value)
    with pytest.raises(ValueError, match=r"written by torchrl-awr 0.1.0.*--model.init_from"):
        cli_main(["fit", *tiny_args(tmp_path / "resume", epochs=2), f"--ckpt_path={old}"])


def test_episodes_that_end_in_an_iteration_log_their_return_and_length(tmp_path):
    """CartPole's untrained policy ends episodes within an iteration: ``train/return`` and ``train/episode_length``
    are the means over the episodes that ended in the collected batch (CartPole pays 1 per step: equal)."""
    cartpole = str(REPO / "configs" / "cartpole.yaml")
    args = [cartpole if arg == str(CONFIG) else arg for arg in tiny_args(tmp_path, epochs=1)]
    cli = cli_main(["fit", *args, "--model.data.init_args.frames_per_iteration=256"])
    batch = cli.model.last_iteration.batch
    done = batch["next", "done"]
    assert done.sum() >= 8  # 8 envs of 32 steps each: every env ended an episode
    expected_return = batch["next", "episode_reward"][done].float().mean()
    expected_length = batch["next", "step_count"][done].float().mean()
    with (checkpoint_dir(tmp_path).parent / "version_0" / "metrics.csv").open() as f:
        logged = [row for row in csv.DictReader(f) if row.get("train/return")]
    assert len(logged) == 1
    assert float(logged[0]["train/return"]) == pytest.approx(float(expected_return), rel=1e-6)
    assert float(logged[0]["train/episode_length"]) == pytest.approx(float(expected_length), rel=1e-6)
    assert float(logged[0]["train/return"]) == pytest.approx(float(logged[0]["train/episode_length"]), rel=1e-6)


@pytest.mark.parametrize("q_critic_first", [False, True], ids=["v_to_q", "q_to_v"])
def test_init_from_across_critic_kinds_is_refused_naming_the_overlays(tmp_path, q_critic_first):
    """A V-critic checkpoint into a Q-critic config (0.3.5's HalfCheetah runs into 0.3.6's config), or back, is
    refused before any step with the overlays that match the checkpoint, not a list of missing keys."""
    q_critic = ["--model.targets=awr_modules.q_critic.QCritic", "--model.critic_optimizer=torch.optim.Adam"]
    _fit(tmp_path, epochs=1, extra=q_critic if q_critic_first else [])
    start = [f"--model.init_from={checkpoint_dir(tmp_path) / 'last.ckpt'}", *([] if q_critic_first else q_critic)]
    has = "the checkpoint" if q_critic_first else "this config"
    with pytest.raises(ValueError, match=rf"{has} has a Q critic's networks.*td_lambda_critic.yaml.*q_critic.yaml"):
        cli_main(["fit", *tiny_args(tmp_path / "other", epochs=1, extra=start)])
    assert not list((tmp_path / "other").rglob("*.ckpt"))


def test_an_init_from_checkpoint_of_another_task_is_refused_before_any_step(tmp_path):
    _fit(tmp_path, epochs=1)
    other = ["--model.recipe.init_args.env_id=MountainCarContinuous-v0",
             f"--model.init_from={checkpoint_dir(tmp_path) / 'last.ckpt'}"]
    with pytest.raises(ValueError, match="checkpoint is for env 'Pendulum-v1'.*MountainCarContinuous-v0"):
        cli_main(["fit", *tiny_args(tmp_path / "other", epochs=1, extra=other)])
    assert not list((tmp_path / "other").rglob("*.ckpt"))


def test_the_clipped_actor_overlay_keeps_the_tasks_step_size_and_caps_the_gradient_norm():
    """``configs/reference/clipped_actor.yaml`` swaps the actor's SGD for ``ClippedSGD``: lr and momentum stay the
    task's, ``max_grad_norm`` is the overlay's, and the critic's optimizer is untouched."""
    from awr_modules.optimizers import ClippedSGD

    module = cli_main(_layered("humanoid.yaml", "reference/clipped_actor.yaml"), run=False).model
    actor_optimizer, critic_optimizer = module.configure_optimizers()[0]
    assert type(actor_optimizer) is ClippedSGD and type(critic_optimizer) is torch.optim.SGD
    assert (actor_optimizer.defaults["lr"], actor_optimizer.defaults["momentum"],
            actor_optimizer.defaults["max_grad_norm"]) == (5e-5, 0.9, 50.0)
