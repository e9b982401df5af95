"""Gaussian mixture worked example: fit, gradient variance, convergence, bounds vs exact log p(x).

    python experiments/gaussian_mixture/run.py [--config config.yaml] [--out DIR]

Writes into DIR (default experiments/gaussian_mixture/figures):
    fit.png         data coloured by the exact responsibilities p(c|x) of the enumerated fit,
                    fitted 1σ/2σ ellipses (solid) and true ones (dashed)
    convergence.png exact mean log p(x) vs step and vs seconds for (a) enumerated and
                    (b) amortized score-function SVI against EM's optimum; (b)'s loss curve;
                    gradient variances of (a), (b), (b') at the same parameters
    bounds.png      ELBO, IWAE-K (K = 1, 10, 100, 1000) and exact log p(x), for an untrained
                    and a trained guide, and their gaps to log p(x)
    results.json    every number behind the figures
"""

from __future__ import annotations

import argparse
import json
import math
import os

import matplotlib
import numpy as np
import torch
import yaml
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, config_enumerate
from sklearn.mixture import GaussianMixture as EM

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Ellipse  # noqa: E402

from mixture_svi import CategoricalGuide, TrainableGaussianMixture, fit, gradient_moments, init_params  # noqa: E402
from pyro_vae.exact import GaussianMixture  # noqa: E402
from pyro_vae.marginal import estimate_log_px  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
COLORS = np.array([[0.85, 0.2, 0.15], [0.15, 0.45, 0.85], [0.2, 0.7, 0.25], [0.9, 0.6, 0.1], [0.5, 0.3, 0.7]])


