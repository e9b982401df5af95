"""Pareto-smoothed importance sampling diagnostic k̂ (Vehtari et al., 2024), batched over rows.

Fit a generalized Pareto distribution to the M largest of K importance weights; its shape k̂
says how heavy the weights' tail is. k̂ < 0.5: the variance of the weights is finite and the
estimate converges at the usual rate; 0.5 ≤ k̂ < 0.7: finite mean, slow; k̂ > 0.7: the variance
is effectively infinite and an importance-sampling estimate is unreliable, however it looks.
"""

from __future__ import annotations

import math

import torch

__all__ = ["pareto_k_hat", "tail_size"]

_CONSTANT = 1e-6  # log-weight spread below which the largest weights count as equal


def tail_size(K: int) -> int:
    """M = ceil(min(K/5, 3√K)), the number of largest weights PSIS fits (as pyro's psis_diagnostic)."""
    return int(math.ceil(min(0.2 * K, 3.0 * math.sqrt(K))))


def pareto_k_hat(log_weights: torch.Tensor, num_samples: int | None = None, row_chunk: int = 256) -> torch.Tensor:
    """PSIS k̂ per row: the generalized Pareto shape fitted to the M largest importance weights.

    Follows ``pyro.infer.importance.psis_diagnostic``, vectorized over rows: with the log weights
    shifted so their maximum is 0, the cutoff u is the (M+1)-th largest (floored at log 1e-15), the
    tail is the weights above it, and the fit (Zhang & Stephens, 2009, as in
    ``pyro.ops.stats.fit_generalized_pareto``) is applied to exp(tail) − exp(u).
    Special values: NaN when K < 50 (too few tail weights to fit); +inf when fewer than 10 of the
    M largest weights are within 1e15 of the largest (one weight dominates: pyro also says inf);
    −inf when the M + 1 largest weights agree within 1e-6 relative, or fewer than 10 of them
    exceed the cutoff because of ties (bounded weights, e.g. the exact posterior as guide, or a
    discrete latent with few values).

    :param log_weights: (N, L) log weights; only the M + 1 largest of each row are used, so L may be
        that many (the rest of the K samples dropped) when ``num_samples`` = K is given.
    """
    K = num_samples or log_weights.shape[-1]
    M = tail_size(K)
    top = log_weights.double().topk(min(M + 1, log_weights.shape[-1]), dim=-1).values
    result = torch.full_like(top[:, 0], math.nan)
    if top.shape[-1] < M + 1 or M < 10:
        return result
    row_max = top[:, 0].clone()
    top = top - top[:, :1]
    cutoff = top[:, M].clamp(min=math.log(1e-15))
    counts = (top[:, :M] > cutoff[:, None]).sum(1)  # the exceedances are a prefix: rows are sorted
    # Too few exceedances: either ties at the top (bounded weights, e.g. a discrete latent with few
    # values) or one weight dwarfs the rest by > 1e15 (degenerate: pyro's psis_diagnostic says inf).
    few, dwarfed = counts < 10, top[:, M] < math.log(1e-15)
    result[few & dwarfed], result[few & ~dwarfed] = math.inf, -math.inf
    result[top[:, M] > -_CONSTANT] = -math.inf      # weights equal: bounded, the estimate exact
    for n in counts.unique().tolist():
        if n < 10:
            continue
        rows = ((counts == n) & (top[:, M] <= -_CONSTANT)).nonzero().flatten()
        if len(rows) == 0:
            continue
        for chunk in rows.split(row_chunk):  # bounds the (rows, grid, n) intermediate
            exceed = top[chunk, :n].flip(-1).exp() - cutoff[chunk, None].exp()  # ascending
            result[chunk] = _fit_gpd_shape(exceed)
    result[~torch.isfinite(row_max)] = math.nan  # all weights 0 (or one infinite): nothing to fit
    return result


def _fit_gpd_shape(X: torch.Tensor) -> torch.Tensor:
    """Generalized Pareto shape k for each row of X (rows ascending, > 0), Zhang & Stephens with a
    weak prior toward 0.5 — line for line ``pyro.ops.stats.fit_generalized_pareto``, batched."""
    N = X.shape[-1]
    M = 30 + int(math.sqrt(N))
    grid = 1.0 - math.sqrt(M) / (torch.arange(1, M + 1, dtype=X.dtype, device=X.device) - 0.5).sqrt()
    bs = grid / (3.0 * X[:, int(N / 4 - 0.5), None]) + 1 / X[:, -1:]                  # (R, M), b = k/σ
    ks = torch.log1p(-bs.unsqueeze(-1) * X.unsqueeze(-2)).mean(-1)                    # (R, M)
    Ls = N * (torch.log(-bs / ks) - (ks + 1.0))                                        # profile log-lik
    weights = 1.0 / torch.exp(Ls.unsqueeze(-2) - Ls.unsqueeze(-1)).sum(-1)            # posterior of b
    weights = torch.where(weights > 1.0e-30, weights, torch.zeros_like(weights))
    b = (bs * weights).sum(-1) / weights.sum(-1)
    k = torch.log1p(-b.unsqueeze(-1) * X).mean(-1)
    return k * N / (N + 10.0) + 5.0 / (N + 10.0)
