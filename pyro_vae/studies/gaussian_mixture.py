"""The Gaussian mixture: EM against enumerated and score-function SVI, and ELBO and IWAE-K against the exact log p(x).

The data are ``data.num_points`` draws of a 2-D mixture c ~ Categorical(π), x | c ~ N(μ_c, Σ_c)
whose clusters overlap, so p(c|x) is uncertain for many points. From one k-means++ start
(:func:`~pyro_vae.exact.mixture_svi.init_params`) three fits climb the same likelihood:
scikit-learn's EM, (a) SVI with c enumerated (the loss is exactly −log p(x)) and (b) SVI with an
amortized guide q(c|x) whose c is sampled (score-function gradients for its network φ)
(:func:`~pyro_vae.exact.mixture_svi.fit`). The exact log p(x) of every fit comes from
:class:`~pyro_vae.exact.GaussianMixture`. **Fits**: each SVI fit's final mean log p(x) and
parameters against EM's, and the steps and seconds until it is within ``converged_within`` nats
per point of EM's. **Gradient variance**: tr Cov and ‖mean‖² of ``num_draws`` gradient draws at the
same parameters (the start with a fresh guide; the end of (b)), full batch and minibatch, of (a),
(b) and (b') = (b) with the sum over q(c|x) done exactly, the mean of (b). **Bounds**: with (b)'s
mixture, for the untrained and the trained guide, the mean IWAE-K (K = 1, 10, …,
``bounds.num_samples``; K = 1 is the ELBO) against the exact ELBO and log p(x):

    log p(x) − ELBO = KL(q(c|x) || p(c|x)),    log p(x) − E[L_K] → 0 as K → ∞
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Dict

import numpy as np
import pandas as pd
import torch

from .. import checks
from ..exact import GaussianMixture
from ..exact.mixture_svi import CategoricalGuide, TrainableGaussianMixture, fit, gradient_moments, init_params
from ..marginal import estimate_log_px
from .gaussian_mixture_figures import plot_bounds, plot_convergence, plot_fit


def check_config(cfg: Dict[str, Any]) -> None:
    """One-line ``ValueError`` for a value the study cannot use; counts given as 3.0 become 3."""
    def fail(key, value, need):
        raise ValueError(f"study gaussian_mixture: {key} must be {need}, got {value!r}")

    def count(section, key, minimum=1):
        node = cfg if section is None else cfg[section]
        node[key] = checks.positive_int(node[key], f"study gaussian_mixture: {section + '.' if section else ''}{key}",
                                        minimum=minimum)

    def positive(key, value):
        checks.positive_number(value, f"study gaussian_mixture: {key}")

    d, f = cfg["data"], cfg["fit"]
    for section, key in ((None, "threads"), ("data", "num_points"), ("fit", "num_components"), ("fit", "num_steps"),
                         ("fit", "hidden_dim"), ("fit", "eval_every"), ("bounds", "num_points"),
                         ("bounds", "num_samples")):
        count(section, key)
    if isinstance(cfg["seed"], bool) or not isinstance(cfg["seed"], int):
        fail("seed", cfg["seed"], "an integer")
    try:
        GaussianMixture.from_covariances(torch.tensor(d["weights"], dtype=torch.float64),
                                         torch.tensor(d["locs"], dtype=torch.float64), d["covariances"])
    except (ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"study gaussian_mixture: data.weights, data.locs and data.covariances do not make a "
                         f"mixture: {str(e).splitlines()[0]}") from None
    for key in ("lr", "reg_covar"):
        positive(f"fit.{key}", f[key])
    if f["final_lr"] is not None:
        positive("fit.final_lr", f["final_lr"])
    if f["covariance_type"] not in ("full", "diag"):
        fail("fit.covariance_type", f["covariance_type"], "full or diag")
    for key, value in (("fit.num_components", f["num_components"]), ("bounds.num_points", cfg["bounds"]["num_points"])):
        if value > d["num_points"]:
            fail(key, value, f"at most data.num_points = {d['num_points']}")
    tols = cfg["converged_within"]
    if not isinstance(tols, list) or not tols:
        fail("converged_within", tols, "a list of tolerances in nats per point, e.g. [0.01, 0.001]")
    for tol in tols:
        positive("converged_within", tol)
    g = cfg["gradient_variance"]
    count("gradient_variance", "num_draws", minimum=2)  # a variance needs two draws
    if not isinstance(g["batch_sizes"], list) or not g["batch_sizes"]:
        fail("gradient_variance.batch_sizes", g["batch_sizes"], "a list of batch sizes (null: full batch)")
    key = "study gaussian_mixture: gradient_variance.batch_sizes"
    g["batch_sizes"] = [b if b is None else checks.positive_int(b, key) for b in g["batch_sizes"]]


@contextlib.contextmanager
def _float64_and_threads(threads: int):
    """float64 by default and ``threads`` torch threads inside, as they were afterwards."""
    dtype, before = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        torch.set_num_threads(before)


def fit_em(x, init, cfg):
    """scikit-learn's EM from the same initialization as SVI (precisions_init = Σ⁻¹)."""
    from sklearn.mixture import GaussianMixture as EM

    precisions = torch.linalg.inv(init["covariances"])
    if cfg["covariance_type"] == "diag":
        precisions = precisions.diagonal(dim1=-2, dim2=-1)
    return EM(cfg["num_components"], covariance_type=cfg["covariance_type"], reg_covar=cfg["reg_covar"],
              tol=1e-12, max_iter=10_000, weights_init=init["weights"].numpy(), means_init=init["locs"].numpy(),
              precisions_init=precisions.numpy()).fit(x.numpy())


