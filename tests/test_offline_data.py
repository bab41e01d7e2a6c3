"""Offline AWR: Minari datasets written and read, offline fits through the CLI, offline-to-online, refusals.

Every dataset here is written by the test itself into a temporary ``MINARI_DATASETS_PATH``.
"""

from __future__ import annotations

import re

import h5py
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning_helpers import checkpoint_dir, load_checkpoint, tiny_args
from minari.data_collector import EpisodeBuffer
from torchrl.objectives.value import TDLambdaEstimator

from awr_modules import make_replay_buffer, refresh_value_targets
from awr_modules.cli import cli_main
from awr_modules.dataset_cli import main as dataset_main
from awr_modules.dataset_writer import checkpoint_policy, random_policy, write_history_dataset, write_policy_dataset
from awr_modules.offline_data import DatasetError, DatasetIdentity, read_minari_dataset
from awr_modules.run_state import check_same_dataset
from awr_recipes.classic_control import ClassicControl

GAMMA, LAMBDA = 0.9, 0.8
PENDULUM = {"env_id": "Pendulum-v1", "observation_shape": (3,), "action_shape": (1,)}


@pytest.fixture(autouse=True)
def _datasets_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "datasets"))


def _random_dataset(dataset_id: str, env_id: str, episodes: int, seed: int = 0):
    import gymnasium as gym

    env = gym.make(env_id)
    return write_policy_dataset(dataset_id, env, random_policy(env.action_space), episodes=episodes, seed=seed)


def _plain_td_lambda(rewards, values, next_values, terminated) -> list[float]:
    """TD(lambda) of one episode in plain Python: G_t = r_t + g((1 - l) V(s') + l G_{t+1}); G_T bootstraps
    from V(s_T) unless the episode terminated."""
    returns, following = [], None
    for t in reversed(range(len(rewards))):
        bootstrap = 0.0 if (t == len(rewards) - 1 and terminated) else next_values[t]
        if following is None:
            target = rewards[t] + GAMMA * bootstrap
        else:
            target = rewards[t] + GAMMA * ((1 - LAMBDA) * next_values[t] + LAMBDA * following)
        returns.append(target)
        following = target
    return returns[::-1]


def test_written_episodes_read_back_and_targets_are_td_lambda_per_episode():
    """CartPole: random episodes end by termination, so both path ends (terminated, and bootstrapped) occur."""
    dataset = _random_dataset("cartpole/random-v0", "CartPole-v1", episodes=4)
    rows, identity = read_minari_dataset("cartpole/random-v0", env_id="CartPole-v1", observation_shape=(4,),
                                         action_shape=())
    assert identity.transitions == rows.shape[0] == dataset.total_steps and identity.episodes == 4
    episodes = list(dataset.iterate_episodes())
    assert torch.equal(rows["next", "reward"].reshape(-1), torch.as_tensor(np.concatenate(
        [episode.rewards for episode in episodes]), dtype=torch.float32))
    assert rows["next", "terminated"].sum() == 4 and rows["collector", "traj_ids"].unique().numel() == 4

    weights = torch.tensor([0.3, -0.2, 0.5, 0.1])
    critic = _linear_critic(weights)
    buffer = make_replay_buffer(rows.shape[0], prioritized=False)
    buffer.extend(rows)
    refreshed = refresh_value_targets(buffer, TDLambdaEstimator(gamma=GAMMA, lmbda=LAMBDA, value_network=critic))
    start = 0
    for episode in episodes:
        steps = len(episode.rewards)
        observations = torch.as_tensor(episode.observations, dtype=torch.float32)
        values = (observations @ weights).tolist()
        expected = _plain_td_lambda(episode.rewards.tolist(), values[:-1], values[1:], bool(episode.terminations[-1]))
        got = refreshed["value_target"][start:start + steps].reshape(-1)
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-5)
        start += steps


def _linear_critic(weights: torch.Tensor):
    from torchrl.modules import ValueOperator

    linear = torch.nn.Linear(weights.numel(), 1, bias=False)
    linear.weight.data.copy_(weights.unsqueeze(0))
    return ValueOperator(linear, in_keys=["observation"])


