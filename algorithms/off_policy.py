"""Off-policy heterogeneous-agent methods: HATD3 and HADDPG, with the MATD3 and MADDPG baselines.

All four learn one deterministic actor per agent, ``a_i = mu_i(o_i)`` (tanh output scaled
to the action bounds), explore with Gaussian noise on it, and learn a centralised critic
``Q(s, a_1..a_n)`` on the global state and the joint action from n-step targets sampled
from the replay buffer (utils/replay.py). Target networks trail the online ones by Polyak
averaging. TD3 (Fujimoto et al. 2018) adds three things to DDPG: twin critics whose
smaller target value is used (clipped double Q), clipped Gaussian noise on the target
actions (target-policy smoothing), and actor and target updates only every
``policy_freq``-th critic update (delayed policy updates).

One update (``OffPolicyMARL.update``), on a batch of B transitions:

    a'_i = clip(mu'_i(o'_i) + clip(eps_i, -c, c), low, high)   eps_i ~ N(0, sigma^2)  (TD3)
    y    = R^(n) + discount * min_k Q'_k(s', a'_1..a'_n)        discount = gamma^k, or 0
                                                                after a termination
    critic loss = sum_k mean_B (Q_k(s, a) - y)^2
    every policy_freq-th update: the actors' step (below), then Polyak on every target

The actors' step is the only thing the family members differ in:

* HA* (sequential; the heterogeneous-agent scheme of Kuba et al. 2022, off-policy as in
  the HARL reference): the agents in a fresh random order; agent i minimises
  ``-mean_B Q_1(s, a)`` where ``a`` holds ``mu_i(o_i)`` (differentiable), the actions of the
  agents already updated in this step from their *new* actors, and the actions of the
  rest from their current actors, all without noise.
* MA* (simultaneous): every actor steps on ``-mean_B Q_1(s, mu_1(o_1), .., mu_n(o_n))``,
  the joint action of the current actors. (HARL's MADDPG runner takes the other agents'
  actions from the replay sample instead.)

``preact_penalty`` > 0 (not in the reference) adds ``preact_penalty * mean(MLP_i(o_i)^2)``
to each actor's loss, on the pre-activation under its tanh: without it an action component
can saturate for good (``own_action``).

Shapes: B = batch size, N = agents, K = critics (2 for TD3, 1 for DDPG).
"""
from __future__ import annotations

import copy
import math
import time
from collections import Counter
from typing import Any

import numpy as np
import torch
from torch import nn

from algorithms.base import NumericalError
from envs.base import AgentSpec, EnvSpec
from utils.errors import ConfigError
from utils.replay import ReplayBatch, ReplayBuffer


def derived_seed(seed: int, tag: str) -> int:
    """A seed for one of the run's random streams, independent of the others."""
    words = [int(seed) & 0xFFFF_FFFF, *tag.encode()]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)


def activation_module(name: str) -> nn.Module:
    # In place: no layer's backward reads the pre-activation (ReLU's and tanh's read their output).
    return nn.ReLU(inplace=True) if name == "relu" else nn.Tanh()


class DeterministicActor(nn.Module):
    """``mu(o) = centre + half_range * tanh(MLP(o))``: [B, obs_dim] -> [B, act_dim] in bounds.
    ``MLP(o)`` is the pre-activation; ``squash`` maps it into the bounds."""

    def __init__(self, spec: AgentSpec, hidden_sizes: list[int], activation: str = "relu"):
        super().__init__()
        layers: list[nn.Module] = []
        dim = spec.obs_dim
        for size in hidden_sizes:
            layers += [nn.Linear(dim, size), activation_module(activation)]
            dim = size
        self.mlp = nn.Sequential(*layers, nn.Linear(dim, spec.action_dim))
        self.low, self.high = float(spec.action_low), float(spec.action_high)
        self.half_range = (self.high - self.low) / 2
        self.centre = (self.high + self.low) / 2

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.squash(self.mlp(obs))

    def squash(self, preactivation: torch.Tensor) -> torch.Tensor:
        return torch.tanh(preactivation) * self.half_range + self.centre


