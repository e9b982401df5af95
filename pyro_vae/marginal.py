"""Per-datapoint estimates of the evidence log p(x) for any Pyro model and guide.

With K proposals z_k ~ r(z | x) and importance weights w_k = p(x, z_k) / r(z_k | x),

    log p̂_K(x) = log (1/K) Σ_k w_k            (importance-weighted estimate; E[p̂_K] = p(x))
    ELBO(x)    ≈ (1/K) Σ_k log w_k             (Monte Carlo ELBO; K = 1 of the above)

E[log p̂_K] is a lower bound on log p(x) that rises with K (Burda et al., 2015). The proposal r
is the guide q(z|x) (``method="guide"``) or the prior p(z) (``method="prior"``, the naive
estimator, hopeless in high dimension). Diagnostics per point, from the normalized weights
w̄_k = w_k / Σ_j w_j:

    ESS    = 1 / Σ_k w̄_k²                      (effective sample size, 1 ≤ ESS ≤ K)
    stderr = sqrt((K / ESS − 1) / (K − 1))     (delta method: sd(w) / (√K mean(w)))
    k̂      = shape of a generalized Pareto fit to the largest weights (:mod:`pyro_vae.psis`);
             k̂ > 0.7 means the variance of the weights is effectively infinite: don't trust log p̂.

Densities come from :mod:`pyro_vae.traces`, unscaled (a minibatch's subsampling scale would
change the estimand inside the logsumexp) and masked.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field

import pyro
import torch
from pyro.poutine.util import is_validation_enabled

from . import traces
from .checks import positive_int
from .psis import pareto_k_hat, tail_size

__all__ = ["estimate_log_px", "LogPxEstimate", "Batching"]


@dataclass
class LogPxEstimate:
    """Per-datapoint results of :func:`estimate_log_px`; every tensor has shape (N,), float64.

    They live on the device of ``x``.

    :ivar log_px: log (1/K) Σ_k w_k.
    :ivar elbo: (1/K) Σ_k log w_k, and ``elbo_stderr`` its standard error.
    :ivar stderr: delta-method standard error of ``log_px``.
    :ivar ess: effective sample size (Σ w)² / Σ w².
    :ivar pareto_k: PSIS k̂ (NaN when K < 50: too few tail weights to fit).
    :ivar log_px_by_k: {K': log p̂_K'} from the first K' particles, for each prefix size K'.
    :ivar log_weights: (N, K) log w_k when asked for with ``keep_log_weights=True``, else None.
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


