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
    k̂      = shape of a generalized Pareto fit to the largest weights (PSIS; Vehtari et al.);
             k̂ > 0.7 means the variance of the weights is effectively infinite: don't trust log p̂.

Densities come from Pyro traces (``poutine.trace`` + ``poutine.replay``), never rewritten here.
Each site's log-density is taken *unscaled*: Pyro's trace ``log_prob`` carries the site's scale
(``scale_and_mask`` in ``Trace.compute_log_prob``: plate subsampling N/B, ``poutine.scale``), and
scaling a term inside the logsumexp would change the estimand. Masks are kept.
"""

from __future__ import annotations

import math
import warnings
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field

import torch
import pyro
import pyro.poutine as poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.util import is_validation_enabled

__all__ = ["estimate_log_px", "LogPxEstimate", "pareto_k_hat"]

_PARTICLES = "_log_px_particles"  # name of the particle plate added outside the data plate


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


def estimate_log_px(model, guide, x: torch.Tensor, num_samples: int = 1000, *, method: str = "guide",
                    data_plate: str = "data", args: tuple = (), kwargs: dict | None = None,
                    max_batch: int = 8192, particle_chunk: int | None = None, data_chunk: int | None = None,
                    vectorize: bool = True, prefix_sizes=None, keep_log_weights: bool = False,
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
    :param max_batch: particles × data points per pass; bounds memory.
    :param particle_chunk, data_chunk: override the split (default: all K particles for as few
        data points as fit in ``max_batch``, so the guide's encoder runs once per point).
    :param vectorize: run a chunk of particles in one pass under a particle plate (as
        ``Trace_ELBO(vectorize_particles=True)``); False runs one particle per pass.
    :param prefix_sizes: K' ≤ K at which to also record log p̂_K' from the first K' particles
        (default 1, 10, 100, … and K).
    :param seed: if given, draw under ``torch.manual_seed(seed)`` and restore the global RNG afterwards.
    :param progress: show a tqdm progress bar over the passes.
    :param warn: warn when some k̂ > 0.7.

    Latent sites sampled by the model but not by the guide are drawn from the model; their
    densities cancel in w. Sites outside the data plate, and guide sites absent from the model,
    raise ``ValueError``: the per-point estimate would be wrong.
    """
    kwargs = dict(kwargs or {})
    x = _check_inputs(x, num_samples, method, guide, max_batch)
    if method == "exact":
        return _exact(model, x, args, kwargs)
    proposal = guide if method == "guide" else _prior_proposal
    K, N = num_samples, x.shape[0]
    prefix_sizes = _prefix_sizes(prefix_sizes, K)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
    with torch.no_grad(), rng:
        if seed is not None:
            torch.manual_seed(seed)
        plan = _Plan.inspect(model, proposal, x[:max_batch], data_plate, args, kwargs)
        if is_validation_enabled():
            plan.validate(model, proposal, x, max_batch, args, kwargs)
        chunks = plan.chunks(x, K, max_batch, particle_chunk, data_chunk, vectorize)
        empty = lambda *shape: torch.empty(*shape, dtype=torch.float64, device=x.device)  # noqa: E731
        out = {name: empty(N) for name in _Stream.fields}
        top = empty(N, _tail_size(K) + 1) if K >= 50 else None  # the largest log weights, for k̂
        by_k = {k: empty(N) for k in prefix_sizes}
        kept = empty(N, K) if keep_log_weights else None
        bar = _progress_bar(len(chunks.data) * len(chunks.particles), progress)
        # Every row was checked above; Pyro's per-call argument and support checks would cost a
        # third of the time of each K-particle pass (a Bernoulli decoder's logits, say).
        with pyro.validation_enabled(False):
            for rows, x_in, indices in chunks.data:
                stream = _Stream(rows.stop - rows.start, K, prefix_sizes, x.device)
                for start, stop in chunks.particles:
                    log_w = plan.log_weights(model, proposal, x_in, indices, stop - start, vectorize, args, kwargs)
                    log_w = log_w[:, :rows.stop - rows.start]  # drop the wrap-around padding of the last chunk
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
    result = LogPxEstimate(**out, num_samples=K, method=method, log_px_by_k=by_k, log_weights=kept)
    bad = result.pareto_k > 0.7
    if warn and bad.any():
        warnings.warn(f"pareto_k > 0.7 for {int(bad.sum())} of {N} data points (max "
                      f"{result.pareto_k.max().item():.2f}): their importance weights are heavy-tailed "
                      f"and log_px is unreliable there; use a better guide or more samples", stacklevel=2)
    return result


