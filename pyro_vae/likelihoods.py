"""Likelihoods p(x|z) whose parameters come from a decoder network. Each is an ``nn.Module``:
``forward(z)`` returns a Pyro distribution over x with event shape (data_dim,); ``mean(z)`` is the
expected image (for figures); ``check_data(x)`` rejects data outside the support with a one-line
error before any training starts."""

from __future__ import annotations

from typing import Sequence

import pyro.distributions as dist
import torch
from torch import nn

from .nets import mlp
from .registry import Registry

LIKELIHOODS = Registry("likelihood")


class Likelihood(nn.Module):
    """Base class. ``binarize`` = True means the model is of binary pixels: training batches are
    binarized afresh each time they are drawn and evaluation data once, with a fixed seed."""

    support = "real numbers"
    binarize = False

    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__()
        self.data_dim, self.latent_dim = int(data_dim), int(latent_dim)

    def check_data(self, x: torch.Tensor, what: str = "data") -> None:
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).nonzero()[0].tolist()
            raise ValueError(
                f"{what} holds NaN or inf (first at index {bad}); clean or impute it before training"
            )

    def forward(self, z) -> dist.TorchDistribution:  # pragma: no cover - interface
        raise NotImplementedError

    def mean(self, z) -> torch.Tensor:
        return self(z).mean


@LIKELIHOODS.register("bernoulli")
class BernoulliLikelihood(Likelihood):
    """p(x|z) = prod_d Bernoulli(x_d; sigmoid(f(z))_d), f a decoder MLP ``latent -> hidden -> D``.
    Data are grey values in [0, 1], read as pixel-on probabilities and binarized."""

    support = "binary pixels; grey values in [0, 1] are binarized"
    binarize = True

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (200, 200),
                 activation: str = "tanh"):
        super().__init__(data_dim, latent_dim)
        self.net = mlp([self.latent_dim, *reversed(list(hidden)), self.data_dim], activation)

    def check_data(self, x, what="data"):
        super().check_data(x, what)
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            raise ValueError(
                f"{what} lies in [{lo:g}, {hi:g}] but the bernoulli likelihood needs values in "
                f"[0, 1]; rescale it (e.g. divide by the maximum pixel value)"
            )

    def forward(self, z):
        return dist.Bernoulli(logits=self.net(z)).to_event(1)
