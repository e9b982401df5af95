"""The run's figures (PNG). matplotlib is imported here only, with the file-only Agg backend."""

from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str) -> None:
    # Write to a temporary name, then rename: a crash never leaves a truncated PNG.
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    _plt().close(fig)


def elbo_curves(history: List[Dict[str, float]], path: str) -> None:
    """Train and validation ELBO and its two terms per epoch."""
    plt = _plt()
    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("elbo", "log_lik", "kl"),
                              ("ELBO", "E_q[log p(x|z)]", "KL(q(z|x) || p(z))")):
        for split in ("train", "val"):
            values = [r.get(f"{split}_{key}") for r in history]
            if any(v is not None for v in values):
                ax.plot(epochs, [np.nan if v is None else v for v in values], label=split)
        ax.set(title=title + " (nats per image)", xlabel="epoch")
        ax.legend()
    save_figure(fig, path)


def image_grid(rows: Sequence[np.ndarray], shape: Tuple[int, int], path: str,
               row_titles: Sequence[str] = (), title: str = "") -> None:
    """Rows of flattened images in [0, 1], one matplotlib row per entry of ``rows``."""
    plt = _plt()
    n_rows, n_cols = len(rows), len(rows[0])
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(n_cols * 0.9, n_rows * 0.95), squeeze=False)
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


def latent_space(z: np.ndarray, labels: np.ndarray, path: str) -> None:
    """Guide means coloured by label; projected on the first two principal components when the
    latent has more than two dimensions."""
    plt = _plt()
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
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    points = ax.scatter(z[:, 0], z[:, 1], c=labels, cmap="tab10", s=6, vmin=-0.5, vmax=9.5)
    fig.colorbar(points, ax=ax, ticks=range(10), label="label")
    ax.set(xlabel=xlabel, ylabel=ylabel, title="test set: mean of q(z|x)")
    save_figure(fig, path)
