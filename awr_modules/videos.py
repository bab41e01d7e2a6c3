"""``EvaluationVideos``: a Lightning callback that films the deterministic policy after evaluations.

    awr fit -c configs/pendulum.yaml --trainer.callbacks+=awr_modules.videos.EvaluationVideos
    # or in YAML, under trainer:
    #   callbacks:
    #     - class_path: awr_modules.videos.EvaluationVideos
    #       init_args: {every_n_evaluations: 2}

After every ``every_n_evaluations``-th evaluation, rank 0 plays one episode of the policy's
deterministic action (:meth:`~awr_recipes.gym_recipe.GymRecipe.deterministic_policy`, the action evaluation
takes) in the gymnasium env with ``render_mode="rgb_array"``, writes it as a GIF to ``dirpath``
(default ``<log dir>/videos``), and hands it to every logger whose experiment has ``add_video``
(TensorBoard; encoding needs ``moviepy``, the ``video`` extra). Rendering is headless: classic control
and Box2D draw with pygame into an off-screen surface, under SDL's ``dummy`` video and audio drivers
(:func:`headless_sdl`; otherwise SDL probes Wayland and X11 at every ``pygame.display.init()``, once per
GIF, and prints ``error: XDG_RUNTIME_DIR is invalid or not set`` where there is no desktop session);
MuJoCo needs an OpenGL backend, ``MUJOCO_GL=egl`` (system package ``libegl1``) or ``MUJOCO_GL=osmesa``
(``libosmesa6``). An episode is played in the training process, so a long one
(HalfCheetah: 1,000 steps, about 10 s) costs that much per filmed evaluation.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import gymnasium as gym
import imageio.v2 as imageio
import lightning.pytorch as pl
import numpy as np
import torch

from awr_modules.environment import environment_variable

SDL_HEADLESS = {"SDL_VIDEODRIVER": "dummy", "SDL_AUDIODRIVER": "dummy"}


@contextmanager
def headless_sdl() -> Iterator[None]:
    """SDL's ``dummy`` video and audio drivers for the block, where the user has not chosen drivers.

    ``rgb_array`` rendering draws into a ``pygame.Surface`` and needs no window or sound, but
    ``pygame.display.init()`` (which gymnasium's classic-control ``render`` calls) still probes the
    desktop drivers; the dummy ones need nothing. Variables already set are kept; all are restored after.
    """
    with ExitStack() as stack:
        for name, value in SDL_HEADLESS.items():
            stack.enter_context(environment_variable(name, os.environ.get(name, value)))
        yield


def record_episode(recipe, actor: torch.nn.Module, *, seed: int = 0, max_steps: int | None = None,
                   every_n_frames: int = 1, downsample: int = 1) -> np.ndarray:
    """Frames ``[T, H, W, 3]`` (uint8) of one deterministic episode of ``actor`` in ``recipe``'s env (headless)."""
    policy = recipe.deterministic_policy(copy.deepcopy(actor).cpu()).eval()
    with headless_sdl():
        return _play(policy, recipe, seed, max_steps, every_n_frames)[:, ::downsample, ::downsample]


def _play(policy: torch.nn.Module, recipe, seed: int, max_steps: int | None, every_n_frames: int) -> np.ndarray:
    """Step the gymnasium env with ``policy`` from ``reset(seed)``, rendering every ``every_n_frames``-th frame."""
    env = gym.make(recipe.env_id, render_mode="rgb_array", **getattr(recipe, "env_kwargs", {}))
    observation, _ = env.reset(seed=seed)
    frames, step, done = [env.render()], 0, False
    while not done and (max_steps is None or step < max_steps):
        with torch.no_grad():
            action = policy(torch.as_tensor(observation, dtype=torch.float32)[None])[0].numpy()
        observation, _, terminated, truncated, _ = env.step(action)
        step, done = step + 1, terminated or truncated
        if step % every_n_frames == 0:
            frames.append(env.render())
    env.close()
    return np.stack(frames)


class EvaluationVideos(pl.Callback):
    """Films one deterministic episode after every ``every_n_evaluations``-th evaluation (see the module doc).

    Args:
        dirpath: folder of the GIFs (default ``<trainer.log_dir>/videos``).
        every_n_evaluations: film one evaluation in this many.
        fps: frame rate of the GIF and of the logged video.
        seed: the filmed episode's reset seed (the same start each time, so videos compare).
        max_steps: stop the episode after this many steps (default: the env's own end).
        every_n_frames: keep one rendered frame in this many steps.
        downsample: keep one pixel in this many along each side.
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, every_n_evaluations: int = 1, fps: int = 30,
                 seed: int = 0, max_steps: int | None = None, every_n_frames: int = 1, downsample: int = 1) -> None:
        if min(every_n_evaluations, fps, every_n_frames, downsample) < 1:
            raise ValueError("EvaluationVideos: every_n_evaluations, fps, every_n_frames and downsample must be >= 1.")
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.every_n_evaluations, self.fps, self.seed = every_n_evaluations, fps, seed
        self.max_steps, self.every_n_frames, self.downsample = max_steps, every_n_frames, downsample
        self.evaluations = 0

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != "fit":
            return
        self.evaluations += 1
        if (self.evaluations - 1) % self.every_n_evaluations:
            return
        frames = record_episode(pl_module.recipe, pl_module.actor, seed=self.seed, max_steps=self.max_steps,
                                every_n_frames=self.every_n_frames, downsample=self.downsample)
        folder = self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "videos"
        folder.mkdir(parents=True, exist_ok=True)
        imageio.mimsave(folder / f"eval_step{trainer.global_step}.gif", list(frames), duration=1000 / self.fps, loop=0)
        video = torch.from_numpy(frames).permute(0, 3, 1, 2).unsqueeze(0)  # [1, T, C, H, W]
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_video"):
                experiment.add_video("eval/video", video, trainer.global_step, fps=self.fps)