def gradient_variances(x, mixture, guide, num_draws, batch_size, seed):
    """tr Cov and squared norm of the mean of three gradient estimators at the same (θ, φ).

    (a) enumerate: c summed out in the model, empty guide: ∇θ of −log p(x) (θ only);
    (b) amortized: Trace_ELBO, c ~ q(c|x), score-function gradient for φ;
    (b') amortized, enumerated: TraceEnum_ELBO summing over q(c|x): the exact mean of (b).
    Losses are per data point; minibatches are drawn with replacement, so (a) and (b') carry
    only subsampling noise. Returns one row per estimator (φ's columns NaN for (a)).
    """
    from pyro.infer import Trace_ELBO, TraceEnum_ELBO, config_enumerate

    theta, phi = list(mixture.parameters()), list(guide.parameters())
    n_theta = sum(p.numel() for p in theta)
    enum, sampled = TraceEnum_ELBO(max_plate_nesting=1), Trace_ELBO(max_plate_nesting=1)
    estimators = {
        "enumerate": (lambda b: enum.differentiable_loss(config_enumerate(mixture.model), lambda x: None, b), theta),
        "amortized": (lambda b: sampled.differentiable_loss(mixture.model, guide.guide, b), theta + phi),
        "amortized_enumerated": (lambda b: enum.differentiable_loss(mixture.model, config_enumerate(guide.guide), b),
                                 theta + phi)}
    rows = []
    for name, (loss, params) in estimators.items():
        torch.manual_seed(seed)
        batch = (lambda: x) if batch_size is None else (lambda: x[torch.randint(len(x), (batch_size,))])
        mean, var = gradient_moments(lambda: loss(batch()) / (batch_size or len(x)), params, num_draws)
        row = {"estimator": name, "θ tr Cov": var[:n_theta].sum().item(),
               "θ ‖mean‖²": mean[:n_theta].pow(2).sum().item()}
        if len(params) > len(theta):
            row |= {"φ tr Cov": var[n_theta:].sum().item(), "φ ‖mean‖²": mean[n_theta:].pow(2).sum().item()}
        rows.append(row)
    return rows


def bounds_for(mixture, guide, x, K, seed, progress):
    """One row per K: the mean IWAE-K over the points of x (every prefix K = 1, 10, …, ``K`` of one
    set of draws), its gap to the exact log p(x) and the gap's standard error over points (paired
    with the exact value, so it holds only the Monte Carlo noise and the spread of the gap), with
    the exact ELBO and log p(x) of the exact ``mixture`` (a GaussianMixture) and the ``guide``."""
    result = estimate_log_px(mixture.model, guide.guide, x, num_samples=K, seed=seed, progress=progress, warn=False)
    with torch.no_grad():
        log_px, elbo = mixture.log_px(x), mixture.elbo(x, guide.probs(x)).mean().item()
        return [{"K": k, "IWAE-K": v.mean().item(), "gap": (log_px - v).mean().item(),
                 "gap SE": ((log_px - v).std() / math.sqrt(len(v))).item(), "exact ELBO": elbo,
                 "exact log p(x)": log_px.mean().item()} for k, v in result.log_px_by_k.items()]


