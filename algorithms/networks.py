"""Actor and critic networks: MLP (optionally + GRU) trunks with HARL's initialisation.

All ``forward``/``evaluate`` methods take sequences ``[L, B, ...]``: an MLP simply maps
every element, a GRU runs over the L steps, resetting its hidden state where
``starts[t, b]`` is true (first step of an episode). Rollouts use L = 1.
"""
from __future__ import annotations

import torch
from torch import nn

from algorithms.distributions import CategoricalHead, DistParams, GaussianHead, GaussianParams
from envs.base import AgentSpec


def _init(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain=gain)
    nn.init.zeros_(layer.bias)
    return layer


class Trunk(nn.Module):
    """[LayerNorm] -> (Linear -> act -> LayerNorm) x n -> [GRU -> LayerNorm]."""

    def __init__(self, in_dim: int, hidden_sizes: list[int], activation: str,
                 feature_norm: bool, recurrent: bool, recurrent_n: int = 1):
        super().__init__()
        act_cls = nn.ReLU if activation == "relu" else nn.Tanh
        gain = nn.init.calculate_gain(activation)
        layers: list[nn.Module] = [nn.LayerNorm(in_dim)] if feature_norm else []
        dim = in_dim
        for size in hidden_sizes:
            layers += [_init(nn.Linear(dim, size), gain), act_cls(), nn.LayerNorm(size)]
            dim = size
        self.mlp = nn.Sequential(*layers)
        self.out_dim = dim
        self.recurrent = recurrent
        self.hidden_size = dim if recurrent else 0
        self.recurrent_n = recurrent_n if recurrent else 0
        if recurrent:
            self.gru = nn.GRU(dim, dim, num_layers=recurrent_n)
            for name, param in self.gru.named_parameters():
                if "bias" in name:
                    nn.init.zeros_(param)
                else:
                    nn.init.orthogonal_(param)
            self.gru_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, hidden: torch.Tensor | None, starts: torch.Tensor | None):
        """x: [L, B, in_dim]; hidden: [B, recurrent_n, H] state before x[0]; starts: [L, B].

        Returns features [L, B, H] and the hidden state after x[-1] ([B, recurrent_n, H]).
        """
        features = self.mlp(x)
        if not self.recurrent:
            return features, hidden
        h = hidden.transpose(0, 1).contiguous()  # [n, B, H]
        keep = (~starts).to(features.dtype)  # [L, B]
        outs = []
        for t in range(features.shape[0]):
            h = h * keep[t].view(1, -1, 1)
            out, h = self.gru(features[t : t + 1], h)
            outs.append(out)
        features = self.gru_norm(torch.cat(outs, 0))
        return features, h.transpose(0, 1)


class Actor(nn.Module):
    """One policy pi(a | o). Shared by several agents when parameters are shared."""

    def __init__(self, spec: AgentSpec, config):
        super().__init__()
        self.trunk = Trunk(spec.obs_dim, config.hidden_sizes, config.activation,
                           config.use_feature_normalization, config.use_recurrent_policy,
                           config.recurrent_n)
        if spec.action_kind == "continuous":
            self.head = GaussianHead(self.trunk.out_dim, spec.action_dim, config.gain,
                                     config.std_x_coef, config.std_y_coef)
        else:
            self.head = CategoricalHead(self.trunk.out_dim, spec.action_dim, config.gain)

    def dist(self, obs, hidden=None, starts=None, avail=None) -> tuple[DistParams, torch.Tensor | None]:
        """obs [L, B, obs_dim] -> distribution parameters over [L, B] and the next hidden."""
        features, hidden = self.trunk(obs, hidden, starts)
        return self.head(features, avail), hidden

    @torch.no_grad()
    def act(self, obs, hidden=None, starts=None, avail=None, deterministic=False):
        """One rollout step. obs [B, obs_dim] -> actions [B, ...], log_probs [B], hidden."""
        params, hidden = self.dist(obs.unsqueeze(0), hidden,
                                   None if starts is None else starts.unsqueeze(0),
                                   None if avail is None else avail.unsqueeze(0))
        actions = self.head.sample(params, deterministic)
        return actions[0], self.head.log_prob(params, actions)[0], hidden

    def evaluate(self, obs, actions, hidden=None, starts=None, avail=None):
        """Sequences [L, B, ...] -> (log_probs [L, B], entropy [L, B], DistParams)."""
        params, _ = self.dist(obs, hidden, starts, avail)
        return self.head.log_prob(params, actions), self.head.entropy(params), params


class Critic(nn.Module):
    """V(x) for x the global state (centralised) or one agent's observation (IPPO)."""

    def __init__(self, in_dim: int, config):
        super().__init__()
        self.trunk = Trunk(in_dim, config.hidden_sizes, config.activation,
                           config.use_feature_normalization, config.use_recurrent_policy,
                           config.recurrent_n)
        self.v = _init(nn.Linear(self.trunk.out_dim, 1), 1.0)

    def forward(self, x, hidden=None, starts=None):
        """x [L, B, in_dim] -> values [L, B] (normalised space), next hidden."""
        features, hidden = self.trunk(x, hidden, starts)
        return self.v(features).squeeze(-1), hidden


class StackedActors:
    """Rollout-time forward of N same-shaped feed-forward actors as one batched pass.

    Separate parameters, one set of batched matmuls: weights are stacked once per update
    (``[N, in, out]``) and every layer runs as ``baddbmm`` over the agent axis, so a step
    costs one forward instead of N. Rebuild after the parameters change.
    """

    def __init__(self, actors: list[Actor]):
        self.head = actors[0].head
        self.ops: list[tuple] = []
        with torch.no_grad():
            for k, module in enumerate(actors[0].trunk.mlp):
                layers = [a.trunk.mlp[k] for a in actors]
                if isinstance(module, nn.Linear):
                    self.ops.append(("linear", torch.stack([m.weight.t() for m in layers]),
                                     torch.stack([m.bias for m in layers]).unsqueeze(1)))
                elif isinstance(module, nn.LayerNorm):
                    self.ops.append(("norm", torch.stack([m.weight for m in layers]).unsqueeze(1),
                                     torch.stack([m.bias for m in layers]).unsqueeze(1), module.eps))
                else:
                    self.ops.append(("act", module))
            heads = [a.head for a in actors]
            if isinstance(self.head, GaussianHead):
                self.out = (torch.stack([h.mean.weight.t() for h in heads]),
                            torch.stack([h.mean.bias for h in heads]).unsqueeze(1))
                self.std = torch.stack([h.std() for h in heads]).unsqueeze(1)
            else:
                self.out = (torch.stack([h.logits.weight.t() for h in heads]),
                            torch.stack([h.logits.bias for h in heads]).unsqueeze(1))

    @torch.no_grad()
    def act(self, obs: torch.Tensor, avail: torch.Tensor | None, deterministic: bool):
        """obs [N, B, obs_dim], avail [N, B, n_actions] -> actions [N, B, ...], log_probs [N, B]."""
        h = obs
        for op in self.ops:
            if op[0] == "linear":
                h = torch.baddbmm(op[2], h, op[1])
            elif op[0] == "norm":
                h = torch.addcmul(op[2], nn.functional.layer_norm(h, h.shape[-1:], eps=op[3]), op[1])
            else:
                h = op[1](h)
        out = torch.baddbmm(self.out[1], h, self.out[0])
        if isinstance(self.head, GaussianHead):
            params = GaussianParams(out, self.std.expand_as(out))
        else:
            params = CategoricalHead.from_logits(out, avail)
        actions = self.head.sample(params, deterministic)
        return actions, self.head.log_prob(params, actions)
