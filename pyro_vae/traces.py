"""From a Pyro model and guide to per-point log-densities: the one place where traces become
(particles × points) tensors. Importance sampling, AIS, the IWAE bound and the ELBO terms all
go through it.

Every caller follows one recipe, *trace the guide, replay the model*:

    guide_tr = trace(guide)(x)                        z ~ q(z | x), under a particle plate of P
    model_tr = trace(replay(model, guide_tr))(x)      p(x, z) at the same z

and reduces each sample site's log-density (a tensor of the site's batch shape) to shape (P, n):
summed over every plate but the particle plate and the data plate. The data plate may sit at any
dim, with other plates inside it; the particle plate goes just outside the outermost one, at dim
−(max_plate_nesting + 1), as in ``Trace_ELBO(vectorize_particles=True)``. Plates and their depth
are learned from one dry run, :func:`inspect`, the way ``pyro.infer.ELBO`` guesses
``max_plate_nesting``.

The ELBO's per-point terms (:func:`pyro_vae.objectives.elbo.elbo_terms`) are built on it too.
A latent the model samples but the guide does not is drawn from the model; in a weight
p(x, z) / r(z | x) its density appears in both, so the proposal r of :func:`log_densities` is
the guide times those model-only conditionals.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites, site_is_subsample

__all__ = ["Layout", "dry_run", "layout", "inspect", "plate_nesting_of", "trace_pair", "site_kind", "site_log_prob",
           "per_point", "site_scale", "log_densities", "replay_values",
           "preserve_rng", "empty_guide"]

PARTICLES = "particles"  # the plate that vectorizes particles (chains), outside every other plate


@dataclass(frozen=True)
class Layout:
    """Where the plates of a model/guide pair are, from one dry run.

    :ivar data_plate: name of the plate over data points.
    :ivar data_dim: its (negative) dim.
    :ivar max_plate_nesting: how deep the pair's vectorized plates nest (particle plate not counted).
    :ivar subsample_size: set when the data plate draws ``subsample_size`` of the rows it is given
        (``pyro.plate(name, N, subsample_size=B)`` on all N rows); callers then choose which rows
        with ``indices``. None when the plate's points are the rows given.
    """

    data_plate: str
    data_dim: int
    max_plate_nesting: int
    subsample_size: int | None = None

    @property
    def particle_dim(self) -> int:
        return -(self.max_plate_nesting + 1)


def preserve_rng():
    """A context in which random draws leave torch's global generators (CPU and CUDA) as they were."""
    cuda = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=cuda)


def empty_guide(*args, **kwargs) -> None:
    """A guide without sites: replayed against it, the model draws every latent from its prior."""


def site_kind(site) -> str | None:
    """"observed", "latent", or None for a site that carries no density (not a sample, a plate's
    subsample, ``pyro.deterministic``)."""
    if site["type"] != "sample" or site_is_subsample(site) or site["infer"].get("_deterministic"):
        return None
    return "observed" if site["is_observed"] else "latent"


def _within(plate, fn):
    def wrapped(*args, **kwargs):
        with plate:
            return fn(*args, **kwargs)
    return wrapped


class _ForceSubsample(Messenger):
    """Sets the indices of the data plate's subsample, so a caller decides which points are visited."""

    def __init__(self, name: str, indices: torch.Tensor):
        super().__init__()
        self.name, self.indices = name, indices

    def _pyro_sample(self, msg):
        if msg["name"] == self.name and site_is_subsample(msg):
            msg["value"] = self.indices


def replay_values(values: dict) -> poutine.Trace:
    """A trace holding ``values`` ({site name: tensor}) as latent samples, for ``poutine.replay``."""
    trace = poutine.Trace()
    for name, value in values.items():
        trace.add_node(name, type="sample", is_observed=False, value=value, infer={})
    return trace