@dataclass(frozen=True)
class Batching:
    """How the K particles × N points of :func:`estimate_log_px` are split into passes.

    :ivar max_batch: particles × data points per pass; bounds memory.
    :ivar particles: particles per pass (default: all K, for as few points as fit in ``max_batch``,
        so the guide's encoder runs once per point).
    :ivar points: data points per pass (fixed by the model when its data plate subsamples x itself).
    :ivar vectorize: run a pass's particles at once under a particle plate (as
        ``Trace_ELBO(vectorize_particles=True)``); False runs one particle per pass.
    """

    max_batch: int = 8192
    particles: int | None = None
    points: int | None = None
    vectorize: bool = True

    def passes(self, layout: traces.Layout, x: torch.Tensor, K: int):
        """(particle ranges, data pieces): each piece is (rows of x, x given to the model, forced indices)."""
        N = x.shape[0]
        points = layout.subsample_size or self.points
        particles = 1 if not self.vectorize else self.particles or min(K, max(1, self.max_batch // (points or 1)))
        points = min(N, points or max(1, self.max_batch // particles))
        ranges = [(s, min(s + particles, K)) for s in range(0, K, particles)]
        pieces = []
        for s in range(0, N, points):
            rows = slice(s, min(s + points, N))
            if layout.subsample_size is None:
                pieces.append((rows, x[rows], None))
            else:  # pass all of x; force the plate's indices, wrapping around to fill the last piece
                pieces.append((rows, x, torch.arange(s, s + points, device=x.device) % N))
        return ranges, pieces


def estimate_log_px(model, guide, x: torch.Tensor, num_samples: int = 1000, *, method: str = "guide",
                    data_plate: str = "data", args: tuple = (), kwargs: dict | None = None,
                    batching: Batching | None = None, prefix_sizes=None, keep_log_weights: bool = False,
                    seed: int | None = None, progress: bool = True, warn: bool = True) -> LogPxEstimate:
    """Estimate log p(x_n) for every row x_n of ``x`` by importance sampling.

    :param model: Pyro model called as ``model(x, *args, **kwargs)``; per-datapoint latents and
        observations inside ``pyro.plate(data_plate, ...)`` (any dim, other plates may nest inside).
    :param guide: Pyro guide with the same signature (the proposal); ignored for ``"prior"``/``"exact"``.
    :param x: data, first dimension indexes data points.
    :param num_samples: K ≥ 1, particles per data point.
    :param method: ``"guide"`` (z ~ q(z|x)), ``"prior"`` (z ~ p(z): the naive estimator), or
        ``"exact"`` (the model's own marginal: ``model`` must be a bound method of an object with
        ``.log_px(x)``, or have a ``log_px`` attribute).
    :param batching: a :class:`Batching` (memory against speed); the default fits most models.
    :param prefix_sizes: K' ≤ K at which to also record log p̂_K' from the first K' particles
        (default 1, 10, 100, … and K).
    :param seed: if given, draw under ``torch.manual_seed(seed)`` and restore the global RNG afterwards.
    :param progress: show a tqdm progress bar over the passes.
    :param warn: warn when some k̂ > 0.7.

    Latent sites sampled by the model but not by the guide are drawn from the model; their
    densities cancel in w. Sites outside the data plate, and guide sites absent from the model,
    raise ``ValueError``: the per-point estimate would be wrong.
    """
    kwargs, batching = dict(kwargs or {}), batching or Batching()
    x = _check_inputs(x, num_samples, method, guide, batching)
    if method == "exact":
        return _exact(model, x, args, kwargs)
    proposal = guide if method == "guide" else _prior_proposal
    with torch.no_grad(), traces.preserve_rng() if seed is not None else nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        layout = _inspect(model, proposal, x[:batching.max_batch], data_plate, args, kwargs)
        if is_validation_enabled():
            _validate(model, proposal, x, layout, batching.max_batch, args, kwargs)
        result = _importance_sampling(model, proposal, x, num_samples, layout, batching,
                                      _prefix_sizes(prefix_sizes, num_samples), keep_log_weights, progress, args, kwargs)
    bad = result.pareto_k > 0.7
    if warn and bad.any():
        warnings.warn(f"pareto_k > 0.7 for {int(bad.sum())} of {len(x)} data points (max "
                      f"{result.pareto_k.max().item():.2f}): their importance weights are heavy-tailed "
                      f"and log_px is unreliable there; use a better guide or more samples", stacklevel=2)
    return result


def _importance_sampling(model, proposal, x, K, layout, batching, prefix_sizes, keep, progress, args, kwargs):
    N = x.shape[0]
    ranges, pieces = batching.passes(layout, x, K)
    empty = lambda *shape: torch.empty(*shape, dtype=torch.float64, device=x.device)  # noqa: E731
    out = {name: empty(N) for name in _Stream.fields}
    top = empty(N, tail_size(K) + 1) if K >= 50 else None  # the largest log weights, for k̂
    by_k = {k: empty(N) for k in prefix_sizes}
    kept = empty(N, K) if keep else None
    bar = progress_bar(len(pieces) * len(ranges), "log p(x)", "pass", progress)
    # Every row was checked by _validate; Pyro's per-call argument and support checks would cost a
    # third of the time of each K-particle pass (a Bernoulli decoder's logits, say).
    with pyro.validation_enabled(False):
        for rows, x_in, indices in pieces:
            n = rows.stop - rows.start
            stream = _Stream(n, K, prefix_sizes, x.device)
            for start, stop in ranges:
                log_w = _log_weights(model, proposal, x_in, layout, stop - start, batching.vectorize, indices,
                                     args, kwargs)[:, :n]  # drop the wrap-around padding of the last piece
                stream.update(log_w, start)
                if kept is not None:
                    kept[rows, start:stop] = log_w.T
                bar.update(1)
            for name, value in stream.finish().items():
                out[name][rows] = value
            if top is not None:
                top[rows] = stream.top
            for k in prefix_sizes:
                by_k[k][rows] = stream.by_k[k]
    bar.close()
    out["pareto_k"] = pareto_k_hat(top, K) if top is not None else torch.full_like(out["log_px"], math.nan)
    return LogPxEstimate(**out, num_samples=K, method="guide" if proposal is not _prior_proposal else "prior",
                         log_px_by_k=by_k, log_weights=kept)


def _log_weights(model, proposal, x, layout, num_particles, vectorize, indices, args, kwargs) -> torch.Tensor:
    """log w = log p(x, z) − log r(z | x), shape (num_particles, n), float64."""
    P = num_particles if vectorize else None
    guide_tr, model_tr = traces.trace_pair(model, proposal, (x, *args), kwargs, layout, P, indices=indices)
    log_p, log_r = traces.log_densities(guide_tr, model_tr, layout, num_particles)
    log_w = log_p - log_r
    if torch.isnan(log_w).any():
        raise ValueError("a log weight is NaN: the model or guide produced NaN densities; check the "
                         "parameters and that x lies in the support of the likelihood")
    return log_w


def _inspect(model, proposal, x0, data_plate, args, kwargs) -> traces.Layout:
    try:
        guide_tr, model_tr = traces.dry_run(model, proposal, (x0, *args), kwargs)
    except (ValueError, RuntimeError, IndexError, TypeError) as e:
        raise ValueError(f"model/guide failed on x of shape {tuple(x0.shape)} ({_one_line(e)}); check that x "
                         f"has the shape the model expects, one row per data point") from e
    return traces.layout(guide_tr, model_tr, data_plate, num_rows=x0.shape[0])


def _validate(model, proposal, x, layout, max_batch, args, kwargs) -> None:
    """One particle for every row of x under Pyro's validation: the checks of x's support and of
    the distributions' parameters that the K-particle passes then skip."""
    N, B = x.shape[0], layout.subsample_size
    step = B or max_batch
    with traces.preserve_rng():
        for start in range(0, N, step):
            x_in, indices = (x[start:start + step], None) if B is None else (
                x, torch.arange(start, start + B, device=x.device) % N)
            try:
                _log_weights(model, proposal, x_in, layout, 1, False, indices, args, kwargs)
            except ValueError as e:
                raise ValueError(f"the model rejects rows {start}-{min(start + step, N) - 1} of x ({_one_line(e)}); "
                                 f"check that x lies in the support of the likelihood") from e


def _check_inputs(x, num_samples, method, guide, batching) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor with one row per data point, got {type(x).__name__}; "
                        f"convert it with torch.as_tensor(x)")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"x must have at least one row (data point), got shape {tuple(x.shape)}")
    if x.is_floating_point() and torch.isnan(x).any():
        rows = torch.isnan(x.reshape(len(x), -1)).any(1).nonzero().flatten()
        raise ValueError(f"x contains NaN in {len(rows)} row(s) (first: {rows[:5].tolist()}); "
                         f"remove or impute them before estimating log p(x)")
    positive_int(num_samples, "num_samples")
    if method not in ("guide", "prior", "exact"):
        raise ValueError(f"method must be 'guide', 'prior' or 'exact', got {method!r}")
    if method == "guide" and guide is None:
        raise ValueError("method='guide' needs a guide; pass one, or use method='prior' to sample z from the prior")
    positive_int(batching.max_batch, "batching.max_batch")
    return x


def _prior_proposal(*args, **kwargs) -> None:
    """The empty guide: every latent is then drawn by the model from its prior, and cancels in w."""


def _exact(model, x, args, kwargs) -> LogPxEstimate:
    log_px = getattr(model, "log_px", None) or getattr(getattr(model, "__self__", None), "log_px", None)
    if log_px is None:
        raise ValueError("method='exact' needs a model that knows its marginal: pass a bound method of an "
                         "object with .log_px(x) (e.g. LinearGaussian(...).model), or use method='guide'")
    value = log_px(x, *args, **kwargs).detach().double().reshape(-1)
    nan = torch.full_like(value, float("nan"))
    return LogPxEstimate(log_px=value, elbo=nan, stderr=torch.zeros_like(value), elbo_stderr=nan,
                         ess=nan, pareto_k=nan, num_samples=0, method="exact")


def _prefix_sizes(prefix_sizes, K: int) -> tuple:
    if prefix_sizes is None:
        prefix_sizes = [10**i for i in range(int(math.log10(K)) + 1)] + [K]
    sizes = sorted(set(int(k) for k in prefix_sizes))
    if sizes and not 1 <= sizes[0] <= sizes[-1] <= K:
        raise ValueError(f"prefix_sizes must lie in [1, num_samples={K}], got {sizes}")
    return tuple(sizes)


def _one_line(error: Exception) -> str:
    return f"{type(error).__name__}: " + (str(error).strip().splitlines() or [""])[0]


def progress_bar(total: int, desc: str, unit: str, enabled: bool):
    """A tqdm bar, or a silent stand-in when ``enabled`` is False (tqdm is imported only then)."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm  # lazy: the core imports only torch, pyro, numpy
    return tqdm(total=total, desc=desc, unit=unit)


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


class _Stream:
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
