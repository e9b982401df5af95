"""The figures of the Gaussian-mixture study (:mod:`pyro_vae.studies.gaussian_mixture`): the fit
with its ellipses, convergence and gradient variance, and the bounds against K."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..figures import new_figure, save_figure

COLORS = np.array([[0.85, 0.2, 0.15], [0.15, 0.45, 0.85], [0.2, 0.7, 0.25], [0.9, 0.6, 0.1], [0.5, 0.3, 0.7]])
ESTIMATORS = {"enumerate": ("(a) enumerated c, ∇θ log p(x)", "C0"),
              "amortized": ("(b) sampled q(c|x), score function", "C1"),
              "amortized_enumerated": ("(b') q(c|x) summed exactly", "C2")}


def _ellipse(ax, loc, cov, n_std, **kw):
    from matplotlib.patches import Ellipse

    values, vectors = np.linalg.eigh(cov)
    angle = np.degrees(np.arctan2(vectors[1, -1], vectors[0, -1]))
    ax.add_patch(Ellipse(loc, *(2 * n_std * np.sqrt(values[::-1])), angle=angle, fill=False, **kw))


def plot_fit(path, x, true, fitted):
    """Points coloured by the fit's exact p(c|x), its 1σ and 2σ ellipses (solid), the true 2σ (dashed)."""
    fig = new_figure(figsize=(6, 5.5))
    ax = fig.add_subplot()
    colors = fitted.posterior_probs(x).numpy() @ COLORS[:fitted.num_components]
    ax.scatter(x[:, 0], x[:, 1], c=colors, s=8, alpha=0.8, linewidths=0)
    for c in range(fitted.num_components):
        for n_std in (1, 2):
            _ellipse(ax, fitted.locs[c].numpy(), fitted.covariances[c].numpy(), n_std, color=COLORS[c], lw=2)
    for c in range(true.num_components):
        _ellipse(ax, true.locs[c].numpy(), true.covariances[c].numpy(), 2, color="k", lw=1, ls="--")
    ax.set_title("Enumerated SVI fit: points coloured by p(c | x)\nsolid: fitted 1σ, 2σ; dashed: true 2σ")
    ax.set_aspect("equal")
    save_figure(fig, path, dpi=90)


def plot_convergence(path, runs, em_log_px, grads: pd.DataFrame):
    """EM's log p(x) − the fit's against step and seconds; tr Cov of each estimator's gradient."""
    fig = new_figure(figsize=(18, 4.8))
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.3]})
    for name, run in runs.items():
        steps, seconds, log_px = np.array(run.log_px).T
        label, color = ESTIMATORS[name]
        # (b)'s training loss is a one-sample −ELBO estimate (smoothed over 25 steps to stay
        # mostly above 0 on the log axis); (a)'s is exactly −log p(x), the curve itself.
        if name == "amortized":
            w = min(25, len(run.losses))
            smooth = np.convolve(run.losses, np.ones(w) / w, mode="valid")
            axes[0].plot(np.arange(w, len(run.losses) + 1), smooth + em_log_px, color=color, alpha=0.4, lw=0.8,
                         label=f"(b) training loss (−ELBO estimate, {w}-step mean) − EM's −log p(x)")
        axes[0].plot(steps, em_log_px - log_px, color=color, label=label)
        axes[1].plot(seconds, em_log_px - log_px, color=color, label=label)
    for ax, xlabel in zip(axes[:2], ["SVI step (full batch)", "training seconds"]):
        ax.set(yscale="log", xlabel=xlabel, ylabel="EM's log p(x) − exact log p(x) of the fit (nats/point)")
        ax.legend(fontsize=7)
    axes[0].set_title("Convergence: exact mean log p(x) of the current fit")
    groups = list(grads.groupby(["at", "batch"], sort=False))
    bars = [(est, grp) for est in ESTIMATORS for grp in "θφ" if not (est == "enumerate" and grp == "φ")]
    width = 0.8 / len(bars)
    for j, (est, grp) in enumerate(bars):
        values = [max(rows.set_index("estimator").loc[est, f"{grp} tr Cov"], 1e-12) for _, rows in groups]
        axes[2].bar(np.arange(len(groups)) + (j - len(bars) / 2 + 0.5) * width, values, width,  # 1e-12: exactly 0
                    color=ESTIMATORS[est][1], hatch="//" if grp == "φ" else None, edgecolor="w",
                    label=f"{ESTIMATORS[est][0].split(',')[0]} ∇{grp}")
    axes[2].set_xticks(range(len(groups)), [f"{at}\n{batch}" for (at, batch), _ in groups])
    axes[2].set(yscale="log", ylabel="tr Cov[gradient] per draw (1e-12 = exactly 0)",
                title="Gradient variance at the same parameters\n(θ: mixture, φ: guide network, hatched)")
    axes[2].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    save_figure(fig, path, dpi=90)


def plot_bounds(path, bounds: pd.DataFrame):
    """Mean IWAE-K and the exact ELBO and log p(x) against K, and the gaps, for each guide."""
    fig = new_figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2)
    for i, (name, b) in enumerate(bounds.groupby("guide", sort=False)):
        elbo, log_px = b["exact ELBO"].iloc[0], b["exact log p(x)"].iloc[0]
        axes[0].errorbar(b["K"], b["IWAE-K"], yerr=2 * b["gap SE"], marker="o", capsize=3, color=f"C{i}",
                         label=f"IWAE-K, {name}")
        axes[0].axhline(elbo, color=f"C{i}", ls=":", label=f"exact ELBO, {name}")
        axes[1].errorbar(b["K"], b["gap"], yerr=2 * b["gap SE"], marker="o", capsize=3, color=f"C{i}",
                         label=f"log p(x) − IWAE-K, {name}")
        axes[1].axhline(log_px - elbo, color=f"C{i}", ls=":", label=f"exact KL(q || p(c|x)), {name}")
    axes[0].axhline(bounds["exact log p(x)"].iloc[0], color="k", lw=1.5, label="exact log p(x)")
    axes[0].set(ylabel="mean over points (nats)", title="ELBO (K = 1) and IWAE-K rise to the exact log p(x)")
    axes[1].set_yscale("symlog", linthresh=1e-3)
    axes[1].set(ylabel="gap to exact log p(x) (nats, symlog)",
                title="Gap per point, averaged (error bars: 2 SE of the paired mean)")
    for ax in axes:
        ax.set(xscale="log", xlabel="K (importance samples from q(c|x))")
        ax.legend(fontsize=7)
    save_figure(fig, path, dpi=90)
