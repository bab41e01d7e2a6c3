"""``EvaluationVideos``: evaluation episodes filmed headless into the run folder and to TensorBoard, without
display errors on stderr."""

from __future__ import annotations

import os

import imageio.v2 as imageio
import numpy as np
from lightning_helpers import tiny_args

from awr_modules.cli import cli_main
from awr_modules.videos import record_episode
from awr_recipes.classic_control import ClassicControl


def test_evaluations_are_filmed_into_the_run_folder_and_tensorboard(tmp_path):
    videos = tmp_path / "videos"
    cli_main(["fit", *tiny_args(tmp_path, epochs=2, extra=[
        "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'tb'}",
        "--trainer.callbacks+=awr_modules.videos.EvaluationVideos",
        f"--trainer.callbacks.dirpath={videos}", "--trainer.callbacks.every_n_evaluations=2",
        "--trainer.callbacks.every_n_frames=4", "--trainer.callbacks.downsample=5"])])
    gifs = sorted(videos.glob("eval_step*.gif"))
    assert len(gifs) == 1  # two evaluations, one filmed
    frames = imageio.mimread(gifs[0])
    assert len(frames) == 1 + 200 // 4 and frames[0].shape[:2] == (100, 100)  # Pendulum: 200 steps, 500 px
    events = b"".join(path.read_bytes() for path in (tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert b"eval/video" in events and b"GIF89a" in events  # tensorboard's video summary is a GIF


def test_filming_headless_prints_no_display_error_and_leaves_the_environment_as_it_was(monkeypatch, capfd):
    """SDL, probing desktop video drivers at each ``pygame.display.init()`` (once per GIF), printed ``error:
    XDG_RUNTIME_DIR is invalid or not set`` where there is no desktop session; filming uses SDL's dummy drivers."""
    for name in ("XDG_RUNTIME_DIR", "SDL_VIDEODRIVER", "SDL_AUDIODRIVER", "WAYLAND_DISPLAY", "DISPLAY"):
        monkeypatch.delenv(name, raising=False)
    recipe = ClassicControl("Pendulum-v1", hidden_sizes=[8])
    actor, _ = recipe.make_networks(recipe.make_env(0))
    for _ in range(2):  # two GIFs: each closes pygame's display and opens it again
        frames = record_episode(recipe, actor, max_steps=2)
        assert frames.shape == (3, 500, 500, 3) and frames.std() > 0  # a drawn pendulum, not a blank surface
    captured = capfd.readouterr()  # the file descriptors: SDL writes from C
    assert "XDG_RUNTIME_DIR" not in captured.err + captured.out
    assert "SDL_VIDEODRIVER" not in os.environ and "SDL_AUDIODRIVER" not in os.environ


def test_a_users_sdl_driver_is_kept_while_filming(monkeypatch):
    monkeypatch.setenv("SDL_VIDEODRIVER", "offscreen")
    seen = {}

    def play(*args):
        seen.update({name: os.environ.get(name) for name in ("SDL_VIDEODRIVER", "SDL_AUDIODRIVER")})
        return np.zeros((1, 4, 4, 3), dtype=np.uint8)

    monkeypatch.setattr("awr_modules.videos._play", play)
    recipe = ClassicControl("Pendulum-v1", hidden_sizes=[8])
    record_episode(recipe, recipe.make_networks(recipe.make_env(0))[0])
    assert seen == {"SDL_VIDEODRIVER": "offscreen", "SDL_AUDIODRIVER": "dummy"}
    assert os.environ["SDL_VIDEODRIVER"] == "offscreen" and "SDL_AUDIODRIVER" not in os.environ
