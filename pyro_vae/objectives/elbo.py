"""The ELBO: its per-point terms (:func:`elbo_terms`), and the objectives that train it, Monte Carlo
(Pyro's Trace_ELBO, or TraceEnum_ELBO for enumerated latents) and mean-field (the KL term
analytic where torch has it, Pyro's TraceMeanField_ELBO)."""

from __future__ import annotations

import pyro.infer
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import kl_divergence

from .. import traces
from ..checks import positive_int
from .base import OBJECTIVES, Objective


def _enumerates(guide_tr, model_tr) -> bool:
    return any(site["infer"].get("enumerate") for tr in (guide_tr, model_tr) for site in tr.nodes.values()
               if traces.site_kind(site) == "latent")


@OBJECTIVES.register("elbo")
class TraceELBO(Objective):
    """ELBO = E_q[log p(x|z)] - beta KL(q || p), both terms Monte Carlo: the mean over
    ``num_particles`` reparameterized z ~ q(z|x) of log p(x, z) - log q(z|x) (Pyro's Trace_ELBO,
    particles vectorized). Latents marked for enumeration (``config_enumerate``, e.g. the GMVAE's
    cluster) are summed out exactly instead (Pyro's TraceEnum_ELBO)."""

    def __init__(self, num_particles: int = 1, beta: float = 1.0, warmup_epochs: int = 0):
        super().__init__(beta, warmup_epochs)
        self.num_particles = positive_int(num_particles, "objective.num_particles")

    def _prepare(self, model, guide, args, kwargs):
        guide_tr, model_tr = traces.dry_run(model, guide, args, kwargs)
        nesting = traces.plate_nesting_of(guide_tr, model_tr)
        elbo = pyro.infer.TraceEnum_ELBO if _enumerates(guide_tr, model_tr) else pyro.infer.Trace_ELBO
        return elbo(num_particles=self.num_particles, vectorize_particles=self.num_particles > 1,
                    max_plate_nesting=nesting)

    def _loss(self, model, guide, elbo, *args, **kwargs):
        return elbo.differentiable_loss(model, guide, *args, **kwargs)


@OBJECTIVES.register("mean_field")
class MeanFieldELBO(Objective):
    """The same ELBO with the KL term analytic: E_q[log p(x|z)] - beta KL(q(z|x) || p(z)), where
    KL(q || p) is torch's closed form for the pair (diagonal or full Gaussian guide with the
    standard-normal prior) and the expectation is Monte Carlo (Pyro's TraceMeanField_ELBO). Lower
    variance than ``elbo``, same expectation.

    Where no closed form is registered (mixture and VampPrior priors, flows), ``fallback="mc"``
    (the default) uses the Monte Carlo term log q(z|x) - log p(z) for that site, as Pyro does;
    ``fallback="error"`` raises instead, so a run never silently loses the analytic KL."""

    FALLBACKS = ("mc", "error")

    def __init__(self, num_particles: int = 1, fallback: str = "mc", beta: float = 1.0, warmup_epochs: int = 0):
        super().__init__(beta, warmup_epochs)
        if fallback not in self.FALLBACKS:
            raise ValueError(f"objective.fallback must be one of {', '.join(self.FALLBACKS)}, got {fallback!r}")
        self.num_particles, self.fallback = positive_int(num_particles, "objective.num_particles"), fallback

    def _prepare(self, model, guide, args, kwargs):
        guide_tr, model_tr = traces.dry_run(model, guide, args, kwargs)
        if _enumerates(guide_tr, model_tr):
            raise ValueError("objective mean_field cannot sum out latents marked for enumeration; use objective=elbo")
        if self.fallback == "error":
            missing = without_analytic_kl(guide_tr, model_tr)
            if missing:
                name, q, p = missing[0]
                raise ValueError(f"objective mean_field: no closed-form KL({type(q).__name__} || {type(p).__name__}) "
                                 f"at site {name!r}; use objective.fallback=mc (Monte Carlo for that site) or "
                                 f"objective=elbo")
        nesting = traces.plate_nesting_of(guide_tr, model_tr)
        return pyro.infer.TraceMeanField_ELBO(num_particles=self.num_particles,
                                              vectorize_particles=self.num_particles > 1, max_plate_nesting=nesting)

    def _loss(self, model, guide, elbo, *args, **kwargs):
        return elbo.differentiable_loss(model, guide, *args, **kwargs)


def _analytic_kl(q, p):
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return None


def without_analytic_kl(guide_tr, model_tr) -> list:
    """[(name, q, p)] for the guide's latent sites whose KL(q || p) torch has no closed form for."""
    return [(name, site["fn"], model_tr.nodes[name]["fn"]) for name, site in guide_tr.nodes.items()
            if traces.site_kind(site) == "latent" and _analytic_kl(site["fn"], model_tr.nodes[name]["fn"]) is None]


def elbo_terms(model, guide, *args, data_plate: str = "data", analytic_kl: bool = True, **kwargs):
    """Per-point ELBO(x_n) = E_q[log p(x_n | z)] − KL(q(z | x_n) || p(z)), each term estimated with
    one z ~ q(z | x): returns (log_lik, kl), shape (n,) each.

    log_lik sums the model's observed sites at that z; kl sums, over the guide's latent sites,
    torch's closed-form KL(q || p) where one is registered for the pair, else the one-draw Monte
    Carlo term log q(z|x) − log p(z). Model-only latents, drawn from the model, belong to log_lik's
    expectation. Unscaled: a minibatch's subsampling scale does not enter. ``analytic_kl=False``
    takes the Monte Carlo term at every site (for guides whose later sites depend on earlier
    draws, where the closed form at the drawn parents is biased).
    """
    guide_tr, model_tr = traces.trace_pair(model, guide, args, kwargs)
    lay = traces.layout(prune_subsample_sites(guide_tr), prune_subsample_sites(model_tr), data_plate)
    log_lik = kl = 0.0
    for name, site in model_tr.nodes.items():
        kind = traces.site_kind(site)
        if kind == "observed":
            log_lik = log_lik + traces.per_point(traces.site_log_prob(site), site, lay)
        elif kind == "latent" and name in guide_tr.nodes:
            q = guide_tr.nodes[name]
            term = _analytic_kl(q["fn"], site["fn"]) if analytic_kl else None
            if term is None:
                term = traces.site_log_prob(q) - traces.site_log_prob(site)
            kl = kl + traces.per_point(scale_and_mask(term, 1.0, site["mask"]), site, lay)
    if not torch.is_tensor(log_lik):
        raise ValueError("the model has no observed site; the ELBO's likelihood term needs observations")
    return log_lik[0], (kl if torch.is_tensor(kl) else torch.zeros_like(log_lik))[0]
