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
from dataclasses import dataclass, fields

import pyro
import torch
from pyro.poutine.util import is_validation_enabled

from . import traces
from .ais import AIS
from .checks import positive_int
from .psis import tail_size
from .weights import LogPxEstimate, WeightStream

__all__ = ["estimate_log_px", "LogPxEstimate", "Batching"]  # LogPxEstimate lives in pyro_vae.weights


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
                    seed: int | None = None, progress: bool = True, warn: bool = True, **ais_options) -> LogPxEstimate:
    """Estimate log p(x_n) for every row x_n of ``x``, by importance sampling or annealed importance sampling.

    :param model: Pyro model called as ``model(x, *args, **kwargs)``; per-datapoint latents and
        observations inside ``pyro.plate(data_plate, ...)`` (any dim, other plates may nest inside).
    :param guide: Pyro guide with the same signature (the proposal); ignored for ``"prior"``/``"exact"``.
    :param x: data, first dimension indexes data points.
    :param num_samples: K ≥ 1, particles per data point (for AIS: chains per data point).
    :param method: ``"guide"`` (z ~ q(z|x)), ``"prior"`` (z ~ p(z): the naive estimator), ``"ais"``
        (annealed importance sampling, :mod:`pyro_vae.ais`; its options, e.g. ``num_steps=T``, go
        as keywords), or ``"exact"`` (the model's own marginal: ``model`` must be a bound method of
        an object with ``.log_px(x)``, or have a ``log_px`` attribute).
    :param batching: a :class:`Batching` (memory against speed); the default fits most models.
    :param prefix_sizes: K' ≤ K at which to also record log p̂_K' from the first K' particles
        (default 1, 10, 100, … and K).
    :param seed: if given, draw under ``torch.manual_seed(seed)`` and restore the global RNG afterwards.
    :param progress: show a tqdm progress bar.
    :param warn: warn when some k̂ > 0.7.

    Latent sites sampled by the model but not by the guide are drawn from the model; their
    densities cancel in w. Sites outside the data plate, and guide sites absent from the model,
    raise ``ValueError``: the per-point estimate would be wrong.
    """
    kwargs, batching = dict(kwargs or {}), batching or Batching()
    x = _check_inputs(x, num_samples, method, guide, batching)
    options = _ais_options(method, ais_options)
    if method == "exact":
        return _exact(model, x, args, kwargs)
    proposal = guide if method == "guide" or (method == "ais" and options.start == "guide") else traces.empty_guide
    with torch.no_grad(), traces.preserve_rng() if seed is not None else nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        layout = _inspect(model, proposal, x[:batching.max_batch], data_plate, args, kwargs, options)
        if is_validation_enabled():
            _validate(model, proposal, x, layout, batching.max_batch, args, kwargs)
        # Every row was checked by _validate; Pyro's per-call argument and support checks would cost a
        # third of the time of each K-particle pass (a Bernoulli decoder's logits, say).
        with pyro.validation_enabled(False):
            result = _estimate(model, proposal, x, num_samples, layout, batching, options,
                               _prefix_sizes(prefix_sizes, num_samples), keep_log_weights, progress, args, kwargs)
    bad = result.pareto_k > 0.7
    if warn and bad.any():
        warnings.warn(f"pareto_k > 0.7 for {int(bad.sum())} of {len(x)} data points (max "
                      f"{result.pareto_k.max().item():.2f}): their {method} weights are heavy-tailed and log_px "
                      f"is unreliable there; use a better guide or more samples (or steps)", stacklevel=2)
    return result


def _ais_options(method, options) -> AIS | None:
    if method != "ais":
        if options:
            raise ValueError(f"{next(iter(options))!r} is an option of method='ais', not of method={method!r}")
        return None
    try:
        return AIS(**options)
    except TypeError:
        known = ", ".join(f.name for f in fields(AIS))
        raise ValueError(f"unknown AIS option(s) {sorted(set(options) - {f.name for f in fields(AIS)})}; "
                         f"the options are: {known}") from None


def _estimate(model, proposal, x, K, layout, batching, ais, prefix_sizes, keep, progress, args, kwargs):
    """Run the passes (particle ranges × pieces of x) and gather the per-point statistics."""
    from tqdm.auto import tqdm  # lazy: the core imports only torch, pyro, numpy

    N = x.shape[0]
    if ais is not None:  # every chain of a point in one pass: the chains interact through the step size
        batching = Batching(batching.max_batch, K, batching.points or max(1, batching.max_batch // K))
    ranges, pieces = batching.passes(layout, x, K)
    empty = lambda *shape: torch.empty(*shape, dtype=torch.float64, device=x.device)  # noqa: E731
    out = {name: empty(N) for name in WeightStream.fields}
    top = empty(N, tail_size(K) + 1) if K >= 50 else None  # the largest log weights, for k̂
    by_k = {k: empty(N) for k in prefix_sizes}
    kept = empty(N, K) if keep else None
    extra = {"accept_rate": empty(N), "step_size": empty(N)} if ais is not None else {}
    total = len(pieces) * (max(ais.num_steps, 1) if ais is not None else len(ranges))
    bar = tqdm(total=total, desc="AIS" if ais is not None else "log p(x)", unit="step" if ais else "pass",
               disable=not progress)
    for rows, x_in, indices in pieces:
        n = rows.stop - rows.start  # the last piece of a subsampling plate wraps around: drop the padding
        stream = WeightStream(n, K, prefix_sizes, x.device)
        for start, stop in ranges:
            if ais is None:
                log_w = _log_weights(model, proposal, x_in, layout, stop - start, batching.vectorize, indices,
                                     args, kwargs)[:, :n]
                bar.update(1)
            else:
                log_w, rate, step = ais.run(model, proposal, (x_in, *args), kwargs, layout, K, indices, progress=bar)
                log_w, extra["accept_rate"][rows], extra["step_size"][rows] = log_w[:, :n], rate[:n], step[:n]
            stream.update(log_w, start)
            if kept is not None:
                kept[rows, start:stop] = log_w.T
        for name, value in stream.finish().items():
            out[name][rows] = value
        if top is not None:
            top[rows] = stream.top
        for k in prefix_sizes:
            by_k[k][rows] = stream.by_k[k]
    bar.close()
    method = "ais" if ais is not None else "guide" if proposal is not traces.empty_guide else "prior"
    return LogPxEstimate.from_streams(out, top, K, method, log_px_by_k=by_k, log_weights=kept,
                                      num_steps=ais.num_steps if ais is not None else None, **extra)


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


def _inspect(model, proposal, x0, data_plate, args, kwargs, ais=None) -> traces.Layout:
    try:
        guide_tr, model_tr = traces.dry_run(model, proposal, (x0, *args), kwargs)
    except (ValueError, RuntimeError, IndexError, TypeError) as e:
        raise ValueError(f"model/guide failed on x of shape {tuple(x0.shape)} ({_one_line(e)}); check that x "
                         f"has the shape the model expects, one row per data point") from e
    layout = traces.layout(guide_tr, model_tr, data_plate, num_rows=x0.shape[0])
    if ais is not None:
        ais.check_latents(model_tr)
    return layout


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
    if method not in ("guide", "prior", "ais", "exact"):
        raise ValueError(f"method must be 'guide', 'prior', 'ais' or 'exact', got {method!r}")
    if method == "guide" and guide is None:
        raise ValueError("method='guide' needs a guide; pass one, or use method='prior' to sample z from the prior")
    positive_int(batching.max_batch, "batching.max_batch")
    return x


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
