"""Training objectives. Each registered class builds an :class:`Objective` with
``differentiable_loss(model, guide, *args, **kwargs)``, the negative objective as a differentiable
tensor (what Pyro's ELBO classes provide), so the trainer treats them alike; ``loss_and_grads``
makes them usable with ``pyro.infer.SVI`` too.

All take a KL weight ``beta`` and a linear warm-up: the trainer calls ``on_epoch(epoch)`` before
each epoch, and the weight is ``beta * min(1, epoch / warmup_epochs)`` (``beta`` throughout when
``warmup_epochs=0``). The weight multiplies the *latent* sites of model and guide (log p(z) and
log q(z|x)), so ELBO_beta = E_q[log p(x|z)] - beta KL(q(z|x) || p(z)).

Plates are found by a dry run of each new (model, guide) pair (:func:`pyro_vae.traces.dry_run`),
so every objective works on every model :func:`pyro_vae.estimate_log_px` accepts, whatever the
data plate's dim; an objective reused on another pair learns that pair's plates anew.
"""

from __future__ import annotations

import math

import pyro.infer
import torch
from pyro.poutine.messenger import Messenger

from . import traces
from .checks import positive_int
from .registry import Registry

OBJECTIVES = Registry("objective")


class _ScaleLatents(Messenger):
    """Multiplies the scale of every latent (unobserved) sample site by ``weight``."""

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def _process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = self.weight * msg["scale"]


class Objective:
    """Base class: KL weight, warm-up schedule, the trainer's selection score and the SVI adapter.

    Subclasses define ``_prepare(model, guide, args, kwargs)``, what they learn once per (model,
    guide) pair, and ``_loss(model, guide, prepared, *args, **kwargs)``.
    """

    #: what :meth:`selection_score` measures; the trainer logs it as ``val_<selection_name>``.
    selection_name = "elbo"

    def __init__(self, beta: float = 1.0, warmup_epochs: int = 0):
        if not beta >= 0:
            raise ValueError(f"objective.beta must be >= 0, got {beta!r}")
        self.beta, self.warmup_epochs = float(beta), positive_int(warmup_epochs, "objective.warmup_epochs", 0)
        self.kl_weight = self.beta if self.warmup_epochs == 0 else 0.0
        self._prepared = {}  # (model, guide) -> what _prepare learned

    def on_epoch(self, epoch: int) -> None:
        """Linear KL warm-up: the weight is beta * min(1, epoch / warmup_epochs) during ``epoch``."""
        self.kl_weight = self.beta * (min(1.0, epoch / self.warmup_epochs) if self.warmup_epochs else 1.0)

    @torch.no_grad()
    def selection_score(self, vae, x: torch.Tensor, batch_size: int = 1000) -> float:
        """The mean per-point score over the rows of x that the trainer selects epochs on (beta = 1,
        whatever the warm-up): the ELBO, E_q[log p(x|z)] - KL(q(z|x) || p(z))."""
        log_lik, kl = map(torch.cat, zip(*(vae.elbo_terms(b) for b in x.split(batch_size))))
        return (log_lik - kl).mean().item()

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The negative objective (with the current KL weight) as a differentiable scalar."""
        prepared = self._prepared_for(model, guide, args, kwargs)
        return self._loss(*self._weighted(model, guide), prepared, *args, **kwargs)

    def _prepared_for(self, model, guide, args, kwargs):
        key = (model, guide)  # bound methods compare equal for the same object: vae.model == vae.model
        if key not in self._prepared:
            if len(self._prepared) >= 8:  # a bounded cache: drop the oldest pair
                self._prepared.pop(next(iter(self._prepared)))
            self._prepared[key] = self._prepare(model, guide, args, kwargs)
        return self._prepared[key]

    def _weighted(self, model, guide):
        if self.kl_weight == 1.0:
            return model, guide
        weight = self.kl_weight

        def wrap(fn):
            def weighted(*args, **kwargs):
                with _ScaleLatents(weight):
                    return fn(*args, **kwargs)
            return weighted
        return wrap(model), wrap(guide)

    def __call__(self, model, guide, *args, **kwargs) -> torch.Tensor:
        return self.differentiable_loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """For ``pyro.infer.SVI``: backpropagate the loss into the parameters, return its value."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def _prepare(self, model, guide, args, kwargs):
        return None

    def _loss(self, model, guide, prepared, *args, **kwargs):  # pragma: no cover - interface
        raise NotImplementedError


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
            missing = traces.without_analytic_kl(guide_tr, model_tr)
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
    stl and dreg need one latent site per data point in the guide (as the library's guides have).

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
        for name, site in latents.items():
            path = log_q[name] - log_q_score[name]  # value 0; gradient: only through z's reparameterization
            if self.estimator == "dreg":
                r = traces.site_scale(site, layout, K) / scale  # relative scale of this latent
                weight = (1 - r) + r * w
                z_model = model_tr.nodes[name]["value"]
                if z_model.requires_grad:
                    z_model.register_hook(_times(_to_site(weight, site, layout)))
                path = weight * path
            surrogate = surrogate - (w * path).sum()
        return bound, scale, surrogate

    def _check_latents(self, guide_tr) -> None:
        latents = {name: site for name, site in guide_tr.nodes.items() if traces.site_kind(site) == "latent"}
        for name, site in latents.items():
            if not site["fn"].has_rsample:
                raise ValueError(f"objective iwae needs reparameterized guide sites, but {name!r} "
                                 f"({type(site['fn']).__name__}) has no rsample; use objective=elbo")
        if self.estimator != "standard" and len(latents) > 1:
            raise ValueError(f"estimator={self.estimator} needs a guide with one latent site per data point, this "
                             f"one has {sorted(latents)}; use objective.estimator=standard")


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


def _to_site(t: torch.Tensor, site, layout) -> torch.Tensor:
    """(K, n) -> a shape that broadcasts against the site's value (batch + event dims)."""
    shape = [1] * (layout.max_plate_nesting + 1)
    shape[0], shape[layout.max_plate_nesting + 1 + layout.data_dim] = t.shape
    return t.reshape(shape + [1] * len(site["fn"].event_shape))


def _times(factor):
    return lambda grad: grad * factor


class PyroObjective(Objective):
    """Any Pyro ELBO (or object with ``differentiable_loss(model, guide, *args, **kwargs)``) as an
    :class:`Objective`: no KL weight of its own, the ELBO as selection score."""

    def __init__(self, elbo):
        super().__init__()
        self.elbo = elbo

    def _loss(self, model, guide, prepared, *args, **kwargs):
        return self.elbo.differentiable_loss(model, guide, *args, **kwargs)


def as_objective(loss) -> Objective:
    """``loss`` itself if it is an :class:`Objective`, else ``loss`` wrapped in :class:`PyroObjective`."""
    return loss if isinstance(loss, Objective) else PyroObjective(loss)