def test_torchrls_local_minari_reader_still_returns_zeros(tmp_path):
    """Why the reader is Minari's own: TorchRL's ``MinariExperienceReplay(load_from_local_minari=True)`` keeps
    ``memmap_like`` of the data (layout, no content). When this fails, TorchRL reads the content: switch back."""
    from torchrl.data.datasets import MinariExperienceReplay

    _random_dataset("pendulum/random-v0", "Pendulum-v1", episodes=2)
    replay = MinariExperienceReplay("pendulum/random-v0", batch_size=4, root=tmp_path / "torchrl",
                                    load_from_local_minari=True)
    rows, _ = read_minari_dataset("pendulum/random-v0", **PENDULUM)
    assert rows["next", "reward"].abs().sum() > 0
    assert replay.storage.get(slice(0, len(replay)))["next", "reward"].abs().sum() == 0


def test_memmap_rows_equal_in_memory_rows(tmp_path):
    _random_dataset("pendulum/random-v0", "Pendulum-v1", episodes=2)
    in_memory, identity = read_minari_dataset("pendulum/random-v0", **PENDULUM)
    on_disk, same = read_minari_dataset("pendulum/random-v0", **PENDULUM, memmap_dir=tmp_path / "rows")
    assert identity == same and on_disk.is_memmap()
    assert (in_memory == on_disk).all()


@pytest.mark.parametrize("fault", ["unknown id", "other env", "other shapes", "missing field", "empty",
                                   "non-finite"])
def test_bad_datasets_are_refused_with_the_fault_named(tmp_path, fault):
    import gymnasium as gym
    import minari

    env = gym.make("Pendulum-v1")

    def episode(number: int, steps: int = 5, reward: float = 1.0) -> EpisodeBuffer:
        return EpisodeBuffer(id=number, observations=np.zeros((steps + 1, 3), np.float32),
                             actions=np.zeros((steps, 1), np.float32), rewards=np.full(steps, reward),
                             terminations=np.zeros(steps, bool), truncations=np.r_[np.zeros(steps - 1, bool), True])

    expected = {"unknown id": "no Minari dataset", "other env": "recorded in 'Pendulum-v1'",
                "other shapes": "observations of shape", "missing field": "lacks a field", "empty": "no transitions",
                "non-finite": "non-finite"}[fault]
    dataset_id, read_as = "pendulum/bad-v0", dict(PENDULUM)
    if fault == "unknown id":
        dataset_id = "pendulum/absent-v0"
    else:
        episodes = [] if fault == "empty" else [episode(0), episode(1, reward=np.nan if fault == "non-finite" else 1.0)]
        minari.create_dataset_from_buffers(dataset_id, episodes, env=env)
    if fault == "other env":
        read_as = {"env_id": "CartPole-v1", "observation_shape": (4,), "action_shape": ()}
    if fault == "other shapes":
        read_as["observation_shape"] = (4,)
    if fault == "missing field":
        with h5py.File(tmp_path / "datasets" / dataset_id / "data" / "main_data.hdf5", "a") as file:
            del file["episode_1"]["rewards"]
    with pytest.raises(DatasetError, match=expected):
        read_minari_dataset(dataset_id, **read_as)


def test_writing_never_replaces_a_dataset_without_overwrite(capsys):
    args = ["random", "-c", "configs/pendulum.yaml", "--episodes", "1", "--id", "pendulum/random-v0"]
    dataset_main(args)
    with pytest.raises(SystemExit, match="already exists"):
        dataset_main(args)
    dataset_main([*args, "--overwrite", "--seed", "3"])
    assert "1 episodes, 200 steps" in capsys.readouterr().out


