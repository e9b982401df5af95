"""The inference gap of a trained model (Cremer et al., 2018): how far its amortized guide's ELBO is
below log p(x), and why.

For a data point x, the encoder's guide q_φ(z|x) = q(z; λ_φ(x)) of a family {q(z; λ)}, and q* =
q(z; λ*_x), the family member with parameters of x's own that maximize ELBO(x; λ),

    log p(x) − ELBO(q_φ) = KL(q_φ || p(z|x))
                         = [log p(x) − ELBO(q*)]          approximation gap: the family's best is not p(z|x)
                         + [ELBO(q*) − ELBO(q_φ)]         amortization gap: the encoder misses the family's best

λ*_x starts at the encoder's output λ_φ(x) and is trained by Adam on ELBO(x; λ) alone, with the
sticking-the-landing gradient (Roeder et al., 2017: the score term ∂_λ log q(z; λ)|_z left out,
zero in expectation; at λ = the posterior the gradient then has no variance). log p(x) is AIS
(:mod:`pyro_vae.ais`). With ``flexible=True`` a full-covariance Gaussian per point, started at q*'s
mean and covariance, is trained the same way: its approximation gap, below the family's, tells
how much of the family's gap a richer family recovers. Each ELBO is a Monte Carlo mean over
``num_elbo_samples`` draws, with its standard error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F

from . import traces
from .checks import positive_int
from .guides import MIN_SCALE
from .marginal import estimate_log_px
from .metrics import mean_se

__all__ = ["inference_gaps", "GapsResult", "FullCovariance"]


@dataclass
class GapsResult:
    """Per point, (N,) float64 each: ``log_px`` (AIS) and the ELBOs of the amortized guide, of the
    per-point optimum of its family and (``flexible=True``, else None) of a per-point full-covariance
    Gaussian, each ELBO with its Monte Carlo standard error (``*_se``); ``opt_steps``, the Adam steps taken."""

    log_px: torch.Tensor
    log_px_se: torch.Tensor
    elbo_amortized: torch.Tensor
    elbo_amortized_se: torch.Tensor
    elbo_optimized: torch.Tensor
    elbo_optimized_se: torch.Tensor
    elbo_flexible: torch.Tensor | None
    elbo_flexible_se: torch.Tensor | None
    opt_steps: list

    @property
    def approximation(self) -> torch.Tensor:
        return self.log_px - self.elbo_optimized

    @property
    def amortization(self) -> torch.Tensor:
        return self.elbo_optimized - self.elbo_amortized

    @property
    def total(self) -> torch.Tensor:
        """KL(q_φ || p(z|x)) = log p(x) − ELBO(q_φ), the sum of the two gaps."""
        return self.log_px - self.elbo_amortized

    def summary(self) -> dict:
        """{name: {"mean", "se"}}: means over the points and their standard errors over points."""
        rows = {"log_px": self.log_px, "elbo_amortized": self.elbo_amortized, "elbo_optimized": self.elbo_optimized,
                "approximation_gap": self.approximation, "amortization_gap": self.amortization,
                "inference_gap": self.total}
        if self.elbo_flexible is not None:
            rows.update(elbo_flexible=self.elbo_flexible, approximation_gap_flexible=self.log_px - self.elbo_flexible)
        return {"num_points": len(self.log_px), **{k: mean_se(v) for k, v in rows.items()},
                "opt_steps_max": max(self.opt_steps)}


class FullCovariance:
    """The full-covariance Gaussian N(μ, L Lᵀ) from raw parameters [μ, ρ, a] (d + d + d(d−1)/2 per
    point): L_ii = softplus(ρ_i) + MIN_SCALE, the strictly lower entries of L are a."""

    def __init__(self, latent_dim: int):
        self.latent_dim = latent_dim
        self.lower = torch.tril_indices(latent_dim, latent_dim, offset=-1)

    def distribution(self, params):
        d = self.latent_dim
        tril = torch.diag_embed(F.softplus(params[..., d:2 * d]) + MIN_SCALE)
        tril[..., self.lower[0], self.lower[1]] = params[..., 2 * d:]
        return dist.MultivariateNormal(params[..., :d], scale_tril=tril)

    def params_of(self, q, num_samples: int = 4096) -> torch.Tensor:
        """Raw parameters of the Gaussian with q's mean and covariance (Monte Carlo if q has none)."""
        try:
            loc = q.mean
            cov = q.covariance_matrix if hasattr(q, "covariance_matrix") else torch.diag_embed(q.variance)
        except NotImplementedError:
            z = q.sample((num_samples,))
            loc, centered = z.mean(0), z - z.mean(0)
            cov = torch.einsum("sni,snj->nij", centered, centered) / (num_samples - 1)
            cov = cov + 1e-6 * torch.eye(self.latent_dim, dtype=cov.dtype)
        tril = torch.linalg.cholesky(cov)
        diag = (tril.diagonal(dim1=-2, dim2=-1) - MIN_SCALE).clamp(min=1e-6)
        raw_diag = diag + torch.log(-torch.expm1(-diag))  # softplus⁻¹
        return torch.cat([loc, raw_diag, tril[..., self.lower[0], self.lower[1]]], -1).detach()


