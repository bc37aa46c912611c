"""Exact checks of the algorithm maths against small closed-form / hand-computed cases.

Covers: conjugate gradient and the Fisher-vector product (trust_region.py), the Gaussian
and masked categorical heads (distributions.py), GAE with termination vs truncation,
ValueNorm, the Huber/clipped value loss, the HAPPO loss, the sequential M factor in
``OnPolicyMARL.train``, the HATRPO line search, dead-agent masking, recurrent chunking
and GRU resets, and the single-agent HAPPO == PPO reduction.

Every network is tiny and every batch a few dozen samples: the file runs in seconds.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, Normal, kl_divergence

from algorithms.base import (OnPolicyMARL, Rows, StepResult, compute_gae, first_hidden, masked_mean, minibatches,
                             take)
from algorithms.distributions import CategoricalHead, CategoricalParams, GaussianHead, GaussianParams
from algorithms.happo import HAPPO, happo_loss
from algorithms.hatrpo import HATRPO
from algorithms.mappo import MAPPO
from algorithms.networks import Trunk
from algorithms.trust_region import conjugate_gradient, flat_params, gauss_newton_fvp_fn, set_flat_params
from algorithms.value_norm import ValueNorm
from envs.base import AgentSpec, EnvSpec
from train.config import Config
from utils.buffer import RolloutBuffer

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- helpers
def make_config(**overrides) -> Config:
    base = dict(hidden_sizes=[16, 16], ppo_epoch=2, critic_epoch=1, actor_num_mini_batch=1,
                critic_num_mini_batch=1, seed=3, lr=5e-3, critic_lr=5e-3)
    base.update(overrides)
    return Config(**base)


def continuous_spec(n_agents: int = 3, obs_dim: int = 4, act_dim: int = 2) -> EnvSpec:
    return EnvSpec("test/continuous", tuple(AgentSpec(obs_dim, "continuous", act_dim)
                                            for _ in range(n_agents)), state_dim=5, episode_limit=50)


def discrete_spec(n_agents: int = 2, obs_dim: int = 4, n_actions: int = 5) -> EnvSpec:
    return EnvSpec("test/discrete", tuple(AgentSpec(obs_dim, "discrete", n_actions)
                                          for _ in range(n_agents)), state_dim=6, episode_limit=50)


def build(cls, spec: EnvSpec, seed: int = 0, **overrides):
    """An algorithm with ``load_config``'s per-algorithm defaults (HATRPO: no entropy bonus)."""
    torch.manual_seed(seed)
    overrides = {**cls.defaults, **overrides}
    return cls(make_config(**overrides), spec, CPU)


def fill_buffer(algo: OnPolicyMARL, T: int, E: int, seed: int, p_inactive: float = 0.0) -> RolloutBuffer:
    """A RolloutBuffer with random data whose actions/log-probs come from the algorithm's actors
    (so every initial ratio is 1) and whose recurrent states are those of the rollout."""
    spec = algo.spec
    g = torch.Generator().manual_seed(seed)
    recurrent = algo.config.use_recurrent_policy
    buf = RolloutBuffer(spec, T, E, algo.n_critics, algo.hidden_shape, recurrent, CPU)
    for i in range(spec.n_agents):
        buf.obs[i].copy_(torch.randn(buf.obs[i].shape, generator=g))
        if buf.avail is not None:
            av = torch.rand(buf.avail[i].shape, generator=g) < 0.6
            av[..., 0] = True  # at least one action available
            buf.avail[i].copy_(av)
    buf.state.copy_(torch.randn(buf.state.shape, generator=g))
    buf.rewards.copy_(torch.randn(buf.rewards.shape, generator=g))
    buf.values.copy_(torch.randn(buf.values.shape, generator=g))
    buf.final_values.copy_(torch.randn(buf.final_values.shape, generator=g))
    buf.terminated.copy_(torch.rand(T, E, generator=g) < 0.15)
    buf.truncated.copy_((torch.rand(T, E, generator=g) < 0.15) & ~buf.terminated)
    buf.starts[0] = True
    buf.starts[1:] = buf.terminated | buf.truncated
    buf.active.copy_(torch.rand(T, E, spec.n_agents, generator=g) >= p_inactive)
    hidden = torch.zeros(E, spec.n_agents, *algo.hidden_shape) if recurrent else None
    torch.manual_seed(seed + 1)
    for t in range(T):
        if recurrent:
            buf.actor_hidden[t] = hidden
        obs = [o[t] for o in buf.obs]
        avail = None if buf.avail is None else [a[t] for a in buf.avail]
        actions, log_probs, hidden = algo.act(obs, avail, hidden, buf.starts[t])
        for i in range(spec.n_agents):
            buf.actions[i][t] = actions[i]
        buf.log_probs[t] = log_probs
    return buf


def independent_log_probs(actor, obs, actions, avail=None) -> torch.Tensor:
    """log pi(a|o) from the actor's raw outputs through torch.distributions (feed-forward actors)."""
    features, _ = actor.trunk(obs, None, None)
    if isinstance(actor.head, GaussianHead):
        mean = actor.head.mean(features)
        std = torch.sigmoid(actor.head.log_std / actor.head.std_x) * actor.head.std_y
        return Normal(mean, std.expand_as(mean)).log_prob(actions).sum(-1)
    logits = actor.head.logits(features)
    if avail is not None:
        logits = logits.masked_fill(~avail, -math.inf)
    return Categorical(logits=logits).log_prob(actions)


def independent_ratio(algo, buf, i: int) -> torch.Tensor:
    """pi_new_i / pi_old_i over [T, E], 1 where agent i is inactive (non-shared actors)."""
    with torch.no_grad():
        lp = independent_log_probs(algo.actors[i], buf.obs[i], buf.actions[i],
                                   None if buf.avail is None else buf.avail[i])
    ratio = torch.exp(lp - buf.log_probs[:, :, i])
    return torch.where(buf.active[:, :, i], ratio, torch.ones_like(ratio))


def record_actor_steps(algo, real_step):
    """Wrap ``algo.actor_step``: record (g, M clone, M.requires_grad, M.grad_fn) per call."""
    calls = []

    def wrapper(g, batch, M):
        calls.append({"g": g, "M": M.detach().clone(), "requires_grad": M.requires_grad,
                      "grad_fn": M.grad_fn, "batch": batch})
        return real_step(algo, g, batch, M) if real_step is not None else StepResult({})

    algo.actor_step = wrapper
    return calls


