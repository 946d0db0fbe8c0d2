"""Gradient surgery as pure maths on the Gram matrix of task gradients.

An aggregator maps the K×K Gram matrix G (G_ij = g_i · g_j, the dot products of the K task
gradients) to K task weights w; the combined gradient is Σ_k w_k g_k. Because every method here
needs only dot products, a distributed engine can all-reduce the K² numbers of G instead of moving
gradients (see engine.py). This module knows nothing of DeepSpeed or of where G came from.

Adding a method = one function ``(gram, orders) -> weights`` registered in ``AGGREGATORS``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

Orders = Sequence[Sequence[int]]


def sum_weights(gram: torch.Tensor, orders: Orders | None = None) -> torch.Tensor:
    """Plain summation: w = 1 (what training without surgery does)."""
    return torch.ones(gram.shape[0], dtype=gram.dtype, device=gram.device)


def mean_weights(gram: torch.Tensor, orders: Orders | None = None) -> torch.Tensor:
    """w = 1/K."""
    return sum_weights(gram) / gram.shape[0]


def pcgrad_coefficients(gram: torch.Tensor, orders: Orders) -> torch.Tensor:
    """PCGrad (Yu et al. 2020) as a K×K coefficient matrix C: the projected gradient of task i is
    g_i' = Σ_j C_ij g_j.

    For task i, for each j in ``orders[i]`` in turn: if g_i' · g_j < 0 (a conflict with the *original*
    g_j), remove the component along g_j: g_i' -= (g_i' · g_j / ||g_j||²) g_j. Since g_i' · g_j =
    (C G)_ij, the whole algorithm runs on G. ``j == i`` is skipped (a gradient never conflicts
    with itself), and so is a task with a zero gradient (nothing to project on).
    """
    k = gram.shape[0]
    gram = gram.double()
    coef = torch.eye(k, dtype=torch.float64, device=gram.device)
    for i in range(k):
        for j in orders[i]:
            if j == i or gram[j, j] <= 0:
                continue
            dot = coef[i] @ gram[:, j]
            if dot < 0:
                coef[i, j] -= dot / gram[j, j]
    return coef


def pcgrad_weights(gram: torch.Tensor, orders: Orders) -> torch.Tensor:
    """Task weights w with Σ_k w_k g_k = Σ_i g_i' (PCGrad's projected gradients, *summed* as in the
    paper's official implementation; ``surgery.method: mean`` is plain averaging, without projections).

    ``gram``: K×K dot products of the task gradients. ``orders[i]``: the task indices that task i is
    projected against, in order (PCGrad draws a random permutation of the other tasks).
    """
    return pcgrad_coefficients(gram, orders).sum(dim=0).to(gram.dtype)


def pcgrad_projections(gram: torch.Tensor, orders: Orders) -> int:
    """How many projections PCGrad applies for this Gram matrix and these orders (telemetry)."""
    coef = pcgrad_coefficients(gram, orders)
    return int((coef - torch.diag(torch.diag(coef)) != 0).sum())


def mgda_weights(gram: torch.Tensor, orders: Orders | None = None, iters: int = 2000) -> torch.Tensor:
    """MGDA (Sener & Koltun 2018): the min-norm point of the convex hull of the task gradients,
    w = argmin_{w in simplex} wᵀ G w, by projected gradient descent (K is small: microseconds);
    scaled by K so that equal, agreeing gradients get the same total weight as ``sum``."""
    k = gram.shape[0]
    g = gram.double()
    lipschitz = float(torch.linalg.eigvalsh(g).max().clamp(min=1e-30))
    w = torch.full((k,), 1.0 / k, dtype=torch.float64, device=gram.device)
    for _ in range(iters):
        w_next = _project_to_simplex(w - (g @ w) / lipschitz)
        if torch.allclose(w_next, w, rtol=0, atol=1e-12):
            break
        w = w_next
    return (w * k).to(gram.dtype)


def _project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto {w >= 0, Σw = 1} (Duchi et al. 2008)."""
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, 0) - 1
    idx = torch.arange(1, len(v) + 1, dtype=v.dtype, device=v.device)
    rho = int(torch.nonzero(u - css / idx > 0).max())
    return (v - css[rho] / (rho + 1)).clamp(min=0)


AGGREGATORS: dict[str, Callable[[torch.Tensor, Orders], torch.Tensor]] = {
    "sum": sum_weights,
    "mean": mean_weights,
    "pcgrad": pcgrad_weights,
    "mgda": mgda_weights,
}


def task_weights(method: str, gram: torch.Tensor, orders: Orders) -> torch.Tensor:
    if method not in AGGREGATORS:
        raise ValueError(f"unknown surgery method {method!r}; choose one of {', '.join(AGGREGATORS)}")
    return AGGREGATORS[method](gram, orders)


def cosine_matrix(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarities between task gradients from their Gram matrix (0 where a norm is 0)."""
    norms = gram.diagonal().clamp(min=0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, gram / denom.clamp(min=1e-30), torch.zeros_like(gram))


def random_orders(k: int, generator: torch.Generator) -> list[list[int]]:
    """For each task, a random permutation of the other tasks (PCGrad's order)."""
    return [[j for j in torch.randperm(k, generator=generator).tolist() if j != i] for i in range(k)]
