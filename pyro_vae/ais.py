"""Annealed importance sampling (Neal, 2001) of log p(x), per data point, for any Pyro model and guide.

From the start distribution r(z | x) (the guide, or the prior) to the posterior p(z | x) along the
geometric path, with inverse temperatures 0 = β_0 < β_1 < … < β_T < β_{T+1} = 1,

    f_t(z) = r(z | x)^(1 − β_t) p(x, z)^β_t,        ℓ(z) = log p(x, z) − log r(z | x),

one chain draws z_0 ~ r, then z_t ~ K_t(· | z_{t−1}), an HMC transition that leaves f_t / Z_t
invariant, and carries the log weight

    log w = Σ_{t=1}^{T+1} (β_t − β_{t−1}) ℓ(z_{t−1}),        E[w] = p(x).

With M chains, log p̂ = log (1/M) Σ_m w_m is a stochastic lower bound that tightens as T grows
(Wu et al., 2017); T = 0 is importance sampling with M samples. Run from an exact posterior sample
with the schedule reversed, the same weights estimate 1 / p(x): ``reverse=True`` returns
−log (1/M) Σ_m w_m, a stochastic upper bound (Grosse et al., 2015; :mod:`pyro_vae.bdmc`).

Latents run in unconstrained space, u = T⁻¹(z) with Pyro's ``biject_to``, the potential carrying
log |det dz/du| (ℓ does not: it cancels). Chains × points are one tensor (M, n, D) of every site's
u; HMC uses Pyro's ``velocity_verlet`` with one step size per data point, multiplied by
1 + ``adapt_rate`` after a transition whose acceptance rate (over that point's chains) exceeds
``target_accept`` and by 1 − ``adapt_rate`` otherwise. Densities come from :mod:`pyro_vae.traces`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from pyro import poutine
from pyro.distributions.transforms import biject_to
from pyro.ops.integrator import velocity_verlet

from . import traces
from .checks import positive_int

__all__ = ["AIS"]


@dataclass(frozen=True)
class AIS:
    """The options of annealed importance sampling (``estimate_log_px(..., method="ais", **options)``).

    :param num_steps: T ≥ 0, the number of intermediate distributions, one HMC transition each.
    :param schedule: the T + 2 inverse temperatures 0 = β_0 < … < β_{T+1} = 1 (default: sigmoidal).
    :param start: ``"guide"`` (r = q(z | x)) or ``"prior"`` (r = p(z)).
    :param num_leapfrog: leapfrog steps per HMC transition.
    :param step_size: the initial leapfrog step size, for every data point.
    :param target_accept: the acceptance rate the per-point step sizes adapt toward.
    :param adapt_rate: relative change of a step size after each transition.
    """

    num_steps: int = 100
    schedule: Sequence[float] | None = None
    start: str = "guide"
    num_leapfrog: int = 10
    step_size: float = 0.05
    target_accept: float = 0.65
    adapt_rate: float = 0.02

    def __post_init__(self):
        positive_int(self.num_steps, "num_steps", 0)
        positive_int(self.num_leapfrog, "num_leapfrog")
        if self.start not in ("guide", "prior"):
            raise ValueError(f"start must be 'guide' or 'prior', got {self.start!r}")
        if not self.step_size > 0:
            raise ValueError(f"step_size must be > 0, got {self.step_size!r}")
        if not 0 < self.target_accept < 1:
            raise ValueError(f"target_accept must lie in (0, 1), got {self.target_accept!r}")
        if self.schedule is not None:
            betas = torch.as_tensor(self.schedule, dtype=torch.float64)
            if betas.dim() != 1 or len(betas) != self.num_steps + 2 or betas[0] != 0 or betas[-1] != 1 \
                    or not (betas.diff() > 0).all():
                raise ValueError(f"schedule must be num_steps + 2 = {self.num_steps + 2} increasing values from 0 "
                                 f"to 1, got {betas.tolist()}")

    @staticmethod
    def check_latents(model_tr) -> None:
        """A one-line ``ValueError`` if a latent of the model trace is discrete: HMC cannot move it."""
        for name, site in model_tr.nodes.items():
            if traces.site_kind(site) == "latent" and site["fn"].support.is_discrete:
                raise ValueError(f"AIS needs continuous latents, but site {name!r} ({type(site['fn']).__name__}) is "
                                 f"discrete; sum it out of the model (enumerate it) or use method='guide' (importance "
                                 f"sampling)")

    def betas(self) -> torch.Tensor:
        """β_0, …, β_{T+1} (float64): the schedule given, or the sigmoidal one of Wu et al. (2017),
        β̃_t = σ(δ (2t / (T+1) − 1)) with δ = 4, rescaled to run from 0 to 1."""
        if self.schedule is not None:
            return torch.as_tensor(self.schedule, dtype=torch.float64)
        s = torch.sigmoid(4.0 * (2 * torch.arange(self.num_steps + 2, dtype=torch.float64) / (self.num_steps + 1) - 1))
        return (s - s[0]) / (s[-1] - s[0])

    def run(self, model, proposal, args, kwargs, layout, num_chains, indices=None, initial=None, progress=None):
        """AIS chains for the points of one pass: (log w (M, n) float64, acceptance rate (n,), step size (n,)).

        :param initial: {site: value} with a leading chain dim of size M: start there (an exact
            posterior sample, for reverse AIS) and run the schedule from β = 1 to 0.
        :param progress: a tqdm bar, advanced once per transition.
        """
        target = _Target(model, proposal, args, kwargs, layout, num_chains, indices, initial)
        betas = self.betas() if initial is None else self.betas().flip(0)
        u, parts = target.u0, target.evaluate(target.u0)
        step = torch.full((parts["log_p"].shape[1],), self.step_size, dtype=u.dtype, device=u.device)
        log_w = torch.zeros_like(parts["log_p"], dtype=torch.float64)
        accepted = torch.zeros_like(step, dtype=torch.float64)
        for t in range(1, len(betas)):
            log_w += (betas[t] - betas[t - 1]).item() * (parts["log_p"] - parts["log_r"]).double()
            if t == len(betas) - 1:
                break
            u, parts, rate = self._transition(target, u, betas[t].item(), step)
            accepted += rate
            step = step * torch.where(rate > self.target_accept, 1 + self.adapt_rate, 1 - self.adapt_rate).to(step)
            if progress is not None:
                progress.update(1)
        return log_w, accepted / max(self.num_steps, 1), step

    def _transition(self, target, u, beta, step):
        """One HMC transition at inverse temperature ``beta`` for every chain and point."""
        record = []

        def potential(z):
            parts = target.evaluate(z["u"])
            record.append(parts)
            return -_log_f(parts, beta).sum()
        momentum = torch.randn_like(u)
        with torch.enable_grad():
            proposed, new_momentum, _, _ = velocity_verlet({"u": u}, {"u": momentum}, potential, lambda r: r,
                                                           step[None, :, None], self.num_leapfrog)
        start, end = record[0], record[-1]
        h0 = -_log_f(start, beta) + 0.5 * momentum.pow(2).sum(-1)
        h1 = -_log_f(end, beta) + 0.5 * new_momentum["u"].pow(2).sum(-1)
        accept = (torch.rand_like(h0).log() < h0 - h1) & torch.isfinite(h1)  # NaN or inf energy: reject
        u = torch.where(accept[..., None], proposed["u"].detach(), u)
        parts = {k: torch.where(accept, end[k], start[k]).detach() for k in start}
        return u, parts, accept.double().mean(0)


def _log_f(parts, beta):
    """log f_β(u) = (1 − β) log r + β log p + log |det dz/du|, per (chain, point)."""
    return (1 - beta) * parts["log_r"] + beta * parts["log_p"] + parts["log_det"]


class _Target:
    """The chains' state: every model latent, unconstrained, packed into one (M, n, D) tensor, and
    its densities log p(x, z), log r(z | x) and log |det dz/du| per (chain, point)."""

    def __init__(self, model, proposal, args, kwargs, layout, M, indices, initial):
        self.model, self.proposal, self.args, self.kwargs = model, proposal, args, kwargs
        self.layout, self.M, self.indices = layout, M, indices
        guide_tr, model_tr = traces.trace_pair(model, proposal, args, kwargs, layout, M, indices=indices, values=initial)
        self.sites = {name: site for name, site in model_tr.nodes.items() if traces.site_kind(site) == "latent"}
        AIS.check_latents(model_tr)
        self.transforms = {name: biject_to(site["fn"].support) for name, site in self.sites.items()}
        # Every site's batch shape spans the particle plate and all plates inside it, so the data
        # plate sits at one axis of every value: (M, …, n, …, event).
        self.axis = layout.max_plate_nesting + 1 + layout.data_dim
        unconstrained = {name: self.transforms[name].inv(site["value"].detach().expand(site["fn"].shape()))
                         for name, site in self.sites.items()}
        self.shapes = {name: u.shape for name, u in unconstrained.items()}
        self.u0 = torch.cat([self._flat(u) for u in unconstrained.values()], -1)
        self.guide_trace = self._fixed_guide(guide_tr)

    def _flat(self, u):
        """(M, …, n, …) -> (M, n, k): the chain axis first, the data axis second, the rest flattened."""
        return u.movedim(self.axis, 1).reshape(u.shape[0], u.shape[self.axis], -1)

    def unpack(self, u) -> dict:
        """The packed (M, n, D) state -> {site: unconstrained value}."""
        values, offset = {}, 0
        for name, shape in self.shapes.items():
            moved = list(shape)
            moved.insert(1, moved.pop(self.axis))
            size = math.prod(moved[2:])
            values[name] = u[..., offset:offset + size].reshape(moved).movedim(1, self.axis)
            offset += size
        return values

    def _fixed_guide(self, guide_tr):
        """The guide's trace, to score every later state with, when no guide site's distribution
        depends on another latent (the encoder then runs once, not at every leapfrog step)."""
        guide_sites = [name for name, site in guide_tr.nodes.items() if traces.site_kind(site) == "latent"]
        if not guide_sites:
            return None
        u = self.u0.clone().requires_grad_()
        with torch.enable_grad():
            values = self.constrained(u)
            tr, _ = traces.trace_pair(self.model, self.proposal, self.args, self.kwargs, self.layout, self.M,
                                      indices=self.indices, values=values)
            for name in guide_sites:
                log_q = traces.site_log_prob(tr.nodes[name], tr.nodes[name]["value"].detach()).sum()
                if log_q.requires_grad and torch.autograd.grad(log_q, u, allow_unused=True)[0] is not None:
                    return None  # q(z_j | z_i, x): rerun the guide at every state
        return tr

    def constrained(self, u) -> dict:
        return {name: self.transforms[name](value) for name, value in self.unpack(u).items()}

    def evaluate(self, u) -> dict:
        """{log_p, log_r, log_det}, each (M, n), at the packed unconstrained state u."""
        unconstrained = self.unpack(u)
        values = {name: self.transforms[name](value) for name, value in unconstrained.items()}
        fixed = None
        if self.guide_trace is not None:
            fixed = poutine.Trace()
            for name, site in self.guide_trace.nodes.items():
                fixed.add_node(name, **({**site, "value": values[name]} if name in values else site))
        guide_tr, model_tr = traces.trace_pair(self.model, self.proposal, self.args, self.kwargs, self.layout, self.M,
                                               indices=self.indices, values=values, guide_trace=fixed)
        log_p, log_r = traces.log_densities(guide_tr, model_tr, self.layout, self.M, dtype=u.dtype)
        log_det = 0.0
        for name, site in self.sites.items():
            jac = self.transforms[name].log_abs_det_jacobian(unconstrained[name], values[name])
            log_det = log_det + traces.per_point(jac, site, self.layout, self.M)
        return {"log_p": log_p, "log_r": log_r, "log_det": log_det + torch.zeros_like(log_p)}