# ------------------------------------------------------------ 1. CG and Fisher-vector product
def test_conjugate_gradient_matches_linear_solve():
    g = torch.Generator().manual_seed(0)
    Q = torch.randn(8, 8, generator=g, dtype=torch.float64)
    A = Q @ Q.T + 0.5 * torch.eye(8, dtype=torch.float64)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: A @ v, b, iters=50, residual_tol=1e-28)
    expected = torch.linalg.solve(A, b)
    assert torch.allclose(x, expected, atol=1e-6, rtol=0)
    # One iteration is the exact line minimum along b: x = (b.b / b.Ab) b.
    x1 = conjugate_gradient(lambda v: A @ v, b, iters=1)
    assert torch.allclose(x1, (b.dot(b) / b.dot(A @ b)) * b, atol=1e-12, rtol=0)
    # A zero right-hand side stops at once with x = 0 (no division by zero).
    assert torch.equal(conjugate_gradient(lambda v: A @ v, torch.zeros(8, dtype=torch.float64)),
                       torch.zeros(8, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["gaussian", "categorical"])
def test_gauss_newton_fvp_is_the_kl_hessian_at_the_old_policy(kind):
    """HATRPO's product J^T W J v (W = head.fisher_weights, scaled by the active mask of the
    mean) equals the explicit Hessian of the masked mean KL at the old parameters."""
    g = torch.Generator().manual_seed(2)
    obs = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)  # [L, B, obs]
    active = torch.rand(2, 4, generator=g) < 0.7
    active[0, 0] = True
    avail = torch.rand(2, 4, 5, generator=g) < 0.6
    avail[..., 2] = True
    w1 = torch.randn(6, 3, generator=g, dtype=torch.float64) * 0.5
    w2 = torch.randn(5, 6, generator=g, dtype=torch.float64) * 0.5
    log_std = torch.randn(5, generator=g, dtype=torch.float64) * 0.3
    sizes = [w1.numel(), w2.numel(), log_std.numel()]
    theta0 = torch.cat([w1.reshape(-1), w2.reshape(-1), log_std])
    head = GaussianHead if kind == "gaussian" else CategoricalHead

    def dist(flat):
        a, b, ls = flat.split(sizes)
        out = torch.tanh(obs @ a.view(6, 3).T) @ b.view(5, 6).T
        if kind == "gaussian":
            return GaussianParams(out, (torch.sigmoid(ls) * 0.5).expand_as(out))
        return CategoricalParams((out + 0 * ls).masked_fill(~avail, -1e10).log_softmax(-1), avail)

    old = dist(theta0)
    old = type(old)(*(None if t is None else t.detach() for t in old))
    mean_kl = lambda flat: masked_mean(head.kl(old, dist(flat)), active)  # noqa: E731
    H = torch.autograd.functional.hessian(mean_kl, theta0)
    assert H.abs().max() > 1e-3
    params = [theta0.clone().requires_grad_(True)]
    new = dist(params[0])
    per_sample = active.double() / active.sum()
    outputs, weights = [], []
    for output, weight in zip(new, head.fisher_weights(old)):
        if weight is not None:
            outputs.append(output)
            weights.append(weight * per_sample.unsqueeze(-1))
    fvp = gauss_newton_fvp_fn(outputs, weights, params, damping=0.1)
    for _ in range(3):
        v = torch.randn(theta0.shape, generator=g, dtype=torch.float64)
        assert torch.allclose(fvp(v), H @ v + 0.1 * v, atol=1e-10, rtol=1e-8)


def test_flat_params_round_trip():
    layer = torch.nn.Linear(3, 2)
    params = list(layer.parameters())
    flat = flat_params(params)
    assert flat.shape == (8,)
    new = torch.arange(8, dtype=torch.float32)
    set_flat_params(params, new)
    assert torch.equal(layer.weight.data, new[:6].view(2, 3)) and torch.equal(layer.bias.data, new[6:])
    assert torch.equal(flat_params(params), new)


# ----------------------------------------------------------------------- 2. Gaussian head
def test_gaussian_log_prob_entropy_kl_match_torch():
    g = torch.Generator().manual_seed(2)
    mean_a, mean_b = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g)
    std_a = torch.rand(7, 3, generator=g) * 0.9 + 0.05
    std_b = torch.rand(7, 3, generator=g) * 0.9 + 0.05
    actions = torch.randn(7, 3, generator=g)
    pa, pb = GaussianParams(mean_a, std_a), GaussianParams(mean_b, std_b)
    na, nb = Normal(mean_a, std_a), Normal(mean_b, std_b)
    assert torch.allclose(GaussianHead.log_prob(pa, actions), na.log_prob(actions).sum(-1), atol=1e-5)
    assert torch.allclose(GaussianHead.entropy(pa), na.entropy().sum(-1), atol=1e-5)
    assert torch.allclose(GaussianHead.kl(pa, pb), kl_divergence(na, nb).sum(-1), atol=1e-5)
    assert GaussianHead.kl(pa, pb).shape == (7,)
    assert torch.allclose(GaussianHead.kl(pa, pa), torch.zeros(7), atol=1e-6)
    # Sampling: empirical moments of many samples match mean / std.
    torch.manual_seed(0)
    big = GaussianParams(mean_a[:1].expand(20000, 3), std_a[:1].expand(20000, 3))
    s = GaussianHead.sample(big, deterministic=False)
    assert torch.allclose(s.mean(0), mean_a[0], atol=0.03)
    assert torch.allclose(s.std(0), std_a[0], rtol=0.03)
    assert torch.equal(GaussianHead.sample(pa, deterministic=True), mean_a)


def test_gaussian_std_parametrisation():
    head = GaussianHead(in_dim=4, act_dim=3, gain=0.01, std_x=1.0, std_y=0.5)
    _, std = head(torch.randn(5, 4))
    expected = 1.0 / (1.0 + math.exp(-1.0)) * 0.5
    assert abs(expected - 0.3655) < 1e-4
    assert torch.allclose(std, torch.full((5, 3), expected), atol=1e-7)
    # Other x, y: sigma = sigmoid(log_std / x) * y, always below y.
    head = GaussianHead(4, 3, 0.01, std_x=2.0, std_y=0.8)
    with torch.no_grad():
        head.log_std.copy_(torch.tensor([-10.0, 0.0, 12.0]))
    _, std = head(torch.randn(2, 4))
    assert torch.allclose(std[0], torch.sigmoid(torch.tensor([-5.0, 0.0, 6.0])) * 0.8)
    assert abs(float(std[0, 1].detach()) - 0.4) < 1e-7
    assert (std < 0.8).all() and (std > 0).all()


