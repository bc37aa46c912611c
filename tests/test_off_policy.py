"""The off-policy family's maths and storage on tiny closed-form cases (fast, no MuJoCo).

utils/replay.py: n-step returns (termination vs truncation, windows across an auto-reset,
the ring's wrap), sampling range, shapes and reuse, chunked incremental save / load and a
save that dies half-way. algorithms/off_policy.py: the TD3 target (clipped smoothing noise,
the smaller twin), Polyak averaging, the sequential update seeing earlier agents' *new*
actions against the simultaneous one, delayed actor updates, the agent-order stream,
checkpoint round trips and the refusal of discrete actions.
"""
from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch

import utils.replay
from algorithms.off_policy import COMMON_DEFAULTS, HADDPG, HATD3, MADDPG, MATD3, MLPEnsemble, OffPolicyMARL
from algorithms.registry import algorithm_class
from envs.base import AgentSpec, EnvSpec, EnvStep
from train.config import FIELDS, OPTIONS, Config, ConfigError
from utils.checkpoint import CheckpointError
from utils.replay import ReplayBuffer, n_step_returns

torch.set_num_threads(1)


# -- helpers ---------------------------------------------------------------------------------------
def tiny_spec(n_agents: int = 2, obs_dim: int = 1, act_dim: int = 1, state_dim: int = 1,
              low: float = -1.0, high: float = 1.0, kind: str = "continuous") -> EnvSpec:
    return EnvSpec("test/tiny", tuple(AgentSpec(obs_dim, kind, act_dim, low, high) for _ in range(n_agents)),
                   state_dim, episode_limit=1000)


def tiny_config(algo: str = "hatd3", **overrides) -> Config:
    values = {**algorithm_class(algo).defaults, "algo": algo, "hidden_sizes": [], **overrides}
    return dataclasses.replace(Config(), **values)


def env_step(E: int, n_agents: int, state, reward, terminated=None, truncated=None, final_state=None) -> EnvStep:
    """An EnvStep with every agent observing ``state + 0.1 * agent`` (one dim each)."""
    state = np.asarray(state, np.float32).reshape(E, 1)
    final = np.zeros_like(state) if final_state is None else np.asarray(final_state, np.float32).reshape(E, 1)
    terminated = np.zeros(E, bool) if terminated is None else np.asarray(terminated, bool)
    truncated = np.zeros(E, bool) if truncated is None else np.asarray(truncated, bool)
    return EnvStep(obs=[state + 0.1 * i for i in range(n_agents)], state=state, avail_actions=None,
                   reward=np.asarray(reward, np.float32), terminated=terminated, truncated=truncated,
                   active=np.ones((E, n_agents), bool), final_state=final,
                   final_obs=[final + 0.1 * i for i in range(n_agents)])


def scripted_buffer(capacity: int = 10, n_step: int = 3, batch_size: int = 6, **kwargs) -> ReplayBuffer:
    """Two envs, five steps, gamma 0.5. Env 0 is cut by a time limit after its transition 1
    (final state -2), env 1 terminates at its transition 2 (final state -3). Before transition
    t, env e is in state 10 * e + t in its first episode; the next one starts in 100 + 10 * e
    (env 0: 100 before transition 2, 103 after transition 4)."""
    buf = ReplayBuffer(tiny_spec(), capacity, n_envs=2, n_step=n_step, gamma=0.5, batch_size=batch_size,
                       device="cpu", seed=0, **kwargs)
    rewards = [[1, 10], [2, 20], [3, 30], [4, 40], [5, 50]]
    state = np.array([0.0, 10.0])
    for t in range(5):
        terminated = [False, t == 2]
        truncated = [t == 1, False]
        nxt = state + 1
        final = nxt.copy()
        if t == 1:
            final[0], nxt[0] = -2.0, 100.0  # env 0: time limit, then the next episode's start
        if t == 2:
            final[1], nxt[1] = -3.0, 110.0  # env 1: terminated
        obs = [torch.tensor(state, dtype=torch.float32).view(2, 1) + 0.1 * i for i in range(2)]
        actions = [torch.full((2, 1), 0.01 * t) for _ in range(2)]
        buf.add(obs, torch.tensor(state, dtype=torch.float32).view(2, 1), actions,
                env_step(2, 2, nxt, rewards[t], terminated, truncated, final))
        state = nxt
    return buf


def rows_of(*slot_env: tuple[int, int], E: int = 2) -> torch.Tensor:
    return torch.tensor([s * E + e for s, e in slot_env], dtype=torch.int64)


