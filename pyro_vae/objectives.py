"""Training objectives. Each registered class builds an object with
``differentiable_loss(model, guide, *args, **kwargs)``, the negative objective as a differentiable
tensor (what Pyro's ELBO classes provide), so the trainer treats them alike; ``loss_and_grads``
makes them usable with ``pyro.infer.SVI`` too.

All take a KL weight ``beta`` and a linear warm-up: the trainer calls ``on_epoch(epoch)`` before
each epoch, and the weight is ``beta * min(1, epoch / warmup_epochs)`` (``beta`` throughout when
``warmup_epochs=0``). The weight multiplies the *latent* sites of model and guide (log p(z) and
log q(z|x)), so ELBO_beta = E_q[log p(x|z)] - beta KL(q(z|x) || p(z)).
"""

from __future__ import annotations

import math

import pyro
import pyro.infer
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample

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
    """Base class: KL weight, warm-up schedule, and the SVI adapter. Subclasses define ``_loss``."""

    def __init__(self, beta: float = 1.0, warmup_epochs: int = 0):
        if not beta >= 0:
            raise ValueError(f"objective.beta must be >= 0, got {beta!r}")
        if int(warmup_epochs) != warmup_epochs or warmup_epochs < 0:
            raise ValueError(f"objective.warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
        self.beta, self.warmup_epochs = float(beta), int(warmup_epochs)
        self.kl_weight = self.beta if self.warmup_epochs == 0 else 0.0

    #: what :meth:`selection_score` measures; the trainer logs it as ``val_<selection_name>``.
    selection_name = "elbo"

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
        return self._loss(*self._weighted(model, guide), *args, **kwargs)

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
        """``pyro.infer.SVI(model, guide, optim, loss=objective)`` calls this and backpropagates it."""
        return self.differentiable_loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """For ``pyro.infer.SVI``: backpropagate the loss into the parameters, return its value."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def _loss(self, model, guide, *args, **kwargs):  # pragma: no cover - interface
        raise NotImplementedError


@OBJECTIVES.register("elbo")
class TraceELBO(Objective):
    """ELBO = E_q[log p(x|z)] - beta KL(q || p), both terms Monte Carlo: the mean over
    ``num_particles`` reparameterized z ~ q(z|x) of log p(x, z) - log q(z|x) (Pyro's Trace_ELBO,
    particles vectorized)."""

    def __init__(self, num_particles: int = 1, beta: float = 1.0, warmup_epochs: int = 0):
        super().__init__(beta, warmup_epochs)
        self.num_particles = _check_particles(num_particles)
        self.elbo = pyro.infer.Trace_ELBO(num_particles=self.num_particles,
                                          vectorize_particles=self.num_particles > 1, max_plate_nesting=1)

    def _loss(self, model, guide, *args, **kwargs):
        return self.elbo.differentiable_loss(model, guide, *args, **kwargs)


trace_elbo = TraceELBO  # the name of the original factory


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
        self.num_particles, self.fallback = _check_particles(num_particles), fallback
        self.elbo = pyro.infer.TraceMeanField_ELBO(num_particles=self.num_particles,
                                                   vectorize_particles=self.num_particles > 1, max_plate_nesting=1)
        self._checked = False

    def _loss(self, model, guide, *args, **kwargs):
        if self.fallback == "error" and not self._checked:
            _require_analytic_kl(model, guide, args, kwargs)
            self._checked = True
        return self.elbo.differentiable_loss(model, guide, *args, **kwargs)


class PyroObjective(Objective):
    """Any Pyro ELBO (or object with ``differentiable_loss(model, guide, *args, **kwargs)``) as an
    :class:`Objective`: no KL weight of its own, the ELBO as selection score."""

    def __init__(self, elbo):
        super().__init__()
        self.elbo = elbo

    def _loss(self, model, guide, *args, **kwargs):
        return self.elbo.differentiable_loss(model, guide, *args, **kwargs)


def as_objective(loss) -> Objective:
    """``loss`` itself if it is an :class:`Objective`, else ``loss`` wrapped in :class:`PyroObjective`."""
    return loss if isinstance(loss, Objective) else PyroObjective(loss)


def _require_analytic_kl(model, guide, args, kwargs):
    with torch.no_grad(), poutine.block():
        guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
    for name, site in model_tr.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and name in guide_tr.nodes \
                and not isinstance(site["fn"], _Subsample):
            q, p = guide_tr.nodes[name]["fn"], site["fn"]
            try:
                torch.distributions.kl_divergence(q, p)
            except NotImplementedError:
                raise ValueError(
                    f"objective mean_field: no closed-form KL({type(q).__name__} || {type(p).__name__}) at "
                    f"site {name!r}; use objective.fallback=mc (Monte Carlo for that site) or objective=elbo"
                ) from None


def _check_particles(num_particles) -> int:
    if isinstance(num_particles, bool) or int(num_particles) != num_particles or num_particles < 1:
        raise ValueError(f"objective.num_particles must be an integer >= 1, got {num_particles!r}")
    return int(num_particles)


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
    Densities come from Pyro traces (``poutine.trace`` + ``poutine.replay``) of model and guide.

    :param data_plate: name of the plate over data points; every latent and observed site is in it.
    """

    ESTIMATORS = ("standard", "stl", "dreg")

    def __init__(self, num_particles: int = 5, estimator: str = "standard", beta: float = 1.0,
                 warmup_epochs: int = 0, data_plate: str = "data"):
        super().__init__(beta, warmup_epochs)
        if estimator not in self.ESTIMATORS:
            raise ValueError(f"objective.estimator must be one of {', '.join(self.ESTIMATORS)}, got {estimator!r}")
        self.num_particles, self.estimator, self.data_plate = _check_particles(num_particles), estimator, data_plate
        self.max_plate_nesting = None  # learned from one dry run, as Pyro's ELBOs do

    def per_point(self, model, guide, *args, **kwargs):
        """(bound_n, c_n): the per-point bound L_K(x_n) and its scale c_n, shape (n,) each."""
        bound, scale, _ = self._compute(*self._weighted(model, guide), *args, **kwargs)
        return bound, scale

    @property
    def selection_name(self) -> str:
        return f"iwae{self.num_particles}"

    @torch.no_grad()
    def selection_score(self, vae, x: torch.Tensor, batch_size: int = 1000) -> float:
        """Mean over the rows of x of L_K(x_n) (beta = 1): what the trainer selects epochs on, since
        an IWAE-trained guide can lower the ELBO while it raises L_K."""
        bounds = [self._compute(vae.model, vae.guide, b)[0] for b in x.split(batch_size)]
        return torch.cat(bounds).mean().item()

    def _loss(self, model, guide, *args, **kwargs):
        bound, scale, surrogate = self._compute(model, guide, *args, **kwargs)
        value = (scale * bound).sum()
        return -(value.detach() + surrogate - surrogate.detach())

    def _compute(self, model, guide, *args, **kwargs):
        if self.max_plate_nesting is None:
            self.max_plate_nesting = _max_plate_nesting(model, guide, args, kwargs)
        K, layout = self.num_particles, _Layout(self.data_plate, self.max_plate_nesting)
        particles = pyro.plate("iwae_particles", K, dim=-(self.max_plate_nesting + 1))
        guide_tr = poutine.trace(_within(particles, guide)).get_trace(*args, **kwargs)
        latents = _latent_sites(guide_tr, self.estimator)
        log_q, log_q_score = {}, {}
        for name, site in latents.items():
            log_q[name] = layout.per_point(name, site, _scaled_log_prob(site, site["value"]), K)
            if self.estimator != "standard":  # d/dphi log q(z; phi) at fixed z: the score term
                log_q_score[name] = layout.per_point(name, site, _scaled_log_prob(site, site["value"].detach()), K)
        if self.estimator == "dreg":  # the model sees a copy of z, whose incoming gradient is reweighted
            values = {name: site["value"] for name, site in latents.items()}
            for name in latents:
                guide_tr.nodes[name]["value"] = values[name].clone()
        model_tr = poutine.trace(poutine.replay(_within(particles, model), trace=guide_tr)).get_trace(*args, **kwargs)
        log_p, scale = layout.model_terms(model_tr, latents, K)
        log_w = (log_p - sum(log_q.values())) / scale  # (K, n), scale c_n taken out
        bound = log_w.logsumexp(0) - math.log(K)
        if self.estimator == "standard":
            return bound, scale, (scale * bound).sum()
        w = log_w.detach().softmax(0)
        surrogate = (w * log_p).sum()
        for name, site in latents.items():
            path = log_q[name] - log_q_score[name]  # value 0; gradient: only through z's reparameterization
            if self.estimator == "dreg":
                r = layout.scale(name, site, K) / scale  # relative scale of this latent
                weight = (1 - r) + r * w
                z_model = guide_tr.nodes[name]["value"]
                if z_model.requires_grad:
                    z_model.register_hook(_times(layout.to_site(weight, site)))
                path = weight * path
            surrogate = surrogate - (w * path).sum()
        return bound, scale, surrogate


def _times(factor):
    return lambda grad: grad * factor


def _within(plate, fn):
    def wrapped(*args, **kwargs):
        with plate:
            return fn(*args, **kwargs)
    return wrapped


def _is_sample(site) -> bool:
    return site["type"] == "sample" and not isinstance(site["fn"], _Subsample)


def _scaled_log_prob(site, value) -> torch.Tensor:
    return scale_and_mask(site["fn"].log_prob(value, *site["args"], **site["kwargs"]), site["scale"], site["mask"])


def _site_scale(site) -> torch.Tensor:
    shape = site["fn"].batch_shape
    value = site["value"]
    dtype = value.dtype if value.is_floating_point() else torch.get_default_dtype()
    return torch.as_tensor(site["scale"], dtype=dtype, device=value.device).expand(shape)


def _latent_sites(guide_tr, estimator):
    latents = {name: site for name, site in guide_tr.nodes.items() if _is_sample(site)}
    for name, site in latents.items():
        if site["is_observed"]:
            raise ValueError(f"guide site {name!r} is observed; a guide may only sample latents")
        if not site["fn"].has_rsample:
            raise ValueError(f"objective iwae needs reparameterized guide sites, but {name!r} "
                             f"({type(site['fn']).__name__}) has no rsample; use objective=elbo")
    if estimator != "standard" and len(latents) > 1:
        raise ValueError(f"estimator={estimator} needs a guide with one latent site per data point, this one has "
                         f"{sorted(latents)}; use objective.estimator=standard")
    return latents


def _max_plate_nesting(model, guide, args, kwargs) -> int:
    with torch.random.fork_rng(devices=[]), torch.no_grad(), poutine.block():
        guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
    dims = [-f.dim for tr in (guide_tr, model_tr) for site in tr.nodes.values() if site["type"] == "sample"
            for f in site["cond_indep_stack"] if f.vectorized]
    return max(dims, default=0)


class _Layout:
    """Reduces a site's log-density tensor to (K particles, n data points)."""

    def __init__(self, data_plate: str, max_plate_nesting: int):
        self.data_plate, self.batch_dims = data_plate, max_plate_nesting + 1

    def data_dim(self, name, site) -> int:
        frames = [f for f in site["cond_indep_stack"] if f.name == self.data_plate and f.vectorized]
        if not frames:
            raise ValueError(f"site {name!r} is outside pyro.plate({self.data_plate!r}); the importance-weighted "
                             f"bound is per data point, so every latent and observed site must be inside it "
                             f"(or pass objective.data_plate=<your plate's name>)")
        return self.batch_dims + frames[0].dim  # axis in the left-padded (K, ..., n, ...) layout

    def per_point(self, name, site, log_p: torch.Tensor, K: int) -> torch.Tensor:
        axis = self.data_dim(name, site)
        log_p = torch.as_tensor(log_p)
        log_p = log_p.reshape((1,) * (self.batch_dims - log_p.dim()) + log_p.shape)
        other = [a for a in range(1, self.batch_dims) if a != axis]
        if other:
            log_p = log_p.sum(other, keepdim=True)
        return log_p.reshape(log_p.shape[0], log_p.shape[axis]).expand(K, -1)

    def to_site(self, t: torch.Tensor, site) -> torch.Tensor:
        """(K, n) -> a shape that broadcasts against the site's value (batch + event dims)."""
        axis = self.data_dim("", site)
        shape = [1] * self.batch_dims
        shape[0], shape[axis] = t.shape
        return t.reshape(shape + [1] * len(site["fn"].event_shape))

    def model_terms(self, model_tr, latents, K):
        """Sum over model sites of the scaled per-point log-density, and the observed sites' scale c_n."""
        log_p, scale = 0.0, None
        for name, site in model_tr.nodes.items():
            if not _is_sample(site):
                continue
            if not site["is_observed"] and name not in latents:
                raise ValueError(f"model latent {name!r} has no guide site; objective iwae needs the guide to "
                                 f"sample every latent of the model")
            log_p = log_p + self.per_point(name, site, _scaled_log_prob(site, site["value"]), K)
            if site["is_observed"]:
                s = self.scale(name, site, K)[0]
                if scale is not None and not torch.allclose(s, scale):
                    raise ValueError("observed sites have different scales; objective iwae needs one scale "
                                     "per data point for all observations")
                scale = s
        if scale is None:
            raise ValueError("the model has no observed site; objective iwae needs observations")
        return log_p, scale

    def scale(self, name, site, K) -> torch.Tensor:
        """The site's scale per (particle, point), (K, n): its mean over the site's other batch dims."""
        shape = site["fn"].batch_shape
        full = [1] * (self.batch_dims - len(shape)) + list(shape)
        axis = self.data_dim(name, site)
        count = math.prod(s for a, s in enumerate(full) if a not in (0, axis))
        return self.per_point(name, site, _site_scale(site), K) / count

