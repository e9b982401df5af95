"""Priors p(z). Each is an ``nn.Module`` whose ``forward()`` returns a Pyro distribution over z
with ``event_shape == (latent_dim,)``; the VAE samples it inside the data plate, which broadcasts
its batch shape. Learnable priors keep their parameters as module parameters."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from .registry import Registry

PRIORS = Registry("prior")


class Prior(nn.Module):
    """Base class of priors p(z) over a ``latent_dim``-dimensional latent."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = int(latent_dim)

    def forward(self) -> dist.TorchDistribution:  # pragma: no cover - interface
        raise NotImplementedError


@PRIORS.register("standard_normal")
class StandardNormalPrior(Prior):
    """p(z) = N(z; 0, I)."""

    def __init__(self, latent_dim: int):
        super().__init__(latent_dim)
        # Buffers, not constants, so .to(device/dtype) moves the prior with the networks.
        self.register_buffer("loc", torch.zeros(self.latent_dim))
        self.register_buffer("scale", torch.ones(self.latent_dim))

    def forward(self):
        return dist.Normal(self.loc, self.scale).to_event(1)
