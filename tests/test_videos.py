"""``EvaluationVideos``: evaluation episodes filmed headless into the run folder and to TensorBoard."""

from __future__ import annotations

import imageio.v2 as imageio
from lightning_helpers import tiny_args

from awr_modules.cli import cli_main


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