def trace_pair(model, guide, args=(), kwargs=None, layout: Layout | None = None, num_particles: int | None = None,
               *, indices: torch.Tensor | None = None, values: dict | None = None, clone_latents: bool = False,
               guide_trace: poutine.Trace | None = None):
    """Trace ``guide(*args, **kwargs)``, then ``model`` replayed against it: (guide_tr, model_tr).

    :param layout: needed for ``num_particles`` and ``indices``.
    :param num_particles: run both under a particle plate of this size at ``layout.particle_dim``;
        None runs them as they are (one draw, no particle dim).
    :param indices: force the data plate's subsample to these indices.
    :param values: {site: tensor}: score the guide and the model at these latent values instead
        of drawing them (every latent named here; model-only latents may be among them).
    :param clone_latents: the model sees copies of the guide's latent values, so a caller can
        reweight the gradient that flows into z through the model alone (DReG).
    :param guide_trace: use this guide trace (made for these ``values``) instead of running the guide.
    """
    kwargs = kwargs or {}
    if num_particles is not None:
        particles = pyro.plate(PARTICLES, num_particles, dim=layout.particle_dim)
        model, guide = _within(particles, model), _within(particles, guide)
    force = _ForceSubsample(layout.data_plate, indices) if indices is not None else nullcontext()
    with force:
        if values is not None:
            guide = poutine.replay(guide, trace=replay_values(values))
        guide_tr = guide_trace if guide_trace is not None else poutine.trace(guide).get_trace(*args, **kwargs)
        source = guide_tr if values is None else replay_values(values)
        if clone_latents:
            source = source.copy()
            for name, site in source.nodes.items():
                if site_kind(site) == "latent":
                    source.nodes[name] = {**site, "value": site["value"].clone()}
        model_tr = poutine.trace(poutine.replay(model, trace=source)).get_trace(*args, **kwargs)
    return guide_tr, model_tr


def dry_run(model, guide, args=(), kwargs=None):
    """(guide_tr, model_tr) of one run without particle plate, subsample sites pruned, that leaves
    the random state and the param store as they were."""
    kwargs = kwargs or {}
    with preserve_rng(), torch.no_grad(), poutine.block():
        guide_tr, model_tr = trace_pair(model, guide, args, kwargs)
    return prune_subsample_sites(guide_tr), prune_subsample_sites(model_tr)


def plate_nesting_of(*trs) -> int:
    """max_plate_nesting of traces: how deep their sample sites' vectorized plates nest."""
    return max((-f.dim for tr in trs for site in tr.nodes.values() if site_kind(site)
                for f in site["cond_indep_stack"] if f.vectorized), default=0)


def inspect(model, guide, args=(), kwargs=None, data_plate: str = "data", option: str = "data_plate",
            num_rows: int | None = None) -> Layout:
    """The :class:`Layout` of a pair whose per-point densities are wanted, from one :func:`dry_run`."""
    return layout(*dry_run(model, guide, args, kwargs), data_plate, option, num_rows)


def layout(guide_tr, model_tr, data_plate: str = "data", option: str = "data_plate",
           num_rows: int | None = None) -> Layout:
    """The :class:`Layout` of a guide and a model trace (without particle plate).

    Raises a one-line ``ValueError`` for what makes a per-point density undefined: an observed
    guide site, a guide latent the model lacks, a sample site outside the data plate, the data
    plate used as an iterator, or model and guide disagreeing on it. ``option`` names the
    caller's argument for the plate's name in those messages; ``num_rows`` (the rows of x) lets
    a data plate that subsamples all rows by itself be detected.
    """
    frames = []
    for who, tr in (("guide", guide_tr), ("model", model_tr)):
        for name, site in tr.nodes.items():
            kind = site_kind(site)
            if kind is None:
                continue
            if who == "guide" and kind == "observed":
                raise ValueError(f"guide site '{name}' is observed; a guide may only sample latents")
            if who == "guide" and name not in model_tr.nodes:
                raise ValueError(f"guide site '{name}' does not appear in the model; the weight p(x, z)/q(z|x) "
                                 f"needs every guide latent to be a model latent")
            data = [f for f in site["cond_indep_stack"] if f.name == data_plate]
            if not data:
                raise ValueError(f"{kind} site '{name}' of the {who} is outside pyro.plate('{data_plate}'): with "
                                 f"sites shared by all data points a per-point density is undefined; put it "
                                 f"inside the data plate (or pass {option}='<name>' if yours is named differently)")
            if data[0].dim is None:
                raise ValueError(f"pyro.plate('{data_plate}') is used as an iterator; use it as a vectorized "
                                 f"context, `with pyro.plate('{data_plate}', N):`")
            frames += [f for f in site["cond_indep_stack"] if f.vectorized]
    data_frames = {(f.dim, f.size, f.full_size) for f in frames if f.name == data_plate}
    if not data_frames:
        raise ValueError(f"no sample site inside pyro.plate('{data_plate}'); pass {option}='<name>' if your "
                         f"data plate has another name")
    if len(data_frames) > 1:
        raise ValueError(f"pyro.plate('{data_plate}') has different dims/sizes in model and guide: "
                         f"{sorted(data_frames)}; use the same plate in both")
    dim, size, full_size = data_frames.pop()
    subsample_size = None
    if num_rows is not None and size != num_rows:
        if not (size < num_rows and full_size == num_rows):
            raise ValueError(f"pyro.plate('{data_plate}') has size {size} but x has {num_rows} rows; the first "
                             f"dimension of x must index the data points of the plate")
        subsample_size = size  # the plate draws `size` of the rows of x: the caller chooses which
    return Layout(data_plate, dim, plate_nesting_of(guide_tr, model_tr), subsample_size)