# -------------------------------------------------------------------- 3. Categorical head
def test_categorical_masking_sampling_entropy_kl():
    g = torch.Generator().manual_seed(3)
    head = CategoricalHead(in_dim=4, n_actions=6, gain=1.0)
    avail = torch.tensor([[True, False, True, True, False, True],
                          [False, False, True, False, False, True],
                          [True, True, True, True, True, True]])
    feats_old, feats_new = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    with torch.no_grad():
        old, new = head(feats_old, avail), head(feats_new, avail)
        raw_old, raw_new = head.logits(feats_old), head.logits(feats_new)
    # masked actions: probability exactly 0 and never sampled
    for a in range(6):
        lp = CategoricalHead.log_prob(old, torch.full((3,), a))
        probs = lp.exp()
        assert torch.equal(probs[~avail[:, a]], torch.zeros(int((~avail[:, a]).sum())))
    torch.manual_seed(0)
    many = CategoricalParams(old.log_probs.unsqueeze(0).expand(20000, 3, 6), avail)
    samples = CategoricalHead.sample(many, deterministic=False)  # [20000, 3]
    assert avail.gather(1, samples.T).all()
    freq = torch.stack([torch.bincount(samples[:, b], minlength=6).float() / 20000 for b in range(3)])
    assert torch.allclose(freq, old.log_probs.exp(), atol=0.02)
    assert avail.gather(1, CategoricalHead.sample(old, True).unsqueeze(1)).all()
    # entropy / KL against torch distributions over the available actions only
    for b in range(3):
        idx = avail[b].nonzero().squeeze(1)
        p_old, p_new = Categorical(logits=raw_old[b, idx]), Categorical(logits=raw_new[b, idx])
        assert torch.allclose(CategoricalHead.entropy(old)[b], p_old.entropy(), atol=1e-5)
        assert torch.allclose(CategoricalHead.kl(old, new)[b], kl_divergence(p_old, p_new), atol=1e-5)
        lo, ln = p_old.logits, p_new.logits  # normalised log-probs
        hand = float((lo.exp() * (lo - ln)).sum())
        assert abs(float(CategoricalHead.kl(old, new)[b]) - hand) < 1e-5
        assert torch.allclose(old.log_probs[b, idx], lo, atol=1e-6)
    assert (CategoricalHead.kl(old, new) > 0).all()
    # without a mask, entropy is the plain categorical entropy
    with torch.no_grad():
        free = head(feats_old)
    assert torch.allclose(CategoricalHead.entropy(free), Categorical(logits=raw_old).entropy(), atol=1e-5)


@pytest.mark.parametrize("n_actions", [2, 8, 15, 16, 23])
def test_categorical_log_probs_and_gradients_equal_log_softmax_at_every_width(n_actions):
    """Narrow heads (< 16 actions) are padded before log_softmax on CPU for speed; the
    values and the gradient must be those of the plain masked log_softmax."""
    g = torch.Generator().manual_seed(n_actions)
    logits = torch.randn(50, n_actions, generator=g, requires_grad=True)
    avail = torch.rand(50, n_actions, generator=g) > 0.3
    avail[:, 0] = True
    weights = torch.randn(50, n_actions, generator=g) * avail
    ours = CategoricalHead.from_logits(logits, avail).log_probs
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    plain = logits.masked_fill(~avail, -1e10).log_softmax(-1)
    (grad_plain,) = torch.autograd.grad((plain * weights).sum(), logits)
    assert ours.shape == (50, n_actions)
    assert torch.allclose(ours[avail], plain[avail], atol=1e-6)
    assert (ours[~avail] < -1e9).all()
    assert torch.allclose(grad_ours, grad_plain, atol=1e-6)


# ------------------------------------------------------------------------------- 4. GAE
def test_gae_termination_and_truncation_by_hand():
    T, E, gamma, lam = 4, 2, 0.9, 0.8
    rewards = torch.tensor([[1.0, 0.5], [2.0, -1.0], [-0.5, 3.0], [1.5, 0.25]])
    values = torch.tensor([[0.3, 1.0], [0.7, -0.2], [1.1, 0.4], [-0.6, 0.9], [2.0, -1.5]]).unsqueeze(-1)
    final_values = torch.tensor([[9.0, 9.0], [9.0, 9.0], [9.0, 5.0], [9.0, 9.0]]).unsqueeze(-1)
    terminated = torch.zeros(T, E, dtype=torch.bool)
    truncated = torch.zeros(T, E, dtype=torch.bool)
    terminated[1, 0] = True  # env 0 ends for real at step 1
    truncated[2, 1] = True  # env 1 hits the time limit at step 2 (V(final) = 5)
    adv, ret = compute_gae(rewards, values, terminated, truncated, final_values, gamma, lam)
    expected = torch.zeros(T, E, 1)
    for e in range(E):
        next_adv = 0.0
        for t in reversed(range(T)):
            r, v = float(rewards[t, e]), float(values[t, e, 0])
            if terminated[t, e]:
                delta, next_adv = r - v, 0.0
            elif truncated[t, e]:
                delta, next_adv = r + gamma * float(final_values[t, e, 0]) - v, 0.0
            else:
                delta = r + gamma * float(values[t + 1, e, 0]) - v
            next_adv = delta + gamma * lam * next_adv
            expected[t, e, 0] = next_adv
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.allclose(ret, adv + values[:-1], atol=1e-6)
    # spot values written out: termination ignores V(next); truncation bootstraps V(final)
    assert abs(float(adv[1, 0, 0]) - (2.0 - 0.7)) < 1e-6
    assert abs(float(adv[2, 1, 0]) - (3.0 + 0.9 * 5.0 - 0.4)) < 1e-6
    assert abs(float(adv[3, 1, 0]) - (0.25 + 0.9 * -1.5 - 0.9)) < 1e-6  # rollout cut: values[T]
    # K > 1 critics are independent columns
    values2 = torch.cat([values, 2 * values], -1)
    final2 = torch.cat([final_values, 2 * final_values], -1)
    adv2, _ = compute_gae(rewards, values2, terminated, truncated, final2, gamma, lam)
    assert torch.allclose(adv2[..., :1], adv, atol=1e-6)


def test_train_treats_truncation_as_termination_without_proper_time_limits(monkeypatch):
    """train() passes (terminated | truncated, no truncation) when use_proper_time_limits is off."""
    import algorithms.base as base
    seen = {}
    real = base.compute_gae

    def spy(rewards, values, terminated, truncated, final_values, gamma, lam):
        seen.update(terminated=terminated.clone(), truncated=truncated.clone())
        return real(rewards, values, terminated, truncated, final_values, gamma, lam)

    monkeypatch.setattr(base, "compute_gae", spy)
    for proper in (True, False):
        algo = build(HAPPO, continuous_spec(1), use_proper_time_limits=proper, ppo_epoch=1)
        buf = fill_buffer(algo, 6, 3, seed=5)
        assert buf.truncated.any() and buf.terminated.any()
        record_actor_steps(algo, None)
        algo.train(buf)
        if proper:
            assert torch.equal(seen["terminated"], buf.terminated)
            assert torch.equal(seen["truncated"], buf.truncated)
        else:
            assert torch.equal(seen["terminated"], buf.terminated | buf.truncated)
            assert not seen["truncated"].any()


