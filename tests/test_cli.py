"""The ``awr`` console script: its help, refused inputs without tracebacks, the import graph, the default progress
bar, unreadable datasets named, and ``awr dataset policy`` / ``awr dataset history`` end to end."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning_helpers import CONFIG, checkpoint_dir, subprocess_env, tiny_args

from awr_modules.cli import main
from awr_modules.configured import AWRCLI, cli_main, is_refusal
from awr_modules.offline_data import DatasetError
from awr_modules.progress import AWRProgressBar

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"awr_modules": ROOT / "awr_modules", "awr_recipes": ROOT / "recipes"}


def _refusal(args: list[str]) -> str:
    """What ``awr ARGS`` prints for a refused input (the ``SystemExit`` message Python prints, status 1)."""
    with pytest.raises(SystemExit) as refused:
        main(args)
    assert isinstance(refused.value.code, str), f"not a refusal message: exit code {refused.value.code!r}"
    return refused.value.code


# ---------------------------------------------------------------------------------------------------- help
def test_help_lists_lightnings_subcommands_and_ours(capsys):
    main(["--help"])
    listing = capsys.readouterr().out
    for subcommand in ("fit", "validate", "test", "predict", "dataset", "export"):
        assert f"\n    {subcommand} " in listing, f"{subcommand} missing from `awr --help`:\n{listing}"
    assert "--traceback" in listing and "AWR_TRACEBACK" in listing


def test_each_subcommand_has_its_own_help_and_an_unknown_one_is_an_error(capsys):
    for subcommand, option in (("fit", "--trainer.max_epochs"), ("dataset", "{policy,random,history}"),
                               ("export", "--checkpoint")):
        with pytest.raises(SystemExit) as done:
            main([subcommand, "--help"])
        assert done.value.code == 0 and option in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        main(["fitt"])
    assert refused.value.code == 2 and "unknown subcommand 'fitt'" in capsys.readouterr().err


def test_a_command_line_builds_the_parser_of_its_own_subcommand_alone(tmp_path):
    """``awr fit ...`` skips the other subcommands' parsers (each is built from the trainer's and the module's
    signatures); the class still names all four, as ``awr --help`` lists them."""
    cli = cli_main(["fit", *tiny_args(tmp_path, epochs=1)])
    assert cli.subcommands() == {"fit": AWRCLI.subcommands()["fit"]}
    assert set(AWRCLI.subcommands()) == {"fit", "validate", "test", "predict"}
    validated = cli_main(["validate", *tiny_args(tmp_path), f"--ckpt_path={checkpoint_dir(tmp_path) / 'last.ckpt'}"])
    assert set(validated.subcommands()) == {"validate"}


# ----------------------------------------------------------------------------------------------- refusals
def test_a_refused_input_is_its_message_and_status_1_without_a_traceback():
    """The console script itself, in a fresh interpreter: stderr is the message, not a traceback."""
    done = subprocess.run([sys.executable, "-m", "awr_modules.cli", "fit", "-c", str(CONFIG), "--num_threads=0"],
                          check=False, capture_output=True, text=True, cwd=ROOT, env=subprocess_env())
    assert done.returncode == 1
    assert "awr fit: num_threads must be >= 1" in done.stderr and "--traceback" in done.stderr
    assert "Traceback" not in done.stderr


def test_traceback_flag_and_environment_variable_let_the_error_through(monkeypatch):
    message = _refusal(["fit", "-c", str(CONFIG), "--num_threads=0"])
    assert message.startswith("awr fit: num_threads must be >= 1") and "ValueError at awr_modules." in message
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        main(["fit", "-c", str(CONFIG), "--num_threads=0", "--traceback"])
    monkeypatch.setenv("AWR_TRACEBACK", "1")
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        main(["fit", "-c", str(CONFIG), "--num_threads=0"])


def test_config_errors_are_the_parsers_message_without_its_usage(capsys):
    message = _refusal(["fit", "-c", str(CONFIG), "--trainer.no_such_field=1"])
    assert "no_such_field" in message and "`awr fit --help` lists the accepted options" in message
    message = _refusal(["validate", "-c", str(ROOT / "configs" / "no_such_config.yaml")])
    assert "no_such_config.yaml" in message
    assert "usage:" not in capsys.readouterr().err  # the message alone, not 80 lines of options first


def test_a_dataset_refusal_names_the_dataset(tmp_path):
    pytest.importorskip("minari")
    args = ["dataset", "random", "-c", str(CONFIG), "--steps", "5", "--id", "pendulum/random-v0",
            "--root", str(tmp_path)]
    main(args)
    message = _refusal(args)
    assert message.startswith("awr dataset: offline data: dataset 'pendulum/random-v0' already exists")
    assert "DatasetError" in message


def test_a_missing_checkpoint_is_refused_naming_it(tmp_path):
    message = _refusal(["export", "-c", str(CONFIG), "--checkpoint", str(tmp_path / "none.ckpt"),
                        "--out", str(tmp_path / "policy.pt2")])
    assert "none.ckpt" in message and "FileNotFoundError" in message


def test_errors_that_are_not_refusals_keep_their_traceback(monkeypatch):
    """A ``ValueError`` raised inside a library (here ``int``) is a bug, not a check: it passes unchanged."""
    def broken(args, **kwargs):
        return int("not a number")

    monkeypatch.setattr("awr_modules.cli.cli_main", broken)
    with pytest.raises(ValueError, match="invalid literal"):
        main(["fit"])
    monkeypatch.setattr("awr_modules.cli.cli_main", lambda args, **kwargs: {}[args[0]])
    with pytest.raises(KeyError):
        main(["fit"])


CHECKS = '''
def check(x):
    if x < 0:
        raise ValueError(
            f"x must be >= 0, got {x}")


def call_badly(x):
    return len(x, 1)


def convert(text):
    return int(text)
'''


def _raised(module_name: str, path: Path, function: str, argument) -> BaseException:
    """The error ``function(argument)`` raises, defined in a file ``path`` loaded as module ``module_name``."""
    path.write_text(CHECKS)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(Exception) as raised:
        getattr(module, function)(argument)
    return raised.value


def test_only_the_projects_own_raise_statements_and_named_types_are_refusals(tmp_path):
    source = tmp_path / "checks.py"
    assert is_refusal(_raised("awr_modules.checks", source, "check", -1))
    assert is_refusal(_raised("awr_recipes.checks", source, "check", -1))
    assert not is_refusal(_raised("someone_else.checks", source, "check", -1))  # another package's check
    assert not is_refusal(_raised("awr_modules.checks", source, "call_badly", "x"))  # TypeError of a bad call: a bug
    assert not is_refusal(_raised("awr_modules.checks", source, "convert", "x"))  # ValueError inside int(): a bug
    for error in (DatasetError("bad"), argparse.ArgumentError(None, "bad"), FileNotFoundError("none.ckpt")):
        assert is_refusal(error)
    assert not is_refusal(RuntimeError("a worker died")) and not is_refusal(KeyError("x"))


# ------------------------------------------------------------------------------------------------- imports
def _import_graph() -> dict[str, set[str]]:
    """Each project module's imports of project modules, at module level or inside functions."""
    modules = {(package if path.stem == "__init__" else f"{package}.{path.stem}"): path
               for package, folder in PACKAGES.items() for path in folder.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    imported.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        graph[name] = {module for module in imported if module in modules and module != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: a path back to its start, found by depth-first search."""
    cycles, state = [], defaultdict(int)  # 0 unseen, 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in sorted(graph[module]):
            if state[imported] == 1:
                cycles.append([*path[path.index(imported):], imported])
            elif state[imported] == 0:
                visit(imported, [*path, imported])
        state[module] = 2

    for module in sorted(graph):
        if state[module] == 0:
            visit(module, [module])
    return cycles


def test_the_projects_imports_form_no_cycle():
    graph = _import_graph()
    assert {"awr_modules.dataset_cli", "awr_modules.export"} <= graph["awr_modules.cli"]  # the graph sees imports
    assert graph["awr_modules.configured"].isdisjoint({"awr_modules.cli", "awr_modules.dataset_cli",
                                                      "awr_modules.export"})
    assert _cycles(graph) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]  # the search finds one


# -------------------------------------------------------------------------------------------- progress bar
def _progress_bars(tmp_path: Path, *extra: str) -> list[type]:
    cli = cli_main([*tiny_args(tmp_path, extra=list(extra))], run=False)
    return [type(callback) for callback in cli.trainer.callbacks if isinstance(callback, ProgressBar)]


def test_the_rl_progress_bar_is_the_default_and_can_be_turned_off_or_replaced(tmp_path):
    assert _progress_bars(tmp_path) == []  # tiny_args: --trainer.enable_progress_bar=false
    assert _progress_bars(tmp_path, "--trainer.enable_progress_bar=true") == [AWRProgressBar]
    assert _progress_bars(tmp_path, "--trainer.enable_progress_bar=true",
                          "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar") == [TQDMProgressBar]


def test_a_fit_shows_env_steps_toward_the_budget_and_the_evaluation_return(tmp_path, capsys):
    cli = cli_main(["fit", *tiny_args(tmp_path, epochs=2, extra=["--trainer.enable_progress_bar=true"])])
    shown = capsys.readouterr().out
    budget = "" if cli.model.max_env_steps is None else f"/{cli.model.max_env_steps}"
    assert f"env_steps={cli.model.env_steps}{budget}" in shown and cli.model.env_steps > 0
    assert "env_steps/s=" in shown and "eval/return=" in shown
    assert "v_num" not in shown and "it/s" not in shown and f"{cli.model.env_steps}.0" not in shown


# ------------------------------------------------------------------------------------------------ datasets
def test_a_truncated_dataset_file_is_refused_naming_the_dataset_and_the_file(tmp_path):
    pytest.importorskip("minari")
    import gymnasium as gym

    from awr_modules.dataset_writer import random_policy, write_policy_dataset
    from awr_modules.offline_data import read_minari_dataset

    env = gym.make("Pendulum-v1")
    write_policy_dataset("pendulum/random-v0", env, random_policy(env.action_space), steps=20, root=tmp_path)
    (data_file,) = (tmp_path / "pendulum" / "random-v0" / "data").glob("*.hdf5")
    with open(data_file, "r+b") as file:
        file.truncate(data_file.stat().st_size // 2)
    with pytest.raises(DatasetError) as refused:
        read_minari_dataset("pendulum/random-v0", env_id="Pendulum-v1", observation_shape=(3,), action_shape=(1,),
                            root=tmp_path)
    assert "'pendulum/random-v0'" in str(refused.value) and str(data_file) in str(refused.value)
    assert "truncated" in str(refused.value) and isinstance(refused.value.__cause__, OSError)


def _fit_config(cli) -> Path:
    """The config a run saved beside its metrics: the task and network sizes its checkpoints have."""
    return Path(cli.trainer.log_dir) / "config.yaml"


def test_dataset_policy_writes_the_checkpoints_deterministic_actions(tmp_path, capsys):
    pytest.importorskip("minari")
    from awr_modules.offline_data import open_minari_dataset

    cli = cli_main(["fit", *tiny_args(tmp_path, epochs=1)])
    checkpoint = checkpoint_dir(tmp_path) / "last.ckpt"
    main(["dataset", "policy", "-c", str(_fit_config(cli)), "--checkpoint", str(checkpoint), "--mode",
          "deterministic", "--steps", "20", "--id", "pendulum/policy-v0", "--root", str(tmp_path / "datasets")])
    assert "wrote 'pendulum/policy-v0': 1 episodes, 20 steps" in capsys.readouterr().out
    episode = next(open_minari_dataset("pendulum/policy-v0", tmp_path / "datasets").iterate_episodes())
    policy = cli.model.recipe.deterministic_policy(cli.model.actor.cpu()).eval()
    with torch.no_grad():
        expected = policy(torch.as_tensor(episode.observations[:-1], dtype=torch.float32)).clamp(-2.0, 2.0)
    torch.testing.assert_close(torch.as_tensor(episode.actions, dtype=torch.float32), expected)
    assert expected.std() > 0  # the policy's actions vary with the state: a real comparison

    message = _refusal(["dataset", "policy", "-c", str(CONFIG), "--checkpoint", str(checkpoint), "--steps", "5",
                        "--id", "pendulum/other-v0", "--root", str(tmp_path / "datasets")])
    assert message.startswith("awr dataset: ")  # the task's own config has other network sizes: refused

    overlay = tmp_path / "tiny_networks.yaml"  # layered after the task's config, as `awr fit -c A -c B` layers it
    overlay.write_text("model:\n  recipe:\n    init_args:\n      hidden_sizes: [16, 16]\n")
    main(["dataset", "policy", "-c", str(CONFIG), "-c", str(overlay), "--checkpoint", str(checkpoint), "--mode",
          "deterministic", "--steps", "20", "--id", "pendulum/layered-v0", "--root", str(tmp_path / "datasets")])
    layered = next(open_minari_dataset("pendulum/layered-v0", tmp_path / "datasets").iterate_episodes())
    np.testing.assert_array_equal(layered.actions, episode.actions)  # the same policy from the same seed


def test_dataset_history_writes_the_recorded_trajectories_up_to_the_cut(tmp_path, capsys):
    pytest.importorskip("minari")
    from awr_modules.offline_data import open_minari_dataset

    history = tmp_path / "history"
    cli = cli_main(["fit", *tiny_args(tmp_path, epochs=2, extra=[
        "--trainer.callbacks+=awr_modules.replay_history.ReplayHistory", f"--trainer.callbacks.dirpath={history}"])])
    first = torch.load(min(history.glob("batch_*.pt")), weights_only=False)
    main(["dataset", "history", "-c", str(_fit_config(cli)), "--history", str(history), "--up-to",
          str(first.numel()), "--id", "pendulum/history-v0", "--root", str(tmp_path / "datasets")])
    shown = capsys.readouterr().out

    recorded = {}  # trajectory id -> its rows in time order (rows of one env are in time order)
    for row in first.reshape(-1).unbind(0):
        recorded.setdefault(int(row["collector", "traj_ids"]), []).append(row)
    episodes = list(open_minari_dataset("pendulum/history-v0", tmp_path / "datasets").iterate_episodes())
    assert len(episodes) == len(recorded) and sum(len(episode.rewards) for episode in episodes) == first.numel()
    assert f"wrote 'pendulum/history-v0': {len(recorded)} episodes, {first.numel()} steps" in shown
    by_start = {tuple(rows[0]["observation"].tolist()): torch.stack(rows) for rows in recorded.values()}
    recipe = cli.model.recipe
    for episode in episodes:
        rows = by_start[tuple(np.asarray(episode.observations[0], dtype=np.float32).tolist())]
        torch.testing.assert_close(torch.as_tensor(episode.rewards, dtype=torch.float32),
                                   rows["next", "reward"].reshape(-1))
        torch.testing.assert_close(torch.as_tensor(episode.observations[1:], dtype=torch.float32),
                                   rows["next", "observation"])
        torch.testing.assert_close(torch.as_tensor(episode.actions, dtype=torch.float32),
                                   recipe.env_actions(rows["action"]).clamp(-2.0, 2.0))
