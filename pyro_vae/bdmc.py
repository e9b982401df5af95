"""Bidirectional Monte Carlo (Grosse et al., 2015): a sandwich around log p(x) on data simulated
from the model, which bounds the error of AIS.

Draw (x̃_n, z̃_n) ~ p(x, z) with the shapes of x; then z̃_n is an exact sample of p(z | x̃_n). For
each x̃_n, with M chains and T steps (:mod:`pyro_vae.ais`),

    lower_n = log (1/M) Σ_m w_m        forward AIS from r(z | x̃_n):          E[lower_n] ≤ log p(x̃_n)
    upper_n = −log (1/M) Σ_m w'_m      reverse AIS from z̃_n, schedule 1 → 0:  E[upper_n] ≥ log p(x̃_n)

(the reverse weights estimate 1 / p(x̃_n) without bias). Both bounds tighten as T grows; the gap
upper − lower bounds, on data like the model's own, how far a forward AIS estimate with these
settings can be from the truth (Wu et al., 2017).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine

from . import traces
from .ais import AIS
from .checks import positive_int
from .marginal import Batching, estimate_log_px

__all__ = ["bdmc", "BDMCResult"]


@dataclass
class BDMCResult:
    """Per simulated data point: ``x`` (the data, with the shape of the x given), ``lower`` and
    ``upper`` (N,) float64, the stochastic bounds on log p(x̃_n)."""

    x: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    num_samples: int
    num_steps: int

    @property
    def gap(self) -> torch.Tensor:
        return self.upper - self.lower

    def summary(self) -> dict:
        n = len(self.lower)
        sem = lambda t: (t.std() / math.sqrt(n)).item() if n > 1 else math.nan  # noqa: E731
        return {"num_samples": self.num_samples, "num_steps": self.num_steps, "num_points": n,
                "lower": self.lower.mean().item(), "upper": self.upper.mean().item(),
                "gap": self.gap.mean().item(), "gap_sem": sem(self.gap)}


def bdmc(model, guide, x: torch.Tensor, num_samples: int = 16, num_steps: int = 100, *, data_plate: str = "data",
         args: tuple = (), kwargs: dict | None = None, max_batch: int = 8192, seed: int | None = None,
         progress: bool = True, **ais_options) -> BDMCResult:
    """Simulate data like ``x`` from ``model`` and sandwich its log p(x̃) between forward and reverse AIS.

    :param model, guide: as for :func:`pyro_vae.estimate_log_px`; the model's one observed site
        has the shape of ``x`` (``model`` is run with its observations drawn, ``poutine.uncondition``).
    :param num_samples: M, chains per data point in each direction.
    :param num_steps: T, AIS steps in each direction; the other AIS options (schedule, start,
        num_leapfrog, step_size, ...) go as keywords.
    :param max_batch: chains × points per pass.
    :param seed: if given, draw under ``torch.manual_seed(seed)`` and restore the global RNG afterwards.
    """
    kwargs = dict(kwargs or {})
    M = positive_int(num_samples, "num_samples")
    options = AIS(num_steps=num_steps, **ais_options)
    proposal = guide if options.start == "guide" else traces.empty_guide
    with torch.no_grad(), traces.preserve_rng() if seed is not None else nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        x_sim, z_sim = _simulate(model, x, args, kwargs)
        lower = estimate_log_px(model, guide, x_sim, M, method="ais", data_plate=data_plate, args=args, kwargs=kwargs,
                                batching=Batching(max_batch), progress=progress, warn=False, num_steps=num_steps,
                                **ais_options).log_px
        layout = traces.inspect(model, proposal, (x_sim, *args), kwargs, data_plate, num_rows=len(x_sim))
        if layout.subsample_size is not None:
            raise ValueError(f"bdmc needs pyro.plate('{data_plate}') over all rows of x, but it subsamples "
                             f"{layout.subsample_size} of {len(x_sim)}; pass the rows to the model directly")
        upper = torch.empty(len(x_sim), dtype=torch.float64, device=x.device)
        axis = layout.max_plate_nesting + layout.data_dim  # the data axis of a value without particle dim
        points = max(1, max_batch // M)
        from tqdm.auto import tqdm  # lazy: the core imports only torch, pyro, numpy
        bar = tqdm(total=math.ceil(len(x_sim) / points) * max(num_steps, 1), desc="reverse AIS", unit="step",
                   disable=not progress)
        for start in range(0, len(x_sim), points):
            n = min(points, len(x_sim) - start)
            initial = {name: z.narrow(axis, start, n).expand((M,) + z.narrow(axis, start, n).shape)
                       for name, z in z_sim.items()}
            # as in estimate_log_px's passes: a leapfrog step may land where a density is NaN (an
            # IAF guide's inverse far from its data); HMC rejects such a proposal, Pyro's check would raise
            with pyro.validation_enabled(False):
                log_w, _, _ = options.run(model, proposal, (x_sim[start:start + n], *args), kwargs, layout, M,
                                          initial=initial, progress=bar)
            upper[start:start + n] = -(log_w.logsumexp(0) - math.log(M))
        bar.close()
    return BDMCResult(x_sim, lower, upper, M, options.num_steps)


def _simulate(model, x, args, kwargs):
    """(x̃, {latent: z̃}): one draw of the model with its observations sampled, at x's shapes."""
    tr = poutine.trace(poutine.uncondition(model)).get_trace(x, *args, **kwargs)
    observed = [site for site in tr.nodes.values() if site["type"] == "sample" and site["infer"].get("was_observed")]
    matching = [site for site in observed if site["value"].shape == x.shape]
    if len(observed) != 1 or not matching:
        names = [site["name"] for site in observed]
        raise ValueError(f"bdmc simulates the model's one observed site with the shape of x {tuple(x.shape)}; this "
                         f"model observes {names}; give it one observed site of x's shape")
    latents = {name: site["value"] for name, site in tr.nodes.items() if traces.site_kind(site) == "latent"
               and not site["infer"].get("was_observed")}
    return matching[0]["value"].to(x.dtype), latents
