"""Yardsticks of a clustering of labelled images: the unsupervised accuracy (the best one-to-one
map of clusters to labels) and k-means on the pixels, the baseline a clustering model must beat."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["cluster_accuracy", "kmeans_clusters"]


def _array(values, what: str) -> np.ndarray:
    if values is None:
        raise ValueError(f"cluster accuracy needs the true {what}, got None; give the labels of the points "
                         f"clustered (a dataset without labels has no accuracy)")
    return np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values).reshape(-1)


def cluster_accuracy(labels, clusters) -> float:
    """Unsupervised clustering accuracy: the fraction of points whose cluster, mapped one-to-one to
    a label by the best matching (Hungarian method on the cluster × label contingency table), is
    their label. Clusters left without a label (more clusters than labels) count as wrong.

    :param labels: the true labels, one per point (any hashable values).
    :param clusters: the assigned clusters, one per point.
    """
    from scipy.optimize import linear_sum_assignment  # lazy: the core imports only torch, pyro, numpy

    labels, clusters = _array(labels, "labels"), _array(clusters, "clusters")
    if labels.shape != clusters.shape or labels.size == 0:
        raise ValueError(f"labels and clusters must be non-empty and of one length, got {labels.size} "
                         f"and {clusters.size}")
    _, label_idx = np.unique(labels, return_inverse=True)
    _, cluster_idx = np.unique(clusters, return_inverse=True)
    table = np.zeros((cluster_idx.max() + 1, label_idx.max() + 1), dtype=np.int64)
    np.add.at(table, (cluster_idx, label_idx), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / labels.size)


def kmeans_clusters(train_x: torch.Tensor, x: torch.Tensor, num_clusters: int, seed: int,
                    restarts: int = 10) -> np.ndarray:
    """k-means on the pixels: scikit-learn's ``KMeans`` (``restarts`` k-means++ starts, the best
    kept, ``random_state=seed``) fitted to the rows of ``train_x``; the nearest centre of each row
    of ``x``, shape (len(x),)."""
    from sklearn.cluster import KMeans  # lazy, as above

    km = KMeans(num_clusters, n_init=restarts, random_state=seed).fit(train_x.cpu().double().numpy())
    return km.predict(x.cpu().double().numpy())