class MLPEnsemble(nn.Module):
    """``members`` independent MLPs of one shape evaluated together: every layer is one
    batched matmul over the member axis, so the twin critics cost one kernel per layer.
    Initialised as ``nn.Linear`` is (uniform in +-1/sqrt(fan_in))."""

    def __init__(self, in_dim: int, hidden_sizes: list[int], out_dim: int, members: int,
                 activation: str = "relu"):
        super().__init__()
        sizes = [in_dim, *hidden_sizes, out_dim]
        self.members = members
        self.weights = nn.ParameterList()  # [members, fan_in, fan_out]
        self.biases = nn.ParameterList()  # [members, 1, fan_out]
        for fan_in, fan_out in zip(sizes, sizes[1:]):
            bound = 1 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(torch.empty(members, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(members, 1, fan_out).uniform_(-bound, bound)))
        self.activation = activation_module(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in_dim] -> [members, B, out_dim]."""
        h = x.unsqueeze(0).expand(self.members, *x.shape)
        last = len(self.weights) - 1
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(b, h, w)
            if k < last:
                h = self.activation(h)
        return h

    def member(self, x: torch.Tensor, m: int = 0) -> torch.Tensor:
        """Member ``m`` alone: x [B, in_dim] -> [B, out_dim]."""
        h = x
        last = len(self.weights) - 1
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            h = torch.addmm(b[m], h, w[m])
            if k < last:
                h = self.activation(h)
        return h


# Per-algorithm defaults below the task file: the reference's MaMuJoCo values (HalfCheetah
# where they differ between tasks). The iteration is train_interval vector steps (500 env
# steps with 10 envs): evaluating every 200 is the reference's every 100k env steps.
COMMON_DEFAULTS: dict[str, Any] = {
    "n_rollout_threads": 10, "hidden_sizes": [256, 256], "activation": "relu", "lr": 5e-4, "critic_lr": 1e-3,
    "gamma": 0.99, "buffer_size": 1_000_000, "batch_size": 1000, "warmup_steps": 10_000, "train_interval": 50,
    "update_per_train": 1.0, "polyak": 0.005, "expl_noise": 0.1, "use_proper_time_limits": True,
    "eval_interval": 200, "eval_episodes": 40, "n_eval_rollout_threads": 20, "log_interval": 10,
    "save_interval": 20}
SATURATED_PREACTIVATION = math.atanh(0.99)  # |tanh| > 0.99: within 1 % of a bound
TD3_DEFAULTS: dict[str, Any] = {"policy_noise": 0.2, "noise_clip": 0.5, "policy_freq": 2}
# The per-algorithm config fields (optimisation, off-policy and networks settings) the
# algorithm, its buffer and the off-policy runner read; the fields every run reads (seed,
# n_rollout_threads, evaluation, logging, ...) are not listed.
COMMON_READS = frozenset({
    "hidden_sizes", "activation", "lr", "critic_lr", "gamma", "use_proper_time_limits", "buffer_size",
    "batch_size", "warmup_steps", "train_interval", "update_per_train", "polyak", "n_step", "expl_noise",
    "preact_penalty"})
TD3_READS = frozenset({"policy_noise", "noise_clip", "policy_freq"})


class OffPolicyMARL:
    """Actors, critic(s), their targets and the update loop shared by the four methods."""

    family = "off-policy"
    action_kinds = ("continuous",)
    compiles_actor_loss = False
    name = ""
    sequential = True  # HA*: actors one at a time in a random order; MA*: all together
    td3 = True  # twin critics, target-policy smoothing, delayed actor updates
    defaults: dict[str, Any] = {}
    reads: frozenset[str] = frozenset()

    def __init__(self, config, spec: EnvSpec, device: torch.device):
        if spec.discrete:
            raise ConfigError(f"--algo {config.algo} needs continuous actions and {spec.name} has discrete "
                              "ones; use happo, hatrpo, mappo or ippo there")
        self.config, self.spec, self.device = config, spec, torch.device(device)
        self.n_agents = spec.n_agents
        self.polyak, self.expl_noise = config.polyak, config.expl_noise
        self.preact_penalty = config.preact_penalty
        self.policy_freq = config.policy_freq if self.td3 else 1
        self.fixed_order = self.sequential and config.fixed_order
        hidden, act = list(config.hidden_sizes), config.activation
        self.actors = nn.ModuleList([DeterministicActor(a, hidden, act) for a in spec.agents]).to(self.device)
        critic_in = spec.state_dim + sum(a.action_dim for a in spec.agents)
        self.critic = MLPEnsemble(critic_in, hidden, 1, 2 if self.td3 else 1, act).to(self.device)
        self.target_actors = copy.deepcopy(self.actors).requires_grad_(False)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)
        # Adam with PyTorch's defaults, as the reference (no --opti_eps, no gradient clipping);
        # fused: one kernel per step instead of several per parameter tensor.
        self.actor_optims = [torch.optim.Adam(a.parameters(), lr=config.lr, fused=True) for a in self.actors]
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=config.critic_lr, fused=True)
        self._online = [*self.actors.parameters(), *self.critic.parameters()]
        self._targets = [*self.target_actors.parameters(), *self.target_critic.parameters()]
        # Separate streams, so that e.g. evaluating (no noise) never shifts training's noise.
        self.explore_rng = torch.Generator(device=self.device)
        self.explore_rng.manual_seed(derived_seed(config.seed, "explore"))
        self.target_noise_rng = torch.Generator(device=self.device)
        self.target_noise_rng.manual_seed(derived_seed(config.seed, "target-noise"))
        self.order_rng = torch.Generator()
        self.order_rng.manual_seed(derived_seed(config.seed, "agent-order"))
        self.updates = 0  # critic updates so far
        self.timings: Counter = Counter()  # seconds per part of train(), read and cleared by the runner
        # What runners/evaluate.py reads of an algorithm: feed-forward, no recurrent state.
        self.chunk_length = None
        self.hidden_shape = (0, 0)

    # -- acting ----------------------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: list[torch.Tensor], avail=None, hidden=None, starts=None, deterministic: bool = False):
        """obs[i] [E, obs_dim_i] -> (actions[i] [E, act_dim_i], None, None): each actor's
        action, plus N(0, (expl_noise * half_range)^2) noise clipped back into bounds unless
        ``deterministic``. The Nones stand for log-probs and recurrent state (evaluate.py)."""
        actions = []
        for actor, o in zip(self.actors, obs):
            a = actor(o)
            if not deterministic:
                noise = torch.randn(a.shape, generator=self.explore_rng, device=self.device)
                a.add_(noise, alpha=self.expl_noise * actor.half_range).clamp_(actor.low, actor.high)
            actions.append(a)
        return actions, None, None

    @torch.no_grad()
    def random_actions(self, n_envs: int) -> list[torch.Tensor]:
        """Uniform actions in each agent's bounds, [E, act_dim_i] (the warm-up steps)."""
        return [torch.rand(n_envs, a.action_dim, generator=self.explore_rng, device=self.device)
                .mul_(a.action_high - a.action_low).add_(a.action_low) for a in self.spec.agents]

    # -- one update ------------------------------------------------------------------------------
    def target_actions(self, i: int, next_obs: torch.Tensor) -> torch.Tensor:
        """Agent i's target action; TD3 smooths it with clipped noise (Fujimoto et al. 2018, eq. 14)."""
        actor = self.target_actors[i]
        a = actor(next_obs)
        if self.td3:
            scale = actor.half_range
            noise = torch.randn(a.shape, generator=self.target_noise_rng, device=self.device)
            noise.mul_(self.config.policy_noise * scale).clamp_(-self.config.noise_clip * scale,
                                                                self.config.noise_clip * scale)
            a = (a + noise).clamp_(actor.low, actor.high)
        return a

    @torch.no_grad()
    def td_target(self, batch: ReplayBatch) -> torch.Tensor:
        """y [B] = R^(n) + discount * min_k Q'_k(s', a') (k over the twin critics)."""
        next_actions = [self.target_actions(i, o) for i, o in enumerate(batch.next_obs)]
        next_q = self.target_critic(torch.cat([batch.next_state, *next_actions], 1)).squeeze(-1)  # [K, B]
        return batch.returns + batch.discount * next_q.min(0).values

    def critic_step(self, batch: ReplayBatch) -> dict[str, torch.Tensor]:
        target = self.td_target(batch)
        q = self.critic(torch.cat([batch.state, *batch.actions], 1)).squeeze(-1)  # [K, B]
        loss = (q - target).pow(2).mean(1).sum()
        self.critic_optim.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_optim.step()
        return {"critic_loss": loss.detach(), "q_mean": q[0].detach().mean()}

    def q1(self, state: torch.Tensor, actions: list[torch.Tensor]) -> torch.Tensor:
        """The first critic's Q(s, a) [B]: what the actors ascend (as in TD3)."""
        return self.critic.member(torch.cat([state, *actions], 1), 0).squeeze(-1)

    def own_action(self, i: int, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float, torch.Tensor]:
        """Agent i's differentiable action [B, act_dim_i], its pre-activation penalty
        ``preact_penalty * mean(MLP(o)^2)`` (keeps tanh from saturating for good: where
        |MLP(o)| is large, dQ/dMLP(o) vanishes while Adam's normalised steps go on pushing it
        out) and the fraction of its components within 1 % of a bound (a diagnostic)."""
        actor = self.actors[i]
        pre = actor.mlp(obs)
        penalty = self.preact_penalty * pre.pow(2).mean() if self.preact_penalty else 0.0  # no tensor when off
        saturated = (pre.detach().abs() > SATURATED_PREACTIVATION).float().mean()
        return actor.squash(pre), penalty, saturated

    def actors_step(self, batch: ReplayBatch) -> dict[str, torch.Tensor]:
        obs = batch.obs
        self.critic.requires_grad_(False)  # the actors' losses need no critic gradients
        try:
            if not self.sequential:  # MA*: one joint loss; agent i's gradient is dQ/da_i . da_i/dtheta_i
                own = [self.own_action(i, o) for i, o in enumerate(obs)]
                loss = -self.q1(batch.state, [a for a, _, _ in own]).mean() + sum(p for _, p, _ in own)
                for optim in self.actor_optims:
                    optim.zero_grad(set_to_none=True)
                loss.backward()
                for optim in self.actor_optims:
                    optim.step()
                return {"actor_loss": loss.detach(), **{f"agent{i}/saturated": s for i, (_, _, s) in enumerate(own)}}
            order = (list(range(self.n_agents)) if self.fixed_order
                     else torch.randperm(self.n_agents, generator=self.order_rng).tolist())
            with torch.no_grad():  # the current actors' actions (the first agent's own is recomputed)
                actions = [None if i == order[0] else actor(o)
                           for i, (actor, o) in enumerate(zip(self.actors, obs))]
            stats = {}
            for position, i in enumerate(order):
                actions[i], penalty, saturated = self.own_action(i, obs[i])
                loss = -self.q1(batch.state, actions).mean() + penalty
                self.actor_optims[i].zero_grad(set_to_none=True)
                loss.backward()
                self.actor_optims[i].step()
                stats[f"agent{i}/actor_loss"] = loss.detach()
                stats[f"agent{i}/saturated"] = saturated
                if position + 1 < len(order):  # the agents after i see i's new action
                    with torch.no_grad():
                        actions[i] = self.actors[i](obs[i])
            return stats
        finally:
            self.critic.requires_grad_(True)

    @torch.no_grad()
    def update_targets(self) -> None:
        """theta' <- theta' + polyak * (theta - theta') for every target network."""
        torch._foreach_lerp_(self._targets, self._online, self.polyak)

    def update(self, batch: ReplayBatch) -> dict[str, torch.Tensor]:
        """One critic update; every ``policy_freq``-th also the actors and the targets."""
        clock = time.perf_counter
        t0 = clock()
        self.updates += 1
        stats = self.critic_step(batch)
        t1 = clock()
        self.timings["critic_s"] += t1 - t0
        if self.updates % self.policy_freq == 0:
            stats.update(self.actors_step(batch))
            t2 = clock()
            self.update_targets()
            self.timings["actor_s"] += t2 - t1
            self.timings["polyak_s"] += clock() - t2
        return stats

    def train(self, buffer: ReplayBuffer, n_updates: int) -> dict[str, float]:
        """``n_updates`` updates on fresh samples; returns each statistic's mean over them."""
        sums: dict[str, torch.Tensor] = {}
        counts: Counter = Counter()
        for _ in range(n_updates):
            t0 = time.perf_counter()
            batch = buffer.sample()
            self.timings["sample_s"] += time.perf_counter() - t0
            for key, value in self.update(batch).items():
                sums[key] = sums[key] + value if key in sums else value
                counts[key] += 1
        stats = {key: float(value) / counts[key] for key, value in sums.items()}
        for key, value in stats.items():  # a NaN anywhere in the window reaches the sums
            if not math.isfinite(value):
                raise NumericalError(f"non-finite {key} ({value}) in updates {self.updates - n_updates + 1}.."
                                     f"{self.updates}")
        if n_updates:
            nets = [(self.critic, "the critic"), *((a, f"agent {i}'s actor") for i, a in enumerate(self.actors))]
            for net, who in nets:
                for pname, p in net.named_parameters():
                    if not torch.isfinite(p).all():
                        raise NumericalError(f"non-finite parameter {pname} of {who} after update {self.updates}")
        return stats

    # -- persistence -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"actors": self.actors.state_dict(), "critic": self.critic.state_dict(),
                "target_actors": self.target_actors.state_dict(), "target_critic": self.target_critic.state_dict(),
                "actor_optims": [o.state_dict() for o in self.actor_optims],
                "critic_optim": self.critic_optim.state_dict(), "updates": self.updates,
                "explore_rng": self.explore_rng.get_state(), "target_noise_rng": self.target_noise_rng.get_state(),
                "order_rng": self.order_rng.get_state()}

    def load_state_dict(self, state: dict[str, Any], weights_only: bool = False) -> None:
        """``weights_only``: the actors and critic alone (evaluation)."""
        self.actors.load_state_dict(state["actors"])
        self.critic.load_state_dict(state["critic"])
        if weights_only:
            return
        self.target_actors.load_state_dict(state["target_actors"])
        self.target_critic.load_state_dict(state["target_critic"])
        for optim, saved in zip(self.actor_optims, state["actor_optims"]):
            optim.load_state_dict(saved)
        self.critic_optim.load_state_dict(state["critic_optim"])
        self.updates = int(state["updates"])
        self.explore_rng.set_state(state["explore_rng"])
        self.target_noise_rng.set_state(state["target_noise_rng"])
        self.order_rng.set_state(state["order_rng"])