# -- n-step returns --------------------------------------------------------------------------------
def test_n_step_returns_by_hand():
    gamma = 0.5
    rewards = torch.tensor([[1.0, 2.0, 3.0]] * 5)
    F, T = False, True
    done = torch.tensor([[F, F, F], [F, T, F], [T, F, F], [F, F, T], [F, F, T]])
    terminated = torch.tensor([[F, F, F], [F, F, F], [T, F, F], [F, F, F], [F, F, T]])
    returns, discount, last = n_step_returns(rewards, terminated, done, gamma)
    # full window; cut by a time limit after 2; terminated at once; cut at the window's end; terminated there
    assert returns.tolist() == [1 + 0.5 * 2 + 0.25 * 3, 1 + 0.5 * 2, 1.0, 2.75, 2.75]
    assert discount.tolist() == [0.125, 0.25, 0.0, 0.125, 0.0]
    assert last.tolist() == [2, 1, 0, 2, 2]
    # Without proper time limits a truncation ends the bootstrap like a termination.
    _, discount, _ = n_step_returns(rewards, terminated, done, gamma, proper_time_limits=False)
    assert discount.tolist() == [0.125, 0.0, 0.0, 0.0, 0.0]


def test_buffer_n_step_windows_across_auto_reset_truncation_and_termination():
    buf = scripted_buffer()
    assert buf.sampleable == 3 * 2  # the newest n - 1 = 2 slots wait for their windows
    rows = rows_of((0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1))
    b = buf.gather(rows)
    # env 0, cut by the time limit after its transition 1: bootstrap from the final state -2
    # env 1, terminated at its transition 2: no bootstrap
    assert b.returns.tolist() == [1 + 0.5 * 2, 2.0, 3 + 0.5 * 4 + 0.25 * 5,
                                  10 + 0.5 * 20 + 0.25 * 30, 20 + 0.5 * 30, 30.0]
    assert b.discount.tolist() == [0.25, 0.5, 0.125, 0.0, 0.0, 0.0]
    assert b.next_state.view(-1).tolist() == [-2.0, -2.0, 103.0, -3.0, -3.0, -3.0]
    assert b.next_obs[1].view(-1).tolist() == pytest.approx([-1.9, -1.9, 103.1, -2.9, -2.9, -2.9])
    assert b.state.view(-1).tolist() == [0.0, 1.0, 100.0, 10.0, 11.0, 12.0]
    assert b.obs[1].view(-1).tolist() == pytest.approx([0.1, 1.1, 100.1, 10.1, 11.1, 12.1])
    assert b.actions[0].view(-1).tolist() == pytest.approx([0.0, 0.01, 0.02] * 2)


def test_buffer_windows_wrap_around_the_ring():
    buf = scripted_buffer(capacity=8, batch_size=2)  # 4 slots: step 4 overwrote slot 0
    assert (buf.pos, buf.size) == (1, 4) and buf.sampleable == 2 * 2
    b = buf.gather(rows_of((2, 0), (2, 1)))  # window: slots 2, 3, 0 (= steps 2, 3, 4)
    assert b.returns.tolist() == [3 + 0.5 * 4 + 0.25 * 5, 30.0]
    assert b.discount.tolist() == [0.125, 0.0]
    assert b.next_state.view(-1).tolist() == [103.0, -3.0]


def test_sampling_covers_exactly_the_complete_windows_with_reused_tensors():
    buf = scripted_buffer(batch_size=6)
    first = buf.sample()
    pointers = [t.data_ptr() for t in (*first.obs, *first.actions, first.state, first.returns, first.next_state)]
    seen = set()
    for _ in range(40):
        b = buf.sample()
        seen.update(buf._rows.tolist())
        assert [t.data_ptr() for t in (*b.obs, *b.actions, b.state, b.returns, b.next_state)] == pointers
    assert seen == set(range(6))  # slots 0..2 of both envs; slots 3, 4 (rows 6..9) never
    for t, dim in ((b.state, 1), (b.next_state, 1), *((o, 1) for o in b.obs), *((a, 1) for a in b.actions)):
        assert t.shape == (6, dim) and t.dtype == torch.float32
    assert b.returns.shape == b.discount.shape == (6,)
    assert b.returns.dtype == b.discount.dtype == torch.float32


def test_sampling_needs_a_batch_and_a_buffer_long_enough():
    buf = scripted_buffer(batch_size=7)
    with pytest.raises(ValueError, match="6 sampleable transitions, fewer than a batch of 7"):
        buf.sample()
    with pytest.raises(ValueError, match="3-step returns need at least 3"):
        ReplayBuffer(tiny_spec(), 5, n_envs=2, n_step=3, gamma=0.5, batch_size=1, device="cpu", seed=0)


