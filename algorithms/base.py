"""The machinery every algorithm shares: actors, critic(s), rollout inference, targets,
the sequential agent-by-agent update loop and the critic update.

HAPPO and HATRPO plug their per-agent step (``actor_step``) into ``train``'s loop:

    order = random permutation of agents                    (Kuba et al. 2022, Alg. 1)
    M = 1                                                   [T, n_envs]
    for i in order:
        actor_step(i, batch_i, M)     # maximise E[M * r_i * A] under a trust region
        M = M * pi_new_i / pi_old_i   # detached: a constant for the agents after i

MAPPO and IPPO use the same loop with ``sequential = False``: M stays 1 and every actor
learns from the same data simultaneously (MAPPO optionally with one shared actor).

Shapes: T = episode_length, E = n_envs, N = n_agents, K = number of critics (1 for a
centralised V(s), N for IPPO's per-agent V(o_i)). An actor "group" is the set of agents
one actor update serves (one agent, or all agents for MAPPO/IPPO with shared parameters;
HAPPO/HATRPO with shared parameters keep one group per agent over one network); its
batch folds agents into the env axis: B = E * len(group).
"""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from algorithms.networks import Actor, Critic, StackedActors
from algorithms.value_norm import ValueNorm
from envs.base import EnvSpec
from utils.errors import ConfigError


class NumericalError(RuntimeError):
    """A NaN/inf appeared; the message names the quantity, agent and update."""


class ActorBatch(NamedTuple):
    """One actor group's rollout data, sequences [T, B, ...] (B = E * agents in the group)."""

    obs: torch.Tensor  # [T, B, obs_dim]
    actions: torch.Tensor  # [T, B, act_dim] float or [T, B] long
    old_log_probs: torch.Tensor  # [T, B]
    avail: torch.Tensor | None  # [T, B, n_actions] bool
    active: torch.Tensor  # [T, B] bool
    advantages: torch.Tensor  # [T, B], normalised over active samples
    starts: torch.Tensor  # [T, B] bool, obs[t] is the first of an episode
    hidden: torch.Tensor | None  # [T, B, recurrent_n, H], actor state before obs[t]


class StepResult(NamedTuple):
    """What an actor step hands back to the sequential loop."""

    stats: dict[str, float]  # diagnostics, averaged over the step's mini-batches
    # pi_new / pi_old of the group after the step, [T, B] (1 where inactive), when the step
    # computed it anyway (HATRPO's accepted line-search trial); None: the loop computes it.
    new_ratio: torch.Tensor | None = None


class CriticBatch(NamedTuple):
    """One critic's data, [T, E, ...]."""

    inputs: torch.Tensor  # [T, E, in_dim]
    returns: torch.Tensor  # [T, E] (raw scale)
    old_values: torch.Tensor  # [T, E] (network output scale)
    mask: torch.Tensor  # [T, E] bool, samples that count in the loss
    starts: torch.Tensor  # [T, E] bool
    hidden: torch.Tensor | None  # [T, E, recurrent_n, H]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def compute_gae(rewards, values, terminated, truncated, final_values, gamma: float, lam: float):
    """Generalised advantage estimation with time-limit bootstrapping.

    rewards [T, E]; values [T+1, E, K] (raw scale; values[T] bootstraps the rollout cut);
    terminated, truncated [T, E] bool (step t ended the episode; the env then auto-reset,
    so values[t+1] belongs to the next episode); final_values [T, E, K] = V(final state)
    where truncated. Returns (advantages [T, E, K], returns [T, E, K]).

        delta_t = r_t + gamma * V_next_t * (1 - terminated_t) - V_t
        V_next_t = final_values_t if truncated_t else values_{t+1}
        A_t = delta_t + gamma * lam * (1 - done_t) * A_{t+1},  done = terminated | truncated
    """
    T = rewards.shape[0]
    advantages = torch.zeros_like(values[:-1])
    gae = torch.zeros_like(values[0])
    not_terminated = (~terminated).to(values.dtype).unsqueeze(-1)
    not_done = (~(terminated | truncated)).to(values.dtype).unsqueeze(-1)
    next_values = torch.where(truncated.unsqueeze(-1), final_values, values[1:])
    deltas = rewards.unsqueeze(-1) + gamma * next_values * not_terminated - values[:-1]
    for t in reversed(range(T)):
        gae = deltas[t] + gamma * lam * not_done[t] * gae
        advantages[t] = gae
    return advantages, advantages + values[:-1]


