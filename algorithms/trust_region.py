"""Trust-region maths for HATRPO: flat parameter vectors, conjugate gradient, and the
Fisher-vector product as a Hessian-vector product of the mean KL (Schulman et al. 2015,
App. C; Kuba et al. 2022, Alg. 2)."""
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


def fisher_vector_product_fn(mean_kl: torch.Tensor, params: list[torch.Tensor],
                             damping: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return ``v -> (H + damping I) v`` with H the Hessian of ``mean_kl`` at the current params.

    The KL's gradient graph is built once; each product is then a single backward pass
    (no new forward pass per conjugate-gradient iteration).
    """
    kl_grad = flat_grad(mean_kl, params, create_graph=True)

    def fvp(v: torch.Tensor) -> torch.Tensor:
        return flat_grad(kl_grad.dot(v), params, retain_graph=True) + damping * v

    return fvp