def test_offline_fit_takes_no_env_step_and_its_checkpoint_names_the_dataset(tmp_path):
    _random_dataset("pendulum/random-v0", "Pendulum-v1", episodes=3)
    offline = ["--model.data=awr_modules.data.MinariDataset", "--model.data.init_args.dataset_id=pendulum/random-v0", "--model.targets.init_args.refresh_every=2"]
    cli = cli_main(["fit", *tiny_args(tmp_path, epochs=3, extra=offline)])
    assert cli.model.env_steps == 0 and cli.trainer.global_step == 3 * (3 + 3)
    state = load_checkpoint(checkpoint_dir(tmp_path) / "last.ckpt")["awr"]
    assert state["dataset"]["dataset_id"] == "pendulum/random-v0" and state["dataset"]["transitions"] == 600
    assert state["ranks"][0]["buffer"] is None  # the transitions are named, not copied
    normalizer = cli.model.critic.module[0]  # the networks' shared normaliser: the dataset's state moments
    rows, _ = read_minari_dataset("pendulum/random-v0", **PENDULUM)
    torch.testing.assert_close(normalizer.loc, rows["observation"].mean(0), rtol=1e-4, atol=1e-4)

    resumed = cli_main(["fit", *tiny_args(tmp_path, epochs=4, extra=offline), "--ckpt_path=last"])
    assert resumed.model.iteration == 4 and resumed.model.env_steps == 0


def test_a_checkpoint_is_refused_when_its_dataset_was_rewritten():
    saved = DatasetIdentity("pendulum/random-v0", "Pendulum-v1", 3, 600, "aaaa").as_dict()
    check_same_dataset(saved, DatasetIdentity("pendulum/random-v0", "Pendulum-v1", 3, 600, "aaaa"))
    check_same_dataset(saved, DatasetIdentity("pendulum/other-v0", "Pendulum-v1", 1, 200, "bbbb"))  # a new stage
    with pytest.raises(ValueError, match="rewritten"):
        check_same_dataset(saved, DatasetIdentity("pendulum/random-v0", "Pendulum-v1", 3, 600, "bbbb"))


@pytest.mark.parametrize("transitions", ["keep", "age_out"])
def test_offline_to_online_starts_from_the_offline_networks(tmp_path, transitions):
    _random_dataset("pendulum/random-v0", "Pendulum-v1", episodes=2)
    offline_dir, online_dir = tmp_path / "offline", tmp_path / "online"
    offline = cli_main(["fit", *tiny_args(offline_dir, epochs=2, extra=["--model.data=awr_modules.data.MinariDataset", "--model.data.init_args.dataset_id=pendulum/random-v0"])])
    weights = {k: v.clone() for k, v in offline.model.actor.state_dict().items()}

    data = "CollectedBesideDataset" if transitions == "keep" else "CollectedAfterDataset"
    online = cli_main(["fit", *tiny_args(online_dir, epochs=2, extra=[
        f"--model.data=awr_modules.data.{data}", "--model.data.init_args.dataset_id=pendulum/random-v0",
        "--model.data.init_args.frames_per_iteration=128",
        f"--model.init_from={checkpoint_dir(offline_dir) / 'last.ckpt'}",
        "--model.policy_phase.steps=0", "--model.value_phase.steps=0"])])  # no update: the actor must be the offline one
    for key, value in online.model.actor.state_dict().items():
        torch.testing.assert_close(value, weights[key])
    assert online.model.env_steps == 2 * 128
    stored = load_checkpoint(checkpoint_dir(online_dir) / "last.ckpt")["awr"]["ranks"][0]["buffer"]
    traj_ids = stored["_storage"]["_storage"]["collector.traj_ids"][: 2 * 128 + (400 if transitions == "age_out" else 0)]
    assert (traj_ids < 0).sum() == (400 if transitions == "age_out" else 0)  # dataset rows only where they age out