def _markdown(df: pd.DataFrame, floatfmt) -> str:
    """``df`` as a Markdown table, a missing value as a dash."""
    return df.astype(object).where(df.notna(), None).to_markdown(index=False, floatfmt=floatfmt, missingval="–")


def run(cfg: Dict[str, Any], out: str, progress: bool = True):
    with _float64_and_threads(cfg["threads"]):
        return _run(cfg, out, progress)


def _run(cfg, out, progress):
    from tqdm.auto import tqdm

    d, f, seed = cfg["data"], cfg["fit"], cfg["seed"]
    true = GaussianMixture.from_covariances(d["weights"], d["locs"], d["covariances"])
    x, _ = true.sample(d["num_points"], torch.Generator().manual_seed(seed))
    init = init_params(x, f["num_components"], f["covariance_type"], f["reg_covar"], seed)

    # Fits from one initialization: EM, (a) enumerated SVI, (b) amortized score-function SVI.
    em = fit_em(x, init, f)
    kw = {k: f[k] for k in ("num_steps", "lr", "final_lr", "reg_covar", "hidden_dim", "eval_every")}
    runs = {m: fit(x, f["num_components"], m, f["covariance_type"], init=init, seed=seed, progress=progress, **kw)
            for m in ("enumerate", "amortized")}
    em_log_px = em.score(x.numpy())
    em_cov = em.covariances_ if f["covariance_type"] == "full" else np.stack([np.diag(v) for v in em.covariances_])
    rows = []
    for m, r in runs.items():
        fm = r.mixture.fixed()
        steps, seconds, log_px = np.array(r.log_px).T
        with torch.no_grad():
            elbo = fm.elbo(x, r.guide.probs(x)).mean().item() if r.guide else fm.log_px(x).mean().item()
        row = {"fit": {"enumerate": "(a) enumerated", "amortized": "(b) amortized"}[m], "mean log p(x)": log_px[-1],
               "EM's − it": em_log_px - log_px[-1], "mean ELBO": elbo,
               "max Δπ": np.abs(fm.weights.numpy() - em.weights_).max(),
               "max Δμ": np.abs(fm.locs.numpy() - em.means_).max(),
               "max ΔΣ": np.abs(fm.covariances.numpy() - em_cov).max(), "s per step": r.seconds / f["num_steps"]}
        for tol in cfg["converged_within"]:
            i = np.nonzero(em_log_px - log_px < tol)[0]  # NaN: never got there
            row |= {f"steps to {tol}": steps[i[0]] if len(i) else np.nan,
                    f"s to {tol}": seconds[i[0]] if len(i) else np.nan}
        rows.append(row)
    fits = pd.DataFrame(rows)
    plot_fit(os.path.join(out, "fit.png"), x, true, runs["enumerate"].mixture.fixed())

    # Gradient variance at the same parameters: the shared initialization (fresh guide) and the
    # end of the amortized run (its θ and trained φ).
    torch.manual_seed(seed)
    at = {"init": (TrainableGaussianMixture(**init, covariance_type=f["covariance_type"], reg_covar=f["reg_covar"]),
                   CategoricalGuide(x.shape[1], f["num_components"], f["hidden_dim"])),
          "trained": (runs["amortized"].mixture, runs["amortized"].guide)}
    g = cfg["gradient_variance"]
    settings = [(where, b) for where in at for b in g["batch_sizes"]]
    grads = pd.DataFrame([{"at": where, "batch": "full" if b is None else b, **row}
                          for where, b in tqdm(settings, desc="gradient variance", disable=not progress)
                          for row in gradient_variances(x, *at[where], g["num_draws"], b, seed)])
    plot_convergence(os.path.join(out, "convergence.png"), runs, em_log_px, grads)

    # ELBO, IWAE-K and exact log p(x) with the amortized run's model, for an untrained and its trained guide.
    b = cfg["bounds"]
    xb, mixture = x[:b["num_points"]], runs["amortized"].mixture.fixed()
    bounds = pd.DataFrame([{"guide": name, **row} for name, q in [("untrained q", at["init"][1]),
                                                                  ("trained q", runs["amortized"].guide)]
                           for row in bounds_for(mixture, q, xb, b["num_samples"], seed, progress)])
    plot_bounds(os.path.join(out, "bounds.png"), bounds)

    results = {"em": {"mean log p(x)": em_log_px, "iterations": int(em.n_iter_),
                      "true mean log p(x)": true.log_px(x).mean().item()},
               "fits": fits.to_dict(orient="records"), "gradient_variance": grads.to_dict(orient="records"),
               "bounds": bounds.to_dict(orient="records")}  # NaN: null in results.json (pyro_vae.studies)
    return results, _body(cfg, results, fits, grads, bounds)


