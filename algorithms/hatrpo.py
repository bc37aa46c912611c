"""HATRPO: Heterogeneous-Agent TRPO (Kuba et al., ICLR 2022, Eq. 9 / Alg. 2).

Same sequential loop as HAPPO (``OnPolicyMARL.train``); agent i_m takes one natural
gradient step on the M-weighted surrogate

    L(theta) = E[ r(theta) M A ] + c_ent E[ H(pi_theta) ]   (r: joint ratio over the agent's action dims)

under KL(pi_old || pi_new) <= delta: conjugate gradient solves H x = g with H the
Fisher (Hessian of the mean KL, plus damping), the step is scaled to the KL boundary,
x * sqrt(2 delta / x^T H x), and a backtracking line search accepts the first fraction
whose KL is below delta and whose improvement is positive and at least ``accept_ratio``
of the linear prediction; otherwise the old parameters are restored.

c_ent is ``--entropy_coef``. The paper's objective has no entropy term, and HATRPO's
default is 0 (``HATRPO.defaults``); a bonus keeps a discrete policy
from turning deterministic within a few hundred KL-bounded steps (SMAX 3m,
``configs/smax/3m.yaml``). The KL bound, the line search and the improvement check all
apply to L as written.
"""
from __future__ import annotations

import torch

from algorithms.base import ActorBatch, NumericalError, OnPolicyMARL, StepResult, first_hidden, masked_mean
from algorithms.trust_region import (conjugate_gradient, flat_grad, flat_params, gauss_newton_fvp_fn,
                                     set_flat_params)


class HATRPO(OnPolicyMARL):
    name = "hatrpo"
    # The paper's objective has no entropy term (the PPO family's reference default is 0.01).
    defaults = {"entropy_coef": 0.0}
    reads = OnPolicyMARL.reads | {"kl_threshold", "ls_step", "accept_ratio", "backtrack_coeff", "cg_iters",
                                  "cg_damping"}
    # Its Fisher-vector products need double backward, which compiled graphs do not give.
    compiles_actor_loss = False
    sequential = True

    def actor_step(self, g: int, batch: ActorBatch, M: torch.Tensor) -> StepResult:
        cfg = self.config
        actor = self.actors[g]
        params = [p for p in actor.parameters() if p.requires_grad]
        h0 = first_hidden(batch.hidden, None)
        weighted_adv = M * batch.advantages

        def evaluate():
            log_probs, entropy, dist = actor.evaluate(batch.obs, batch.actions, h0, batch.starts, batch.avail)
            ratio = torch.exp(log_probs - batch.old_log_probs)
            objective = masked_mean(ratio * weighted_adv, batch.active)
            if cfg.entropy_coef:
                objective = objective + cfg.entropy_coef * masked_mean(entropy, batch.active)
            return objective, entropy, dist, ratio

        def mean_kl(old_dist, new_dist):
            return masked_mean(actor.head.kl(old_dist, new_dist), batch.active)

        # Until a step is accepted the policy is unchanged: its ratio for M is exactly 1.
        unchanged = torch.ones_like(batch.old_log_probs)
        surrogate, entropy, dist, _ = evaluate()
        old_dist = type(dist)(*(None if t is None else t.detach() for t in dist))
        who = self.label(g)
        if not torch.isfinite(surrogate):
            raise NumericalError(f"non-finite HATRPO surrogate for {who} at update {self.iteration}")
        grad = flat_grad(surrogate, params, retain_graph=True)
        if not torch.isfinite(grad).all():
            raise NumericalError(f"non-finite HATRPO gradient for {who} at update {self.iteration}")
        stats = {"surrogate": float(surrogate.detach()), "entropy": float(masked_mean(entropy, batch.active).detach()),
                 "grad_norm": float(grad.norm()), "kl": 0.0, "kl_max": 0.0, "accepted": 0.0, "ls_steps": 0.0,
                 "improvement": 0.0, "expected_improvement": 0.0}
        if float(grad.norm()) < 1e-10:
            return StepResult(stats, unchanged)  # nothing to improve (e.g. every sample inactive)
        fvp = self.fisher_vector_product(actor, dist, old_dist, batch.active, params)
        step_dir = conjugate_gradient(fvp, grad, iters=cfg.cg_iters)
        shs = 0.5 * step_dir.dot(fvp(step_dir))
        if not torch.isfinite(shs) or shs <= 0:
            raise NumericalError(f"non-finite or non-positive curvature s^T H s for {who} at update {self.iteration}")
        full_step = step_dir * torch.sqrt(cfg.kl_threshold / shs)  # = s sqrt(2 delta / s^T H s)
        expected = float(grad.dot(full_step))
        stats["expected_improvement"] = expected
        old_params = flat_params(params)
        with torch.no_grad():
            for k in range(cfg.ls_step):
                fraction = cfg.backtrack_coeff ** k
                set_flat_params(params, old_params + fraction * full_step)
                new_surrogate, _, new_dist, new_ratio = evaluate()
                kl = float(mean_kl(old_dist, new_dist))
                improvement = float(new_surrogate - surrogate)
                stats["ls_steps"] = float(k + 1)
                if (kl < cfg.kl_threshold and improvement > 0
                        and improvement / (expected * fraction) > cfg.accept_ratio):
                    stats.update(kl=kl, kl_max=kl, accepted=1.0, improvement=improvement)
                    # The accepted trial's forward pass already gives M's next factor.
                    return StepResult(stats, torch.where(batch.active, new_ratio, unchanged))
            set_flat_params(params, old_params)  # no acceptable step: keep the old policy
        return StepResult(stats, unchanged)

    def fisher_vector_product(self, actor, dist, old_dist, active, params):
        """v -> (H + damping I) v, H the Hessian of the mean KL at the old parameters.

        Computed in its Gauss-Newton form J^T W J (``trust_region.gauss_newton_fvp_fn``):
        the same matrix as differentiating the KL twice, for about half the work per
        product (tests/test_algorithm_math.py checks it against the explicit Hessian).
        """
        per_sample = active.to(dist[0].dtype) / active.sum().clamp(min=1)  # the masked mean's weights
        outputs, weights = [], []
        for output, weight in zip(dist, actor.head.fisher_weights(old_dist)):
            if weight is not None and output.requires_grad:
                outputs.append(output)
                weights.append(weight * per_sample.unsqueeze(-1))
        return gauss_newton_fvp_fn(outputs, weights, params, self.config.cg_damping)
