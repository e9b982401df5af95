"""The importance-weighted bound (IWAE) and its standard, STL and DReG gradient estimators."""

from __future__ import annotations

import math

import torch

from .. import traces
from ..checks import positive_int
from .base import OBJECTIVES, Objective


@OBJECTIVES.register("iwae")
class IWAE(Objective):
    """The importance-weighted bound (Burda et al., 2015) with K = ``num_particles`` samples:

        L_K(x_n) = log (1/K) sum_k w_nk,   w_nk = p(x_n, z_nk) / q(z_nk | x_n),   z_nk ~ q(z | x_n)
        loss     = - sum_n c_n L_K(x_n)

    c_n is the scale of the observed sites (plate subsampling num_data / batch, ``poutine.scale``):
    it multiplies the per-point bound *outside* the log-sum-exp, so a minibatch estimates the
    full-data bound (Pyro's RenyiELBO scales log w inside, which estimates something else). A
    latent site whose scale differs, s_n = r_n c_n (the KL weight beta, or a likelihood weight),
    enters the weight as (p(z) / q(z|x))^r_n; K = 1 is then exactly the (beta-)ELBO.

    Gradient ``estimator`` (w~_k = w_k / sum_j w_j, all K samples reparameterized):
      - ``standard``: sum_k w~_k d log w_k, the gradient of L_K.
      - ``stl``: sticking the landing (Roeder et al., 2017): drops the score term d_phi log q|_z.
        Unbiased for K = 1; for K > 1 it is biased (Tucker et al., 2018, sec. 3).
      - ``dreg``: doubly reparameterized (Tucker et al., 2018): the score term is replaced by its
        reparameterized equivalent, so the guide's gradient is sum_k w~_k^2 (d log w_k / dz_k) dz_k/dphi
        (weights (1 - r) w~ + r w~^2 when latents carry a relative scale r); the model's is standard.
        Unbiased, with a variance that does not grow with K.
    With several latent sites (q(z1|x) q(z2|z1)), d log w / dz with phi held fixed also counts
    how each z enters the conditionals of the sites after it, log q(z2 | z1; phi) through z1
    (:func:`_parent_path_term`).

    :param data_plate: name of the plate over data points; every latent and observed site is in it.
    """

    ESTIMATORS = ("standard", "stl", "dreg")

    def __init__(self, num_particles: int = 5, estimator: str = "standard", beta: float = 1.0,
                 warmup_epochs: int = 0, data_plate: str = "data"):
        super().__init__(beta, warmup_epochs)
        if estimator not in self.ESTIMATORS:
            raise ValueError(f"objective.estimator must be one of {', '.join(self.ESTIMATORS)}, got {estimator!r}")
        self.num_particles = positive_int(num_particles, "objective.num_particles")
        self.estimator, self.data_plate = estimator, data_plate

    @property
    def selection_name(self) -> str:
        return f"iwae{self.num_particles}"

    @torch.no_grad()
    def selection_score(self, vae, x: torch.Tensor, batch_size: int = 1000) -> float:
        """Mean over the rows of x of L_K(x_n) (beta = 1): what the trainer selects epochs on, since
        an IWAE-trained guide can lower the ELBO while it raises L_K."""
        layout = self._prepared_for(vae.model, vae.guide, (x[:batch_size],), {})
        bounds = [self._compute(vae.model, vae.guide, layout, (b,), {})[0] for b in x.split(batch_size)]
        return torch.cat(bounds).mean().item()

    def per_point(self, model, guide, *args, **kwargs):
        """(bound_n, c_n): the per-point bound L_K(x_n) (at the current KL weight) and its scale c_n,
        shape (n,) each."""
        layout = self._prepared_for(model, guide, args, kwargs)
        bound, scale, _ = self._compute(*self._weighted(model, guide), layout, args, kwargs)
        return bound, scale

    def _prepare(self, model, guide, args, kwargs) -> traces.Layout:
        guide_tr, model_tr = traces.dry_run(model, guide, args, kwargs)
        layout = traces.layout(guide_tr, model_tr, self.data_plate, option="objective.data_plate")
        self._check_latents(guide_tr)
        return layout

    def _loss(self, model, guide, layout, *args, **kwargs):
        bound, scale, surrogate = self._compute(model, guide, layout, args, kwargs)
        value = (scale * bound).sum()
        return -(value.detach() + surrogate - surrogate.detach())

    def _compute(self, model, guide, layout, args, kwargs):
        K = self.num_particles
        guide_tr, model_tr = traces.trace_pair(model, guide, args, kwargs, layout, K,
                                               clone_latents=self.estimator == "dreg")
        latents = {name: site for name, site in guide_tr.nodes.items() if traces.site_kind(site) == "latent"}
        log_q, log_q_score = {}, {}
        for name, site in latents.items():
            log_q[name] = traces.per_point(traces.site_log_prob(site, scaled=True), site, layout, K)
            if self.estimator != "standard":  # d/dphi log q(z; phi) at fixed z: the score term
                log_q_score[name] = traces.per_point(traces.site_log_prob(site, site["value"].detach(), scaled=True),
                                                     site, layout, K)
        log_p, scale = _model_terms(model_tr, latents, layout, K)
        log_w = (log_p - sum(log_q.values())) / scale  # (K, n), scale c_n taken out
        bound = log_w.logsumexp(0) - math.log(K)
        if self.estimator == "standard":
            return bound, scale, (scale * bound).sum()
        w = log_w.detach().softmax(0)
        surrogate = (w * log_p).sum()
        coefficients = {}
        for name, site in latents.items():
            path = log_q[name] - log_q_score[name]  # value 0; gradient: only through z's reparameterization
            coefficients[name] = w
            if self.estimator == "dreg":
                r = traces.site_scale(site, layout, K) / scale  # relative scale of this latent
                weight = (1 - r) + r * w
                z_model = model_tr.nodes[name]["value"]
                if z_model.requires_grad:
                    z_model.register_hook(_times(_to_site(weight, site, layout)))
                coefficients[name] = w * weight
            surrogate = surrogate - (coefficients[name] * path).sum()
        if len(latents) > 1 and torch.is_grad_enabled():
            surrogate = surrogate - _parent_path_term(latents, log_q_score, coefficients)
        return bound, scale, surrogate

    def _check_latents(self, guide_tr) -> None:
        latents = {name: site for name, site in guide_tr.nodes.items() if traces.site_kind(site) == "latent"}
        for name, site in latents.items():
            if not site["fn"].has_rsample:
                raise ValueError(f"objective iwae needs reparameterized guide sites, but {name!r} "
                                 f"({type(site['fn']).__name__}) has no rsample; use objective=elbo")


