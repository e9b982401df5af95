"""Figure: the importance-weighted estimate of log p(x) against the number of samples K.

E[log p̂_K] is a lower bound that rises with K toward log p(x) (K = 1: the ELBO). Each curve shows
the dataset mean of log p̂_K, computed from the first K particles of one run
(``LogPxEstimate.log_px_by_k``), with ±1 standard error of that mean over data points.
matplotlib is imported here only, never by the library core.
"""

from __future__ import annotations

import math


def plot_log_px_vs_k(results, exact: float | None = None, ax=None, title: str | None = None):
    """Draw mean log p̂_K(x) against K (log axis) for one or several estimates.

    :param results: a :class:`pyro_vae.marginal.LogPxEstimate`, or a dict {label: LogPxEstimate}
        (e.g. ``{"guide": ..., "prior": ...}`` to show the naive estimator's failure).
    :param exact: the true mean log p(x), drawn as a horizontal line when known.
    :param ax: matplotlib axes to draw into; a new figure when None.
    :returns: the matplotlib Figure.
    """
    import matplotlib.pyplot as plt  # lazy: keep matplotlib out of the library core

    if not isinstance(results, dict):
        results = {results.method: results}
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    for label, result in results.items():
        if not result.log_px_by_k:
            raise ValueError(f"result {label!r} has no log_px_by_k (method={result.method!r}); "
                             f"plot an importance-sampling estimate, or pass the exact value as exact=")
        ks = sorted(result.log_px_by_k)
        values = [result.log_px_by_k[k] for k in ks]
        means = [v.mean().item() for v in values]
        sems = [v.std().item() / math.sqrt(v.numel()) if v.numel() > 1 else 0.0 for v in values]
        ax.errorbar(ks, means, yerr=sems, marker="o", capsize=3, label=f"{label} (K ≤ {result.num_samples})")
    if exact is not None:
        ax.axhline(exact, color="k", linestyle="--", linewidth=1, label="exact log p(x)")
    ax.set_xscale("log")
    ax.set_xlabel("number of samples K")
    ax.set_ylabel("mean log p̂_K(x)  [nats]")
    ax.set_title(title or "importance-weighted log p(x) estimate vs K")
    ax.legend(fontsize="small")
    ax.figure.tight_layout()
    return ax.figure
