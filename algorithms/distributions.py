"""Action heads and the closed-form quantities the trust-region maths needs.

Continuous actions: diagonal Gaussian with a state-independent std
``sigma = sigmoid(log_std / std_x) * std_y`` (HARL's parametrisation: sigma < std_y always;
``log_std`` keeps HARL's name, and checkpoints store it under it, though it is the
sigmoid's argument, not a logarithm).
Discrete actions: categorical whose unavailable actions get a logit of -1e10, so they
are never sampled and contribute nothing to entropy or KL.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

UNAVAILABLE_LOGIT = -1e10


class GaussianParams(NamedTuple):
    """A diagonal Gaussian over a batch: the head's outputs, in this order (HATRPO's
    Fisher-vector product pairs them with ``fisher_weights``, which has the same fields)."""

    mean: torch.Tensor  # [..., act_dim]
    std: torch.Tensor  # [..., act_dim]


class CategoricalParams(NamedTuple):
    """A categorical over a batch, unavailable actions masked out."""

    log_probs: torch.Tensor  # [..., n_actions] normalised; about -1e10 where unavailable
    avail: torch.Tensor | None  # [..., n_actions] bool, or None: every action available


DistParams = GaussianParams | CategoricalParams  # what an actor's head outputs


def _orthogonal(layer: nn.Linear, gain: float) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, gain=gain)
    nn.init.zeros_(layer.bias)
    return layer


class GaussianHead(nn.Module):
    """Linear mean head with a learned, state-independent std."""

    def __init__(self, in_dim: int, act_dim: int, gain: float, std_x: float, std_y: float):
        super().__init__()
        self.mean = _orthogonal(nn.Linear(in_dim, act_dim), gain)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(std_x)))
        self.std_x, self.std_y = std_x, std_y

    def forward(self, features: torch.Tensor, avail: torch.Tensor | None = None) -> GaussianParams:
        mean = self.mean(features)
        return GaussianParams(mean, self.std().expand_as(mean))

    def std(self) -> torch.Tensor:
        """[act_dim] = sigmoid(log_std / std_x) * std_y."""
        return torch.sigmoid(self.log_std / self.std_x) * self.std_y

    @staticmethod
    def sample(p: GaussianParams, deterministic: bool) -> torch.Tensor:
        if deterministic:
            return p.mean
        return p.mean + p.std * torch.randn_like(p.mean)

    @staticmethod
    def log_prob(p: GaussianParams, actions: torch.Tensor) -> torch.Tensor:
        """Joint log-probability [...] (sum over action dims: the product of per-dim ratios)."""
        z = (actions - p.mean) / p.std
        return (-0.5 * z.pow(2) - p.std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)

    @staticmethod
    def entropy(p: GaussianParams) -> torch.Tensor:
        """Per-sample entropy [...], summed over action dims."""
        return (0.5 + 0.5 * math.log(2 * math.pi) + p.std.log()).sum(-1)

    @staticmethod
    def kl(old: GaussianParams, new: GaussianParams) -> torch.Tensor:
        """KL(old || new) per sample [...], summed over action dims."""
        var_old, var_new = old.std.pow(2), new.std.pow(2)
        return (torch.log(new.std / old.std) + (var_old + (old.mean - new.mean).pow(2)) / (2 * var_new)
                - 0.5).sum(-1)

    @staticmethod
    def fisher_weights(old: GaussianParams) -> GaussianParams:
        """Diagonal Hessian of KL(old || new) in (mean, std) at new = old, each output's
        weight in its own field: 1/sigma^2 for the mean, 2/sigma^2 for the std."""
        inv_var = old.std.pow(-2)
        return GaussianParams(mean=inv_var, std=2 * inv_var)


class CategoricalHead(nn.Module):
    """Linear logits head; unavailable actions are masked out of everything."""

    def __init__(self, in_dim: int, n_actions: int, gain: float):
        super().__init__()
        self.logits = _orthogonal(nn.Linear(in_dim, n_actions), gain)

    def forward(self, features: torch.Tensor, avail: torch.Tensor | None = None) -> CategoricalParams:
        return self.from_logits(self.logits(features), avail)

    @staticmethod
    def from_logits(logits: torch.Tensor, avail: torch.Tensor | None) -> CategoricalParams:
        """Raw logits [..., n_actions] -> masked, normalised log-probs."""
        if avail is not None:
            logits = logits.masked_fill(~avail, UNAVAILABLE_LOGIT)
        n = logits.shape[-1]
        if n < 16 and logits.device.type == "cpu":
            # torch's CPU log_softmax has no vectorised path for rows narrower than 16
            # floats: [1600, 8] takes 190 us, padded to 16 columns 36 us (backward 2.5x
            # faster too). Padding logits of -1e10 add exp(-1e10 - max) = 0 to the sum.
            padded = torch.nn.functional.pad(logits, (0, 16 - n), value=UNAVAILABLE_LOGIT)
            return CategoricalParams(padded.log_softmax(-1)[..., :n], avail)
        return CategoricalParams(logits.log_softmax(-1), avail)

    @staticmethod
    def sample(p: CategoricalParams, deterministic: bool) -> torch.Tensor:
        if deterministic:
            return p.log_probs.argmax(-1)
        # Gumbel-max on the normalised log-probs: masked actions (-1e10) never win.
        u = torch.rand_like(p.log_probs).clamp_(1e-20, 1.0)
        return (p.log_probs - torch.log(-torch.log(u))).argmax(-1)

    @staticmethod
    def log_prob(p: CategoricalParams, actions: torch.Tensor) -> torch.Tensor:
        return p.log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def entropy(p: CategoricalParams) -> torch.Tensor:
        """Entropy over available actions only [...]."""
        plogp = p.log_probs.exp() * p.log_probs
        if p.avail is not None:
            plogp = plogp.masked_fill(~p.avail, 0.0)
        return -plogp.sum(-1)

    @staticmethod
    def kl(old: CategoricalParams, new: CategoricalParams) -> torch.Tensor:
        """True KL(old || new) = sum_a pi_old(a) (log pi_old(a) - log pi_new(a)) over available a."""
        terms = old.log_probs.exp() * (old.log_probs - new.log_probs)
        if old.avail is not None:
            terms = terms.masked_fill(~old.avail, 0.0)
        return terms.sum(-1)

    @staticmethod
    def fisher_weights(old: CategoricalParams) -> CategoricalParams:
        """In log-probability coordinates the Fisher is diag(pi_old) (sum_a pi grad log pi = 0
        removes the rank-one term): pi_old is the weight of the ``log_probs`` output, 0 for
        unavailable actions; ``avail`` is no output and has none."""
        probs = old.log_probs.exp()
        if old.avail is not None:
            probs = probs.masked_fill(~old.avail, 0.0)
        return CategoricalParams(log_probs=probs, avail=None)