def inference_gaps(model, encoder, x: torch.Tensor, *, num_chains: int = 16, num_steps: int = 500,
                   num_elbo_samples: int = 1000, opt_steps: int = 3000, opt_particles: int = 16, lr: float = 1e-2,
                   tol: float = 1e-3, flexible: bool = False, stl: bool = True, site: str = "z",
                   data_plate: str = "data",
                   points_per_pass: int = 100, seed: int | None = 0, progress: bool = True,
                   log_px: tuple | None = None, **ais_options) -> GapsResult:
    """The approximation and amortization gaps of ``encoder`` for ``model`` at every row of ``x``.

    :param model: Pyro model ``model(x)`` with the latent ``site`` (batch (n,), event (d,)) inside
        ``pyro.plate(data_plate)``, e.g. ``vae.model``.
    :param encoder: the amortized guide's family: ``encoder.net(x)`` gives the raw parameters of
        each point and ``encoder.distribution(params)`` the distribution (a :class:`pyro_vae.guides.Guide`).
    :param num_chains, num_steps: M and T of the AIS estimate of log p(x); other AIS options as keywords.
    :param num_elbo_samples: draws per point for each final ELBO.
    :param opt_steps: at most this many Adam steps per pass of points. Each time the mean ELBO of
        the last 100 steps rose by less than ``tol`` nats per point over the 100 before, the step
        size falls tenfold; the third such plateau ends the pass.
    :param opt_particles: draws per point and step of the training ELBO; ``lr``: Adam's step size.
    :param flexible: also the per-point full-covariance Gaussian.
    :param stl: the sticking-the-landing gradient; False: the full reparameterized gradient. STL
        scores z at detached parameters, which a flow (the IAF guide) can only do by inverting
        itself, one pass per latent dimension: use False there.
    :param points_per_pass: points optimized together (independently: each has its own parameters).
    :param seed: if given, run under ``torch.manual_seed(seed)`` and restore the global RNG afterwards.
    :param log_px: (log p(x) per point, its standard error) estimated already, e.g. by an earlier
        AIS run with these settings: used instead of running AIS.
    """
    for key, value in (("num_elbo_samples", num_elbo_samples), ("opt_steps", opt_steps),
                       ("opt_particles", opt_particles), ("points_per_pass", points_per_pass)):
        positive_int(value, key)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    with traces.preserve_rng():
        if seed is not None:
            torch.manual_seed(seed)

        dim = _data_dim(model, x[:points_per_pass], site, data_plate)

        def amortized(x):
            with pyro.plate(data_plate, len(x), dim=dim):
                pyro.sample(site, encoder(x))
        layout = traces.inspect(model, amortized, (x[:points_per_pass],), {}, data_plate, option="data_plate")
        if log_px is None:
            with torch.no_grad():
                ais = estimate_log_px(model, amortized, x, num_chains, method="ais", num_steps=num_steps,
                                      data_plate=data_plate, progress=progress, warn=False, **ais_options)
            log_px = (ais.log_px, ais.stderr)
        out = {k: [] for k in ("amortized", "optimized", "flexible")}
        steps = []
        for start in range(0, len(x), points_per_pass):
            xs = x[start:start + points_per_pass]
            gap = _Pass(model, xs, layout, site, data_plate, num_elbo_samples)
            with torch.no_grad():
                init = encoder.net(xs).detach()
            out["amortized"].append(gap.elbo(encoder.distribution, init))
            best, n_steps = gap.optimize(encoder.distribution, init, opt_steps, opt_particles, lr, tol, stl)
            out["optimized"].append(gap.elbo(encoder.distribution, best))
            steps.append(n_steps)
            if flexible:
                with torch.no_grad():
                    q_best = encoder.distribution(best)
                    full = FullCovariance(q_best.event_shape[-1])
                    init_full = full.params_of(q_best)
                best_full, n_steps = gap.optimize(full.distribution, init_full, opt_steps, opt_particles, lr, tol, stl)
                out["flexible"].append(gap.elbo(full.distribution, best_full))
                steps.append(n_steps)
    cat = {k: tuple(torch.cat(t) for t in zip(*v)) if v else (None, None) for k, v in out.items()}
    return GapsResult(*log_px, *cat["amortized"], *cat["optimized"], *cat["flexible"], steps)


