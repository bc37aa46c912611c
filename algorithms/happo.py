"""HAPPO: Heterogeneous-Agent PPO (Kuba et al., ICLR 2022, Eq. 11 / Alg. 1).

Agents update one at a time in a random order (``OnPolicyMARL.train``). Agent i_m
maximises the clipped surrogate weighted by M, the product of the probability ratios
of the agents i_1..i_{m-1} already updated this iteration (a constant, no gradient):

    L(theta) = E[ min( r(theta) M A, clip(r(theta), 1-eps, 1+eps) M A ) ] + c_ent H

with r the joint ratio over agent i_m's action dimensions. M multiplies outside the
clip, as in the reference implementation.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from algorithms.base import (ActorBatch, MaybeCompiled, OnPolicyMARL, StepResult, first_hidden, masked_mean,
                             minibatches, take)


def happo_loss(log_probs, old_log_probs, advantages, M, active, entropy, clip_param: float,
               entropy_coef: float):
    """The HAPPO actor loss on a (mini-)batch; every input is [L, b] (``active`` bool).

    Returns (loss to minimise, diagnostics dict of detached tensors).
    """
    ratio = torch.exp(log_probs - old_log_probs)
    surrogate = torch.min(ratio * advantages,
                          ratio.clamp(1.0 - clip_param, 1.0 + clip_param) * advantages)
    policy_loss = -masked_mean(M * surrogate, active)
    mean_entropy = masked_mean(entropy, active)  # per-sample entropy (summed over dims), averaged
    with torch.no_grad():
        clip_fraction = masked_mean(((ratio - 1.0).abs() > clip_param).float(), active)
        approx_kl = masked_mean((ratio - 1.0) - (log_probs - old_log_probs), active)
    info = {"policy_loss": policy_loss.detach(), "entropy": mean_entropy.detach(),
            "clip_fraction": clip_fraction, "approx_kl": approx_kl}
    return policy_loss - entropy_coef * mean_entropy, info


def minibatch_loss(actor, obs, actions, hidden, starts, avail, old_log_probs, advantages, M,
                   active, clip_param: float, entropy_coef: float):
    """``happo_loss`` of ``actor`` on one mini-batch (what ``--compile`` compiles)."""
    log_probs, entropy, _ = actor.evaluate(obs, actions, hidden, starts, avail)
    return happo_loss(log_probs, old_log_probs, advantages, M, active, entropy, clip_param,
                      entropy_coef)


class HAPPO(OnPolicyMARL):
    name = "happo"
    defaults = {}
    reads = OnPolicyMARL.reads | {"lr", "ppo_epoch", "actor_num_mini_batch", "clip_param"}
    compiles_actor_loss = True
    sequential = True

    def __init__(self, config, spec, device):
        super().__init__(config, spec, device)
        self.minibatch_loss = MaybeCompiled(minibatch_loss, config.compiles_actor_loss)

    def actor_step(self, g: int, batch: ActorBatch, M: torch.Tensor) -> StepResult:
        """``ppo_epoch`` epochs of clipped updates of actor ``g``; M [T, B]."""
        cfg = self.config
        actor, optim = self.actors[g], self.actor_optims[g]
        T, B = batch.old_log_probs.shape
        sums: dict[str, list[torch.Tensor]] = defaultdict(list)
        for _ in range(cfg.ppo_epoch):
            for idx in minibatches(T, B, cfg.actor_num_mini_batch, self.chunk_length, self.rng,
                                   self.device):
                loss, info = self.minibatch_loss(
                    actor, take(batch.obs, idx), take(batch.actions, idx),
                    first_hidden(batch.hidden, idx), take(batch.starts, idx), take(batch.avail, idx),
                    take(batch.old_log_probs, idx), take(batch.advantages, idx), take(M, idx),
                    take(batch.active, idx), cfg.clip_param, cfg.entropy_coef)
                info["grad_norm"] = self.optimise(optim, actor, loss, "actor loss", self.label(g))
                for key, value in info.items():
                    sums[key].append(value)
        # Averaged over every mini-batch of every epoch, not just the last one.
        return StepResult({key: float(torch.stack(values).mean()) for key, values in sums.items()})
