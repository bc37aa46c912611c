"""Render a trained run to a video: ``python -m train.render <run dir> [options]``
(or ``bash scripts/render.sh <run dir> [options]``).

Loads ``<run dir>/checkpoints/last.pt`` (a checkpoint file works too), rebuilds the task
with one rendering environment, plays ``--episodes`` deterministic episodes (the policy's
greedy actions, as in evaluation) and writes the frames to ``--out`` (default
``<run dir>/video.mp4``; for a checkpoint file outside a run's ``checkpoints/`` folder,
the file's name with ``.mp4``): MP4 via imageio-ffmpeg or GIF, chosen by the extension. Prints
each episode's return and the output path.

``--max_steps N`` cuts every episode after N steps (MaMuJoCo episodes last 1000 steps);
a cut episode's return is the return of its first N steps (and it counts as not won).
MaMuJoCo renders off-screen with ``MUJOCO_GL=egl`` unless MUJOCO_GL is already set.
Bad input (no such run directory, no checkpoint, an unknown extension, an ``--out`` that
cannot be written) exits with status 2 and one line on stderr, before any episode is played.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports mujoco

import numpy as np  # noqa: E402

from envs.registry import make_vec_env  # noqa: E402
from train.config import ConfigError, config_from_dict  # noqa: E402
from utils.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from utils.errors import ArgumentParser  # noqa: E402

FORMATS = (".mp4", ".gif")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m train.render",
                description="Render deterministic episodes of a trained run to an MP4 or GIF.")
    p.add_argument("run_dir", help="run directory (or a checkpoint file)")
    p.add_argument("--episodes", type=int, default=1, help="episodes to play (default 1)")
    p.add_argument("--out", default="", help="output file, .mp4 or .gif (default <run dir>/video.mp4)")
    p.add_argument("--fps", type=int, default=0,
                   help="frames per second (default: the environment's own, else 30)")
    p.add_argument("--width", type=int, default=0, help="frame width in pixels (default: as rendered)")
    p.add_argument("--height", type=int, default=0, help="frame height in pixels (default: as rendered)")
    p.add_argument("--max_steps", "--max-steps", dest="max_steps", type=int, default=0,
                   help="cut every episode after this many steps (0 = play episodes to the end)")
    p.add_argument("--seed", type=int, default=None, help="environment seed (default: the run's evaluation seed)")
    p.add_argument("--device", default="cpu", help="device for the policy (default cpu)")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for name in ("episodes",):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name} must be a positive integer; got {getattr(args, name)}")
    for name in ("fps", "width", "height", "max_steps"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} must be >= 0; got {getattr(args, name)}")
    if args.seed is not None and not 0 <= args.seed < 2**32:  # as training checks --seed
        raise ConfigError(f"--seed must be in [0, 2**32 - 1]; got {args.seed}")
    return args


def default_output(source: Path) -> Path:
    """<run>/video.mp4 for a run directory or its <run>/checkpoints/*.pt; else <file>.mp4
    (a copied checkpoint's grandparent is no run of its own)."""
    if source.is_dir():
        return source / "video.mp4"
    if source.parent.name == "checkpoints":
        return source.parent.parent / "video.mp4"
    return source.with_suffix(".mp4")


def output_path(args: argparse.Namespace, source: Path) -> Path:
    out = Path(args.out) if args.out else default_output(source)
    if out.suffix.lower() not in FORMATS:
        raise ConfigError(f"--out {out}: the extension must be .mp4 or .gif")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory")
    check_writable(out)
    return out


def check_writable(out: Path) -> None:
    """Write (and delete) a probe beside ``out`` now: an unwritable ``--out`` found only after
    all the episodes were played wastes them. Folders made for the probe are removed again."""
    existing = next(d for d in (out.parent, *out.parent.parents) if d.exists())
    if not existing.is_dir():
        raise ConfigError(f"--out {out}: {existing} is a file, not a directory")
    created = [d for d in (out.parent, *out.parent.parents) if not d.exists()]  # deepest first
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = FrameWriter.temp_path(out)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write in {out.parent} ({exc.strerror})") from None
    finally:
        for d in created:
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()


class EpisodeRecorder:
    """Wraps a 1-env VecEnv: records every finished episode, optionally cuts episodes.

    A cut (``max_steps``) ends the episode as a time limit would (``truncated``, a
    ``completed`` record with the return so far) and starts the next one from a fresh
    reset; the frame drawn after that step is the cut episode's last state. After an
    episode ends by itself the env has already auto-reset, so the frame drawn after the
    last wanted episode (the next episode's first state) is dropped (``render`` -> None).
    """

    def __init__(self, env, max_steps: int, n_episodes: int):
        if env.n_envs != 1:
            raise ValueError("EpisodeRecorder wraps a single environment")
        self.env, self.spec, self.n_envs = env, env.spec, 1
        self.max_steps, self.n_episodes = max_steps, n_episodes
        self.episodes: list[dict] = []
        self._length, self._return, self._seed, self._resets = 0, 0.0, 0, 0
        self._last_frame = None  # the final state of a cut episode, drawn before its reset

    def reset(self, seed: int):
        self._seed, self._length, self._return = int(seed), 0, 0.0
        return self.env.reset(seed)

    def step(self, actions):
        step = self.env.step(actions)
        self._length += 1
        self._return += float(step.reward[0])
        if step.completed:
            self.episodes.extend(dict(record) for record in step.completed)
            self._length, self._return = 0, 0.0
            return step
        if self.max_steps and self._length >= self.max_steps:
            record = {"env": 0, "return": self._return, "length": self._length, "cut": True,
                      **{metric: 0.0 for metric in self.spec.episode_metrics}}
            self.episodes.append(record)
            self._last_frame = render_frame(self.env)
            self._resets += 1
            self._length, self._return = 0, 0.0
            fresh = self.env.reset(self._seed + 7919 * self._resets)
            fresh.truncated = np.ones(1, bool)
            fresh.completed = [record]
            return fresh
        return step

    def render(self, env_index: int = 0):
        if self._last_frame is not None:
            frame, self._last_frame = self._last_frame, None
            return frame
        if len(self.episodes) >= self.n_episodes:
            return None
        return render_frame(self.env)

    def close(self) -> None:
        self.env.close()


def render_frame(env) -> np.ndarray:
    try:
        return env.render(0)
    except Exception as exc:
        # MaMuJoCoVecEnv.render goes through gymnasium's OrderEnforcing wrapper, which never
        # sees the reset (the vec env resets the unwrapped env) and raises ResetNeeded.
        raw = getattr(env, "_raw", None)
        if type(exc).__name__ == "ResetNeeded" and raw:
            return raw[0].render()
        raise


GIF_MAX_FPS = 50  # GIF delays are whole hundredths of a second; viewers slow any under 2 to 10


class FrameWriter:
    """Streams frames into an MP4 (imageio-ffmpeg) or a GIF; written atomically on close.

    A GIF faster than ``GIF_MAX_FPS`` (MuJoCo's Hopper renders at 125 fps) keeps every
    ``stride``-th frame and plays at the nearest whole-hundredth delay; ``fps`` is then the
    rate written (a delay of 0.8 hundredths was stored as 0, which viewers play at 10 fps).
    """

    def __init__(self, path: Path, fps: int, width: int, height: int):
        self.path, self.width, self.height = path, width, height
        self.stride = 1
        self.fps: float = fps
        if path.suffix.lower() == ".gif":
            self.stride = max(1, math.ceil(fps / GIF_MAX_FPS))
            self.fps = 100 / max(2, round(100 * self.stride / fps))
        self._offered = 0  # frames passed to append (every stride-th is kept)
        self.tmp = self.temp_path(path)
        self.writer = None
        self.count = 0
        self.size: tuple[int, int] | None = None

    @staticmethod
    def temp_path(path: Path) -> Path:
        return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")

    def _target_size(self, frame: np.ndarray) -> tuple[int, int]:
        h, w = frame.shape[:2]
        if self.width and self.height:
            w, h = self.width, self.height
        elif self.width:
            w, h = self.width, max(1, round(h * self.width / w))
        elif self.height:
            w, h = max(1, round(w * self.height / h)), self.height
        if self.path.suffix.lower() == ".mp4":  # H.264 with yuv420p needs even sizes
            w, h = w + w % 2, h + h % 2
        return w, h

    def append(self, frame) -> None:
        if frame is None:
            return
        self._offered += 1
        if (self._offered - 1) % self.stride:
            return
        import imageio.v2 as imageio

        frame = np.asarray(frame)
        if frame.ndim == 2:
            frame = np.repeat(frame[:, :, None], 3, axis=2)
        frame = np.ascontiguousarray(frame[:, :, :3]).astype(np.uint8, copy=False)
        if self.size is None:
            self.size = self._target_size(frame)
        if frame.shape[1::-1] != self.size:
            from PIL import Image

            frame = np.asarray(Image.fromarray(frame).resize(self.size, Image.BILINEAR))
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.suffix.lower() == ".mp4":
                self.writer = imageio.get_writer(self.tmp, format="FFMPEG", mode="I", fps=self.fps,
                                                 codec="libx264", quality=7, macro_block_size=2)
            else:
                self.writer = imageio.get_writer(self.tmp, format="GIF", mode="I",
                                                 duration=1000.0 / self.fps, loop=0)
        if self.count == 0:  # the first frame starts ffmpeg; JAX (SMAX) warns about any fork
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
                self.writer.append_data(frame)
        else:
            self.writer.append_data(frame)
        self.count += 1

    def close(self, keep: bool) -> None:
        if self.writer is not None:
            self.writer.close()
        if keep and self.count:
            os.replace(self.tmp, self.path)
        else:
            try:
                self.tmp.unlink()
            except FileNotFoundError:
                pass


def default_fps(env) -> int:
    """The environment's real-time frame rate if it reports one (MuJoCo: 1 / dt)."""
    raw = getattr(env, "_raw", None)
    if raw:
        fps = raw[0].metadata.get("render_fps")
        if fps:
            return int(round(fps))
    return 30


def render(argv: list[str]) -> int:
    args = parse_args(argv)
    # torch, and the modules that import it, load once the arguments are read: --help and
    # a bad flag answer without the second or two it takes.
    import torch

    from runners.evaluate import eval_seed, evaluate, policy_from_checkpoint
    from utils.device import resolve_device, set_threads

    source = Path(args.run_dir)
    if not source.exists():
        raise ConfigError(f"{source}: no such run directory")
    try:
        checkpoint = load_checkpoint(source)
    except CheckpointError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    out = output_path(args, source)
    config = config_from_dict(checkpoint["config"], f"{source} (saved config)")
    set_threads(config.torch_threads)
    device = resolve_device(args.device)
    iteration = checkpoint.get("counters", {}).get("iteration", 0)
    seed = args.seed if args.seed is not None else eval_seed(config, iteration)  # as --eval_only
    env = make_vec_env(config, n_envs=1, seed=seed, evaluation=True, render_mode="rgb_array")
    recorder = EpisodeRecorder(env, args.max_steps, args.episodes)
    writer = FrameWriter(out, args.fps or default_fps(env), args.width, args.height)
    ok = False
    try:
        algo = policy_from_checkpoint(checkpoint, config, env.spec, device)
        torch.manual_seed(config.seed)
        try:
            result = evaluate(algo, recorder, args.episodes, seed=seed, on_frame=writer.append)
        except NotImplementedError as exc:  # a family that cannot draw frames
            raise ConfigError(f"cannot render {env.spec.name}: {exc}") from None
        ok = writer.count > 0
    finally:
        writer.close(keep=ok)
        recorder.close()
    env_steps = checkpoint.get("counters", {}).get("env_steps")
    print(f"{config.algo} on {env.spec.name}, checkpoint at {env_steps} env steps:")
    for k, ep in enumerate(recorder.episodes[:args.episodes], 1):
        extra = "".join(f", {m} {ep[m]:.3g}" for m in env.spec.episode_metrics)
        cut = f" (cut at --max_steps {args.max_steps})" if ep.get("cut") else ""
        print(f"  episode {k}: return {ep['return']:.4g} over {ep['length']} steps{extra}{cut}")
    metrics = "".join(f"  eval_{m} {result[f'eval_{m}']:.3g}" for m in env.spec.episode_metrics)
    print(f"eval_return {result['eval_return']:.4g} (std {result['eval_return_std']:.3g}){metrics}")
    if not ok:
        raise ConfigError("no frames were rendered")
    w, h = writer.size
    print(f"wrote {out} ({writer.count} frames, {w}x{h}, {writer.fps:g} fps)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return render(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
