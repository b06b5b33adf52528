"""Entropic optimal transport (Sinkhorn, log domain) between two point clouds with cosine cost.

Used by the `ot` near-future distance: the two clouds are the embeddings of the teacher's and the student's
continuations of the same prefix (input token embeddings, or the student's last-layer states), uniform weights.
"""

from __future__ import annotations

import torch


def cosine_cost(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """C[i, j] = 1 - cos(a_i, b_j), in [0, 2]."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    b = torch.nn.functional.normalize(b.double(), dim=-1)
    return 1.0 - a @ b.T


def sinkhorn(cost: torch.Tensor, eps: float = 0.05, iters: int = 200,
             mu: torch.Tensor | None = None, nu: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropic OT plan and transport cost <P, C> for marginals mu, nu (uniform by default)."""
    n, m = cost.shape
    c = cost.double()
    log_mu = torch.log(mu.double()) if mu is not None else torch.full((n,), -torch.log(torch.tensor(float(n))),
                                                                      dtype=torch.float64)
    log_nu = torch.log(nu.double()) if nu is not None else torch.full((m,), -torch.log(torch.tensor(float(m))),
                                                                      dtype=torch.float64)
    f = torch.zeros(n, dtype=torch.float64)
    g = torch.zeros(m, dtype=torch.float64)
    for _ in range(iters):
        f = eps * (log_mu - torch.logsumexp((g[None, :] - c) / eps, dim=1))
        g = eps * (log_nu - torch.logsumexp((f[:, None] - c) / eps, dim=0))
    plan = torch.exp((f[:, None] + g[None, :] - c) / eps)
    return plan, (plan * c).sum()


def ot_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 0.05, iters: int = 200) -> float:
    """Entropic OT cost between embeddings a [n, d] and b [m, d], uniform weights, cost 1 - cos."""
    if a.shape[0] == 0 or b.shape[0] == 0:
        return 0.0 if a.shape[0] == b.shape[0] else 2.0
    return float(sinkhorn(cosine_cost(a, b), eps, iters)[1])
