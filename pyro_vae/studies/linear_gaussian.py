"""The linear-Gaussian ELBO gap: ELBO, IWAE-K and exact log p(x) against K, and the IWAE gradient estimators.

The model is :class:`~pyro_vae.exact.linear_gaussian.LinearGaussian` (z ~ N(0, I_d),
x | z ~ N(W z + b, σ² I_D)), where log p(x) and p(z|x) are closed form; the guide is the exact
posterior with its mean moved and its scale widened (:meth:`LinearGaussianGuide.perturbed`). The
guide's error is the same at every x in the posterior's own coordinates, so every point has the
same gap distribution and two numbers describe it exactly:

    log p(x) − ELBO      = KL(q(z|x) || p(z|x))                          (K = 1)
    log p(x) − E[L_K]    = (I − 1) / (2K) + O(1/K²),   I = E_q[(p(z|x)/q(z|x))²]   (K large)

(:func:`~pyro_vae.exact.linear_gaussian.log_weight_second_moment`). **Bounds**: for each K,
``repeats`` independent draws of L_K(x_n) (:meth:`pyro_vae.objectives.IWAE.per_point`) at each of
``num_points`` points x_n ~ p(x), against the closed forms. **Gradients**: at one x,
``num_draws`` independent draws of the gradient of −L_K by each estimator (standard, STL, DReG):
total variance and signal-to-noise ratio ‖E g‖ / √tr Cov g for the guide's parameters (A, c, L)
and the model's offset b, and the bias against the standard estimator's mean (Tucker et al.
2018: STL is biased for K > 1; Rainforth et al. 2018: the standard guide SNR falls as K grows).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Sequence

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch

from ..checks import positive_int, positive_number
from ..exact.linear_gaussian import LinearGaussian, LinearGaussianGuide, gaussian_kl, log_weight_second_moment
from ..figures import new_figure, save_figure
from ..objectives import IWAE


def check_config(cfg: Dict[str, Any]) -> None:
    """A one-line ``ValueError`` for a value the study cannot use; integers given as 3.0 become 3."""
    for key in ("data_dim", "latent_dim"):
        cfg["model"][key] = positive_int(cfg["model"][key], f"model.{key}")
    cfg["model"]["sigma"] = positive_number(cfg["model"]["sigma"], "study linear_gaussian: model.sigma")
    cfg["guide"]["scale_factor"] = positive_number(cfg["guide"]["scale_factor"],
                                                   "study linear_gaussian: guide.scale_factor")
    cfg["bounds"]["num_points"] = positive_int(cfg["bounds"]["num_points"], "bounds.num_points")
    cfg["bounds"]["repeats"] = positive_int(cfg["bounds"]["repeats"], "bounds.repeats")
    cfg["gradients"]["num_draws"] = positive_int(cfg["gradients"]["num_draws"],
                                                 "gradients.num_draws (a variance needs two draws)", minimum=2)
    for section in ("bounds", "gradients"):
        ks = cfg[section]["num_particles"]
        if not isinstance(ks, list) or not ks:
            raise ValueError(f"study linear_gaussian: {section}.num_particles must be a list of K, got {ks!r}")
        cfg[section]["num_particles"] = [positive_int(k, f"{section}.num_particles") for k in ks]
    for name in cfg["gradients"]["estimators"]:
        if name not in IWAE.ESTIMATORS:
            raise ValueError(f"study linear_gaussian: gradients.estimators has {name!r}; choose from "
                             f"{', '.join(IWAE.ESTIMATORS)}")


def gradient_draws(lg: LinearGaussian, q: LinearGaussianGuide, x: torch.Tensor, estimator: str, K: int,
                   num_draws: int = 3000, seed: int = 0) -> torch.Tensor:
    """(num_draws, P) independent draws of the gradient of −L_K(x) for one point x (shape (1, D))
    with respect to the guide's parameters (A, c and the lower triangle of L: the first
    d·D + d + d(d+1)/2 columns) and the model's offset b (the last D columns).

    The point is repeated ``num_draws`` times, each copy with its own copy of the parameters, so
    one backward pass of the estimator gives ``num_draws`` independent draws."""
    A, c, L, b = (t.expand(num_draws, *t.shape).clone().requires_grad_() for t in (q.A, q.c, q.scale_tril, lg.b))
    x = x.expand(num_draws, -1)
    d = lg.dims[1]

    def model(x):
        with pyro.plate("data", num_draws):
            z = pyro.sample("z", dist.Normal(torch.zeros(d, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ lg.W.T + b, lg.sigma).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", num_draws):
            loc = torch.einsum("rij,rj->ri", A, x) + c
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=L.tril()))
    torch.manual_seed(seed)
    grads = torch.autograd.grad(IWAE(K, estimator).differentiable_loss(model, guide, x), (A, c, L, b))
    lower = torch.tril_indices(d, d)
    return torch.cat([grads[0].flatten(1), grads[1], grads[2][:, lower[0], lower[1]], grads[3]], 1)


def _bounds(lg, q, cfg, progress) -> pd.DataFrame:
    from tqdm.auto import tqdm

    x = lg.sample(cfg["num_points"], seed=cfg["seed"])
    log_px = lg.log_px(x)
    mean, cov = lg.posterior(x)
    tril = torch.linalg.cholesky(cov)
    kl = gaussian_kl(q.loc(x), q.scale_tril, mean, tril).mean().item()
    log_i = log_weight_second_moment(q.loc(x), q.scale_tril, mean, tril).mean().item()
    torch.manual_seed(cfg["seed"])
    rows = []
    for K in tqdm(cfg["num_particles"], desc="bounds: L_K for each K", disable=not progress):
        gaps = torch.cat([log_px - IWAE(K).per_point(lg.model, q.guide, x)[0] for _ in range(cfg["repeats"])])
        n = len(gaps)
        rows.append({"K": K, "E L_K": (log_px.mean() - gaps.mean()).item(), "gap": gaps.mean().item(), "gap SE": gaps.std().item() / math.sqrt(n),
                     "closed form": kl if K == 1 else math.expm1(log_i) / (2 * K) if math.isfinite(log_i) else math.inf,
                     "draws": n})
    df = pd.DataFrame(rows)
    df["gap / closed form"] = df["gap"] / df["closed form"]
    df["(gap − closed form) / SE"] = (df["gap"] - df["closed form"]) / df["gap SE"]
    df.attrs.update(kl=kl, second_moment=math.exp(log_i), log_px=log_px.mean().item())
    return df


def _gradients(lg, q, cfg, progress) -> pd.DataFrame:
    from tqdm.auto import tqdm

    x = lg.sample(1, seed=cfg["data_seed"])
    num_guide = sum(t.numel() for t in (q.A, q.c)) + lg.dims[1] * (lg.dims[1] + 1) // 2
    rows = []
    for K in tqdm(cfg["num_particles"], desc="gradients: each estimator at each K", disable=not progress):
        draws = {e: gradient_draws(lg, q, x, e, K, cfg["num_draws"], seed=cfg["seed"] + i)
                 for i, e in enumerate(cfg["estimators"])}
        reference = draws.get("standard")
        for estimator, g in draws.items():
            row = {"K": K, "estimator": estimator}
            for part, cols in (("guide", slice(0, num_guide)), ("model", slice(num_guide, None))):
                mean, var = g[:, cols].mean(0), g[:, cols].var(0)
                row[f"{part} variance"] = var.sum().item()
                row[f"{part} SNR"] = (mean.norm() / var.sum().sqrt()).item()
            if reference is not None and estimator != "standard":
                se = (reference.var(0) / len(reference) + g.var(0) / len(g)).sqrt()[:num_guide]
                row["bias |z| (max over guide params)"] = ((g.mean(0) - reference.mean(0))[:num_guide] / se).abs().max().item()
            rows.append(row)
    return pd.DataFrame(rows)


def _figures(bounds: pd.DataFrame, grads: pd.DataFrame, out: str) -> None:
    import os

    fig = new_figure(figsize=(5, 3.6))
    ax = fig.add_subplot()
    ax.errorbar(bounds["K"], bounds["gap"], yerr=2 * bounds["gap SE"], fmt="o", label="log p(x) − E[L_K], MC ± 2 SE")
    ks = np.geomspace(bounds["K"].min(), bounds["K"].max(), 50)
    if math.isfinite(bounds.attrs["second_moment"]):
        ax.plot(ks, (bounds.attrs["second_moment"] - 1) / (2 * ks), "--", label="(I − 1) / 2K")
    ax.axhline(bounds.attrs["kl"], color="grey", lw=0.8, label="KL(q || p(z|x)): the ELBO's gap")
    ax.set(xscale="log", yscale="log", xlabel="K", ylabel="nats per point", title="IWAE bound's gap to log p(x)")
    ax.legend(fontsize=7)
    save_figure(fig, os.path.join(out, "gap_vs_k.png"))

    fig = new_figure(figsize=(9, 3.4))
    for i, column in enumerate(("guide variance", "guide SNR", "model variance")):
        ax = fig.add_subplot(1, 3, i + 1)
        for estimator, part in grads.groupby("estimator", sort=False):
            ax.plot(part["K"], part[column], "o-", label=estimator)
        ax.set(xscale="log", yscale="log", xlabel="K", title=column)
        ax.legend(fontsize=7)
    save_figure(fig, os.path.join(out, "gradients_vs_k.png"))


def _markdown(df: pd.DataFrame, floatfmt: Sequence[str]) -> str:
    """``df`` as a Markdown table, a missing value as a dash."""
    return df.astype(object).where(df.notna(), None).to_markdown(index=False, floatfmt=floatfmt, missingval="–")


def _reading(grads: pd.DataFrame) -> str:
    """The gradient table's K = smallest against K = largest, in words, for the estimators run."""
    at = {e: part.set_index("K") for e, part in grads.groupby("estimator")}
    k0, k1 = grads["K"].min(), grads["K"].max()
    lines = []
    for e, part in at.items():
        lines.append(f"- {e}: guide variance {part.loc[k0, 'guide variance']:.4g} → {part.loc[k1, 'guide variance']:.4g}, "
                     f"guide SNR {part.loc[k0, 'guide SNR']:.3f} → {part.loc[k1, 'guide SNR']:.3f}, model SNR "
                     f"{part.loc[k0, 'model SNR']:.3f} → {part.loc[k1, 'model SNR']:.3f} from K = {k0} to K = {k1}"
                     + (f"; bias |z| {part.loc[k1, 'bias |z| (max over guide params)']:.1f} at K = {k1}"
                        if e != "standard" and "bias |z| (max over guide params)" in part else "") + ".")
    return ("Rainforth et al. (2018) predict the standard estimator's guide SNR to fall as 1/√K (a factor "
            f"{math.sqrt(k1 / k0):.1f} here) while the model's rises as √K; DReG's to rise; STL to be biased "
            "for K > 1 (Tucker et al. 2018). Measured:\n" + "\n".join(lines))