class HATD3(OffPolicyMARL):
    """Heterogeneous-agent TD3: sequential actor updates in a random order, twin critics."""

    name = "hatd3"
    sequential, td3 = True, True
    defaults = {**COMMON_DEFAULTS, **TD3_DEFAULTS, "n_step": 10}
    reads = COMMON_READS | TD3_READS | {"fixed_order"}


class HADDPG(OffPolicyMARL):
    """Heterogeneous-agent DDPG: sequential actor updates in a random order, one critic."""

    name = "haddpg"
    sequential, td3 = True, False
    defaults = {**COMMON_DEFAULTS, "n_step": 20}
    reads = COMMON_READS | {"fixed_order"}


class MATD3(OffPolicyMARL):
    """Multi-agent TD3: every actor steps at once on the current joint action."""

    name = "matd3"
    sequential, td3 = False, True
    defaults = {**COMMON_DEFAULTS, **TD3_DEFAULTS, "n_step": 10}
    reads = COMMON_READS | TD3_READS


class MADDPG(OffPolicyMARL):
    """Multi-agent DDPG: every actor steps at once on the current joint action, one critic."""

    name = "maddpg"
    sequential, td3 = False, False
    defaults = {**COMMON_DEFAULTS, "n_step": 20}
    reads = COMMON_READS