def _model_terms(model_tr, latents, layout, K):
    """Sum over model sites of the scaled per-point log-density, and the observed sites' scale c_n."""
    log_p, scale = 0.0, None
    for name, site in model_tr.nodes.items():
        kind = traces.site_kind(site)
        if kind is None:
            continue
        if kind == "latent" and name not in latents:
            raise ValueError(f"model latent {name!r} has no guide site; objective iwae needs the guide to "
                             f"sample every latent of the model")
        log_p = log_p + traces.per_point(traces.site_log_prob(site, scaled=True), site, layout, K)
        if kind == "observed":
            s = traces.site_scale(site, layout, K)[0]
            if scale is not None and not torch.allclose(s, scale):
                raise ValueError("observed sites have different scales; objective iwae needs one scale "
                                 "per data point for all observations")
            scale = s
    if scale is None:
        raise ValueError("the model has no observed site; objective iwae needs observations")
    return log_p, scale


def _parent_path_term(latents, log_q_score, coefficients) -> torch.Tensor:
    """The surrogate term whose phi-gradient is sum_j c_j (d log q_j / d z_i) dz_i/dphi over every
    guide site i that site j's conditional q_j(z_j | z_i, ...; phi) takes as an input: the part of
    the path derivative of log q(z; phi) at fixed phi that runs through the conditionals of later
    sites, not through z_j itself. ``log_q_score[j]`` = log q_j at z_j detached, whose gradient
    with respect to z_i is exactly that dependence; c_j are the per-(particle, point) weights of
    site j's path term (w~ for stl, w~ times its DReG weight for dreg)."""
    score = sum((coefficients[name] * log_q_score[name]).sum() for name in latents)
    values = [site["value"] for site in latents.values() if site["value"].requires_grad]
    if not values or not score.requires_grad:
        return score.new_zeros(())
    grads = torch.autograd.grad(score, values, retain_graph=True, allow_unused=True)
    return sum((g.detach() * v).sum() for g, v in zip(grads, values) if g is not None)


def _to_site(t: torch.Tensor, site, layout) -> torch.Tensor:
    """(K, n) -> a shape that broadcasts against the site's value (batch + event dims)."""
    shape = [1] * (layout.max_plate_nesting + 1)
    shape[0], shape[layout.max_plate_nesting + 1 + layout.data_dim] = t.shape
    return t.reshape(shape + [1] * len(site["fn"].event_shape))


def _times(factor):
    return lambda grad: grad * factor