def run(cfg: Dict[str, Any], out: str, progress: bool = True):
    m, g = cfg["model"], cfg["guide"]
    lg = LinearGaussian.random(D=m["data_dim"], d=m["latent_dim"], sigma=m["sigma"], seed=m["seed"])
    q = LinearGaussianGuide.perturbed(lg, loc_shift=g["loc_shift"], scale_factor=g["scale_factor"], seed=g["seed"])
    bounds, grads = _bounds(lg, q, cfg["bounds"], progress), _gradients(lg, q, cfg["gradients"], progress)
    _figures(bounds, grads, out)
    big = bounds.iloc[-1]
    body = f"""\
Model: D = {m['data_dim']}, d = {m['latent_dim']}, σ = {m['sigma']}; guide: the exact posterior with its mean
moved {g['loc_shift']} posterior standard deviations and its scale × {g['scale_factor']}. In closed form
KL(q || p(z|x)) = {bounds.attrs['kl']:.4f} nats and I = E_q[(p(z|x)/q(z|x))²] = {bounds.attrs['second_moment']:.4f}
at every x. Module docstring of `pyro_vae/studies/linear_gaussian.py`: what each number is.

## Bounds against the exact log p(x)

{cfg['bounds']['num_points']} points x ~ p(x), {cfg['bounds']['repeats']} draws of L_K each; nats per point. "gap" is
log p(x) − L_K (mean ± SE over the draws; the mean exact log p(x) of the points is
{bounds.attrs['log_px']:.4f}); "closed form" is KL(q || p(z|x)) at K = 1 and the
first-order asymptote (I − 1)/(2K) above it.

{_markdown(bounds, ('g', '.4f', '.5f', '.5f', '.5f', 'g', '.3f', '.1f'))}

At K = 1 the bound is the ELBO, and its measured gap is the KL to within
{abs(bounds['(gap − closed form) / SE'].iloc[0]):.1f} SE. Above it the gap falls as 1/K; the first-order
asymptote leaves out terms of order (I − 1)²/K², which make the small-K gaps larger; at K =
{int(big['K'])} the measured gap is {big['gap / closed form']:.3f} of the asymptote,
{big['(gap − closed form) / SE']:+.1f} SE from it.

![gap against K](gap_vs_k.png)

## Gradient estimators of L_K

One x, {cfg['gradients']['num_draws']} independent gradient draws per estimator and K: total variance
(sum over parameters) and SNR = ‖E g‖ / √(tr Cov g) of the guide's parameters (A, c, L) and of the
model's offset b; "bias |z|" is the largest |mean difference| / SE against the standard
estimator over the guide's parameters (about 3 or less if unbiased).

{_markdown(grads, ('g', 's', '.4g', '.3f', '.4g', '.3f', '.1f'))}

{_reading(grads)}

![variance and SNR against K](gradients_vs_k.png)
"""
    results = {**bounds.attrs,
               "bounds": bounds.to_dict(orient="records"), "gradients": grads.to_dict(orient="records")}
    return results, body