def _check_inputs(x, num_samples, method, guide, max_batch) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor with one row per data point, got {type(x).__name__}; "
                        f"convert it with torch.as_tensor(x)")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"x must have at least one row (data point), got shape {tuple(x.shape)}")
    if x.is_floating_point() and torch.isnan(x).any():
        rows = torch.isnan(x.reshape(len(x), -1)).any(1).nonzero().flatten()
        raise ValueError(f"x contains NaN in {len(rows)} row(s) (first: {rows[:5].tolist()}); "
                         f"remove or impute them before estimating log p(x)")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if method not in ("guide", "prior", "exact"):
        raise ValueError(f"method must be 'guide', 'prior' or 'exact', got {method!r}")
    if method == "guide" and guide is None:
        raise ValueError("method='guide' needs a guide; pass one, or use method='prior' to sample z from the prior")
    if not (isinstance(max_batch, int) and max_batch >= 1):
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
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


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm  # lazy: the core imports only torch, pyro, numpy
    return tqdm(total=total, desc="log p(x)", unit="pass")


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


class _ForceSubsample(Messenger):
    """Sets the indices of the data plate's subsample, so every point is visited exactly once."""

    def __init__(self, name: str, indices: torch.Tensor | None):
        super().__init__()
        self.name, self.indices = name, indices

    def _pyro_sample(self, msg):
        if self.indices is not None and msg["name"] == self.name and isinstance(msg["fn"], _Subsample):
            msg["value"] = self.indices


def _site_kind(site) -> str | None:
    """'observed', 'latent', or None for sites that carry no density (plates' subsample, deterministic)."""
    if site["type"] != "sample" or isinstance(site["fn"], _Subsample) or site["infer"].get("_deterministic"):
        return None
    return "observed" if site["is_observed"] else "latent"


@dataclass
class _Chunks:
    data: list        # (rows into x, x passed to the model, forced data-plate indices or None)
    particles: list   # (start, stop) particle ranges