def test_a_runs_history_becomes_a_dataset_of_everything_it_collected(tmp_path):
    """Three iterations of 8 Pendulum envs x 16 steps recorded; the first two batches' 256 steps written: each env's
    32 steps are one episode (Pendulum's last 200), step for step what was collected, cut as truncated."""
    history = tmp_path / "history"
    cli_main(["fit", *tiny_args(tmp_path, epochs=3, extra=[
        "--trainer.callbacks+=awr_modules.replay_history.ReplayHistory",
        f"--trainer.callbacks.dirpath={history}"])])
    files = sorted(history.glob("batch_*.pt"))
    assert [path.name for path in files] == ["batch_000001.pt", "batch_000002.pt", "batch_000003.pt"]
    first, second = (torch.load(path, weights_only=False) for path in files[:2])
    assert first.shape == second.shape == (8, 16)
    for batch in (first, second):  # one trajectory per env across both batches
        assert torch.equal(batch["collector", "traj_ids"], torch.arange(8).unsqueeze(-1).expand(8, 16))
    recipe = ClassicControl("Pendulum-v1")
    dataset = write_history_dataset("pendulum/history-v0", history, recipe, up_to_env_steps=2 * 128)
    _, identity = read_minari_dataset("pendulum/history-v0", **PENDULUM)
    assert dataset.total_steps == identity.transitions == 2 * 128 and identity.episodes == 8

    episodes = list(dataset.iterate_episodes())
    for env, (episode, steps) in enumerate(zip(episodes, torch.cat([first, second], dim=1), strict=True)):
        assert episode.id == env
        assert torch.equal(steps["next", "observation"][:-1], steps["observation"][1:])  # consecutive steps
        observations = torch.cat([steps["observation"], steps["next", "observation"][-1:]])
        np.testing.assert_array_equal(episode.observations, observations.numpy())
        np.testing.assert_array_equal(episode.actions, (2.0 * steps["action"]).clamp(-2.0, 2.0).numpy())  # [-2, 2]
        np.testing.assert_array_equal(episode.rewards, steps["next", "reward"].reshape(-1).double().numpy())
        assert not episode.terminations.any()
        assert episode.truncations.tolist() == [False] * 31 + [True]  # still running where the history stops


def test_a_checkpoints_policy_writes_episodes_in_the_env_units(tmp_path):
    import gymnasium as gym

    cli = cli_main(["fit", *tiny_args(tmp_path, epochs=1)])
    recipe, actor = cli.model.recipe, cli.model.actor
    env = gym.make("Pendulum-v1")
    dataset = write_policy_dataset("pendulum/policy-v0", env, checkpoint_policy(actor, recipe, "deterministic"),
                                   steps=50, seed=0)
    episode = next(dataset.iterate_episodes())
    from tensordict import TensorDict
    from torchrl.envs import ExplorationType, set_exploration_type

    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        mode = actor(TensorDict({"observation": torch.as_tensor(episode.observations[:1])}, [1]))["action"]
    torch.testing.assert_close(torch.as_tensor(episode.actions[:1]), recipe.env_actions(mode).clamp(-2, 2))
    assert dataset.total_steps == 50


def _dataset_file(tmp_path, dataset_id: str):
    return tmp_path / "datasets" / dataset_id / "data" / "main_data.hdf5"


def test_the_fingerprint_depends_on_the_bytes_not_on_threads(tmp_path):
    _random_dataset("pendulum/random-v0", "Pendulum-v1", episodes=2)
    torch.set_num_threads(2)
    _, two_threads = read_minari_dataset("pendulum/random-v0", **PENDULUM)
    torch.set_num_threads(1)
    _, one_thread = read_minari_dataset("pendulum/random-v0", **PENDULUM)
    assert two_threads.fingerprint == one_thread.fingerprint
    assert (one_thread.episodes, one_thread.transitions) == (2, 400)

    fingerprints = {}
    for field, index in (("rewards", 7), ("observations", 150), ("actions", 199)):  # one number of one field
        with h5py.File(_dataset_file(tmp_path, "pendulum/random-v0"), "a") as file:
            values = file["episode_1"][field]
            original = values[index].copy()
            values[index] = original + 0.5
        _, changed = read_minari_dataset("pendulum/random-v0", **PENDULUM)
        assert (changed.episodes, changed.transitions) == (2, 400)  # the same counts: only the bytes tell
        fingerprints[field] = changed.fingerprint
        with pytest.raises(ValueError, match="rewritten"):  # a resume on the changed dataset is refused
            check_same_dataset(one_thread.as_dict(), changed)
        with h5py.File(_dataset_file(tmp_path, "pendulum/random-v0"), "a") as file:
            file["episode_1"][field][index] = original
    assert len({one_thread.fingerprint, *fingerprints.values()}) == 4
    _, restored = read_minari_dataset("pendulum/random-v0", **PENDULUM)
    assert restored.fingerprint == one_thread.fingerprint  # the same bytes again: the same fingerprint
    check_same_dataset(one_thread.as_dict(), restored)