# ------------------------------------------------------------------------- 5. ValueNorm
def test_value_norm_statistics_and_inverse():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, generator=g) * 3.0 + 5.0
    norm = ValueNorm()
    norm.update(x)  # debiasing: exact after a single update
    mean, var = norm.mean_var()
    assert abs(float(mean) - float(x.double().mean())) < 1e-9
    assert abs(float(var) - float(x.double().var(unbiased=False))) < 1e-7
    for _ in range(100):
        norm.update(x)
    mean, var = norm.mean_var()
    assert abs(float(mean) - float(x.double().mean())) < 1e-8
    assert abs(float(var) - float(x.double().var(unbiased=False))) < 1e-6
    z = norm.normalize(x)
    assert z.dtype == x.dtype
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std(unbiased=False)) - 1.0) < 1e-5
    assert torch.allclose(norm.denormalize(z), x, atol=1e-5)
    assert torch.allclose(norm.normalize(norm.denormalize(x)), x, atol=1e-5)
    # two batches: debiased EMA = (beta * m1 + m2) / (1 + beta)
    y = torch.randn(50, generator=g) - 2.0
    two = ValueNorm()
    two.update(x)
    two.update(y)
    b = two.beta
    m1, m2 = float(x.double().mean()), float(y.double().mean())
    s1, s2 = float(x.double().pow(2).mean()), float(y.double().pow(2).mean())
    mean, var = two.mean_var()
    assert abs(float(mean) - (b * m1 + m2) / (1 + b)) < 1e-8
    assert abs(float(var) - ((b * s1 + s2) / (1 + b) - ((b * m1 + m2) / (1 + b)) ** 2)) < 1e-6
    # a constant batch: variance floored at 1e-2
    const = ValueNorm()
    const.update(torch.full((10,), 3.0))
    mean, var = const.mean_var()
    assert abs(float(mean) - 3.0) < 1e-9 and abs(float(var) - 1e-2) < 1e-12
    assert torch.allclose(const.normalize(torch.tensor([3.0, 3.1])), torch.tensor([0.0, 1.0]), atol=1e-4)


# ------------------------------------------------------------------------- 6. value loss
def test_huber_value_loss_both_signs():
    algo = build(HAPPO, continuous_spec(1), use_clipped_value_loss=False, use_huber_loss=True,
                 huber_delta=10.0)
    targets = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    values = torch.tensor([[-25.0, -10.5, -10.0, -3.0, 0.5, 9.0, 12.0, 40.0]])  # e = -values
    mask = torch.ones_like(values, dtype=torch.bool)
    loss = algo.value_loss(values, values.clone(), targets, mask)
    ref = F.huber_loss(values, targets, reduction="none", delta=10.0)
    assert torch.allclose(loss, ref.mean(), atol=1e-5)
    # each element alone (masking all others): catches sign errors element by element
    for j in range(values.shape[1]):
        m = torch.zeros_like(mask)
        m[0, j] = True
        one = algo.value_loss(values, values.clone(), targets, m)
        e = abs(float(values[0, j]))
        hand = 0.5 * e * e if e <= 10 else 10 * (e - 5)
        assert abs(float(one) - hand) < 1e-4, (float(values[0, j]), float(one), hand)
    # squared loss when Huber is off
    algo.config.use_huber_loss = False
    assert torch.allclose(algo.value_loss(values, values.clone(), targets, mask), (0.5 * values ** 2).mean())


def test_clipped_value_loss_is_max_of_unclipped_and_clipped():
    algo = build(HAPPO, continuous_spec(1), use_clipped_value_loss=True, use_huber_loss=True,
                 huber_delta=1.0, clip_param=0.2)
    old = torch.tensor([[0.0, 0.0, 1.0, 1.0, -2.0, 0.5]])
    values = torch.tensor([[1.0, -1.0, 1.1, 0.0, 3.0, 0.5]])
    targets = torch.tensor([[2.0, 0.5, -1.0, 1.5, -2.5, 4.0]])
    mask = torch.tensor([[True, True, True, True, True, False]])

    def huber(e):
        return 0.5 * e * e if abs(e) <= 1.0 else 1.0 * (abs(e) - 0.5)

    hand = []
    for v, o, t in zip(values[0].tolist(), old[0].tolist(), targets[0].tolist()):
        clipped = o + min(max(v - o, -0.2), 0.2)
        hand.append(max(huber(t - v), huber(t - clipped)))
    expected = sum(hand[:5]) / 5
    assert abs(float(algo.value_loss(values, old, targets, mask)) - expected) < 1e-5
    assert any(huber(t - v) < h for v, t, h in zip(values[0].tolist(), targets[0].tolist(), hand[:5]))


# --------------------------------------------------------------------------- 7. HAPPO loss
def test_happo_loss_by_hand():
    lp = torch.tensor([[-1.0, -0.5, -2.0, -0.2, -1.3, -0.7]])
    old = torch.tensor([[-1.2, -0.5, -1.5, -0.6, -1.0, -0.7]])
    adv = torch.tensor([[1.0, -2.0, 0.5, -1.0, 2.0, 3.0]])
    M = torch.tensor([[1.0, 0.8, 1.3, 0.5, 2.0, 1.1]])
    active = torch.tensor([[True, True, True, True, True, False]])
    entropy = torch.tensor([[1.0, 1.2, 0.8, 0.9, 1.1, 50.0]])
    clip, c = 0.2, 0.01
    loss, info = happo_loss(lp, old, adv, M, active, entropy, clip, c)
    terms, ents = [], []
    for j in range(5):
        r = math.exp(lp[0, j] - old[0, j])
        a = float(adv[0, j])
        terms.append(float(M[0, j]) * min(r * a, min(max(r, 1 - clip), 1 + clip) * a))
        ents.append(float(entropy[0, j]))
    expected = -sum(terms) / 5 - c * sum(ents) / 5
    assert abs(float(loss) - expected) < 1e-6
    assert abs(float(info["policy_loss"]) + sum(terms) / 5) < 1e-6
    assert abs(float(info["entropy"]) - sum(ents) / 5) < 1e-6
    # ratios exp(.2)=1.22, exp(-.5)=0.61, exp(.4)=1.49, exp(-.3)=0.74 are clipped: 4 of 5
    assert abs(float(info["clip_fraction"]) - 4 / 5) < 1e-6
    # the inactive sample does not matter
    lp2, old2, adv2, M2, ent2 = lp.clone(), old.clone(), adv.clone(), M.clone(), entropy.clone()
    lp2[0, 5], old2[0, 5], adv2[0, 5], M2[0, 5], ent2[0, 5] = 3.0, -4.0, -100.0, 7.0, -9.0
    loss2, _ = happo_loss(lp2, old2, adv2, M2, active, ent2, clip, c)
    assert float(loss2) == float(loss)
    # gradient through the log-probs: zero on the inactive and on clipped-out samples
    lpg = lp.clone().requires_grad_(True)
    happo_loss(lpg, old, adv, M, active, entropy, clip, c)[0].backward()
    assert lpg.grad[0, 5] == 0
    r1 = math.exp(0.2)  # sample 0: r > 1 + clip, A > 0 -> clipped, no gradient
    assert r1 > 1.2 and lpg.grad[0, 0] == 0
    # sample 3: r = exp(0.4) > 1.2 with A < 0 -> unclipped term is the min: gradient -M r A / 5
    assert abs(float(lpg.grad[0, 3]) - (-0.5 * math.exp(0.4) * -1.0 / 5)) < 1e-6


