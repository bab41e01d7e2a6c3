"""``awr export``: the deterministic policy as a ``torch.export`` file that runs with torch alone.

Pinned: a fresh interpreter that cannot import this package, TensorDict or TorchRL loads the file and
reproduces the return of the trained actor's evaluation episode on a fixed seed; the exported action
is the actor's deterministic action in env units for every actor kind, and ``awr export`` of a
checkpoint of each kind (discrete, TanhNormal, learned-std and bounded-std Gaussians) writes the checkpoint's policy.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from episode_return import episode_return
from lightning_helpers import CONFIG, checkpoint_dir, subprocess_env, tiny_args
from tensordict import TensorDict
from torchrl.envs import ExplorationType, set_exploration_type

from awr_modules.cli import cli_main
from awr_modules.cli import main as awr_main
from awr_modules.evaluation import evaluate
from awr_modules.export import main as export_main
from awr_recipes.classic_control import ClassicControl

SEED = 7
FRESH_INTERPRETER = """
import sys
for name in ("awr_modules", "awr_recipes", "tensordict", "torchrl", "lightning"):
    sys.modules[name] = None  # any import of them fails: the file must need torch alone
sys.path.insert(0, sys.argv[3])
import torch
from episode_return import episode_return
print(episode_return(torch.export.load(sys.argv[1]).module(), int(sys.argv[2])))
"""


def test_the_exported_policy_reproduces_the_evaluation_return_without_this_package(tmp_path):
    cli = cli_main(["fit", *tiny_args(tmp_path, epochs=2)])
    out = tmp_path / "policy.pt2"
    config = tmp_path / "tiny.yaml"  # the task and network sizes of the tiny run
    config.write_text("model:\n  recipe:\n    class_path: awr_recipes.classic_control.ClassicControl\n    init_args:\n"
                      "      env_id: Pendulum-v1\n      hidden_sizes: [16, 16]\n")
    export_main(["-c", str(config), "--checkpoint", str(checkpoint_dir(tmp_path) / "last.ckpt"), "--out", str(out)])
    tests = Path(__file__).resolve().parent  # episode_return.py, the loop the next test checks against TorchRL
    fresh = subprocess.run([sys.executable, "-c", FRESH_INTERPRETER, str(out), str(SEED), str(tests)],
                           capture_output=True, text=True, check=True, cwd=tmp_path, env=subprocess_env())
    env = ClassicControl("Pendulum-v1", hidden_sizes=[16, 16]).make_env(SEED)
    evaluation = evaluate(env, cli.model.actor.cpu())  # the episode `awr validate` runs, through TorchRL
    assert float(fresh.stdout.strip()) == pytest.approx(evaluation.returns[0], rel=1e-4, abs=1e-3)


@pytest.mark.parametrize("policy", ["fixed_std", "learned_std", "bounded_std", "tanh_normal", "discrete"])
def test_the_exported_action_is_the_actors_deterministic_action_in_env_units(policy):
    recipe = ClassicControl("CartPole-v1") if policy == "discrete" else ClassicControl("Pendulum-v1", policy=policy)
    env = recipe.make_env(0)
    actor, _ = recipe.make_networks(env)
    for parameter in actor.parameters():  # away from the near-zero initial mean head
        parameter.data.normal_(0, 0.5)
    observation = torch.randn(5, env.observation_spec["observation"].shape[-1])
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        action = actor(TensorDict({"observation": observation}, [5]))["action"]
    expected = action.argmax(-1) if policy == "discrete" else recipe.env_actions(action)
    program = torch.export.export(recipe.deterministic_policy(actor), (observation,))
    torch.testing.assert_close(program.module()(observation), expected)


def test_a_gymnasium_episode_of_the_actor_matches_torchrls_evaluation_episode():
    """The fresh interpreter's loop (gymnasium, ``reset(seed)``) is the episode TorchRL's seeded env evaluates."""
    recipe = ClassicControl("Pendulum-v1", hidden_sizes=[16, 16])
    env = recipe.make_env(SEED)
    actor, _ = recipe.make_networks(env)
    total = episode_return(recipe.deterministic_policy(actor), SEED)
    assert np.isclose(total, evaluate(env, actor).returns[0], rtol=1e-4)


CARTPOLE = CONFIG.parent / "cartpole.yaml"


def _kind_args(save_dir: Path, kind: str) -> list[str]:
    """A one-iteration tiny run of an actor kind: CartPole's config for the discrete one, else Pendulum's with the
    recipe's ``policy`` (a TanhNormal's mean cannot leave the bounds: no bound penalty)."""
    args = tiny_args(save_dir, epochs=1)
    if kind == "discrete":
        args[args.index(str(CONFIG))] = str(CARTPOLE)  # tiny_args' sizes over CartPole's config
        return args
    no_penalty = ["--model.loss.init_args.action_bound_penalty=0"] if kind == "tanh_normal" else []
    return [*args, f"--model.recipe.init_args.policy={kind}", *no_penalty]


@pytest.mark.parametrize("kind", ["discrete", "tanh_normal", "learned_std"])
def test_awr_export_writes_the_checkpoints_deterministic_policy_for_each_actor_kind(tmp_path, kind, capsys):
    cli = cli_main(["fit", *_kind_args(tmp_path, kind)])
    out = tmp_path / "policy.pt2"
    awr_main(["export", "-c", str(Path(cli.trainer.log_dir) / "config.yaml"),  # the config the run saved
              "--checkpoint", str(checkpoint_dir(tmp_path) / "last.ckpt"), "--out", str(out)])
    assert f"awr export: wrote {out}" in capsys.readouterr().out

    recipe, actor = cli.model.recipe, cli.model.actor.cpu()  # the trained module the checkpoint holds
    env = recipe.make_env(0)
    observation = env.rollout(6)["observation"]  # states the task visits, a batch of 6
    policy = torch.export.load(str(out)).module()
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        mode = actor(TensorDict({"observation": observation}, [6]))["action"]
    exported = policy(observation)
    if kind == "discrete":
        assert exported.dtype == torch.long and set(exported.tolist()) <= {0, 1}
        torch.testing.assert_close(exported, mode.argmax(-1))
    else:
        low, high = env.action_spec.space.low, env.action_spec.space.high
        assert exported.shape == (6, 1) and ((exported >= low) & (exported <= high)).all()
        torch.testing.assert_close(exported, recipe.env_actions(mode))
    torch.testing.assert_close(policy(observation[:1]), exported[:1])  # any batch size
    with torch.no_grad():
        fresh, _ = recipe.make_networks(env)
        assert any(not torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), actor.state_dict().values(),
                                                        strict=True))  # the checkpoint's weights, not new ones
