"""Figures (PNG): a run's training curves, images and latent space, log p̂_K(x) against K, and AIS
and BDMC against the number of steps.

matplotlib is imported here only, lazily (the library core never needs it). Every figure is a
``matplotlib.figure.Figure`` on the file-only Agg canvas (:func:`new_figure`, the one place a
backend is chosen), not a pyplot figure: drawing one neither switches the process's pyplot
backend nor adds to its open figures, so the functions are safe in scripts, servers and
notebooks. :func:`save_figure` writes the PNG atomically. The drawing functions return the Figure.
"""

from __future__ import annotations

import io
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .checkpoint import atomic_write_bytes
from .metrics import mean_se


def new_figure(**kwargs):
    """A matplotlib Figure drawn by the Agg canvas; ``kwargs`` go to ``Figure`` (figsize, ...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str, dpi: int = 110) -> None:
    """Write ``fig`` as a PNG to ``path`` atomically: rendered in memory, then written to a
    temporary file that is renamed over ``path``, so a crash never leaves a truncated image."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def elbo_curves(history: List[Dict[str, float]], path: str):
    """Train and validation ELBO and its two terms per epoch."""
    epochs = [r["epoch"] for r in history]
    fig = new_figure(figsize=(13, 3.6))
    for ax, key, title in zip(fig.subplots(1, 3), ("elbo", "log_lik", "kl"),
                              ("ELBO", "E_q[log p(x|z)]", "KL(q(z|x) || p(z))")):
        for split in ("train", "val"):
            values = [r.get(f"{split}_{key}") for r in history]
            if any(v is not None for v in values):
                ax.plot(epochs, [np.nan if v is None else v for v in values], label=split)
        ax.set(title=title + " (nats per image)", xlabel="epoch")
        if ax.lines:
            ax.legend()
    save_figure(fig, path)
    return fig


def image_grid(rows: Sequence[np.ndarray], shape: Tuple[int, int], path: str,
               row_titles: Sequence[str] = (), title: str = ""):
    """Rows of flattened images in [0, 1], one matplotlib row per entry of ``rows``."""
    n_rows, n_cols = len(rows), len(rows[0])
    fig = new_figure(figsize=(n_cols * 0.9, n_rows * 0.95))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            ax = axes[r][c]
            ax.imshow(np.asarray(image).reshape(shape), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        if r < len(row_titles):
            axes[r][0].set_ylabel(row_titles[r], fontsize=8)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)
    return fig