def test_sampling_is_reproducible_from_the_seed():
    a, b = scripted_buffer(batch_size=4), scripted_buffer(batch_size=4)
    for _ in range(3):
        assert torch.equal(a.sample().state, b.sample().state)


# -- saving and loading the buffer --------------------------------------------------------------------
def add_steps(buf: ReplayBuffer, count: int, start: float) -> None:
    for k in range(count):
        s = start + k
        obs = [torch.tensor([[s], [s + 0.5]]) + 0.1 * i for i in range(2)]
        buf.add(obs, torch.tensor([[s], [s + 0.5]]), [torch.full((2, 1), s / 100)] * 2,
                env_step(2, 2, [s + 1, s + 1.5], [s, -s], truncated=[k == 1, False], final_state=[-s, -s]))


def small_buffer() -> ReplayBuffer:  # 8 slots of 2 envs, 4-row chunks (2 slots each)
    return ReplayBuffer(tiny_spec(), 16, n_envs=2, n_step=2, gamma=0.9, batch_size=4, device="cpu", seed=3,
                        chunk_rows=4)


def files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def snapshot(buf: ReplayBuffer) -> dict:
    return {"fields": {k: v.clone() for k, v in buf.fields.items()}, "cursor": buf.cursor,
            "rng": buf.generator.get_state()}


def assert_matches(buf: ReplayBuffer, snap: dict) -> None:
    for k, v in snap["fields"].items():
        assert torch.equal(buf.fields[k], v), k
    assert buf.cursor == snap["cursor"]
    assert torch.equal(buf.generator.get_state(), snap["rng"])


def test_save_writes_only_changed_chunks_and_load_restores_everything(tmp_path):
    buf = small_buffer()
    add_steps(buf, 3, start=1.0)  # rows 0..5: chunks 0 and 1
    buf.sample()  # the sampling stream is part of what is restored
    buf.save(tmp_path)
    assert files(tmp_path) == ["chunk-00000-00000001.pt", "chunk-00001-00000001.pt", "manifest.pt"]
    add_steps(buf, 1, start=10.0)  # rows 6, 7: chunk 1 only
    manifest = buf.save(tmp_path)
    assert files(tmp_path) == ["chunk-00000-00000001.pt", "chunk-00001-00000002.pt", "manifest.pt"]
    assert manifest["chunks"] == {0: "chunk-00000-00000001.pt", 1: "chunk-00001-00000002.pt"}
    assert (manifest["pos"], manifest["size"], manifest["generation"]) == (4, 4, 2)
    again = small_buffer()
    again.load(tmp_path)
    assert_matches(again, snapshot(buf))
    for _ in range(3):  # and samples continue the same
        assert torch.equal(again.sample().returns, buf.sample().returns)
    # An unchanged buffer saves no chunk at all.
    buf.save(tmp_path)
    assert files(tmp_path) == ["chunk-00000-00000001.pt", "chunk-00001-00000002.pt", "manifest.pt"]