@dataclass
class _Plan:
    """What one dry run (one particle, no particle plate) learns about the model and guide."""

    data_plate_name: str
    data_dim: int               # the data plate's dim (negative)
    max_plate_nesting: int      # the particle plate goes at dim -(max_plate_nesting + 1)
    subsample_size: int | None  # set when the data plate subsamples the rows of x itself

    @classmethod
    def inspect(cls, model, guide, x0, data_plate, args, kwargs) -> "_Plan":
        try:
            with torch.random.fork_rng(devices=[]):  # the dry run leaves the random stream untouched
                guide_tr, model_tr = _traces(model, guide, x0, args, kwargs)
        except (ValueError, RuntimeError, IndexError, TypeError) as e:
            raise ValueError(f"model/guide failed on x of shape {tuple(x0.shape)} ({_one_line(e)}); check "
                             f"that x has the shape the model expects, one row per data point") from e
        frames = []
        for trace_name, tr in (("guide", guide_tr), ("model", model_tr)):
            for name, site in tr.nodes.items():
                kind = _site_kind(site)
                if kind is None:
                    continue
                if trace_name == "guide":
                    if kind == "observed":
                        raise ValueError(f"guide site '{name}' is observed; a guide may only sample latents")
                    if name not in model_tr.nodes:
                        raise ValueError(f"guide site '{name}' does not appear in the model; the weight "
                                         f"p(x, z)/q(z|x) needs every guide latent to be a model latent")
                data = [f for f in site["cond_indep_stack"] if f.name == data_plate]
                if not data:
                    raise ValueError(
                        f"{kind} site '{name}' of the {trace_name} is outside pyro.plate('{data_plate}'): "
                        f"with sites shared by all data points a per-point log p(x) is undefined; put it "
                        f"inside the data plate (or pass data_plate='<name>' if yours is named differently)")
                if data[0].dim is None:
                    raise ValueError(f"pyro.plate('{data_plate}') is used as an iterator; use it as a "
                                     f"vectorized context, `with pyro.plate('{data_plate}', N):`")
                frames += [f for f in site["cond_indep_stack"] if f.vectorized]
                frames += data
        data_frames = {(f.dim, f.size, f.full_size) for f in frames if f.name == data_plate}
        if not data_frames:
            raise ValueError(f"no sample site inside pyro.plate('{data_plate}'); pass data_plate='<name>' "
                             f"if your data plate has another name")
        if len(data_frames) > 1:
            raise ValueError(f"pyro.plate('{data_plate}') has different dims/sizes in model and guide: "
                             f"{sorted(data_frames)}; use the same plate in both")
        dim, size, full_size = data_frames.pop()
        n0 = x0.shape[0]
        if size == n0:
            subsample_size = None  # plain, or a minibatch of a larger set: rows of x map to the plate
        elif size < n0 and full_size == n0:
            subsample_size = size  # the plate draws `size` of the rows of x: we choose which
        else:
            raise ValueError(f"pyro.plate('{data_plate}') has size {size} but x has {n0} rows; the first "
                             f"dimension of x must index the data points of the plate")
        return cls(data_plate, dim, max(-f.dim for f in frames), subsample_size)

    def validate(self, model, guide, x, max_batch, args, kwargs) -> None:
        """One particle for every row of x under Pyro's validation: the checks of x's support and of
        the distributions' parameters that the K-particle passes then skip."""
        N, B = x.shape[0], self.subsample_size
        pieces = ([(s, x[s:s + max_batch], None) for s in range(0, N, max_batch)] if B is None else
                  [(s, x, torch.arange(s, s + B, device=x.device) % N) for s in range(0, N, B)])
        with torch.random.fork_rng(devices=[]):
            for start, x_in, indices in pieces:
                try:
                    self.log_weights(model, guide, x_in, indices, 1, False, args, kwargs)
                except ValueError as e:
                    stop = min(start + (B or max_batch), N) - 1
                    raise ValueError(f"the model rejects rows {start}-{stop} of x ({_one_line(e)}); check "
                                     f"that x lies in the support of the likelihood") from e

    def chunks(self, x, K, max_batch, particle_chunk, data_chunk, vectorize) -> _Chunks:
        N = x.shape[0]
        if not vectorize:
            particle_chunk = 1
        if self.subsample_size is not None:
            data_chunk = self.subsample_size  # fixed by the model's plate
        particle_chunk = particle_chunk or min(K, max(1, max_batch // (data_chunk or 1)))
        data_chunk = min(N, data_chunk or max(1, max_batch // particle_chunk))
        particles = [(s, min(s + particle_chunk, K)) for s in range(0, K, particle_chunk)]
        data = []
        for s in range(0, N, data_chunk):
            rows = slice(s, min(s + data_chunk, N))
            if self.subsample_size is None:
                data.append((rows, x[rows], None))
            else:  # pass all of x; force the plate's indices, wrapping around to fill the last chunk
                data.append((rows, x, torch.arange(s, s + data_chunk, device=x.device) % N))
        return _Chunks(data, particles)

    def log_weights(self, model, guide, x, indices, num_particles, vectorize, args, kwargs) -> torch.Tensor:
        """log w, shape (num_particles, n) in float64: Σ log p over model sites − Σ log q over guide sites."""
        with _ForceSubsample(self.data_plate_name, indices):
            if vectorize:
                particles = pyro.plate(_PARTICLES, num_particles, dim=-(self.max_plate_nesting + 1))
                guide_tr, model_tr = _traces(_within(particles, model), _within(particles, guide), x, args, kwargs)
            else:
                guide_tr, model_tr = _traces(model, guide, x, args, kwargs)
        n = len(indices) if indices is not None else x.shape[0]
        log_w = torch.zeros(num_particles, n, dtype=torch.float64, device=x.device)
        for sign, tr in ((1.0, model_tr), (-1.0, guide_tr)):
            for name, site in tr.nodes.items():
                kind = _site_kind(site)
                if kind is None or (tr is model_tr and kind == "latent" and name not in guide_tr.nodes):
                    continue  # a model-only latent is drawn from p(z_j | ...), which cancels in w
                log_w += sign * self._per_point(name, site, num_particles, n)
        if torch.isnan(log_w).any():
            raise ValueError("a log weight is NaN: the model or guide produced NaN densities; check the "
                             "parameters and that x lies in the support of the likelihood")
        return log_w

    def _per_point(self, name, site, num_particles, n) -> torch.Tensor:
        """The site's unscaled, masked log-density summed over all dims but particle and data: (P, n)."""
        log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])  # unscaled
        mask = site["mask"]
        if mask is False:
            log_p = torch.zeros_like(log_p)
        elif isinstance(mask, torch.Tensor):
            log_p = torch.where(mask, log_p, log_p.new_zeros(()))
        batch_dims = self.max_plate_nesting + 1
        if log_p.dim() > batch_dims:
            raise ValueError(f"site '{name}' has log_prob shape {tuple(log_p.shape)}, more batch dims than "
                             f"plates; declare the extra dims with .to_event(...) or a pyro.plate")
        log_p = log_p.double().reshape((1,) * (batch_dims - log_p.dim()) + log_p.shape)
        data_axis = batch_dims + self.data_dim
        other = [a for a in range(1, batch_dims) if a != data_axis]
        log_p = log_p.sum(other, keepdim=True) if other else log_p
        return log_p.reshape(log_p.shape[0], log_p.shape[data_axis]).expand(num_particles, n)


def _one_line(error: Exception) -> str:
    return f"{type(error).__name__}: " + (str(error).strip().splitlines() or [""])[0]


def _within(plate, fn):
    def wrapped(*args, **kwargs):
        with plate:
            return fn(*args, **kwargs)
    return wrapped


def _traces(model, guide, x, args, kwargs):
    guide_tr = poutine.trace(guide).get_trace(x, *args, **kwargs)
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x, *args, **kwargs)
    return guide_tr, model_tr


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
        self.tail = _tail_size(K) + 1 if K >= 50 else 0
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


_CONSTANT = 1e-6  # log-weight spread below which the largest weights count as equal


def _tail_size(K: int) -> int:
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
    M = _tail_size(K)
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