class Rows(NamedTuple):
    """A mini-batch's samples of [T, B, ...] tensors: ``x[t, b]`` is [L, b, ...]."""

    t: torch.Tensor  # [L, b] time indices
    b: torch.Tensor  # [b] batch indices
    flat: torch.Tensor  # [L, b] = t * B + b, rows of the [T * B, ...] view


def minibatches(T: int, B: int, num_mini_batch: int, chunk_length: int | None,
                rng: np.random.Generator, device: torch.device | str = "cpu"):
    """Yield ``Rows`` so ``take(x, rows)`` is x's mini-batch [L, b, ...].

    The indices live on ``device``, the buffer's device: ``index_select`` (in ``take``)
    refuses CPU indices for a CUDA tensor.

    Feed-forward (chunk_length None): single samples (L = 1) shuffled over T*B. A single
    mini-batch yields ``None``: use the whole [T, B] batch as it is (no copy).
    Recurrent: chunks of ``chunk_length`` consecutive steps of one env, shuffled.
    """
    if chunk_length is None:
        if num_mini_batch == 1:
            yield None
            return
        perm = torch.from_numpy(rng.permutation(T * B)).to(device)
        for part in perm.tensor_split(num_mini_batch):
            yield Rows((part // B).unsqueeze(0), part % B, part.unsqueeze(0))
        return
    n_chunks = (T // chunk_length) * B
    perm = torch.from_numpy(rng.permutation(n_chunks)).to(device)
    offsets = torch.arange(chunk_length, device=device).unsqueeze(1)
    for part in perm.tensor_split(num_mini_batch):
        starts, b_idx = (part // B) * chunk_length, part % B
        t_idx = starts.unsqueeze(0) + offsets
        yield Rows(t_idx, b_idx, t_idx * B + b_idx)


def take(x: torch.Tensor | None, rows: Rows | None) -> torch.Tensor | None:
    """x [T(+1), B, ...] -> x[rows.t, rows.b] [L, b, ...] (x itself for ``rows`` None)."""
    if x is None or rows is None:
        return x
    if x.is_contiguous():
        # One index_select on the [T * B, ...] view: ~3x faster on CPU than indexing with
        # two index tensors (28 vs 96 us for 1,600 rows of 75 floats), and it runs ~8
        # times per mini-batch.
        return x.flatten(0, 1).index_select(0, rows.flat.reshape(-1)).view(*rows.flat.shape, *x.shape[2:])
    return x[rows.t, rows.b]


def first_hidden(hidden: torch.Tensor | None, rows: Rows | None) -> torch.Tensor | None:
    """Hidden state before the first step of each sequence: [b, recurrent_n, H]."""
    if hidden is None:
        return None
    if rows is None:
        return hidden[0]
    return hidden[rows.t[0], rows.b]


def compile_failure(exc: BaseException) -> str:
    """One line naming why torch.compile failed: dynamo wraps a backend's error (whose own
    message starts with an empty line), so name the wrapped one."""
    cause = getattr(exc, "inner_exception", None) or exc
    reason = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")
    return f"{type(cause).__name__}: {reason[:200]}"


class MaybeCompiled:
    """``fn`` run through ``torch.compile`` when ``enabled`` (``--compile``), else as it is.

    Inductor needs a C++ compiler on the CPU (triton on CUDA). If a compiled call fails where
    ``fn`` itself runs, the compiler is the problem: warn once and go on with ``fn`` (a
    genuine error in ``fn`` raises from the plain call). ``dynamic=False``: a run's batch
    shapes are fixed, so one graph serves every actor of the same shape.
    """

    fell_back = False  # some compiled function of this process failed and runs plain

    def __init__(self, fn, enabled: bool):
        self.fn = fn
        self.compiled = None
        if enabled:
            import torch._functorch.config
            import torch._inductor.config

            # Compile in this process: by default inductor starts a pool of compile workers
            # (one per core on a big machine) that outlive the compile, each a few hundred MB,
            # for graphs this small.
            torch._inductor.config.compile_threads = 1
            # Compile the backward graph with the forward, inside the call below: by default
            # it is compiled at the first backward(), where a compiler failure would escape
            # the fall-back and stop the run.
            torch._functorch.config.force_non_lazy_backward_lowering = True
            self.compiled = torch.compile(fn, dynamic=False)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as exc:  # noqa: BLE001 - decided by the plain call below
                out = self.fn(*args)
                print(f"warning: --compile: torch.compile failed ({compile_failure(exc)}); "
                      "continuing without it (--no-compile skips the attempt)", file=sys.stderr, flush=True)
                self.compiled = None
                MaybeCompiled.fell_back = True
                return out
        return self.fn(*args)


class OnPolicyMARL:
    """Actors, critics and the shared update loop. Subclasses define ``actor_step``."""

    family = "on-policy"  # algorithms/registry.py describes these declarations
    action_kinds = ("continuous", "discrete")
    # The per-algorithm settings that the critic, the networks and this loop read; each
    # algorithm adds those of its actor step.
    reads = frozenset({
        "critic_lr", "opti_eps", "weight_decay", "use_linear_lr_decay", "lr_decay_floor", "gamma", "gae_lambda",
        "use_proper_time_limits", "critic_epoch", "critic_num_mini_batch", "value_clip_param", "entropy_coef",
        "value_loss_coef", "max_grad_norm", "use_huber_loss", "huber_delta", "use_clipped_value_loss",
        "use_valuenorm", "use_policy_active_masks", "use_value_active_masks", "fixed_order", "share_param",
        "parallel_critic", "hidden_sizes", "activation", "use_feature_normalization", "gain", "std_x_coef",
        "std_y_coef", "use_recurrent_policy", "recurrent_n", "data_chunk_length"})
    sequential = True  # HAPPO/HATRPO: agents update one after another with the M factor
    centralised_critic = True  # V(s) on the global state; False: one V(o_i) per agent

    def __init__(self, config, spec: EnvSpec, device: torch.device):
        self.config, self.spec, self.device = config, spec, device
        n = spec.n_agents
        if config.share_param:
            first = spec.agents[0]
            if any(a != first for a in spec.agents):
                by_default = getattr(type(self), "defaults", {}).get("share_param")
                default = f" ({config.algo}'s default)" if by_default else ""
                raise ConfigError(f"one network shared by all agents{default} needs every agent to have the "
                                  f"same observation and action spaces; {spec.name} has "
                                  f"{[(a.obs_dim, a.action_dim) for a in spec.agents]}; turn share_param off",
                                  field="share_param")
        # Update units ("groups"): MAPPO/IPPO with shared parameters fold every agent into one
        # group (one update on all agents' data). HAPPO/HATRPO keep one update per agent (random
        # order, M factor) even when the agents share one network, as the reference
        # implementation's share_param does: the network then takes n sequential steps.
        fold = config.share_param and not self.sequential
        self.groups = [list(range(n))] if fold else [[i] for i in range(n)]
        # fused Adam: one kernel per step instead of ~10 small ops per parameter tensor, which
        # matters with many small mini-batches (~0.7 ms per step for a [64, 64, 64] actor on CPU).
        def adam(net: nn.Module, lr: float) -> torch.optim.Optimizer:
            return torch.optim.Adam(net.parameters(), lr=lr, eps=config.opti_eps,
                                    weight_decay=config.weight_decay, fused=True)
        if config.share_param:  # one network and one optimiser, listed once per group
            shared = Actor(spec.agents[0], config).to(device)
            self.actors = nn.ModuleList([shared] * len(self.groups))
            self.actor_optims = [adam(shared, config.lr)] * len(self.groups)
        else:
            self.actors = nn.ModuleList([Actor(spec.agents[g[0]], config) for g in self.groups]).to(device)
            self.actor_optims = [adam(a, config.lr) for a in self.actors]
        # Rollout inference: (network, agents it serves); a shared network acts for all agents
        # in one batch.
        self.act_units = ([(self.actors[0], list(range(n)))] if config.share_param
                          else list(zip(self.actors, self.groups)))
        critic_inputs = [spec.state_dim] if self.centralised_critic else [a.obs_dim for a in spec.agents]
        self.critics = nn.ModuleList([Critic(d, config) for d in critic_inputs]).to(device)
        self.critic_optims = [adam(c, config.critic_lr) for c in self.critics]
        self.value_norms = nn.ModuleList([ValueNorm() for _ in self.critics]).to(device)
        self.rng = np.random.default_rng(config.seed)
        # The critic's update depends on neither the actors' updates nor the next rollout, so
        # it runs on its own thread (with its own RNG, so results stay deterministic):
        # started with the actors when the second core would otherwise idle during their
        # updates (one intra-op thread, or --parallel_critic), else after them. A
        # feed-forward critic is not needed during the rollout (``fill_values`` evaluates
        # the whole rollout in one batch afterwards), so the runner lets its update overlap
        # the next rollout's env stepping (``train(..., defer_critic=True)``).
        self.critic_rng = np.random.default_rng(config.seed + 1)
        self.critic_with_actors = config.parallel_critic or torch.get_num_threads() == 1
        self.batched_values = not config.use_recurrent_policy
        # One intra-op thread there: it shares the machine with the actors' or the rollout's
        # work (the setting is per thread; measured in docs/performance.md).
        self._critic_pool = ThreadPoolExecutor(1, thread_name_prefix="critic",
                                               initializer=torch.set_num_threads, initargs=(1,))
        self._critic_job = None  # Future of the pending critic update
        self._critic_stats: dict[str, float] = {}  # the last finished critic update's stats
        self.iteration = 0  # set by the runner; names the update in error messages
        trunk = self.actors[0].trunk
        self.hidden_shape = (trunk.recurrent_n, trunk.hidden_size)  # per agent
        self.chunk_length = config.data_chunk_length if config.use_recurrent_policy else None
        # Separate but identically shaped feed-forward actors act in one batched pass.
        self.stackable = (len(self.act_units) > 1 and not config.use_recurrent_policy
                          and all(a == spec.agents[0] for a in spec.agents))
        self._stacked: StackedActors | None = None

    @property
    def n_critics(self) -> int:
        return len(self.critics)

    # -- rollout ---------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: list[torch.Tensor], avail: list[torch.Tensor] | None,
            hidden: torch.Tensor | None, starts: torch.Tensor | None, deterministic: bool = False):
        """Actions for one rollout step: one batched forward for all agents where their
        shapes allow (``StackedActors``), else one per actor (a shared actor takes all its
        agents in one batch).

        obs[i] [E, obs_dim_i]; avail[i] [E, n_actions_i]; hidden [E, N, recurrent_n, H];
        starts [E] bool. Returns actions (list, [E, act_dim_i] or [E]), log_probs [E, N],
        next hidden [E, N, recurrent_n, H] (None for feed-forward actors).
        """
        E = obs[0].shape[0]
        if self.stackable:
            if self._stacked is None:
                self._stacked = StackedActors([a for a, _ in self.act_units])
            a, lp = self._stacked.act(torch.stack(obs), None if avail is None else torch.stack(avail),
                                      deterministic)
            return list(a.unbind(0)), lp.t(), None
        actions: list[Any] = [None] * self.spec.n_agents
        log_probs = torch.empty(E, self.spec.n_agents, device=self.device)
        next_hidden = torch.empty_like(hidden) if hidden is not None else None
        for actor, group in self.act_units:
            n = len(group)
            if n == 1:
                i = group[0]
                x, av = obs[i], None if avail is None else avail[i]
                h = None if hidden is None else hidden[:, i]
                s = starts
            else:  # shared actor: stack agents into the batch, one forward for all
                x = torch.stack([obs[i] for i in group], 1).reshape(E * n, -1)
                av = None if avail is None else torch.stack([avail[i] for i in group], 1).reshape(E * n, -1)
                h = None if hidden is None else hidden[:, group].reshape(E * n, *self.hidden_shape)
                s = None if starts is None else starts.repeat_interleave(n)
            a, lp, h_next = actor.act(x, h, s, av, deterministic)
            if n == 1:
                actions[group[0]] = a
                log_probs[:, group[0]] = lp
                if next_hidden is not None:
                    next_hidden[:, group[0]] = h_next
            else:
                a = a.reshape(E, n, *a.shape[1:])
                lp = lp.reshape(E, n)
                for j, i in enumerate(group):
                    actions[i] = a[:, j]
                    log_probs[:, i] = lp[:, j]
                if next_hidden is not None:
                    next_hidden[:, group] = h_next.reshape(E, n, *self.hidden_shape)
        return actions, log_probs, next_hidden

    def critic_inputs(self, state: torch.Tensor, obs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Inputs of each critic: [state] (centralised) or obs (per agent). Any leading dims."""
        return [state] if self.centralised_critic else list(obs)

    @torch.no_grad()
    def values(self, state: torch.Tensor, obs: list[torch.Tensor], hidden: torch.Tensor | None,
               starts: torch.Tensor | None):
        """V at one step: state [E, S], obs[i] [E, d_i], hidden [E, K, recurrent_n, H].

        Returns values [E, K] in the network's (normalised) scale and the next hidden.
        """
        self.wait_for_critics()
        E = state.shape[0]
        out = torch.empty(E, self.n_critics, device=self.device)
        next_hidden = torch.empty_like(hidden) if hidden is not None else None
        s = None if starts is None else starts.unsqueeze(0)
        for k, (critic, x) in enumerate(zip(self.critics, self.critic_inputs(state, obs))):
            v, h = critic(x.unsqueeze(0), None if hidden is None else hidden[:, k], s)
            out[:, k] = v[0]
            if next_hidden is not None:
                next_hidden[:, k] = h
        return out, next_hidden

    @torch.no_grad()
    def fill_values(self, buf, state: torch.Tensor, obs: list[torch.Tensor]) -> None:
        """Feed-forward critics: write ``buf.values`` and ``buf.final_values`` for a whole
        rollout in one batched pass per critic (the runner skipped them per step).

        state [E, S] / obs[i] [E, d_i] are the observations after the last step
        (values[T] bootstraps the rollout cut); buf.final_state / buf.final_obs hold the
        last observations of truncated episodes.
        """
        self.wait_for_critics()
        T = buf.T
        truncated = buf.truncated
        any_truncated = bool(truncated.any())
        inputs = zip(self.critic_inputs(buf.state, buf.obs), self.critic_inputs(state, obs),
                     self.critic_inputs(buf.final_state, buf.final_obs))
        for k, (critic, (rollout, last, final)) in enumerate(zip(self.critics, inputs)):
            buf.values[:T, :, k] = critic(rollout, None, None)[0]
            buf.values[T, :, k] = critic(last.unsqueeze(0), None, None)[0][0]
            if any_truncated:
                buf.final_values[:, :, k][truncated] = critic(final[truncated].unsqueeze(0), None, None)[0][0]

    def wait_for_critics(self) -> None:
        """Join a pending critic update (re-raising its error, e.g. a NumericalError)."""
        job, self._critic_job = self._critic_job, None
        if job is not None:
            self._critic_stats = job.result()

    def denormalize(self, values: torch.Tensor) -> torch.Tensor:
        """[..., K] network outputs -> raw return scale."""
        if not self.config.use_valuenorm:
            return values
        return torch.stack([vn.denormalize(values[..., k]) for k, vn in enumerate(self.value_norms)], -1)

    # -- training --------------------------------------------------------------------------
    def set_progress(self, fraction_done: float) -> None:
        """Linear learning-rate decay, if enabled: from the full rates to ``lr_decay_floor`` of them."""
        if not self.config.use_linear_lr_decay:
            return
        floor = self.config.lr_decay_floor
        scale = floor + (1.0 - floor) * max(1.0 - fraction_done, 0.0)
        for opt in self.actor_optims:
            for group in opt.param_groups:
                group["lr"] = self.config.lr * scale
        for opt in self.critic_optims:
            for group in opt.param_groups:
                group["lr"] = self.config.critic_lr * scale

    def _fold(self, tensors: list[torch.Tensor], group: list[int]) -> torch.Tensor:
        """Per-agent [T, E, ...] tensors of a group -> [T, E * n, ...] (agents into the batch)."""
        if len(group) == 1:  # contiguous, so that ``take`` can gather rows of a flat view
            return tensors[group[0]].contiguous()
        x = torch.stack([tensors[i] for i in group], 2)
        return x.reshape(x.shape[0], -1, *x.shape[3:])

    def actor_batch(self, g: int, buf, advantages: torch.Tensor) -> ActorBatch:
        """Assemble group ``g``'s batch from the buffer; advantages [T, E, K]."""
        group = self.groups[g]
        per_agent = lambda x: [x[:, :, i] for i in range(self.spec.n_agents)]  # noqa: E731
        adv = [advantages[..., 0 if self.centralised_critic else i] for i in range(self.spec.n_agents)]
        active = self._fold(per_agent(buf.active), group)
        adv = self._fold(adv, group)
        if self.config.use_policy_active_masks:
            mask = active
        else:
            mask = torch.ones_like(active)
        mean = masked_mean(adv, mask)
        std = masked_mean((adv - mean).pow(2), mask).sqrt()
        starts = buf.starts[:-1]
        return ActorBatch(
            obs=self._fold(buf.obs, group),
            actions=self._fold(buf.actions, group),
            old_log_probs=self._fold(per_agent(buf.log_probs), group),
            avail=None if buf.avail is None else self._fold(buf.avail, group),
            active=mask,
            advantages=(adv - mean) / (std + 1e-5),
            starts=starts if len(group) == 1 else starts.repeat_interleave(len(group), 1),
            hidden=None if buf.actor_hidden is None else self._fold(per_agent(buf.actor_hidden), group),
        )

    def train(self, buf, defer_critic: bool = False) -> dict[str, float]:
        """One iteration of updates on a filled ``utils.buffer.RolloutBuffer``.

        ``defer_critic`` (feed-forward critics only): return while the critic update still
        runs on its thread, so it overlaps whatever the caller does next (the runner: the
        next rollout, which then calls ``fill_values``, which waits for it). Its stats are
        reported by the next ``train``. Anything that reads the critics waits for it.
        """
        cfg = self.config
        self._stacked = None  # the actors change: rebuild the batched rollout forward
        values = self.denormalize(buf.values)
        final_values = self.denormalize(buf.final_values)
        truncated = buf.truncated if cfg.use_proper_time_limits else torch.zeros_like(buf.truncated)
        terminated = buf.terminated if cfg.use_proper_time_limits else buf.terminated | buf.truncated
        advantages, returns = compute_gae(buf.rewards, values, terminated, truncated, final_values,
                                          cfg.gamma, cfg.gae_lambda)
        stats: dict[str, float] = {}
        self.wait_for_critics()
        # The critic's own copy of its data: the next rollout refills the buffer while a
        # deferred update may still be reading it.
        defer_critic = defer_critic and self.batched_values
        critic_data = self.critic_batches(buf, returns, copy=defer_critic)
        if self.critic_with_actors:
            self._critic_job = self._critic_pool.submit(self.fit_critics, critic_data)
        n_groups = len(self.groups)
        order = np.arange(n_groups) if (cfg.fixed_order or not self.sequential) else self.rng.permutation(n_groups)
        T, E = buf.rewards.shape
        # MAPPO/IPPO have M = 1; so does a folded group of all agents (nothing precedes it).
        use_M = self.sequential and n_groups > 1
        M = torch.ones(T, E, device=self.device)
        for position, g in enumerate(order):
            batch = self.actor_batch(int(g), buf, advantages)
            weight = M if use_M else torch.ones_like(batch.old_log_probs)
            step = self.actor_step(int(g), batch, weight)
            group_stats = dict(step.stats)
            self.check_finite_params(self.actors[g], self.label(g))
            if use_M:
                group_stats["M_mean"] = float(M.mean())
                group_stats["M_std"] = float(M.std())
                group_stats["M_min"] = float(M.min())
                group_stats["M_max"] = float(M.max())
                group_stats["order"] = float(position)
                # Detached: later agents see a constant. A step that already computed the
                # ratio (HATRPO's accepted line-search trial) saves the pass here.
                ratio = step.new_ratio if step.new_ratio is not None else self.new_ratio(g, batch)
                M = M * ratio.detach()
            for key, value in group_stats.items():
                stats[f"{self.label(g)}/{key}"] = value
        # A deferred update reports with the next iteration; the first one runs at once so
        # that every metrics row has the critic's columns.
        deferring = defer_critic and bool(self._critic_stats)
        if self._critic_job is None:  # not started with the actors
            if deferring:
                self._critic_job = self._critic_pool.submit(self.fit_critics, critic_data)
            else:  # nothing to overlap with: here, with every intra-op thread
                self._critic_stats = self.fit_critics(critic_data)
        elif not deferring:
            self.wait_for_critics()
        stats.update(self._critic_stats)
        return stats

    @torch.no_grad()
    def new_ratio(self, g: int, batch: ActorBatch) -> torch.Tensor:
        """pi_new(a|o) / pi_old(a|o) of group g over the whole batch [T, B] (1 where inactive)."""
        log_probs, _, _ = self.actors[g].evaluate(batch.obs, batch.actions, first_hidden(batch.hidden, None),
                                                  batch.starts, batch.avail)
        ratio = torch.exp(log_probs - batch.old_log_probs)
        return torch.where(batch.active, ratio, torch.ones_like(ratio))

    def label(self, g: int) -> str:
        group = self.groups[g]
        return f"agent{group[0]}" if len(group) == 1 else "shared"

    def actor_step(self, g: int, batch: ActorBatch, M: torch.Tensor) -> StepResult:
        """Update group ``g``'s actor on ``batch`` with the M factor ``M`` [T, B]."""
        raise NotImplementedError

    def critic_batches(self, buf, returns: torch.Tensor, copy: bool = False) -> list[CriticBatch]:
        """Each critic's data from the buffer: views where contiguous, or copies that outlive the
        buffer's reuse."""
        inputs = self.critic_inputs(buf.state, buf.obs)
        out = []
        for k, x in enumerate(inputs):
            if self.centralised_critic or not self.config.use_value_active_masks:
                mask = torch.ones_like(buf.starts[:-1])
            else:
                mask = buf.active[:, :, k]
            batch = CriticBatch(x, returns[..., k], buf.values[:-1, :, k], mask, buf.starts[:-1],
                                None if buf.critic_hidden is None else buf.critic_hidden[:, :, k])
            # Contiguous, so that ``take`` gathers rows of flat views; copies in any case
            # when the update is deferred (the next rollout refills the buffer).
            if copy:
                batch = CriticBatch(*(None if t is None else t.clone(memory_format=torch.contiguous_format)
                                      for t in batch))
            else:
                batch = CriticBatch(*(None if t is None else t.contiguous() for t in batch))
            out.append(batch)
        return out

    def value_loss(self, values, old_values, targets, mask) -> torch.Tensor:
        """Huber (or squared) error on optionally clipped values, masked mean. [L, b] inputs."""
        cfg = self.config
        error = targets - values

        def elementwise(e: torch.Tensor) -> torch.Tensor:
            if cfg.use_huber_loss:  # correct for both signs of e
                a = e.abs()
                return torch.where(a <= cfg.huber_delta, 0.5 * e.pow(2), cfg.huber_delta * (a - 0.5 * cfg.huber_delta))
            return 0.5 * e.pow(2)

        loss = elementwise(error)
        if cfg.use_clipped_value_loss:
            clipped = old_values + (values - old_values).clamp(-cfg.value_clip, cfg.value_clip)
            loss = torch.max(loss, elementwise(targets - clipped))
        return masked_mean(loss, mask)

    def fit_critics(self, batches: list[CriticBatch]) -> dict[str, float]:
        """The critics' epochs on their batches (``critic_batches``); returns their stats."""
        cfg = self.config
        stats: dict[str, float] = {}
        for k, batch in enumerate(batches):
            critic, optim, norm = self.critics[k], self.critic_optims[k], self.value_norms[k]
            if cfg.use_valuenorm:
                norm.update(batch.returns[batch.mask])
                targets = norm.normalize(batch.returns)
            else:
                targets = batch.returns
            T, E = batch.returns.shape
            losses, norms = [], []
            for _ in range(cfg.critic_epoch):
                for idx in minibatches(T, E, cfg.critic_num_mini_batch, self.chunk_length, self.critic_rng,
                                       self.device):
                    values, _ = critic(take(batch.inputs, idx), first_hidden(batch.hidden, idx),
                                       take(batch.starts, idx))
                    loss = self.value_loss(values, take(batch.old_values, idx), take(targets, idx),
                                           take(batch.mask, idx)) * cfg.value_loss_coef
                    grad_norm = self.optimise(optim, critic, loss, "critic loss", f"critic{k}")
                    losses.append(loss.detach())
                    norms.append(grad_norm)
            self.check_finite_params(critic, f"critic{k}")
            name = "critic" if self.n_critics == 1 else f"critic{k}"
            stats[f"{name}/value_loss"] = float(torch.stack(losses).mean())
            stats[f"{name}/grad_norm"] = float(torch.stack(norms).mean())
        return stats

    def optimise(self, optim, module: nn.Module, loss: torch.Tensor, what: str, who: str) -> torch.Tensor:
        """zero_grad / backward / clip / step with NaN checks on the loss and the gradient."""
        if not torch.isfinite(loss):
            raise NumericalError(f"non-finite {what} ({float(loss.detach())}) for {who} at update {self.iteration}")
        optim.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(module.parameters(), self.config.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise NumericalError(f"non-finite gradient of the {what} for {who} at update {self.iteration}")
        optim.step()
        return grad_norm.detach()

    def check_finite_params(self, module: nn.Module, who: str) -> None:
        for name, p in module.named_parameters():
            if not torch.isfinite(p).all():
                raise NumericalError(f"non-finite parameter {name} of {who} after update {self.iteration}")

    # -- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self.wait_for_critics()
        return {"actors": self.actors.state_dict(), "critics": self.critics.state_dict(),
                "value_norms": self.value_norms.state_dict(),
                "actor_optims": [o.state_dict() for o in self.actor_optims],
                "critic_optims": [o.state_dict() for o in self.critic_optims],
                "rng": self.rng.bit_generator.state, "critic_rng": self.critic_rng.bit_generator.state,
                "critic_stats": dict(self._critic_stats)}  # a deferred update reports one iteration later

    def load_state_dict(self, state: dict[str, Any], weights_only: bool = False) -> None:
        self.wait_for_critics()
        self._stacked = None
        self.actors.load_state_dict(state["actors"])
        self.critics.load_state_dict(state["critics"])
        self.value_norms.load_state_dict(state["value_norms"])
        if weights_only:
            return
        for opt, s in zip(self.actor_optims, state["actor_optims"]):
            opt.load_state_dict(s)
        for opt, s in zip(self.critic_optims, state["critic_optims"]):
            opt.load_state_dict(s)
        self.rng.bit_generator.state = state["rng"]
        self.critic_rng.bit_generator.state = state["critic_rng"]
        self._critic_stats = dict(state.get("critic_stats", {}))