@pytest.mark.parametrize("fail_at", ["second chunk", "manifest"])
def test_a_save_that_dies_half_way_leaves_the_previous_one_loadable(tmp_path, monkeypatch, fail_at):
    buf = small_buffer()
    add_steps(buf, 3, start=1.0)
    buf.save(tmp_path)
    saved = snapshot(buf)
    add_steps(buf, 3, start=20.0)  # rows 6..11: chunks 1 and 2
    real_write, calls = utils.replay.atomic_write_bytes, []

    def dying_write(path, data):
        calls.append(path.name)
        if (fail_at == "manifest") == (path.name == "manifest.pt") and (fail_at == "manifest" or len(calls) == 2):
            path.with_name(path.name + ".partial").write_bytes(data[: len(data) // 2])  # what a kill leaves
            raise CheckpointError(f"could not write {path}")
        real_write(path, data)

    monkeypatch.setattr(utils.replay, "atomic_write_bytes", dying_write)
    with pytest.raises(CheckpointError):
        buf.save(tmp_path)
    monkeypatch.setattr(utils.replay, "atomic_write_bytes", real_write)
    old = small_buffer()
    old.load(tmp_path)
    assert_matches(old, saved)
    buf.save(tmp_path)  # the next save goes through and removes what the failed one left
    latest = small_buffer()
    latest.load(tmp_path)
    assert_matches(latest, snapshot(buf))
    named = set(torch.load(tmp_path / "manifest.pt", weights_only=True)["chunks"].values())
    assert {p.name for p in tmp_path.glob("chunk-*.pt")} == named


def test_a_chunk_file_holds_its_own_rows_only(tmp_path):
    buf = ReplayBuffer(tiny_spec(), 4096, n_envs=2, n_step=2, gamma=0.9, batch_size=4, device="cpu", seed=3,
                       chunk_rows=256)  # 16 chunks
    add_steps(buf, 3, start=1.0)
    buf.save(tmp_path)
    row_bytes = sum(v[0].numel() * v.element_size() for v in buf.fields.values())
    (chunk,) = tmp_path.glob("chunk-*.pt")
    assert 256 * row_bytes <= chunk.stat().st_size < 2 * 256 * row_bytes  # not the whole 4096-row buffer
    assert all(len(t) == 256 for t in torch.load(chunk, weights_only=True).values())


def test_load_refuses_another_layout_and_a_missing_chunk(tmp_path):
    buf = small_buffer()
    add_steps(buf, 3, start=1.0)
    buf.save(tmp_path)
    other = ReplayBuffer(tiny_spec(), 32, n_envs=2, n_step=2, gamma=0.9, batch_size=4, device="cpu", seed=3,
                         chunk_rows=4)
    with pytest.raises(CheckpointError, match="saved with rows 16; this run's buffer has 32"):
        other.load(tmp_path)
    (tmp_path / "chunk-00001-00000001.pt").unlink()
    with pytest.raises(CheckpointError, match="chunk-00001-00000001.pt is missing"):
        small_buffer().load(tmp_path)


# -- the algorithm ----------------------------------------------------------------------------------
def set_linear(linear: torch.nn.Linear, weight, bias) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(weight, dtype=torch.float32).view_as(linear.weight))
        linear.bias.copy_(torch.tensor(bias, dtype=torch.float32).view_as(linear.bias))


def set_member(ensemble, m: int, layers: list[tuple[list, list]]) -> None:
    """Member m's layers (weight [fan_in][fan_out], bias [fan_out])."""
    with torch.no_grad():
        for k, (w, b) in enumerate(layers):
            ensemble.weights[k][m].copy_(torch.tensor(w, dtype=torch.float32))
            ensemble.biases[k][m, 0].copy_(torch.tensor(b, dtype=torch.float32))


def batch_of(state, obs, actions, returns, discount, next_state, next_obs):
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    from utils.replay import ReplayBatch

    return ReplayBatch(obs=[t(o) for o in obs], actions=[t(a) for a in actions], state=t(state),
                       returns=t(returns), discount=t(discount), next_state=t(next_state),
                       next_obs=[t(o) for o in next_obs])


def test_td3_target_clipped_smoothing_noise_and_smaller_twin_by_hand():
    spec = tiny_spec(low=-2.0, high=2.0)  # half range 2: noise std 2 * 0.6, clipped at +-2 * 0.5
    algo = HATD3(tiny_config(policy_noise=0.6, noise_clip=0.5), spec, "cpu")
    for actor, w in zip(algo.target_actors, (0.5, -0.25)):
        set_linear(actor.mlp[0], [w], [0.0])
    # Q'_k(s, a0, a1) = w . [s, a0, a1] + c: member 0 favours a0, member 1 a1
    set_member(algo.target_critic, 0, [([[1.0], [2.0], [0.5]], [0.1])])
    set_member(algo.target_critic, 1, [([[1.0], [0.5], [2.0]], [-0.1])])
    # sample 0: a'_1 - a'_0 ~ 3.3 beyond any noise, member 0 is smaller; sample 1 the reverse
    next_obs = [[[-3.0], [3.0], [0.5]], [[-4.0], [4.0], [1.0]]]
    batch = batch_of(state=[[0.0]] * 3, obs=[[[0.0]] * 3] * 2, actions=[[[0.0]] * 3] * 2,
                     returns=[1.0, -2.0, 0.5], discount=[0.9, 0.25, 0.0], next_state=[[0.3], [-0.7], [1.1]],
                     next_obs=next_obs)
    replay = torch.Generator()
    replay.set_state(algo.target_noise_rng.get_state())
    eps = [torch.randn(3, 1, generator=replay).view(-1).double().tolist() for _ in range(2)]  # agent 0, then 1

    clipped, members = 0, set()
    want = []
    for b in range(3):
        actions = []
        for i, w in enumerate((0.5, -0.25)):
            mu = 2 * math.tanh(w * next_obs[i][b][0])
            noise = eps[i][b] * 0.6 * 2
            clipped += abs(noise) > 1.0
            noise = max(-1.0, min(1.0, noise))
            actions.append(max(-2.0, min(2.0, mu + noise)))
        s = batch.next_state[b, 0].item()
        q = [s + 2.0 * actions[0] + 0.5 * actions[1] + 0.1, s + 0.5 * actions[0] + 2.0 * actions[1] - 0.1]
        members.add(int(np.argmin(q)))
        want.append(batch.returns[b].item() + batch.discount[b].item() * min(q))
    assert clipped >= 1 and members == {0, 1}, "the case must exercise the clip and both twins"
    assert algo.td_target(batch).tolist() == pytest.approx(want, abs=1e-5)


def test_ddpg_target_has_no_noise_and_one_critic():
    algo = HADDPG(tiny_config("haddpg"), tiny_spec(), "cpu")
    assert algo.critic.members == 1 and algo.policy_freq == 1
    for actor in algo.target_actors:
        set_linear(actor.mlp[0], [1.0], [0.0])
    set_member(algo.target_critic, 0, [([[1.0], [2.0], [-1.0]], [0.5])])
    batch = batch_of(state=[[0.0]], obs=[[[0.0]]] * 2, actions=[[[0.0]]] * 2, returns=[1.0], discount=[0.5],
                     next_state=[[2.0]], next_obs=[[[0.5]], [[-1.0]]])
    q = 2.0 + 2.0 * math.tanh(0.5) - math.tanh(-1.0) + 0.5
    assert algo.td_target(batch).item() == pytest.approx(1.0 + 0.5 * q, abs=1e-6)


def test_polyak_averaging_is_exact():
    algo = MATD3(tiny_config("matd3", polyak=0.25, hidden_sizes=[3]), tiny_spec(), "cpu")
    with torch.no_grad():
        for k, (p, t) in enumerate(zip(algo._online, algo._targets)):  # dyadic values: exact arithmetic
            p.copy_(torch.arange(p.numel(), dtype=torch.float32).view_as(p) / 4 + k)
            t.copy_(-torch.arange(t.numel(), dtype=torch.float32).view_as(t) / 2)
    before = [t.clone() for t in algo._targets]
    algo.update_targets()
    for p, t, old in zip(algo._online, algo._targets, before):
        assert torch.equal(t, old + 0.25 * (p - old))
    assert len(algo._targets) == len(list(algo.target_actors.parameters())) + len(list(algo.target_critic.parameters()))


def gated_case(cls, gate_by: int = 0):
    """Two agents, actors a_i = tanh(w_i o_i + b_i) starting at w = b = 0 (a = 0), plain SGD
    with lr 0.1 (so a step is -0.1 x the gradient), one sample with o = 1 and s = 0, fixed
    order [0, 1]; critic member 0 with one ReLU layer of two units:

        Q1 = relu(a_<gate_by> + 0.5) + relu(a_0 + a_1 - 0.05)

    Unit 1 gives agent ``gate_by`` the gradient dQ1/da = 1 at a = 0 whatever the other does.
    Unit 2 is off at the start (-0.05) and turns on once a_<gate_by> has moved: the other
    agent gets a gradient only if it sees the *new* action. Member 1's weights would give
    other gradients, so using it instead of Q1 would show."""
    algo = cls(tiny_config(cls.name, fixed_order=True), tiny_spec(), "cpu")  # actors: no hidden layer
    algo.critic = MLPEnsemble(3, [2], 1, algo.critic.members)  # the critic: one of two units
    for actor in algo.actors:
        set_linear(actor.mlp[0], [0.0], [0.0])
    algo.actor_optims = [torch.optim.SGD(a.parameters(), lr=0.1) for a in algo.actors]
    unit1 = [0.0, 0.0, 0.0]  # over the critic's input [s, a_0, a_1]
    unit1[1 + gate_by] = 1.0
    w1 = [[unit1[r], [0.0, 1.0, 1.0][r]] for r in range(3)]  # [input][unit]
    set_member(algo.critic, 0, [(w1, [0.5, -0.05]), ([[1.0], [1.0]], [0.0])])
    if algo.critic.members > 1:
        set_member(algo.critic, 1, [([[0.0, 0.0], [-1.0, 0.0], [0.0, -1.0]], [1.0, 1.0]), ([[1.0], [1.0]], [0.0])])
    batch = batch_of(state=[[0.0]], obs=[[[1.0]], [[1.0]]], actions=[[[0.0]], [[0.0]]], returns=[0.0],
                     discount=[0.0], next_state=[[0.0]], next_obs=[[[0.0]], [[0.0]]])
    return algo, batch


def actor_params(algo) -> list[tuple[float, float]]:
    return [(a.mlp[0].weight.item(), a.mlp[0].bias.item()) for a in algo.actors]


@pytest.mark.parametrize("cls", [HATD3, HADDPG])
def test_sequential_update_uses_the_earlier_agents_new_actions(cls):
    # Agent 0 goes first: dQ1/da_0 = 1 and da_0/dw_0 = o = 1 (tanh'(0) = 1), so SGD moves w_0
    # and b_0 to 0.1; a_0 becomes tanh(0.2) > 0.05, unit 2 turns on and agent 1 steps too.
    algo, batch = gated_case(cls, gate_by=0)
    algo.actors_step(batch)
    assert actor_params(algo) == [(pytest.approx(0.1), pytest.approx(0.1)), (pytest.approx(0.1), pytest.approx(0.1))]
    # Gated by agent 1, updated *after* it: agent 0 sees a_1's old value 0, so no gradient.
    algo, batch = gated_case(cls, gate_by=1)
    algo.actors_step(batch)
    assert actor_params(algo) == [(0.0, 0.0), (pytest.approx(0.1), pytest.approx(0.1))]


@pytest.mark.parametrize("cls", [MATD3, MADDPG])
def test_simultaneous_update_uses_the_current_joint_action(cls):
    algo, batch = gated_case(cls, gate_by=0)
    algo.actors_step(batch)
    assert actor_params(algo) == [(pytest.approx(0.1), pytest.approx(0.1)), (0.0, 0.0)]


def test_actor_loss_is_minus_q1_averaged_over_the_batch():
    algo, _ = gated_case(HATD3, gate_by=0)
    batch = batch_of(state=[[0.0]] * 2, obs=[[[1.0], [1.0]], [[1.0], [1.0]]], actions=[[[0.0]] * 2] * 2,
                     returns=[0.0] * 2, discount=[0.0] * 2, next_state=[[0.0]] * 2, next_obs=[[[0.0]] * 2] * 2)
    stats = algo.actors_step(batch)
    assert stats["agent0/actor_loss"].item() == pytest.approx(-0.5)  # Q1 = relu(0.5) + relu(-0.05) at a = 0
    assert stats["agent1/actor_loss"].item() == pytest.approx(-(math.tanh(0.2) + 0.5 + math.tanh(0.2) - 0.05))


def filled_buffer(spec, batch_size=8, seed=0) -> ReplayBuffer:
    buf = ReplayBuffer(spec, 64, n_envs=2, n_step=2, gamma=0.9, batch_size=batch_size, device="cpu", seed=seed)
    add_steps(buf, 12, start=0.0)
    return buf


def test_actors_and_targets_move_only_every_policy_freq_updates():
    algo = HATD3(tiny_config(hidden_sizes=[4], policy_freq=3), tiny_spec(), "cpu")
    buf = filled_buffer(algo.spec)

    def frozen():
        return [p.clone() for p in (*algo.actors.parameters(), *algo._targets)]

    for k in range(1, 7):
        before, critic_before = frozen(), [p.clone() for p in algo.critic.parameters()]
        stats = algo.update(buf.sample())
        moved = [not torch.equal(a, b) for a, b in zip(before, frozen())]
        assert any(not torch.equal(a, b) for a, b in zip(critic_before, algo.critic.parameters()))
        assert all(moved) if k % 3 == 0 else not any(moved), k
        assert ("agent0/actor_loss" in stats) == (k % 3 == 0)


def test_agent_order_is_a_fresh_reproducible_permutation_each_update():
    def orders(algo, buf, count):
        return [tuple(int(k[5]) for k in algo.update(buf.sample()) if k.endswith("actor_loss")) for _ in range(count)]

    spec = tiny_spec(n_agents=3)
    a = HATD3(tiny_config(hidden_sizes=[4], policy_freq=1, seed=7), spec, "cpu")
    b = HATD3(tiny_config(hidden_sizes=[4], policy_freq=1, seed=7), spec, "cpu")
    seen_a, seen_b = orders(a, filled_buffer(spec), 30), orders(b, filled_buffer(spec), 30)
    assert seen_a == seen_b
    assert all(sorted(o) == [0, 1, 2] for o in seen_a) and len(set(seen_a)) >= 4
    fixed = HATD3(tiny_config(hidden_sizes=[4], policy_freq=1, fixed_order=True), spec, "cpu")
    assert set(orders(fixed, filled_buffer(spec), 5)) == {(0, 1, 2)}


def test_state_dict_round_trip_continues_identically():
    spec = tiny_spec()
    cfg = tiny_config(hidden_sizes=[8], seed=5)
    algo, buf = HATD3(cfg, spec, "cpu"), filled_buffer(spec, seed=1)
    for _ in range(3):
        algo.update(buf.sample())
    algo.act([torch.ones(2, 1)] * 2)  # the exploration stream moves too
    data = io.BytesIO()  # through bytes, as a checkpoint: Optimizer.load_state_dict keeps the
    torch.save(algo.state_dict(), data)  # very tensors it is given, which would tie the two
    data.seek(0)
    state = torch.load(data, weights_only=True)
    torch.manual_seed(123)  # a fresh one initialises differently
    other = HATD3(cfg, spec, "cpu")
    other.load_state_dict(state)
    buf_copy = filled_buffer(spec, seed=1)
    for _ in range(3):
        buf_copy.sample()
    for _ in range(4):
        batch = buf.sample()
        stats = algo.update(batch)
        again = other.update(buf_copy.sample())
        assert {k: v.item() for k, v in again.items()} == {k: v.item() for k, v in stats.items()}
    for x, y in zip(algo.act([torch.ones(2, 1)] * 2)[0], other.act([torch.ones(2, 1)] * 2)[0]):
        assert torch.equal(x, y)
    evaluator = HATD3(cfg, spec, "cpu")  # evaluation loads the weights alone
    evaluator.load_state_dict(algo.state_dict(), weights_only=True)
    for x, y in zip(algo.act([torch.ones(2, 1)] * 2, deterministic=True)[0],
                    evaluator.act([torch.ones(2, 1)] * 2, deterministic=True)[0]):
        assert torch.equal(x, y)


def test_actions_stay_in_bounds_and_noise_scales_with_the_half_range():
    spec = tiny_spec(low=-3.0, high=1.0)  # centre -1, half range 2
    algo = MADDPG(tiny_config("maddpg", expl_noise=0.25, hidden_sizes=[4]), spec, "cpu")
    for actor in algo.actors:  # mu = -1 (the centre) everywhere
        set_linear(actor.mlp[-1], [[0.0] * 4], [0.0])
    obs = [torch.randn(20000, 1)] * 2
    greedy = algo.act(obs, deterministic=True)[0]
    assert all(torch.equal(g, torch.full_like(g, -1.0)) for g in greedy)
    noisy = algo.act(obs)[0]
    assert all(n.min() >= -3.0 and n.max() <= 1.0 for n in noisy)
    assert noisy[0].std().item() == pytest.approx(0.25 * 2, rel=0.03)
    uniform = algo.random_actions(20000)
    assert all(u.min() >= -3.0 and u.max() <= 1.0 and abs(u.mean().item() + 1.0) < 0.05 for u in uniform)


def test_a_discrete_action_env_is_refused_in_one_line():
    spec = tiny_spec(kind="discrete", act_dim=5)
    with pytest.raises(ConfigError) as info:
        HATD3(tiny_config(), spec, "cpu")
    message = str(info.value)
    assert "\n" not in message and "--algo hatd3" in message and "continuous actions" in message


@pytest.mark.parametrize("overrides,message", [
    ({"buffer_size": 40, "batch_size": 32}, "--batch_size 32 is more than the 22 transitions"),
    ({"train_interval": 1, "update_per_train": 0.4}, "rounds to no gradient update"),
])
def test_runner_refuses_settings_that_would_never_train(monkeypatch, tmp_path, overrides, message):
    import runners.base
    import runners.off_policy_runner as runner_module

    class ContinuousEnv:
        spec = tiny_spec()
        n_envs = 2

        def close(self):
            pass

    monkeypatch.setattr(runners.base, "make_vec_env", lambda *a, **k: ContinuousEnv())
    config = tiny_config("hatd3", n_rollout_threads=2, n_step=10, **overrides)
    with pytest.raises(ConfigError, match=message):
        runner_module.OffPolicyRunner(config, tmp_path, torch.device("cpu"))


def test_runner_refuses_a_discrete_action_env_and_closes_it(monkeypatch, tmp_path):
    import runners.base
    import runners.off_policy_runner as runner_module

    closed = []

    class DiscreteEnv:
        spec = tiny_spec(kind="discrete", act_dim=5)
        n_envs = 2

        def close(self):
            closed.append(True)

    monkeypatch.setattr(runners.base, "make_vec_env", lambda *a, **k: DiscreteEnv())
    with pytest.raises(ConfigError) as info:
        runner_module.OffPolicyRunner(tiny_config("maddpg"), tmp_path, torch.device("cpu"))
    assert "--algo maddpg needs continuous actions" in str(info.value) and "\n" not in str(info.value)
    assert closed == [True] and not list(tmp_path.iterdir())


# -- what the registry reads ------------------------------------------------------------------------
@pytest.mark.parametrize("cls,n_step,td3,sequential", [(HATD3, 10, True, True), (HADDPG, 20, False, True),
                                                       (MATD3, 10, True, False), (MADDPG, 20, False, False)])
def test_class_attributes_describe_each_method(cls, n_step, td3, sequential):
    assert algorithm_class(cls.name) is cls and issubclass(cls, OffPolicyMARL)
    assert cls.family == "off-policy" and cls.action_kinds == ("continuous",) and cls.compiles_actor_loss is False
    assert (cls.td3, cls.sequential) == (td3, sequential)
    assert cls.defaults["n_step"] == n_step  # the reference's HalfCheetah 2x3 value
    assert set(cls.defaults) <= set(FIELDS)
    assert all(OPTIONS[name].per_algorithm for name in cls.reads)  # what the registry's reads means
    assert {k: cls.defaults[k] for k in COMMON_DEFAULTS} == COMMON_DEFAULTS
    assert cls.defaults["n_rollout_threads"] == 10 and cls.defaults["hidden_sizes"] == [256, 256]
    assert (cls.defaults["lr"], cls.defaults["critic_lr"], cls.defaults["batch_size"]) == (5e-4, 1e-3, 1000)
    assert ({"policy_noise", "noise_clip", "policy_freq"} <= cls.reads) == td3
    assert ("fixed_order" in cls.reads) == sequential
    assert not {"opti_eps", "max_grad_norm", "episode_length", "ppo_epoch"} & cls.reads


# -- the pre-activation penalty ---------------------------------------------------------------------
def preset_actors(algo: OffPolicyMARL, biases: list[float]) -> None:
    """Actors with no hidden layer, zero weights and the given output bias: MLP(o) = bias."""
    with torch.no_grad():
        for actor, bias in zip(algo.actors, biases):
            actor.mlp[0].weight.zero_()
            actor.mlp[0].bias.fill_(bias)


def test_own_action_penalty_and_saturation_by_hand():
    algo = HATD3(tiny_config(preact_penalty=0.01), tiny_spec(act_dim=2), "cpu")
    preset_actors(algo, [3.0, 0.5])
    obs = torch.ones(4, 1)
    action, penalty, saturated = algo.own_action(0, obs)
    assert torch.allclose(action, torch.full((4, 2), math.tanh(3.0)))
    assert penalty.item() == pytest.approx(0.01 * 9.0)
    assert saturated.item() == 1.0  # tanh(3) = 0.9951 > 0.99
    _, penalty, saturated = algo.own_action(1, obs)
    assert penalty.item() == pytest.approx(0.01 * 0.25) and saturated.item() == 0.0
    unpenalised = HATD3(tiny_config(), tiny_spec(act_dim=2), "cpu")
    preset_actors(unpenalised, [3.0, 0.5])
    assert float(unpenalised.own_action(0, obs)[1]) == 0.0


@pytest.mark.parametrize("algo_name", ["hatd3", "matd3"])
@pytest.mark.parametrize("coef", [0.0, 0.01])
def test_penalty_alone_pulls_a_saturated_actor_back(algo_name, coef):
    """With a critic that ignores the actions, the penalty is the actors' whole gradient: its
    first Adam step moves each output bias by -lr * sign(bias) (Adam's first step is the
    gradient's sign times lr); without the penalty nothing moves."""
    algo = algorithm_class(algo_name)(tiny_config(algo_name, preact_penalty=coef, policy_freq=1, lr=0.1),
                                      tiny_spec(), "cpu")
    preset_actors(algo, [4.0, -2.0])
    with torch.no_grad():
        for w in algo.critic.weights:
            w.zero_()
    stats = algo.actors_step(filled_buffer(algo.spec).sample())
    moved = [actor.mlp[0].bias.item() for actor in algo.actors]
    assert moved == (pytest.approx([3.9, -1.9], abs=1e-6) if coef else [4.0, -2.0])
    assert stats["agent0/saturated"].item() == 1.0 and stats["agent1/saturated"].item() == 0.0