def latent_space(z: np.ndarray, labels: np.ndarray, path: str, label_name: str = "label"):
    """Guide means coloured by ``labels`` (integers >= 0, named ``label_name`` on the colour bar);
    projected on the first two principal components when the latent has more than two dimensions."""
    z = np.asarray(z, dtype=np.float64)
    xlabel, ylabel = "z1", "z2"
    if z.shape[1] > 2:
        centred = z - z.mean(0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        z = centred @ vt[:2].T
        explained = s[:2] ** 2 / (s**2).sum()
        xlabel, ylabel = (f"PC{i + 1} ({100 * e:.0f}% var.)" for i, e in enumerate(explained))
    elif z.shape[1] == 1:
        z = np.concatenate([z, np.zeros_like(z)], 1)
    fig = new_figure(figsize=(5.5, 4.5))
    ax = fig.subplots()
    colours = max(10, int(np.max(labels)) + 1)
    points = ax.scatter(z[:, 0], z[:, 1], c=labels, cmap="tab10" if colours == 10 else "tab20", s=6, vmin=-0.5,
                        vmax=colours - 0.5)
    fig.colorbar(points, ax=ax, ticks=range(colours), label=label_name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title="test set: mean of q(z|x)")
    save_figure(fig, path)
    return fig


def plot_log_px_vs_k(results, exact: float | None = None, ax=None, title: str | None = None):
    """Draw the dataset mean of log p̂_K(x) against K (log axis), with error bars of ±1 standard
    error of the mean difference log p̂_K(x) − log p̂_Kmax(x) over data points (paired: the spread
    of log p(x) across the points cancels, so the bars say whether the curve still rises with K).

    E[log p̂_K] is a lower bound that rises with K toward log p(x) (K = 1: the ELBO). Each curve is
    computed from the first K particles of one estimate (``LogPxEstimate.log_px_by_k``).

    :param results: a :class:`pyro_vae.marginal.LogPxEstimate`, or a dict {label: LogPxEstimate}
        (e.g. ``{"guide": ..., "prior": ...}`` to show the naive estimator's failure).
    :param exact: the true mean log p(x), drawn as a horizontal line when known.
    :param ax: matplotlib axes to draw into; a new figure when None.
    :returns: the matplotlib Figure.
    """
    if not isinstance(results, dict):
        results = {results.method: results}
    if ax is None:
        ax = new_figure(figsize=(5, 3.5)).subplots()
    for label, result in results.items():
        if not result.log_px_by_k:
            raise ValueError(f"result {label!r} has no log_px_by_k (method={result.method!r}); "
                             f"plot an importance-sampling estimate, or pass the exact value as exact=")
        ks = sorted(result.log_px_by_k)
        top = result.log_px_by_k[ks[-1]]
        ax.errorbar(ks, [mean_se(result.log_px_by_k[k])["mean"] for k in ks],
                    yerr=[mean_se(result.log_px_by_k[k] - top)["se"] for k in ks], marker="o", capsize=3,
                    label=f"{label} (K ≤ {result.num_samples})")
    if exact is not None:
        ax.axhline(exact, color="k", linestyle="--", linewidth=1, label="exact log p(x)")
    ax.set_xscale("log")
    ax.set_xlabel("number of samples K\n(bars: ±1 s.e. of the mean of log p̂_K − log p̂_Kmax, paired over points)")
    ax.set_ylabel("mean log p̂_K(x)  [nats]")
    ax.set_title(title or "importance-weighted log p(x) estimate vs K")
    ax.legend(fontsize="small")
    ax.figure.tight_layout()
    return ax.figure


def plot_log_px_vs_steps(evaluation: dict, title: str | None = None):
    """AIS and BDMC of a run against the number of steps T (``evaluation.json``'s ``"ais"`` and
    ``"bdmc"`` entries, :func:`pyro_vae.evaluation.evaluate_ais_run`).

    Left: test images, the mean AIS log p̂(x) against T, one curve per (chains, points), bars ±1
    s.e. of the mean of AIS − IS (paired over points), and the importance-sampling means at K on
    the same points as horizontal lines. Right: data simulated from the model, the mean BDMC
    lower and upper bounds against T, closing as T grows, each gap annotated (mean ± s.e.).
    """
    fig = new_figure(figsize=(10, 3.8))
    left, right = fig.subplots(1, 2)
    curves = {}
    for e in evaluation.get("ais", []):
        curves.setdefault((e["num_chains"], e["num_points"]), []).append(e)
    for (M, n), entries in sorted(curves.items()):
        entries = sorted(entries, key=lambda e: e["num_steps"])
        left.errorbar([e["num_steps"] for e in entries], [e["log_px"]["mean"] for e in entries],
                      yerr=[e["ais_minus_is"]["se"] for e in entries], marker="o", capsize=3, label=f"AIS, M={M}, {n} images")
        for (k, v), style in zip(sorted(entries[-1]["is_log_px_by_k"].items(), key=lambda kv: int(kv[0])),
                                 ["dotted", "dashdot", "dashed", (0, (5, 1)), "solid"] * 4):
            if int(k) > 1:
                left.axhline(v["mean"], color="gray", linestyle=style, linewidth=1, label=f"IS, K={k}")
    left.set(xscale="log", xlabel="AIS steps T", ylabel="mean log p̂(x)  [nats]", title="test images")
    e = sorted(evaluation.get("bdmc", []), key=lambda e: e["num_steps"])
    if e:
        ts = [b["num_steps"] for b in e]
        for key, color, how in (("lower", "C0", "forward"), ("upper", "C3", "reverse")):
            right.plot(ts, [b[key]["mean"] for b in e], marker="o", color=color, label=f"BDMC {key} ({how} AIS)")
        right.fill_between(ts, [b["lower"]["mean"] for b in e], [b["upper"]["mean"] for b in e],
                           color="C1", alpha=0.2, label="gap")
        for b in e:
            right.annotate(f"{b['gap']['mean']:.2f}±{b['gap']['se']:.2f}", (b["num_steps"], b["upper"]["mean"]),
                           textcoords="offset points", xytext=(0, 6), ha="center", fontsize="x-small")
    right.set(xscale="log", xlabel="AIS steps T", ylabel="mean bound on log p(x̃)  [nats]",
              title="data simulated from the model")
    for ax in (left, right):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_gaps(result, title: str | None = None):
    """The inference gap of a :class:`pyro_vae.gaps.GapsResult`: left, the means over points of the
    approximation and amortization gaps stacked (± 1 s.e. over points), and the flexible guide's
    approximation gap when measured; right, the two gaps of every point against each other."""
    fig = new_figure(figsize=(9, 3.6))
    left, right = fig.subplots(1, 2)
    approx, amort = mean_se(result.approximation), mean_se(result.amortization)
    left.bar([0], [approx["mean"]], yerr=[approx["se"]], capsize=3, color="C0", label="approximation")
    left.bar([0], [amort["mean"]], bottom=[approx["mean"]], yerr=[amort["se"]], capsize=3, color="C1",
             label="amortization")
    ticks = ["family of the guide"]
    if result.elbo_flexible is not None:
        flex = mean_se(result.log_px - result.elbo_flexible)
        left.bar([1], [flex["mean"]], yerr=[flex["se"]], capsize=3, color="C2", label="approximation, full covariance")
        ticks.append("full covariance")
    left.set_xticks(range(len(ticks)), ticks)
    left.set(ylabel="nats per image", title="log p(x) − ELBO(q), mean over images")
    left.legend(fontsize="x-small")
    right.scatter(result.approximation.cpu(), result.amortization.cpu(), s=8)
    right.set(xlabel="approximation gap [nats]", ylabel="amortization gap [nats]", title="per image")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