def _body(cfg, results, fits, grads, bounds) -> str:
    f, em = cfg["fit"], results["em"]
    a, b = fits.iloc[0], fits.iloc[1]
    full = grads[grads["batch"] == "full"].set_index(["at", "estimator"])
    start, end = full.loc[("init", "amortized")], full.loc[("trained", "amortized")]
    first, last = bounds.groupby("guide", sort=False).first(), bounds.groupby("guide", sort=False).last()
    kl = first["exact log p(x)"] - first["exact ELBO"]
    k1 = ((first["gap"] - kl) / first["gap SE"]).abs().max()
    return f"""\
{cfg['data']['num_points']} points of a {len(cfg['data']['weights'])}-component 2-D mixture, fitted with \
{f['num_components']} {f['covariance_type']}-covariance components; SVI takes {f['num_steps']} full-batch Adam steps \
(lr {f['lr']} → {f['final_lr']}). Module docstring of `pyro_vae/studies/gaussian_mixture.py`: what each number is.

## Fits against scikit-learn's EM from the same start

EM reaches a mean log p(x) of {em['mean log p(x)']:.6f} nats per point in {em['iterations']} iterations \
(the true parameters: {em['true mean log p(x)']:.6f}). "EM's − it" is EM's mean log p(x) minus the fit's;
"max Δ·" the largest absolute difference from EM's parameters; "steps / s to tol" the first step (and
training seconds) at which the fit was within tol nats per point of EM's.

{_markdown(fits, ('s', '.6f', '.2e', '.6f', '.2e', '.2e', '.2e', '.4f') + ('g', '.2f') * len(cfg['converged_within']))}

The enumerated fit ends {a["EM's − it"]:.1e} nats per point from EM's optimum, the amortized one
{b["EM's − it"]:.1e}, its ELBO {b['mean log p(x)'] - b['mean ELBO']:.4f} nats below its log p(x) (the KL of its
guide to p(c|x)).

![fit](fit.png)

## Gradient variance at the same parameters

{cfg['gradient_variance']['num_draws']} gradient draws per estimator of the loss per data point; θ the
mixture's parameters, φ the guide network's; "init" is the shared start with a fresh guide,
"trained" the end of (b).

{_markdown(grads, ('s', 's', 's', '.3e', '.3e', '.3e', '.3e'))}

At full batch (a) and (b') are exact (tr Cov 0); the sampled (b) is not. Its φ gradient has tr Cov
{start['φ tr Cov']:.3g} against a squared mean of {start['φ ‖mean‖²']:.3g} at the start, and
{end['φ tr Cov']:.3g} against {end['φ ‖mean‖²']:.3g} after training.

![convergence and gradient variance](convergence.png)

## ELBO and IWAE-K against the exact log p(x)

{cfg['bounds']['num_points']} points, the amortized fit's mixture; IWAE-K is the mean over points, "gap" is
log p(x) − IWAE-K with its standard error over points (paired with the exact value).

{_markdown(bounds, ('s', 'g', '.6f', '.6f', '.2e', '.6f', '.6f'))}

At K = 1 the gap is the exact KL(q || p(c|x)) \
({', '.join(f'{v:.4f} {k}' for k, v in kl.items())}) to within {k1:.1f} SE; \
at K = {int(last['K'].iloc[0])} it is {', '.join(f'{v:.2e} {k}' for k, v in last['gap'].items())}.

![bounds](bounds.png)
"""