def site_log_prob(site, value=None, scaled: bool = False) -> torch.Tensor:
    """log p(value) of a sample site (its own value by default), masked as the site is masked.

    Unscaled by default: ``Trace.compute_log_prob`` multiplies by the site's scale (plate
    subsampling N/B, ``poutine.scale``), which inside a log-sum-exp would change the estimand.
    ``scaled=True`` applies it, as ``Trace_ELBO`` does.
    """
    log_p = site["fn"].log_prob(site["value"] if value is None else value, *site["args"], **site["kwargs"])
    return scale_and_mask(log_p, site["scale"] if scaled else 1.0, site["mask"])


def _data_frame(site, layout: Layout):
    frames = [f for f in site["cond_indep_stack"] if f.name == layout.data_plate and f.vectorized]
    if not frames:
        raise ValueError(f"site '{site['name']}' is outside pyro.plate('{layout.data_plate}'); a per-point "
                         f"density needs every latent and observed site inside it")
    return frames[0]


def per_point(tensor: torch.Tensor, site, layout: Layout, num_particles: int = 1) -> torch.Tensor:
    """Reduce ``tensor``, of the site's batch shape (a log-density, a KL, a scale), to (P, n): sum
    over every plate dim but the particle and the data plate's."""
    frame = _data_frame(site, layout)
    batch_dims = layout.max_plate_nesting + 1
    axis = batch_dims + frame.dim  # the data plate's axis in the (P, ..., n, ...) layout
    tensor = torch.as_tensor(tensor)
    if tensor.dim() > batch_dims:
        raise ValueError(f"site '{site['name']}' has log_prob shape {tuple(tensor.shape)}, more batch dims than "
                         f"plates; declare the extra dims with .to_event(...) or a pyro.plate")
    tensor = tensor.reshape((1,) * (batch_dims - tensor.dim()) + tensor.shape)
    other = [a for a in range(1, batch_dims) if a != axis]
    if other:
        tensor = tensor.sum(other, keepdim=True)
    return tensor.reshape(tensor.shape[0], tensor.shape[axis]).expand(num_particles, frame.size)


def site_scale(site, layout: Layout, num_particles: int = 1) -> torch.Tensor:
    """The site's scale per (particle, point), (P, n): its mean over the site's other plate dims."""
    value = site["value"]
    dtype = value.dtype if value.is_floating_point() else torch.get_default_dtype()
    scale = torch.as_tensor(site["scale"], dtype=dtype, device=value.device).expand(site["fn"].batch_shape)
    full = (1,) * (layout.max_plate_nesting + 1 - scale.dim()) + tuple(scale.shape)
    axis = layout.max_plate_nesting + 1 + _data_frame(site, layout).dim
    count = math.prod(size for a, size in enumerate(full) if a not in (0, axis))
    return per_point(scale, site, layout, num_particles) / count


def log_densities(guide_tr, model_tr, layout: Layout, num_particles: int = 1, dtype=torch.float64):
    """(log p(x, z), log r(z | x)), each (P, n) in ``dtype``, unscaled: the model's every site, and
    the proposal r = the guide's sites times the model's own conditionals of the latents the guide
    does not sample. log p − log r is the importance log weight."""
    log_p = log_r = 0.0
    for name, site in model_tr.nodes.items():
        kind = site_kind(site)
        if kind is None:
            continue
        term = per_point(site_log_prob(site).to(dtype), site, layout, num_particles)
        log_p = log_p + term
        if kind == "latent" and name not in guide_tr.nodes:
            log_r = log_r + term
    for site in guide_tr.nodes.values():
        if site_kind(site):
            log_r = log_r + per_point(site_log_prob(site).to(dtype), site, layout, num_particles)
    return log_p, log_r

