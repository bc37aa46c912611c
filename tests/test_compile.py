"""``--compile``: the compiled actor loss against the plain one, a compiled training run, and
the fall-back when compiling fails.

The rest of the suite runs with compiling switched off (tests/conftest.py); the fixture
``compiling`` switches it back on. Each distinct graph costs a few seconds to compile.
"""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from algorithms.base import MaybeCompiled, compile_failure
from algorithms.happo import minibatch_loss
from algorithms.networks import Actor
from envs.base import AgentSpec
from train.config import Config, load_config

B = 256  # mini-batch size of the loss checks


@pytest.fixture(scope="module")
def toolchain():
    """Skip where torch.compile cannot build CPU kernels at all (no C++ compiler or Python
    headers): a property of the machine, checked on a function of its own."""
    with torch._dynamo.config.patch(disable=False):
        try:
            torch.compile(lambda x: (x.relu() + 1.0).sum(), dynamic=False)(torch.randn(8))
        except Exception as exc:  # noqa: BLE001
            pytest.skip(f"torch.compile cannot build kernels on this machine: {compile_failure(exc)}")
        finally:
            torch._dynamo.reset()


@pytest.fixture
def compiling(toolchain):
    with torch._dynamo.config.patch(disable=False):
        torch._dynamo.reset()
        counters.clear()
        yield
        torch._dynamo.reset()


def loss_inputs(spec: AgentSpec, seed: int = 0) -> tuple:
    """One mini-batch [1, B, ...] for ``minibatch_loss``, with inactive samples and (discrete)
    unavailable actions."""
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(1, B, spec.obs_dim, generator=g)
    if spec.action_kind == "discrete":
        avail = torch.rand(1, B, spec.action_dim, generator=g) > 0.3
        avail[..., 0] = True
        actions = (torch.rand(1, B, spec.action_dim, generator=g) * avail).argmax(-1)
    else:
        avail = None
        actions = torch.randn(1, B, spec.action_dim, generator=g)
    old_log_probs = torch.randn(1, B, generator=g) - 1.5
    advantages = torch.randn(1, B, generator=g)
    M = torch.rand(1, B, generator=g) + 0.5
    active = torch.rand(1, B, generator=g) > 0.2
    return obs, actions, None, None, avail, old_log_probs, advantages, M, active, 0.2, 0.01