# ------------------------------------------------------------------------- 8. the M factor
def test_m_factor_is_product_of_previous_ratios():
    algo = build(HAPPO, continuous_spec(3), fixed_order=True, ppo_epoch=3, lr=1e-2)
    buf = fill_buffer(algo, 6, 4, seed=7, p_inactive=0.2)
    assert (~buf.active).any()
    for i in range(3):  # initial ratios are exactly 1 (log-probs came from these actors)
        assert torch.allclose(independent_ratio(algo, buf, i), torch.ones(6, 4), atol=1e-5)
    calls = record_actor_steps(algo, HAPPO.actor_step)
    stats = algo.train(buf)
    assert [c["g"] for c in calls] == [0, 1, 2]
    ratios = [independent_ratio(algo, buf, i) for i in range(3)]  # actor i last changed in its step
    assert all((r - 1).abs().max() > 1e-3 for r in ratios)  # every actor really moved
    assert torch.equal(calls[0]["M"], torch.ones(6, 4))
    assert torch.allclose(calls[1]["M"], ratios[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(calls[2]["M"], ratios[0] * ratios[1], rtol=1e-5, atol=1e-6)
    for c in calls:
        assert not c["requires_grad"] and c["grad_fn"] is None
    assert stats["agent0/order"] == 0.0 and stats["agent2/order"] == 2.0
    assert abs(stats["agent2/M_mean"] - float((ratios[0] * ratios[1]).mean())) < 1e-5


def test_hatrpo_m_factor_uses_the_accepted_step_ratio():
    """HATRPO takes M's next factor from its accepted line-search trial (no extra forward
    pass): it must equal the ratio recomputed independently, and exactly 1 when rejected."""
    algo = build(HATRPO, continuous_spec(3), fixed_order=True, kl_threshold=0.05)
    buf = fill_buffer(algo, 6, 4, seed=7, p_inactive=0.2)
    calls = record_actor_steps(algo, HATRPO.actor_step)

    def second_pass(g, batch):
        raise AssertionError("HATRPO's step returns its ratio: the loop must not recompute it")
    algo.new_ratio = second_pass
    stats = algo.train(buf)
    factors = []
    for i in range(3):
        if stats[f"agent{i}/accepted"]:
            factors.append(independent_ratio(algo, buf, i))
        else:
            factors.append(torch.ones(6, 4))
    assert any(stats[f"agent{i}/accepted"] for i in range(2))
    assert torch.equal(calls[0]["M"], torch.ones(6, 4))
    assert torch.allclose(calls[1]["M"], factors[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(calls[2]["M"], factors[0] * factors[1], rtol=1e-5, atol=1e-6)


def test_m_factor_follows_random_order():
    algo = build(HAPPO, continuous_spec(3), fixed_order=False, ppo_epoch=2, lr=1e-2, seed=11)
    buf = fill_buffer(algo, 5, 3, seed=8)
    calls = record_actor_steps(algo, HAPPO.actor_step)
    algo.train(buf)
    order = [c["g"] for c in calls]
    ratios = {i: independent_ratio(algo, buf, i) for i in range(3)}
    expected = torch.ones(5, 3)
    for c in calls:
        assert torch.allclose(c["M"], expected, rtol=1e-5, atol=1e-6)
        expected = expected * ratios[c["g"]]
    assert sorted(order) == [0, 1, 2]


def test_order_is_a_fresh_permutation_each_iteration():
    algo = build(HAPPO, continuous_spec(3), fixed_order=False, seed=5)
    buf = fill_buffer(algo, 3, 2, seed=1)
    calls = record_actor_steps(algo, None)  # no actor updates: only the loop order matters
    orders = []
    for _ in range(8):
        calls.clear()
        algo.train(buf)
        orders.append(tuple(c["g"] for c in calls))
    assert all(sorted(o) == [0, 1, 2] for o in orders)
    assert len(set(orders)) > 1
    fixed = build(HAPPO, continuous_spec(3), fixed_order=True, seed=5)
    calls = record_actor_steps(fixed, None)
    for _ in range(3):
        calls.clear()
        fixed.train(buf)
        assert [c["g"] for c in calls] == [0, 1, 2]


def test_mappo_gives_every_agent_m_equal_one():
    algo = build(MAPPO, continuous_spec(3), share_param=False, ppo_epoch=2, lr=1e-2)
    buf = fill_buffer(algo, 5, 3, seed=9)
    calls = record_actor_steps(algo, HAPPO.actor_step)
    algo.train(buf)
    assert [c["g"] for c in calls] == [0, 1, 2]
    assert all(torch.equal(c["M"], torch.ones(5, 3)) for c in calls)
    assert (independent_ratio(algo, buf, 0) - 1).abs().max() > 1e-3


@pytest.mark.parametrize("cls", [HAPPO, HATRPO])
def test_sequential_algorithms_with_shared_parameters(cls):
    """One network for every agent, still updated once per agent in a random order with M
    (the reference's share_param): agent 2's M is agent 1's ratio after its step."""
    algo = build(cls, discrete_spec(3), share_param=True, ppo_epoch=2, actor_num_mini_batch=2,
                 kl_threshold=0.05, seed=3)
    assert algo.actors[0] is algo.actors[1] is algo.actors[2]
    assert algo.actor_optims[0] is algo.actor_optims[2] and len(algo.act_units) == 1
    before = [p.clone() for p in algo.actors[0].parameters()]
    buf = fill_buffer(algo, 6, 4, seed=2)
    calls, ratios = [], []

    def step(g, batch, M):  # the real step, then the agent's ratio under the shared network
        calls.append({"g": g, "M": M.clone()})
        out = cls.actor_step(algo, g, batch, M)
        ratios.append(algo.new_ratio(g, batch))
        return out
    algo.actor_step = step
    algo.train(buf)
    assert sorted(c["g"] for c in calls) == [0, 1, 2]
    assert torch.equal(calls[0]["M"], torch.ones(6, 4))
    assert torch.allclose(calls[1]["M"], ratios[0]) and (ratios[0] - 1).abs().max() > 1e-4
    assert torch.allclose(calls[2]["M"], ratios[0] * ratios[1])
    assert any(not torch.equal(a, b) for a, b in zip(before, algo.actors[0].parameters()))
    twin = build(cls, discrete_spec(3), share_param=True, seed=9)  # checkpoint round trip
    twin.load_state_dict(algo.state_dict())
    assert twin.actors[0] is twin.actors[2]
    assert all(torch.equal(a, b) for a, b in zip(twin.actors[0].parameters(), algo.actors[0].parameters()))


def test_mappo_with_shared_parameters_updates_all_agents_at_once():
    algo = build(MAPPO, discrete_spec(3), share_param=True, ppo_epoch=1)
    calls = record_actor_steps(algo, HAPPO.actor_step)
    algo.train(fill_buffer(algo, 5, 2, seed=4))
    assert len(calls) == 1 and calls[0]["batch"].obs.shape[:2] == (5, 2 * 3)


# ---------------------------------------------------------------------------- 9. HATRPO
def _hatrpo_case(spec, seed, **overrides):
    algo = build(HATRPO, spec, seed=seed, **overrides)
    buf = fill_buffer(algo, 8, 4, seed=seed, p_inactive=0.25)
    g = torch.Generator().manual_seed(seed)
    advantages = torch.randn(8, 4, 1, generator=g)
    batch = algo.actor_batch(0, buf, advantages)
    M = torch.rand(8, 4, generator=g) + 0.5
    return algo, buf, batch, M


def _mean_kl_and_surrogate(actor, batch, old_dist, M):
    with torch.no_grad():
        lp, _, dist = actor.evaluate(batch.obs, batch.actions, None, batch.starts, batch.avail)
        surrogate = masked_mean(torch.exp(lp - batch.old_log_probs) * M * batch.advantages, batch.active)
        if isinstance(actor.head, GaussianHead):
            kl = kl_divergence(Normal(old_dist.mean, old_dist.std), Normal(dist.mean, dist.std)).sum(-1)
        else:
            lo, ln = old_dist.log_probs, dist.log_probs
            kl = (lo.exp() * (lo - ln)).masked_fill(~batch.avail, 0.0).sum(-1)
    return float(masked_mean(kl, batch.active)), float(surrogate), dist




def _old_dist(actor, batch):
    with torch.no_grad():
        d = actor.evaluate(batch.obs, batch.actions, None, batch.starts, batch.avail)[2]
    return type(d)(*(None if t is None else t.clone() for t in d))


@pytest.mark.parametrize("spec_fn,seed", [(continuous_spec, 0), (continuous_spec, 1), (discrete_spec, 2),
                                          (discrete_spec, 3)])
def test_hatrpo_step_accepted_within_trust_region(spec_fn, seed):
    algo, buf, batch, M = _hatrpo_case(spec_fn(2), seed)
    actor = algo.actors[0]
    before = [p.detach().clone() for p in actor.parameters()]
    old_dist = _old_dist(actor, batch)
    kl0, surrogate0, _ = _mean_kl_and_surrogate(actor, batch, old_dist, M)
    assert kl0 == 0.0
    stats = algo.actor_step(0, batch, M).stats
    kl, surrogate1, _ = _mean_kl_and_surrogate(actor, batch, old_dist, M)
    assert stats["accepted"] == 1.0
    assert 0 < kl < algo.config.kl_threshold
    assert abs(stats["kl"] - kl) < 1e-6
    assert surrogate1 > surrogate0
    assert abs(stats["improvement"] - (surrogate1 - surrogate0)) < 1e-6
    assert stats["improvement"] > algo.config.accept_ratio * stats["expected_improvement"] * \
        algo.config.backtrack_coeff ** (stats["ls_steps"] - 1)
    assert any(not torch.equal(b, p) for b, p in zip(before, actor.parameters()))
    # the full step is scaled to the KL boundary, so the KL is of the order of the threshold
    assert kl > 0.05 * algo.config.kl_threshold


@pytest.mark.parametrize("spec_fn", [continuous_spec, discrete_spec])
def test_hatrpo_entropy_bonus_is_part_of_the_objective(spec_fn):
    """Zero advantages: with no bonus there is nothing to improve and the policy stays put;
    with one, the accepted step raises the mean entropy inside the trust region, and the
    reported improvement is exactly c_ent times that rise."""
    def mean_entropy(actor, batch):
        with torch.no_grad():
            entropy = actor.evaluate(batch.obs, batch.actions, None, batch.starts, batch.avail)[1]
        return float(masked_mean(entropy, batch.active))

    for coef in (0.0, 0.05):
        algo, buf, batch, M = _hatrpo_case(spec_fn(2), 5, entropy_coef=coef)
        batch = batch._replace(advantages=torch.zeros_like(batch.advantages))
        actor = algo.actors[0]
        if isinstance(actor.head, CategoricalHead):  # off the near-uniform start, the maximum
            with torch.no_grad():
                actor.head.logits.weight.mul_(100.0)
        before = [p.detach().clone() for p in actor.parameters()]
        old_dist = _old_dist(actor, batch)
        h0 = mean_entropy(actor, batch)
        stats = algo.actor_step(0, batch, M).stats
        if coef == 0.0:
            assert stats["accepted"] == 0.0 and stats["grad_norm"] < 1e-10
            assert all(torch.equal(b, p) for b, p in zip(before, actor.parameters()))
            continue
        kl, _, _ = _mean_kl_and_surrogate(actor, batch, old_dist, M)
        h1 = mean_entropy(actor, batch)
        assert stats["accepted"] == 1.0 and 0 < kl < algo.config.kl_threshold
        assert h1 > h0
        assert abs(stats["improvement"] - coef * (h1 - h0)) < 1e-6


def test_hatrpo_step_rejected_restores_parameters_bitwise():
    algo, buf, batch, M = _hatrpo_case(continuous_spec(2), 4, accept_ratio=1e9, ls_step=4)
    actor = algo.actors[0]
    before = [p.detach().clone() for p in actor.parameters()]
    stats = algo.actor_step(0, batch, M).stats
    assert stats["accepted"] == 0.0 and stats["ls_steps"] == 4.0 and stats["kl"] == 0.0
    assert all(torch.equal(b, p) for b, p in zip(before, actor.parameters()))
    # every sample inactive: no gradient, early exit, nothing changes
    empty = batch._replace(active=torch.zeros_like(batch.active))
    stats = algo.actor_step(0, empty, M).stats
    assert stats["accepted"] == 0.0 and stats["grad_norm"] == 0.0
    assert all(torch.equal(b, p) for b, p in zip(before, actor.parameters()))


def test_hatrpo_rejects_a_step_outside_the_kl_threshold(monkeypatch):
    """Only the KL test can fail here (accept_ratio = -1e9, one line-search step). Over
    several random cases, whenever the proposed step's KL (measured independently) exceeds
    the threshold the step is rejected and the old parameters stay; otherwise, with a
    positive improvement, it is accepted. At least one case of each kind must occur."""
    import algorithms.hatrpo as hatrpo
    real_set = hatrpo.set_flat_params
    rejected = accepted = 0
    for seed in range(40):
        algo, buf, batch, M = _hatrpo_case(continuous_spec(2), seed, kl_threshold=5.0, ls_step=1,
                                           accept_ratio=-1e9)
        actor = algo.actors[0]
        before = [p.detach().clone() for p in actor.parameters()]
        old_dist = _old_dist(actor, batch)
        _, surrogate0, _ = _mean_kl_and_surrogate(actor, batch, old_dist, M)
        proposed = []

        def spy(params, flat):
            proposed.append(flat.clone())
            real_set(params, flat)

        monkeypatch.setattr(hatrpo, "set_flat_params", spy)
        stats = algo.actor_step(0, batch, M).stats
        monkeypatch.setattr(hatrpo, "set_flat_params", real_set)
        trial = copy.deepcopy(actor)
        set_flat_params(list(trial.parameters()), proposed[0])
        kl, surrogate1, _ = _mean_kl_and_surrogate(trial, batch, old_dist, M)
        if kl >= algo.config.kl_threshold:
            assert stats["accepted"] == 0.0
            assert all(torch.equal(b, p) for b, p in zip(before, actor.parameters()))
            assert len(proposed) == 2 and torch.equal(proposed[1], flat_params(before))  # trial, restore
            rejected += 1
        elif surrogate1 > surrogate0:
            assert stats["accepted"] == 1.0 and len(proposed) == 1
            accepted += 1
        if rejected and accepted:
            break
    assert rejected and accepted, (rejected, accepted)


@pytest.mark.parametrize("spec_fn,seed,overrides", [
    (continuous_spec, 6, dict(kl_threshold=5.0, ls_step=1)),
    (discrete_spec, 7, dict(kl_threshold=3.0, ls_step=1)),
    (continuous_spec, 8, dict(cg_damping=0.0, ls_step=2)),
    (discrete_spec, 9, dict(kl_threshold=1e-4, ls_step=1)),
])
def test_hatrpo_step_accepts_inside_trust_region_or_restores(spec_fn, seed, overrides):
    algo, buf, batch, M = _hatrpo_case(spec_fn(2), seed, **overrides)
    actor = algo.actors[0]
    before = [p.detach().clone() for p in actor.parameters()]
    old_dist = _old_dist(actor, batch)
    stats = algo.actor_step(0, batch, M).stats
    kl, _, _ = _mean_kl_and_surrogate(actor, batch, old_dist, M)
    if stats["accepted"] == 1.0:
        assert kl < algo.config.kl_threshold
        assert any(not torch.equal(b, p) for b, p in zip(before, actor.parameters()))
    else:
        assert stats["accepted"] == 0.0
        assert all(torch.equal(b, p) for b, p in zip(before, actor.parameters()))


# ------------------------------------------------------------------- 10. dead-agent masks
def _actor_loss(algo, g, batch, M=None):
    actor = algo.actors[g]
    lp, ent, _ = actor.evaluate(batch.obs, batch.actions, None, batch.starts, batch.avail)
    M = torch.ones_like(lp) if M is None else M
    return happo_loss(lp, batch.old_log_probs, batch.advantages, M, batch.active, ent,
                      algo.config.clip_param, algo.config.entropy_coef)[0]


def test_active_mask_flag_irrelevant_when_all_agents_alive():
    algo = build(HAPPO, discrete_spec(2), use_policy_active_masks=True)
    buf = fill_buffer(algo, 5, 3, seed=12, p_inactive=0.0)
    adv = torch.randn(5, 3, 1, generator=torch.Generator().manual_seed(0)) * 2 + 1
    with torch.no_grad():  # perturb the actor so ratios differ from 1
        for p in algo.actors[0].parameters():
            p.add_(0.05 * torch.randn_like(p))
    on = algo.actor_batch(0, buf, adv)
    algo.config.use_policy_active_masks = False
    off = algo.actor_batch(0, buf, adv)
    assert torch.equal(on.advantages, off.advantages) and torch.equal(on.active, off.active)
    a = adv[..., 0]
    assert torch.allclose(on.advantages, (a - a.mean()) / (a.std(unbiased=False) + 1e-5), atol=1e-6)
    assert torch.equal(_actor_loss(algo, 0, on), _actor_loss(algo, 0, off))


def test_inactive_samples_do_not_affect_the_actor_update():
    algo = build(HAPPO, discrete_spec(2), use_policy_active_masks=True, ppo_epoch=2, lr=1e-2)
    buf = fill_buffer(algo, 6, 4, seed=13, p_inactive=0.3)
    dead = ~buf.active[:, :, 0]
    assert dead.any() and (~dead).any()
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(6, 4, 1, generator=g)
    with torch.no_grad():
        for p in algo.actors[0].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    # change everything about agent 0's dead samples: advantage, obs, action, old log-prob
    buf2 = copy.deepcopy(buf)
    adv2 = adv.clone()
    adv2[dead] = torch.randn(int(dead.sum()), 1, generator=g) * 100
    buf2.obs[0][dead] = torch.randn(int(dead.sum()), buf.obs[0].shape[-1], generator=g) * 5
    buf2.actions[0][dead] = 0  # action 0 is always available
    buf2.log_probs[:, :, 0][dead] = torch.rand(int(dead.sum()), generator=g) * -3
    b1, b2 = algo.actor_batch(0, buf, adv), algo.actor_batch(0, buf2, adv2)
    assert torch.equal(b1.advantages[~dead], b2.advantages[~dead])
    # the normalisation uses the alive samples only
    alive = adv[..., 0][~dead]
    assert torch.allclose(b1.advantages[~dead], (alive - alive.mean()) / (alive.std(unbiased=False) + 1e-5),
                          atol=1e-5)
    M = torch.rand(6, 4, generator=g) + 0.5
    grads = []
    for b in (b1, b2):
        algo.actors[0].zero_grad()
        loss = _actor_loss(algo, 0, b, M)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in algo.actors[0].parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.allclose(x, y, atol=1e-7, rtol=0) for x, y in zip(grads[0][1], grads[1][1]))
    # a whole actor_step (several Adam steps) ends at the same parameters
    twins = [build(HAPPO, discrete_spec(2), use_policy_active_masks=True, ppo_epoch=2, lr=1e-2)
             for _ in range(2)]
    for twin, b in zip(twins, (b1, b2)):
        twin.actors.load_state_dict(algo.actors.state_dict())
        HAPPO.actor_step(twin, 0, b, M)
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(twins[0].actors[0].parameters(),
                                                                twins[1].actors[0].parameters()))
    assert any(not torch.equal(x, y) for x, y in zip(twins[0].actors[0].parameters(),
                                                     algo.actors[0].parameters()))
    # control: without the mask the dead samples do count
    algo.config.use_policy_active_masks = False
    c1, c2 = algo.actor_batch(0, buf, adv), algo.actor_batch(0, buf2, adv2)
    assert not torch.equal(_actor_loss(algo, 0, c1, M), _actor_loss(algo, 0, c2, M))


# ------------------------------------------------------------------ 11. recurrent chunking
def test_recurrent_minibatches_cover_each_sample_once_in_aligned_chunks():
    T, B, L = 12, 3, 4
    for n in (1, 2, 4, 9):
        seen = torch.zeros(T, B, dtype=torch.long)
        parts = list(minibatches(T, B, n, L, np.random.default_rng(n)))
        x = torch.randn(T + 1, B, 2)  # like obs: one more row than the rollout
        for t_idx, b_idx, flat in parts:
            assert torch.equal(take(x, Rows(t_idx, b_idx, flat)), x[t_idx, b_idx])
            assert t_idx.shape == (L, b_idx.shape[0])
            assert (t_idx[0] % L == 0).all()
            assert torch.equal(t_idx, t_idx[:1] + torch.arange(L).unsqueeze(1))
            seen[t_idx, b_idx] += 1
        assert torch.equal(seen, torch.ones(T, B, dtype=torch.long))
    # shuffled: two seeds give different chunk orders
    a = torch.cat([r.b for r in minibatches(T, B, 1, L, np.random.default_rng(0))])
    a_t = torch.cat([r.t[0] for r in minibatches(T, B, 1, L, np.random.default_rng(0))])
    b_t = torch.cat([r.t[0] for r in minibatches(T, B, 1, L, np.random.default_rng(1))])
    assert a.shape == (9,) and not torch.equal(a_t, b_t)
    # feed-forward: single samples, every (t, b) once; one mini-batch means "the whole batch"
    seen = torch.zeros(5, 3, dtype=torch.long)
    x = torch.randn(5, 3, 2)
    for rows in minibatches(5, 3, 4, None, np.random.default_rng(0)):
        t_idx, b_idx = rows.t, rows.b
        assert torch.equal(take(x, rows), x[t_idx, b_idx])
        assert t_idx.shape == (1, b_idx.shape[0])
        seen[t_idx, b_idx] += 1
    assert torch.equal(seen, torch.ones(5, 3, dtype=torch.long))
    assert list(minibatches(5, 3, 1, None, np.random.default_rng(0))) == [None]
    x = torch.arange(36.0).view(12, 3)
    t_idx = torch.tensor([[4], [5], [6], [7]])
    idx = Rows(t_idx, torch.tensor([2]), t_idx * 3 + 2)
    assert torch.equal(take(x, idx), torch.tensor([[14.0], [17.0], [20.0], [23.0]]))
    assert torch.equal(take(x.t().contiguous().t(), idx), take(x, idx))  # strided: advanced indexing
    assert take(x, None) is x and take(None, idx) is None
    h = torch.arange(12 * 3 * 2.0).view(12, 3, 1, 2)
    assert torch.equal(first_hidden(h, idx), h[4, [2]]) and torch.equal(first_hidden(h, None), h[0])


@pytest.mark.parametrize("T,B,n,L", [(12, 3, 4, 4), (5, 2, 6, None), (12, 3, 6, 4)])
def test_minibatches_yield_exactly_num_mini_batch_parts(T, B, n, L):
    parts = list(minibatches(T, B, n, L, np.random.default_rng(0)))
    sizes = [rows.b.shape[0] for rows in parts]
    assert len(parts) == n and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("L", [None, 4])
def test_minibatch_indices_live_on_the_buffers_device(L):
    """``take`` uses index_select, which refuses CPU indices for a CUDA tensor: the indices
    must be made on the buffer's device. No GPU here, so the meta device stands in for it
    (a CPU-built index would report device cpu)."""
    rows = next(minibatches(12, 3, 2, L, np.random.default_rng(0), torch.device("meta")))
    assert {rows.t.device.type, rows.b.device.type, rows.flat.device.type} == {"meta"}
    assert take(torch.zeros(12, 3, 5, device="meta"), rows).shape == (L or 1, rows.b.shape[0], 5)


@pytest.mark.parametrize("recurrent_n", [1, 2])
def test_gru_trunk_resets_and_chunking(recurrent_n):
    torch.manual_seed(0)
    trunk = Trunk(3, [8], "tanh", feature_norm=True, recurrent=True, recurrent_n=recurrent_n)
    L, B = 7, 2
    x = torch.randn(L, B, 3)
    h0 = torch.randn(B, recurrent_n, 8)
    starts = torch.zeros(L, B, dtype=torch.bool)
    starts[3, 0] = True
    with torch.no_grad():
        out, h_end = trunk(x, h0, starts)
        fresh, fresh_end = trunk(x[3:, :1], torch.zeros(1, recurrent_n, 8), starts[3:, :1])
        assert torch.allclose(out[3:, :1], fresh, atol=1e-6)
        assert torch.allclose(h_end[:1], fresh_end, atol=1e-6)
        # no reset: the carried state matters (the comparison above can fail)
        no_reset, _ = trunk(x, h0, torch.zeros_like(starts))
        assert not torch.allclose(no_reset[3:, :1], fresh, atol=1e-3)
        assert torch.allclose(no_reset[:3], out[:3]) and torch.allclose(no_reset[:, 1], out[:, 1])
        # two chunks with the carried hidden == the whole sequence
        first, h_mid = trunk(x[:4], h0, starts[:4])
        second, h_last = trunk(x[4:], h_mid, starts[4:])
        assert torch.allclose(torch.cat([first, second]), out, atol=1e-6)
        assert torch.allclose(h_last, h_end, atol=1e-6)
        assert h_end.shape == (B, recurrent_n, 8)


def test_recurrent_chunks_reproduce_rollout_log_probs():
    algo = build(HAPPO, continuous_spec(2), use_recurrent_policy=True, data_chunk_length=4,
                 hidden_sizes=[8])
    T, E = 8, 3
    buf = fill_buffer(algo, T, E, seed=21)
    assert buf.starts[1:-1].any() and not buf.starts[1:-1].all()
    adv = torch.randn(T, E, 1)
    for i in range(2):
        batch = algo.actor_batch(i, buf, adv)
        assert torch.allclose(algo.new_ratio(i, batch), torch.ones(T, E), atol=1e-5)
        differs = False
        for idx in minibatches(T, E, 3, 4, np.random.default_rng(i)):
            with torch.no_grad():
                lp, _, _ = algo.actors[i].evaluate(take(batch.obs, idx), take(batch.actions, idx),
                                                   first_hidden(batch.hidden, idx), take(batch.starts, idx),
                                                   take(batch.avail, idx))
                zero = torch.zeros_like(first_hidden(batch.hidden, idx))
                lp0, _, _ = algo.actors[i].evaluate(take(batch.obs, idx), take(batch.actions, idx), zero,
                                                    take(batch.starts, idx), take(batch.avail, idx))
            assert torch.allclose(lp, take(batch.old_log_probs, idx), atol=1e-5)
            differs |= not torch.allclose(lp0, lp, atol=1e-4)
        assert differs  # the stored hidden state matters, so the check above can fail


# ------------------------------------------------------------ 12. single agent: HAPPO == PPO
def test_single_agent_happo_loss_is_ppo_loss():
    g = torch.Generator().manual_seed(30)
    lp = torch.randn(4, 5, generator=g) * 0.3 - 1
    old = lp + torch.randn(4, 5, generator=g) * 0.3
    adv = torch.randn(4, 5, generator=g)
    ent = torch.rand(4, 5, generator=g)
    active = torch.ones(4, 5, dtype=torch.bool)
    loss, _ = happo_loss(lp, old, adv, torch.ones(4, 5), active, ent, 0.2, 0.0)
    r = torch.exp(lp - old)
    # PPO-clip written per advantage sign: A >= 0 caps r at 1 + eps, A < 0 floors it at 1 - eps
    ppo = torch.where(adv >= 0, torch.minimum(r, torch.tensor(1.2)) * adv,
                      torch.maximum(r, torch.tensor(0.8)) * adv)
    assert torch.allclose(loss, -ppo.mean(), atol=1e-6)
    assert ((r - 1).abs() > 0.2).any()  # some clipping happens


def test_single_agent_happo_trains_exactly_like_mappo():
    spec = continuous_spec(1)
    happo = build(HAPPO, spec, seed=40, ppo_epoch=3, fixed_order=False)
    mappo = build(MAPPO, spec, seed=40, ppo_epoch=3)
    assert all(torch.equal(a, b) for a, b in zip(happo.actors.parameters(), mappo.actors.parameters()))
    buf = fill_buffer(happo, 6, 4, seed=41, p_inactive=0.2)
    calls = record_actor_steps(happo, HAPPO.actor_step)
    happo.train(buf)
    mappo.train(copy.deepcopy(buf))
    assert len(calls) == 1 and torch.equal(calls[0]["M"], torch.ones(6, 4))
    assert all(torch.equal(a, b) for a, b in zip(happo.actors.parameters(), mappo.actors.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(happo.critics.parameters(), mappo.critics.parameters()))
    assert (independent_ratio(happo, buf, 0) - 1).abs().max() > 1e-3