def test_a_resume_on_a_dataset_rewritten_in_place_is_refused(tmp_path):
    """An offline run's checkpoint names its dataset; one reward changed under the same id (same counts) stops the
    resume with both fingerprints named; the original bytes back, the run resumes."""
    _random_dataset("pendulum/random-v0", "Pendulum-v1", episodes=2)
    offline = ["--model.data=awr_modules.data.MinariDataset", "--model.data.init_args.dataset_id=pendulum/random-v0"]
    cli_main(["fit", *tiny_args(tmp_path, epochs=1, extra=offline)])
    with h5py.File(_dataset_file(tmp_path, "pendulum/random-v0"), "a") as file:
        file["episode_1"]["rewards"][7] += 0.5
    with pytest.raises(ValueError, match="rewritten") as refused:
        cli_main(["fit", *tiny_args(tmp_path, epochs=2, extra=offline), "--ckpt_path=last"])
    counts = re.findall(r"(400) transitions \(fingerprint ([0-9a-f]{16})\).* holds (400) \(fingerprint ([0-9a-f]{16})\)",
                        str(refused.value))
    assert len(counts) == 1 and counts[0][1] != counts[0][3]  # the same counts, two fingerprints
    with h5py.File(_dataset_file(tmp_path, "pendulum/random-v0"), "a") as file:
        file["episode_1"]["rewards"][7] -= 0.5
    assert cli_main(["fit", *tiny_args(tmp_path, epochs=2, extra=offline), "--ckpt_path=last"]).model.iteration == 2


def test_the_seed_makes_every_written_episode_reproducible():
    """Episode k starts at gymnasium's ``reset(seed=seed + k)`` and its actions are the action space's draws from
    ``seed``: the same seed writes the same episodes, another seed others."""
    import gymnasium as gym

    first = _random_dataset("cartpole/a-v0", "CartPole-v1", episodes=3, seed=4)
    second = _random_dataset("cartpole/b-v0", "CartPole-v1", episodes=3, seed=4)
    other = _random_dataset("cartpole/c-v0", "CartPole-v1", episodes=3, seed=5)
    fields = ("observations", "actions", "rewards", "terminations", "truncations")
    for one, same in zip(first.iterate_episodes(), second.iterate_episodes(), strict=True):
        for field in fields:
            np.testing.assert_array_equal(getattr(one, field), getattr(same, field), err_msg=field)

    for seed, dataset in ((4, first), (5, other)):  # by hand
        env = gym.make("CartPole-v1")
        env.action_space.seed(seed)
        episodes = list(dataset.iterate_episodes())
        assert len(episodes) == 3
        for k, episode in enumerate(episodes):
            np.testing.assert_array_equal(episode.observations[0], env.reset(seed=seed + k)[0])
            np.testing.assert_array_equal(episode.actions, [env.action_space.sample() for _ in episode.actions])
            assert episode.terminations[-1] and not episode.terminations[:-1].any()  # random CartPole falls

    for one, different in zip(first.iterate_episodes(), other.iterate_episodes(), strict=True):
        assert not np.array_equal(one.observations[0], different.observations[0])


def test_age_out_keeps_the_newest_transitions_of_a_dataset_larger_than_the_buffer(tmp_path):
    _random_dataset("pendulum/random-v0", "Pendulum-v1", episodes=2)  # 400 transitions: ids -1, -2
    cli_main(["fit", *tiny_args(tmp_path, epochs=1, extra=[
        "--model.data=awr_modules.data.CollectedAfterDataset", "--model.data.init_args.dataset_id=pendulum/random-v0",
        "--model.data.init_args.frames_per_iteration=128", "--model.data.init_args.buffer_size=300"])])
    stored = load_checkpoint(checkpoint_dir(tmp_path) / "last.ckpt")["awr"]["ranks"][0]["buffer"]
    traj_ids = stored["_storage"]["_storage"]["collector.traj_ids"]
    # the dataset's newest 300 rows (100 of episode 0, all 200 of episode 1), then 128 collected ones over the oldest
    assert traj_ids[traj_ids < 0].unique().tolist() == [-2] and (traj_ids == -2).sum() == 300 - 128


