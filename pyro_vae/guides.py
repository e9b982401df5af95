"""Amortized guides q(z|x). Each is an ``nn.Module`` whose ``forward(x)`` maps a batch x of shape
(B, D) to a reparameterizable Pyro distribution over z with batch shape (B,) and event shape
(latent_dim,). The VAE samples it at site "z" inside the data plate."""

from __future__ import annotations

from typing import Sequence

import pyro.distributions as dist
import torch.nn.functional as F
from torch import nn

from .nets import mlp
from .registry import Registry

GUIDES = Registry("guide")

MIN_SCALE = 1e-5  # keeps sigma(x) away from 0, where log q(z|x) overflows


class Guide(nn.Module):
    """Base class of amortized guides q(z|x)."""

    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__()
        self.data_dim, self.latent_dim = int(data_dim), int(latent_dim)

    def forward(self, x) -> dist.TorchDistribution:  # pragma: no cover - interface
        raise NotImplementedError


@GUIDES.register("diagonal_normal")
class DiagonalNormalGuide(Guide):
    """q(z|x) = N(z; mu(x), diag sigma(x)^2), with mu and sigma = softplus(.) + MIN_SCALE from one
    encoder MLP ``D -> hidden -> 2 * latent_dim``. Sampling is reparameterized:
    z = mu(x) + sigma(x) * eps, eps ~ N(0, I)."""

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (200, 200),
                 activation: str = "tanh"):
        super().__init__(data_dim, latent_dim)
        self.net = mlp([self.data_dim, *hidden, 2 * self.latent_dim], activation)

    def forward(self, x):
        loc, raw_scale = self.net(x).chunk(2, dim=-1)
        return dist.Normal(loc, F.softplus(raw_scale) + MIN_SCALE).to_event(1)
