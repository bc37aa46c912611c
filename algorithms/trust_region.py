"""Trust-region maths for HATRPO: flat parameter vectors, conjugate gradient, and the
Fisher-vector product, i.e. the mean KL's Hessian at the old policy times a vector
(Schulman et al. 2015, App. C; Kuba et al. 2022, Alg. 2), in Gauss-Newton form."""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def flat_params(params: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.data.reshape(-1) for p in params])


def set_flat_params(params: Iterable[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.data.copy_(flat[offset : offset + n].view_as(p))
        offset += n


def flat_grad(output: torch.Tensor, params: list[torch.Tensor], **kwargs) -> torch.Tensor:
    grads = torch.autograd.grad(output, params, allow_unused=True, **kwargs)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for g, p in zip(grads, params)])


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       iters: int = 10, residual_tol: float = 1e-10) -> torch.Tensor:
    """Approximately solve ``A x = b`` for symmetric positive-definite A given ``matvec(v) = A v``."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r.dot(r)
    for _ in range(iters):
        if rr < residual_tol:
            break
        Ap = matvec(p)
        alpha = rr / p.dot(Ap)
        x += alpha * p
        r -= alpha * Ap
        rr_new = r.dot(r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def gauss_newton_fvp_fn(outputs: list[torch.Tensor], weights: list[torch.Tensor], params: list[torch.Tensor],
                        damping: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return ``v -> (J^T W J + damping I) v``, J = d outputs / d params.

    At the old parameters the mean KL's Hessian is exactly this Gauss-Newton form: its
    other term carries the KL's gradient with respect to the distribution parameters,
    which vanishes where new = old. ``outputs`` are the distribution parameters (still
    attached to the forward graph) and ``weights`` the KL's Hessian with respect to them,
    diagonal, already scaled by the mask of the mean (``head.fisher_weights``). J v comes
    from a backward pass through the (linear in u) graph of J^T u; J^T (W J v) from a
    plain backward pass through the forward graph, which is kept.
    """
    dummies = [torch.zeros_like(y, requires_grad=True) for y in outputs]
    jt_u = flat_grad(outputs, params, grad_outputs=dummies, create_graph=True)

    def fvp(v: torch.Tensor) -> torch.Tensor:
        jv = torch.autograd.grad(jt_u, dummies, grad_outputs=v, retain_graph=True)
        weighted = [w * x for w, x in zip(weights, jv)]
        return flat_grad(outputs, params, grad_outputs=weighted, retain_graph=True) + damping * v

    return fvp