def test_a_resumed_offline_to_online_run_needs_no_init_checkpoint(tmp_path):
    _random_dataset("pendulum/random-v0", "Pendulum-v1", episodes=1)
    offline_dir, online_dir = tmp_path / "offline", tmp_path / "online"
    cli_main(["fit", *tiny_args(offline_dir, epochs=1, extra=["--model.data=awr_modules.data.MinariDataset", "--model.data.init_args.dataset_id=pendulum/random-v0"])])
    start = tmp_path / "start.ckpt"
    start.write_bytes((checkpoint_dir(offline_dir) / "last.ckpt").read_bytes())
    online = tiny_args(online_dir, epochs=2, extra=[f"--model.init_from={start}"])
    cli_main(["fit", *online[:2], "--trainer.max_epochs=1", *online[3:]])
    start.unlink()  # the resume restores the run from its own checkpoint
    assert cli_main(["fit", *online, "--ckpt_path=last"]).model.iteration == 2


def test_a_resumed_runs_history_keeps_its_episodes_apart(tmp_path):
    history = tmp_path / "history"
    record = ["--trainer.callbacks+=awr_modules.replay_history.ReplayHistory", f"--trainer.callbacks.dirpath={history}"]
    cli_main(["fit", *tiny_args(tmp_path, epochs=2, extra=record)])
    cli_main(["fit", *tiny_args(tmp_path, epochs=4, extra=record), "--ckpt_path=last"])
    dataset = write_history_dataset("pendulum/history-v0", history, ClassicControl("Pendulum-v1"))
    assert dataset.total_steps == 4 * 128
    for episode in dataset.iterate_episodes():  # an end flag only at an episode's last step
        assert not (episode.terminations[:-1].any() or episode.truncations[:-1].any())


def test_memmap_rows_with_mapped_actions_and_target_columns(tmp_path):
    """Actions mapped to the actor's units episode by episode, zero target columns, the same identity."""
    _random_dataset("cartpole/random-v0", "CartPole-v1", episodes=2)
    recipe = ClassicControl("CartPole-v1")
    cartpole = {"env_id": "CartPole-v1", "observation_shape": (4,), "action_shape": ()}
    stored, identity = read_minari_dataset("cartpole/random-v0", **cartpole)
    mapped, same = read_minari_dataset("cartpole/random-v0", **cartpole, memmap_dir=tmp_path / "rows",
                                       policy_actions=recipe.policy_actions, extra_columns=("advantage",))
    assert mapped.is_memmap() and same.transitions == identity.transitions
    assert torch.equal(mapped["action"], recipe.policy_actions(stored["action"]))  # one-hot [N, 2]
    assert mapped["advantage"].shape == (stored.shape[0], 1) and not mapped["advantage"].any()
    assert torch.equal(mapped["next", "observation"], stored["next", "observation"])


class RecordDatasetTargets(pl.Callback):
    """The dataset buffer's stored targets at the end of fit, and whether its storage is memory-mapped."""

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        (buffer,) = module.awr.data.buffers  # offline: the dataset's rows are the one buffer
        self.memmap = buffer.storage._storage.is_memmap()
        self.targets = buffer.storage.get(torch.arange(len(buffer))).select(
            "state_value", "value_target", "advantage").clone()


def _recorded(cli) -> RecordDatasetTargets:
    (recorder,) = [callback for callback in cli.trainer.callbacks if isinstance(callback, RecordDatasetTargets)]
    return recorder