def fit_em(x, init, cfg):
    """scikit-learn's EM from the same initialization as SVI (precisions_init = Σ⁻¹)."""
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
    only subsampling noise.
    """
    theta, phi = list(mixture.parameters()), list(guide.parameters())
    n_theta = sum(p.numel() for p in theta)
    enum, sampled = TraceEnum_ELBO(max_plate_nesting=1), Trace_ELBO(max_plate_nesting=1)
    estimators = {
        "enumerate": (lambda b: enum.differentiable_loss(config_enumerate(mixture.model), lambda x: None, b), theta),
        "amortized": (lambda b: sampled.differentiable_loss(mixture.model, guide.guide, b), theta + phi),
        "amortized_enumerated": (lambda b: enum.differentiable_loss(mixture.model, config_enumerate(guide.guide), b),
                                 theta + phi)}
    out = {}
    for name, (loss, params) in estimators.items():
        torch.manual_seed(seed)
        batch = (lambda: x) if batch_size is None else (lambda: x[torch.randint(len(x), (batch_size,))])
        mean, var = gradient_moments(lambda: loss(batch()) / (batch_size or len(x)), params, num_draws)
        out[name] = {"theta_trace_cov": var[:n_theta].sum().item(), "theta_mean_sq": mean[:n_theta].pow(2).sum().item()}
        if len(params) > len(theta):
            out[name] |= {"phi_trace_cov": var[n_theta:].sum().item(), "phi_mean_sq": mean[n_theta:].pow(2).sum().item()}
    return out


def ellipse(ax, loc, cov, n_std, **kw):
    values, vectors = np.linalg.eigh(cov)
    angle = np.degrees(np.arctan2(vectors[1, -1], vectors[0, -1]))
    ax.add_patch(Ellipse(loc, *(2 * n_std * np.sqrt(values[::-1])), angle=angle, fill=False, **kw))


def plot_fit(path, x, true, fitted):
    fig, ax = plt.subplots(figsize=(6, 5.5))
    colors = fitted.posterior_probs(x).numpy() @ COLORS[:fitted.num_components]
    ax.scatter(x[:, 0], x[:, 1], c=colors, s=8, alpha=0.8, linewidths=0)
    for c in range(fitted.num_components):
        for n_std in (1, 2):
            ellipse(ax, fitted.locs[c].numpy(), fitted.covariances[c].numpy(), n_std, color=COLORS[c], lw=2)
        ellipse(ax, true.locs[c].numpy(), true.covariances[c].numpy(), 2, color="k", lw=1, ls="--")
    ax.set_title("Enumerated SVI fit: points coloured by p(c | x)\nsolid: fitted 1σ, 2σ; dashed: true 2σ")
    ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


ESTIMATORS = {"enumerate": ("(a) enumerated c, ∇θ log p(x)", "C0"),
              "amortized": ("(b) sampled q(c|x), score function", "C1"),
              "amortized_enumerated": ("(b') q(c|x) summed exactly", "C2")}


def plot_convergence(path, runs, em_log_px, variances):
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8), gridspec_kw={"width_ratios": [1, 1, 1.3]})
    for name, run in runs.items():
        steps, seconds, log_px = np.array(run.log_px).T
        label, color = ESTIMATORS[name]
        # (b)'s training loss is a one-sample −ELBO estimate (smoothed over 25 steps to stay
        # mostly above 0 on the log axis); (a)'s is exactly −log p(x), the curve itself.
        if name == "amortized":
            smooth = np.convolve(run.losses, np.ones(25) / 25, mode="valid")
            axes[0].plot(np.arange(25, len(run.losses) + 1), smooth + em_log_px, color=color, alpha=0.4, lw=0.8,
                         label="(b) training loss (−ELBO estimate, 25-step mean) − EM's −log p(x)")
        axes[0].plot(steps, em_log_px - log_px, color=color, label=label)
        axes[1].plot(seconds, em_log_px - log_px, color=color, label=label)
    for ax, xlabel in zip(axes[:2], ["SVI step (full batch)", "training seconds"]):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("EM's log p(x) − exact log p(x) of the fit (nats/point)")
        ax.legend(fontsize=7)
    axes[0].set_title("Convergence: exact mean log p(x) of the current fit")
    # Grouped bars: tr Cov of each estimator's gradient, per parameter group, at four settings.
    groups = [(where, batch) for where in variances for batch in variances[where]]
    bars = [(est, grp) for est in ESTIMATORS for grp in ("theta", "phi") if not (est == "enumerate" and grp == "phi")]
    width = 0.8 / len(bars)
    for j, (est, grp) in enumerate(bars):
        values = [max(variances[w][b][est][f"{grp}_trace_cov"], 1e-12) for w, b in groups]  # exact 0 at the floor
        axes[2].bar(np.arange(len(groups)) + (j - len(bars) / 2 + 0.5) * width, values, width,
                    color=ESTIMATORS[est][1], hatch="//" if grp == "phi" else None, edgecolor="w",
                    label=f"{ESTIMATORS[est][0].split(',')[0]} ∇{'θ' if grp == 'theta' else 'φ'}")
    axes[2].set_xticks(range(len(groups)), [f"{w}\n{'full batch' if b == 'None' else 'batch ' + b}"
                                            for w, b in groups])
    axes[2].set_yscale("log")
    axes[2].set_ylabel("tr Cov[gradient] per draw (1e-12 = exactly 0)")
    axes[2].set_title("Gradient variance at the same parameters\n(θ: mixture, φ: guide network, hatched)")
    axes[2].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_bounds(path, bounds):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, b) in enumerate(bounds.items()):
        ks = sorted(int(k) for k in b["iwae"])
        mean = np.array([b["iwae"][str(k)] for k in ks])
        sem = np.array([b["gap_sem"][str(k)] for k in ks])
        axes[0].errorbar(ks, mean, yerr=2 * sem, marker="o", capsize=3, color=f"C{i}", label=f"IWAE-K, {name}")
        axes[0].axhline(b["exact_elbo"], color=f"C{i}", ls=":", label=f"exact ELBO, {name}")
        gap = b["exact_log_px"] - mean
        axes[1].errorbar(ks, gap, yerr=2 * sem, marker="o", capsize=3, color=f"C{i}", label=f"log p(x) − IWAE-K, {name}")
        axes[1].axhline(b["exact_log_px"] - b["exact_elbo"], color=f"C{i}", ls=":", label=f"exact KL(q || p(c|x)), {name}")
    axes[0].axhline(next(iter(bounds.values()))["exact_log_px"], color="k", lw=1.5, label="exact log p(x)")
    axes[0].set_ylabel("mean over points (nats)")
    axes[0].set_title("ELBO (K = 1) and IWAE-K rise to the exact log p(x)")
    axes[1].set_yscale("symlog", linthresh=1e-3)
    axes[1].set_ylabel("gap to exact log p(x) (nats, symlog)")
    axes[1].set_title("Gap per point, averaged (error bars: 2 SE of the paired mean)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("K (importance samples from q(c|x))")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def bounds_for(mixture, guide, x, K, seed):
    """Mean ELBO, IWAE-K for every prefix K, exact ELBO and exact log p(x) over the points of x,
    for the exact ``mixture`` (a GaussianMixture) and the amortized ``guide``.

    ``gap_sem`` is the standard error of the mean of log p(x_n) − log p̂_K(x_n) over points: paired
    with the exact value, so it holds only the Monte Carlo noise and the spread of the gap.
    """
    result = estimate_log_px(mixture.model, guide.guide, x, num_samples=K, seed=seed, progress=False, warn=False)
    with torch.no_grad():
        log_px = mixture.log_px(x)
        gaps = {str(k): log_px - v for k, v in result.log_px_by_k.items()}
        return {"iwae": {str(k): v.mean().item() for k, v in result.log_px_by_k.items()},
                "gap_sem": {k: (v.std() / math.sqrt(len(v))).item() for k, v in gaps.items()},
                "exact_elbo": mixture.elbo(x, guide.probs(x)).mean().item(),
                "exact_log_px": log_px.mean().item()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(HERE, "config.yaml"))
    parser.add_argument("--out", default=os.path.join(HERE, "figures"))
    args = parser.parse_args()
    with open(args.config) as f:
        cfg = yaml.safe_load(f)
    torch.set_num_threads(cfg["threads"])
    torch.set_default_dtype(torch.float64)
    os.makedirs(args.out, exist_ok=True)
    d, f = cfg["data"], cfg["fit"]
    true = GaussianMixture.from_covariances(d["weights"], d["locs"], d["covariances"])
    x, _ = true.sample(d["num_points"], torch.Generator().manual_seed(cfg["seed"]))
    init = init_params(x, f["num_components"], f["covariance_type"], f["reg_covar"], cfg["seed"])
    results = {"config": cfg}

    # Fit three ways from one initialization: EM, (a) enumerated SVI, (b) amortized score-function SVI.
    em = fit_em(x, init, f)
    kw = {k: f[k] for k in ("num_steps", "lr", "final_lr", "reg_covar", "hidden_dim", "eval_every")}
    runs = {m: fit(x, f["num_components"], m, f["covariance_type"], init=init, seed=cfg["seed"], **kw)
            for m in ("enumerate", "amortized")}
    em_log_px = em.score(x.numpy())
    fitted = runs["enumerate"].mixture.fixed()
    em_cov = em.covariances_ if f["covariance_type"] == "full" else np.stack([np.diag(v) for v in em.covariances_])
    results["sklearn"] = {"em_mean_log_px": em_log_px, "em_iterations": int(em.n_iter_),
                          "true_mean_log_px": true.log_px(x).mean().item()}
    for m, run in runs.items():
        fm = run.mixture.fixed()
        steps, seconds, log_px = np.array(run.log_px).T
        first = lambda a: float(a[0]) if len(a) else None  # noqa: E731  (None: never got there)
        reached = {str(tol): np.nonzero(em_log_px - log_px < tol)[0] for tol in cfg["converged_within"]}
        with torch.no_grad():
            elbo = fm.elbo(x, run.guide.probs(x)).mean().item() if run.guide else fm.log_px(x).mean().item()
        results[m] = {"final_mean_log_px": log_px[-1], "gap_to_em": em_log_px - log_px[-1], "final_mean_elbo": elbo,
                      "max_abs_diff_weights": np.abs(fm.weights.numpy() - em.weights_).max(),
                      "max_abs_diff_locs": np.abs(fm.locs.numpy() - em.means_).max(),
                      "max_abs_diff_covariances": np.abs(fm.covariances.numpy() - em_cov).max(),
                      "seconds": run.seconds, "seconds_per_step": run.seconds / f["num_steps"],
                      "steps_to_within": {tol: first(steps[i]) for tol, i in reached.items()},
                      "seconds_to_within": {tol: first(seconds[i]) for tol, i in reached.items()}}
    plot_fit(os.path.join(args.out, "fit.png"), x, true, fitted)

    # Gradient variance at the same parameters: the shared initialization (fresh guide) and the
    # end of the amortized run (its θ and trained φ).
    torch.manual_seed(cfg["seed"])
    at = {"init": (TrainableGaussianMixture(**init, covariance_type=f["covariance_type"], reg_covar=f["reg_covar"]),
                   CategoricalGuide(x.shape[1], f["num_components"], f["hidden_dim"])),
          "trained": (runs["amortized"].mixture, runs["amortized"].guide)}
    g = cfg["gradient_variance"]
    results["gradient_variance"] = {where: {str(b): gradient_variances(x, m, q, g["num_draws"], b, cfg["seed"])
                                            for b in g["batch_sizes"]} for where, (m, q) in at.items()}
    plot_convergence(os.path.join(args.out, "convergence.png"), runs, em_log_px, results["gradient_variance"])

    # ELBO, IWAE-K and exact log p(x) with the amortized run's model, for an untrained and its trained guide.
    b = cfg["bounds"]
    xb = x[:b["num_points"]]
    results["bounds"] = {name: bounds_for(runs["amortized"].mixture.fixed(), q, xb, b["num_samples"], cfg["seed"])
                         for name, q in [("untrained q", at["init"][1]), ("trained q", runs["amortized"].guide)]}
    plot_bounds(os.path.join(args.out, "bounds.png"), results["bounds"])
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1, default=float)
    print(json.dumps({k: v for k, v in results.items() if k != "config"}, indent=1, default=float))


if __name__ == "__main__":
    main()
