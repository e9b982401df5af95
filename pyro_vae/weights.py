"""Statistics of log importance weights, per data point: the estimate log p̂, its standard error,
the ELBO, the effective sample size and the Pareto k̂, for importance sampling and AIS alike.

With K weights w_k of one data point and w̄_k = w_k / Σ_j w_j,

    log p̂  = log (1/K) Σ_k w_k                     ELBO = (1/K) Σ_k log w_k
    ESS    = 1 / Σ_k w̄_k²                          stderr = sqrt((K / ESS − 1) / (K − 1))

stderr is the delta-method standard error sd(w) / (√K mean(w)) of log p̂. It is computed from the
weights drawn, so it can never show an error the draws did not reach: where k̂ > 0.7 the
variance of the weights is effectively infinite and stderr is NaN, not a small number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .psis import pareto_k_hat, tail_size

__all__ = ["LogPxEstimate", "WeightStream"]


@dataclass
class LogPxEstimate:
    """Per-datapoint results of :func:`estimate_log_px`; every tensor has shape (N,), float64.

    They live on the device of ``x``.

    :ivar log_px: log (1/K) Σ_k w_k.
    :ivar elbo: (1/K) Σ_k log w_k, and ``elbo_stderr`` its standard error.
    :ivar stderr: delta-method standard error of ``log_px``; NaN where k̂ > 0.7 (not meaningful there).
    :ivar ess: effective sample size (Σ w)² / Σ w².
    :ivar pareto_k: PSIS k̂ (NaN when K < 50: too few tail weights to fit).
    :ivar log_px_by_k: {K': log p̂_K'} from the first K' particles, for each prefix size K'.
    :ivar log_weights: (N, K) log w_k when asked for with ``keep_log_weights=True``, else None.
    :ivar num_steps, accept_rate, step_size: AIS only: its T, and per point the mean HMC acceptance
        rate and the final leapfrog step size.
    """

    log_px: torch.Tensor
    elbo: torch.Tensor
    stderr: torch.Tensor
    elbo_stderr: torch.Tensor
    ess: torch.Tensor
    pareto_k: torch.Tensor
    num_samples: int
    method: str
    log_px_by_k: dict = field(default_factory=dict)
    log_weights: torch.Tensor | None = None
    num_steps: int | None = None
    accept_rate: torch.Tensor | None = None
    step_size: torch.Tensor | None = None

    @classmethod
    def from_streams(cls, out: dict, top: torch.Tensor | None, K: int, method: str, **extra) -> "LogPxEstimate":
        """The estimate from per-point :class:`WeightStream` results ``out`` and the largest log
        weights ``top`` (N, M+1) (None when K < 50): fits k̂ and withdraws the stderr where k̂ > 0.7."""
        pareto_k = pareto_k_hat(top, K) if top is not None else torch.full_like(out["log_px"], math.nan)
        stderr = torch.where(pareto_k > 0.7, torch.full_like(out["stderr"], math.nan), out["stderr"])
        return cls(**{**out, "stderr": stderr}, pareto_k=pareto_k, num_samples=K, method=method, **extra)

    def mean_log_px_by_k(self) -> dict:
        """{K': mean over data points of log p̂_K'} — E[log p̂_K'] rises with K' toward log p(x)."""
        return {k: v.mean().item() for k, v in self.log_px_by_k.items()}

    def fraction_pareto_k_above(self, threshold: float = 0.7) -> float | None:
        """Fraction of the points with a fitted k̂ (not NaN: K ≥ 50) whose k̂ exceeds ``threshold``;
        +inf (one weight dominates) counts as above. None when no point has a k̂."""
        fitted = self.pareto_k[~torch.isnan(self.pareto_k)]
        return (fitted > threshold).double().mean().item() if len(fitted) else None

    def summary(self) -> dict:
        """Dataset means (nats per data point) and diagnostics, as plain floats."""
        n = self.log_px.numel()
        return {"method": self.method, "num_samples": self.num_samples, "num_points": n,
                "log_px": self.log_px.mean().item(),
                "log_px_sem": (self.log_px.std() / math.sqrt(n)).item() if n > 1 else float("nan"),
                "elbo": self.elbo.mean().item(), "ess_median": self.ess.median().item(),
                "pareto_k_max": self.pareto_k.max().item(),
                "frac_pareto_k_above_0.7": self.fraction_pareto_k_above(0.7)}


class WeightStream:
    """Streaming per-point statistics of log weights arriving in particle chunks, all in float64.

    Keeps logsumexp of log w and of 2 log w (for log p̂ and ESS), shifted sums of log w and its
    square (for the ELBO and its variance, without cancellation), and the largest M+1 log weights
    (the Pareto tail), so memory does not grow with K.
    """

    fields = ("log_px", "elbo", "stderr", "elbo_stderr", "ess")

    def __init__(self, n: int, K: int, prefix_sizes: tuple, device):
        self.K, self.prefix_sizes = K, prefix_sizes
        self.lse = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
        self.lse2 = self.lse.clone()
        self.shift = self.s1 = self.s2 = None
        self.tail = tail_size(K) + 1 if K >= 50 else 0
        self.top = self.lse.new_empty(n, 0)
        self.by_k = {}

    def update(self, log_w: torch.Tensor, start: int) -> None:
        """Add particles start, …, start + P − 1; ``log_w`` has shape (P, n)."""
        stop = start + log_w.shape[0]
        for k in self.prefix_sizes:
            if start < k <= stop:  # the prefix ends inside this chunk
                part = torch.logaddexp(self.lse, log_w[:k - start].logsumexp(0))
                self.by_k[k] = part - math.log(k)
        self.lse = torch.logaddexp(self.lse, log_w.logsumexp(0))
        self.lse2 = torch.logaddexp(self.lse2, (2 * log_w).logsumexp(0))
        if self.shift is None:
            self.shift = log_w.mean(0)
            self.s1, self.s2 = torch.zeros_like(self.shift), torch.zeros_like(self.shift)
        centered = log_w - self.shift
        self.s1 += centered.sum(0)
        self.s2 += centered.pow(2).sum(0)
        if self.tail:
            both = torch.cat([self.top, log_w.T], dim=1)
            self.top = both.topk(min(self.tail, both.shape[1]), dim=1).values

    def finish(self) -> dict:
        K = self.K
        ess = torch.exp(2 * self.lse - self.lse2)
        var = (self.s2 - self.s1**2 / K) / (K - 1) if K > 1 else torch.full_like(self.s1, math.nan)
        stderr = ((K / ess - 1).clamp(min=0) / (K - 1)).sqrt() if K > 1 else torch.full_like(ess, math.nan)
        return {"log_px": self.lse - math.log(K), "elbo": self.shift + self.s1 / K, "stderr": stderr,
                "elbo_stderr": (var.clamp(min=0) / K).sqrt(), "ess": ess}