def test_a_memory_mapped_dataset_refreshed_in_chunks_trains_as_one_in_memory(tmp_path):
    """The same offline run with the dataset in memory-mapped files, refreshed 150 rows at a time: its storage is the
    files, its targets are those of the in-memory run, and it trains and resumes."""
    _random_dataset("pendulum/random-v0", "Pendulum-v1", episodes=3)  # 600 transitions
    offline = ["--model.data=awr_modules.data.MinariDataset", "--model.data.init_args.dataset_id=pendulum/random-v0", "--model.value_phase.steps=0",
               "--model.policy_phase.steps=0", f"--trainer.callbacks+={__name__}.RecordDatasetTargets"]
    memmap = [f"--model.data.init_args.memmap_dir={tmp_path / 'rows'}", "--model.targets.init_args.chunk_size=150"]
    in_memory = _recorded(cli_main(["fit", *tiny_args(tmp_path / "memory", epochs=1, extra=offline)]))
    on_disk = _recorded(cli_main(["fit", *tiny_args(tmp_path / "disk", epochs=1, extra=[*offline, *memmap])]))
    assert on_disk.memmap and not in_memory.memmap and (tmp_path / "rows" / "rank0").is_dir()
    expected, got = in_memory.targets, on_disk.targets
    for key in ("state_value", "value_target", "advantage"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)
    assert got["advantage"].std() > 0.5  # standardised over the dataset, not zero columns

    trains = ["--model.data=awr_modules.data.MinariDataset", "--model.data.init_args.dataset_id=pendulum/random-v0", *memmap]
    cli_main(["fit", *tiny_args(tmp_path / "train", epochs=2, extra=trains)])
    resumed = cli_main(["fit", *tiny_args(tmp_path / "train", epochs=3, extra=trains), "--ckpt_path=last"])
    assert resumed.model.iteration == 3


def test_a_memory_mapped_dataset_cannot_be_written_beside_the_fifo_buffer(tmp_path, capsys):
    """A kept dataset would be copied into memory for every phase: the part that keeps it has no memmap_dir, so the
    combination is refused by the config parser, naming the field."""
    with pytest.raises(SystemExit):
        cli_main([*tiny_args(tmp_path, extra=["--model.data=awr_modules.data.CollectedBesideDataset",
                                              "--model.data.init_args.dataset_id=pendulum/random-v0",
                                              "--model.data.init_args.memmap_dir=rows"]), "--trainer.logger=false"],
                 run=False)
    assert "memmap_dir" in capsys.readouterr().err


def test_online_phases_with_a_kept_dataset_draw_from_the_dataset_and_the_fifo_buffer(tmp_path, monkeypatch):
    """CollectedBesideDataset: every phase's minibatches are drawn uniformly from the dataset's 400 rows and the
    collected ones together, so both are sampled (each with about its share of the draws)."""
    import awr_modules.iteration as iteration_file

    _random_dataset("pendulum/random-v0", "Pendulum-v1", episodes=2)  # 400 rows, trajectory ids < 0
    draws, phase_inputs = [], iteration_file.phase_inputs

    def recorded(buffers, loss, steps, batch_size, **kwargs):
        inputs = phase_inputs(buffers, loss, steps, batch_size, **kwargs)
        draws.append(([len(buffer) for buffer in buffers], inputs[1].reshape(-1).clone()))
        return inputs

    monkeypatch.setattr(iteration_file, "phase_inputs", recorded)
    cli_main(["fit", *tiny_args(tmp_path, epochs=2, extra=[
        "--model.data=awr_modules.data.CollectedBesideDataset", "--model.data.init_args.dataset_id=pendulum/random-v0",
        "--model.data.init_args.frames_per_iteration=128", "--model.value_phase={steps: 20, batch_size: 32}",
        "--model.policy_phase={steps: 20, batch_size: 32}"])])
    assert [lengths for lengths, _ in draws] == [[400, 128], [400, 128], [400, 256], [400, 256]]
    for lengths, index in draws:
        from_dataset = (index < lengths[0]).double().mean()  # the dataset's rows come first
        share = lengths[0] / sum(lengths)
        assert (index >= 0).all() and (index < sum(lengths)).all()
        assert abs(float(from_dataset) - share) < 0.1  # 640 draws: the share's standard error is under 0.02