def loss_and_grads(loss_fn, actor, inputs) -> tuple[torch.Tensor, dict, list[torch.Tensor]]:
    actor.zero_grad(set_to_none=True)
    loss, info = loss_fn(actor, *inputs)
    loss.backward()
    return loss.detach(), info, [p.grad.clone() for p in actor.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_compiled_loss_and_gradients_match_the_plain_ones(compiling, kind):
    spec = AgentSpec(12, kind, 5)
    torch.manual_seed(0)
    actor = Actor(spec, Config(hidden_sizes=[32, 32]))
    inputs = loss_inputs(spec)
    compiled = MaybeCompiled(minibatch_loss, enabled=True)
    plain_loss, plain_info, plain_grads = loss_and_grads(minibatch_loss, actor, inputs)
    for _ in range(2):  # the second call runs the cached graph
        loss, info, grads = loss_and_grads(compiled, actor, inputs)
        torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
        for key in plain_info:
            torch.testing.assert_close(info[key], plain_info[key], rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, plain_grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert compiled.compiled is not None  # no fall-back happened
    assert counters["stats"]["unique_graphs"] == 1  # compiled once, then reused


@pytest.mark.slow
def test_compiled_training_runs_repeat_and_resume_exactly(compiling, tmp_path, capsys):
    """Short HAPPO runs on MaMuJoCo HalfCheetah 2x3 with --compile: the same seed twice gives
    the same metrics, and so does a run stopped after 2 of its 3 iterations and resumed; no
    fall-back warning (the compiled path really ran)."""
    pytest.importorskip("gymnasium_robotics")
    from train.train import main

    flags = ["--env", "mamujoco", "--scenario", "HalfCheetah", "--agent_conf", "2x3", "--algo", "happo",
             "--n_rollout_threads", "2", "--episode_length", "50", "--hidden_sizes", "16,16",
             "--ppo_epoch", "2", "--actor_num_mini_batch", "2", "--critic_epoch", "1",
             "--no-use_eval", "--log_interval", "1", "--save_interval", "1", "--device", "cpu",
             "--torch_threads", "1", "--no-progress", "--no-tensorboard", "--compile"]

    def trained(results: Path) -> list[dict[str, str]]:
        run = results / "mamujoco" / "HalfCheetah-2x3" / "happo" / "default" / "seed-1"
        with open(run / "metrics.csv", newline="") as fh:
            return [{k: v for k, v in r.items() if k.startswith(("env_steps", "agent", "critic", "train_"))}
                    for r in csv.DictReader(fh)]

    for name in ("a", "b"):
        assert main([*flags, "--num_env_steps", "300", "--results_dir", str(tmp_path / name)]) == 0
    assert main([*flags, "--num_env_steps", "200", "--results_dir", str(tmp_path / "c")]) == 0
    run_c = tmp_path / "c" / "mamujoco" / "HalfCheetah-2x3" / "happo" / "default" / "seed-1"
    assert main(["--resume", str(run_c), "--num_env_steps", "300", "--no-progress"]) == 0
    assert "torch.compile failed" not in capsys.readouterr().err
    assert counters["stats"]["unique_graphs"] >= 1
    a = trained(tmp_path / "a")
    assert len(a) == 3 and a == trained(tmp_path / "b") == trained(tmp_path / "c")


@pytest.mark.slow
def test_a_failure_compiling_the_backward_falls_back_too(compiling, monkeypatch, capsys):
    """AOT autograd compiles the backward graph at the first backward() unless told to
    compile it with the forward; a compiler failure there escaped the fall-back (the run
    stopped in its first update)."""
    import torch._functorch.config
    import torch._inductor.compile_fx as compile_fx
    import torch._inductor.config

    real_compile_fx, real_inner = compile_fx.compile_fx, compile_fx.compile_fx_inner

    def inner(gm, example_inputs, **kwargs):
        if kwargs.get("is_backward"):
            raise RuntimeError("simulated C++ compiler failure on the backward graph")
        return real_inner(gm, example_inputs, **kwargs)

    monkeypatch.setattr(compile_fx, "compile_fx",
                        lambda gm, example_inputs, **kw: real_compile_fx(gm, example_inputs, inner_compile=inner, **kw))
    monkeypatch.setattr(MaybeCompiled, "fell_back", False)
    spec = AgentSpec(7, "discrete", 4)
    torch.manual_seed(0)
    actor = Actor(spec, Config(hidden_sizes=[8]))
    inputs = loss_inputs(spec, seed=3)
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        compiled = MaybeCompiled(minibatch_loss, enabled=True)
        loss, _, grads = loss_and_grads(compiled, actor, inputs)
    err = capsys.readouterr().err
    assert err.count("warning: --compile: torch.compile failed") == 1, err
    assert "simulated C++ compiler failure on the backward graph" in err
    assert compiled.compiled is None and MaybeCompiled.fell_back
    plain_loss, _, plain_grads = loss_and_grads(minibatch_loss, actor, inputs)
    assert torch.equal(loss, plain_loss) and all(torch.equal(a, b) for a, b in zip(grads, plain_grads))


def test_failed_compile_warns_once_and_continues_plain(monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("InductorError: no working C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: broken)
    monkeypatch.setattr(MaybeCompiled, "fell_back", False)
    fn = MaybeCompiled(lambda x: x * 2, enabled=True)
    assert fn(3) == 6
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: --compile: torch.compile failed (")
    assert "no working C++ compiler found" in err and "continuing without it" in err
    assert fn(4) == 8 and capsys.readouterr().err == ""  # plain from now on
    assert fn.compiled is None and MaybeCompiled.fell_back  # train.bench reports compile=off


def test_an_error_of_the_loss_itself_is_raised_not_hidden(monkeypatch, capsys):
    def loss(x):
        raise ValueError(f"bad batch {x}")

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    with pytest.raises(ValueError, match="bad batch 1"):
        MaybeCompiled(loss, enabled=True)(1)
    assert capsys.readouterr().err == ""


def test_compile_flag(capsys):
    assert load_config(["--env", "smax", "--map_name", "3m"]).compile
    assert not load_config(["--env", "smax", "--map_name", "3m", "--no-compile"]).compile
    capsys.readouterr()
    load_config(["--env", "smax", "--map_name", "3m", "--algo", "hatrpo", "--compile"])
    assert "warning: --compile has no effect here: it compiles the PPO family's actor loss" in capsys.readouterr().err
    load_config(["--env", "smax", "--map_name", "3m", "--use_recurrent_policy", "--compile"])
    assert "warning: --compile has no effect here: it compiles feed-forward actors only" in capsys.readouterr().err
    load_config(["--env", "smax", "--map_name", "3m", "--algo", "hatrpo", "--no-compile"])
    assert capsys.readouterr().err == ""  # nothing compiles, as asked


def test_compile_may_change_on_resume_and_older_runs_resume_plain(tmp_path, capsys):
    """--compile is a runtime setting (like --torch_threads): --no-compile is the way out of
    a machine whose compiler fails. A run saved before the flag existed trained uncompiled
    and resumes so."""
    pytest.importorskip("gymnasium_robotics")
    from train.train import main, resume_config
    from utils.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint

    assert main(["--env", "mamujoco", "--scenario", "HalfCheetah", "--agent_conf", "2x3",
                 "--n_rollout_threads", "2", "--episode_length", "50", "--hidden_sizes", "8",
                 "--ppo_epoch", "1", "--critic_epoch", "1", "--num_env_steps", "100", "--no-use_eval",
                 "--device", "cpu", "--torch_threads", "1", "--no-progress", "--no-tensorboard",
                 "--results_dir", str(tmp_path)]) == 0
    run = tmp_path / "mamujoco" / "HalfCheetah-2x3" / "happo" / "default" / "seed-1"
    assert resume_config({"resume": str(run)})[0].compile
    assert not resume_config({"resume": str(run), "compile": False})[0].compile
    checkpoint = load_checkpoint(checkpoint_path(run))
    del checkpoint["config"]["compile"]  # as saved before --compile existed
    save_checkpoint(run, checkpoint)
    assert not resume_config({"resume": str(run)})[0].compile
    assert resume_config({"resume": str(run), "compile": True})[0].compile


def test_torch_switch_turns_compile_off(capsys):
    """PyTorch's own switch (``TORCH_COMPILE_DISABLE=1``, as tests/conftest.py sets it for the
    suite's many tiny runs, and a user whose compiler misbehaves may) reaches ``--compile``:
    the loss runs plain, with the plain result, no graph compiled and no fall-back warning."""
    spec = AgentSpec(12, "discrete", 5)
    torch.manual_seed(0)
    actor = Actor(spec, Config(hidden_sizes=[32, 32]))
    inputs = loss_inputs(spec)
    with torch._dynamo.config.patch(disable=True):
        torch._dynamo.reset()
        counters.clear()
        loss, info, grads = loss_and_grads(MaybeCompiled(minibatch_loss, enabled=True), actor, inputs)
        assert counters["stats"]["unique_graphs"] == 0
    plain_loss, _, plain_grads = loss_and_grads(minibatch_loss, actor, inputs)
    assert torch.equal(loss, plain_loss) and all(torch.equal(a, b) for a, b in zip(grads, plain_grads))
    assert capsys.readouterr().err == ""
