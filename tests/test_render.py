"""Rendering a trained run to a video (train/render.py, scripts/render.sh).

A tiny MaMuJoCo run (one 100-step iteration) and a tiny SMAX 3m run (10 steps, no
evaluation) are trained in-process, then rendered: MaMuJoCo episodes are cut with
--max_steps (they last 1000 steps), SMAX 3m episodes are short and play to the end. The
SMAX test uses a JAX compilation cache in a temporary folder so that the rendering
environment reuses the training environment's compiled step (about 15 s less).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

imageio = pytest.importorskip("imageio.v2")

from train.render import main as render_main  # noqa: E402
from train.train import main as train_main  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
COMMON = ["--hidden_sizes", "16", "--ppo_epoch", "1", "--critic_epoch", "1", "--device", "cpu",
          "--torch_threads", "1", "--no-progress", "--no-tensorboard"]


def read_frames(path: Path) -> list[np.ndarray]:
    assert path.is_file() and path.stat().st_size > 0, path
    return list(imageio.mimread(path, memtest=False))


@pytest.fixture(scope="module")
def mujoco_run(tmp_path_factory) -> Path:
    pytest.importorskip("gymnasium_robotics")
    pytest.importorskip("mujoco")
    results = tmp_path_factory.mktemp("render-mujoco")
    rc = train_main([*COMMON, "--results_dir", str(results), "--n_rollout_threads", "2", "--episode_length", "50",
                     "--num_env_steps", "100", "--eval_episodes", "1", "--n_eval_rollout_threads", "1"])
    assert rc == 0
    return results / "mamujoco" / "HalfCheetah-2x3" / "happo" / "default" / "seed-1"


@pytest.mark.slow
def test_mamujoco_mp4(mujoco_run, capsys):
    rc = render_main([str(mujoco_run), "--max_steps", "12", "--episodes", "2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    video = mujoco_run / "video.mp4"  # the default output
    frames = read_frames(video)
    assert len(frames) == 1 + 12 + 12  # first state + every step (the 2nd episode's first state is cut)
    assert frames[0].shape == (480, 480, 3) and frames[0].std() > 0
    assert not np.array_equal(frames[1], frames[-1])
    assert "episode 1: return" in out and "episode 2: return" in out and "eval_return" in out
    assert f"wrote {video} (25 frames" in out


@pytest.mark.slow
def test_mamujoco_gif_resized_through_the_script(mujoco_run, tmp_path):
    out = tmp_path / "clip" / "cheetah.gif"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "render.sh"), str(mujoco_run), "--max_steps", "5",
                           "--out", str(out), "--width", "96", "--fps", "10"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    frames = read_frames(out)
    assert len(frames) > 1 and frames[0].shape[:2] == (96, 96)
    assert f"wrote {out}" in proc.stdout and "episode 1: return" in proc.stdout


def test_a_fast_gif_keeps_every_kth_frame_at_a_delay_viewers_honour(tmp_path):
    """Hopper renders at 125 fps: 8 ms per frame was stored as a GIF delay of 0 (viewers play
    that at 10 fps). Every 3rd frame is kept, at 20 ms (50 fps)."""
    from PIL import Image

    from train.render import FrameWriter

    out = tmp_path / "fast.gif"
    writer = FrameWriter(out, 125, 0, 0)
    for k in range(9):
        writer.append(np.full((8, 8, 3), 20 * k, np.uint8))
    writer.close(keep=True)
    assert writer.fps == 50 and writer.count == 3
    with Image.open(out) as gif:
        assert gif.n_frames == 3 and gif.info["duration"] == 20
    slow = FrameWriter(tmp_path / "slow.gif", 20, 0, 0)
    assert slow.stride == 1 and slow.fps == 20


def test_default_output_beside_the_run_or_the_checkpoint_file(tmp_path):
    """A copied checkpoint (/x/ck/run1.pt) gets /x/ck/run1.mp4, not a video in /x."""
    from train.render import default_output

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").touch()
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "run1.pt").touch()
    assert default_output(run) == run / "video.mp4"
    assert default_output(run / "checkpoints" / "last.pt") == run / "video.mp4"
    assert default_output(tmp_path / "ck" / "run1.pt") == tmp_path / "ck" / "run1.mp4"


@pytest.mark.slow
def test_bad_input_is_one_line(mujoco_run, tmp_path, capsys):
    cases = [([str(tmp_path / "nowhere")], "no such run directory"),
             ([str(tmp_path)], "no checkpoint at"),
             ([str(mujoco_run), "--out", str(tmp_path / "x.avi")], "must be .mp4 or .gif"),
             ([str(mujoco_run), "--episodes", "0"], "--episodes must be a positive integer"),
             ([str(mujoco_run), "--seed", "-1"], "--seed must be in [0, 2**32 - 1]")]
    for argv, message in cases:
        assert render_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_unwritable_out_is_refused_before_any_episode(mujoco_run, tmp_path, capsys, monkeypatch):
    import runners.evaluate

    def played(*args, **kwargs):
        raise AssertionError("an episode was played before --out was checked")

    monkeypatch.setattr(runners.evaluate, "evaluate", played)
    blocker = tmp_path / "a-file"
    blocker.write_text("keep\n")
    for out, message in [("/proc/x.gif", "cannot write"), (blocker / "x.gif", "is a file"),
                         (blocker / "sub" / "x.mp4", "is a file")]:
        assert render_main([str(mujoco_run), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out}") and err.count("\n") == 1 and message in err, err
    assert blocker.read_text() == "keep\n" and [p.name for p in tmp_path.iterdir()] == ["a-file"]


@pytest.fixture(scope="module")
def jaxmarl():
    """Imported before the test's capsys starts: importing jaxmarl (its mabrax module)
    sets sys.stdout / sys.stderr back to sys.__stdout__ / sys.__stderr__, which would
    take the output away from capsys."""
    return pytest.importorskip("jaxmarl")


@pytest.fixture
def jax_compile_cache(tmp_path):
    """A persistent JAX compilation cache for this test only (restored afterwards)."""
    jax = pytest.importorskip("jax")
    try:
        from jax._src.compilation_cache import reset_cache
    except ImportError:  # another JAX layout: run without the cache (slower)
        yield
        return
    names = {"jax_compilation_cache_dir": str(tmp_path / "jax-cache"),
             "jax_persistent_cache_min_compile_time_secs": 0,
             "jax_persistent_cache_min_entry_size_bytes": 0}
    old = {name: getattr(jax.config, name) for name in names}
    for name, value in names.items():
        jax.config.update(name, value)
    reset_cache()
    try:
        yield
    finally:
        for name, value in old.items():
            jax.config.update(name, value)
        reset_cache()


@pytest.mark.slow
def test_smax_3m_gif(jaxmarl, jax_compile_cache, tmp_path, capsys):
    rc = train_main([*COMMON, "--env", "smax", "--map_name", "3m", "--results_dir", str(tmp_path),
                     "--n_rollout_threads", "1", "--episode_length", "10", "--num_env_steps", "10",
                     "--no-use_eval"])
    assert rc == 0
    run = tmp_path / "smax" / "3m" / "happo" / "default" / "seed-1"
    out = tmp_path / "battle.gif"
    rc = render_main([str(run), "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    frames = read_frames(out)
    assert len(frames) > 1 and frames[0].shape == (320, 320, 3)
    assert "episode 1: return" in printed and "win_rate" in printed and f"wrote {out}" in printed
    assert os.path.getsize(out) > 0