def _data_dim(model, x, site, data_plate) -> int:
    """The dim of the model's data plate at ``site``, from one dry run; a one-line error if it lacks them."""
    _, model_tr = traces.dry_run(model, traces.empty_guide, (x,), {})
    if traces.site_kind(model_tr.nodes.get(site, {"type": None})) != "latent":
        raise ValueError(f"site={site!r} is not a latent of the model; pass the name of its latent site")
    dims = [f.dim for f in model_tr.nodes[site]["cond_indep_stack"] if f.name == data_plate and f.vectorized]
    if not dims:
        raise ValueError(f"the model's site {site!r} is outside pyro.plate({data_plate!r}); pass data_plate='<name>'")
    return dims[0]


class _Pass:
    """The per-point ELBO of one pass of points x under a distribution built from parameters (n, P)."""

    def __init__(self, model, x, layout, site, data_plate, num_elbo_samples):
        self.model, self.x, self.layout, self.site, self.plate = model, x, layout, site, data_plate
        self.num_elbo_samples = num_elbo_samples

    def log_weights(self, distribution, params, num_particles, stl):
        """log p(x, z) − log q(z) (S, n), z ~ q reparameterized; ``stl``: log q at detached parameters
        (else by q itself, which scores its own draw without inverting a flow)."""
        q = distribution(params)
        z = q.rsample((num_particles,))
        score = distribution(params.detach()) if stl else q

        def guide(x):
            with pyro.plate(self.plate, len(x), dim=self.layout.data_dim):
                pyro.sample(self.site, score)
        guide_tr, model_tr = traces.trace_pair(self.model, guide, (self.x,), {}, self.layout, num_particles,
                                               values={self.site: z})
        log_p, log_q = traces.log_densities(guide_tr, model_tr, self.layout, num_particles, dtype=z.dtype)
        return log_p - log_q

    def optimize(self, distribution, init, max_steps, num_particles, lr, tol, stl, window: int = 100,
                 decays: int = 2):
        """λ* by Adam on −Σ_n ELBO(x_n; λ_n), from ``init``: (λ*, steps taken). On a plateau (the
        mean ELBO of the last ``window`` steps above the previous window's by less than ``tol`` per
        point) the step size falls tenfold; the ``decays + 1``-th plateau ends it. (At a fixed step
        size Adam's noise keeps hundreds of parameters a point away from the optimum.)"""
        params = init.clone().requires_grad_()
        optim = torch.optim.Adam([params], lr=lr)
        history, n, plateaus = [], len(self.x), 0
        with pyro.validation_enabled(False):
            for step in range(1, max_steps + 1):
                loss = -self.log_weights(distribution, params, num_particles, stl).mean(0).sum()
                optim.zero_grad()
                loss.backward()
                optim.step()
                history.append(-loss.item() / n)
                if step % window == 0 and len(history) >= 2 * window:
                    if sum(history[-window:]) / window - sum(history[-2 * window:-window]) / window < tol:
                        plateaus += 1
                        if plateaus > decays:
                            break
                        for group in optim.param_groups:
                            group["lr"] /= 10
                        history = []  # the next comparison is between windows at the new step size
        return params.detach(), step

    @torch.no_grad()
    @pyro.validation_enabled(False)
    def elbo(self, distribution, params):
        """(ELBO per point, its Monte Carlo standard error), each (n,) float64."""
        chunk = max(1, 8192 // len(self.x))
        log_w = torch.cat([self.log_weights(distribution, params, min(chunk, self.num_elbo_samples - s), stl=False)
                           for s in range(0, self.num_elbo_samples, chunk)]).double()
        S = log_w.shape[0]
        return log_w.mean(0), (log_w.std(0) / math.sqrt(S) if S > 1 else torch.full_like(log_w[0], math.nan))
