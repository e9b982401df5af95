"""The VAE: a prior p(z), a likelihood p(x|z) with a decoder and an amortized guide q(z|x).

    model(x):  for n in data plate:  z_n ~ p(z);   x_n ~ p(x | z_n)   (observed)
    guide(x):  for n in data plate:  z_n ~ q(z | x_n)                  (reparameterized)

Both are plain Pyro functions, usable with any ``pyro.infer`` ELBO and ``pyro.infer.SVI``:

    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    svi.step(x_batch, num_data=len(train_x))

With ``num_data`` > len(x) the data plate is subsampled, so Pyro scales each per-point term by
num_data / len(x) and the loss estimates the full-data ELBO (:meth:`LatentVariableModel.data_plate`).
"""

from __future__ import annotations

import pyro
import torch

from .base import LatentVariableModel
from .guides import Guide
from .likelihoods import Likelihood
from .objectives.elbo import elbo_terms
from .priors import Prior


class VAE(LatentVariableModel):
    """Composes ``prior`` p(z), ``likelihood`` p(x|z) and ``encoder``, the guide family q(z|x).

    Parameters live in this module and are registered with Pyro's param store as ``vae0``,
    ``vae1``, ... (see :class:`pyro_vae.base.LatentVariableModel`).

    :param prior: p(z), a :class:`pyro_vae.priors.Prior`.
    :param likelihood: p(x|z), a :class:`pyro_vae.likelihoods.Likelihood`.
    :param encoder: q(z|x), a :class:`pyro_vae.guides.Guide`.
    :param name: the name in Pyro's param store (default ``vae<k>``).
    """

    name_prefix = "vae"

    def __init__(self, prior: Prior, likelihood: Likelihood, encoder: Guide, name: str | None = None):
        super().__init__(likelihood, name)
        dims = {prior.latent_dim, likelihood.latent_dim, encoder.latent_dim}
        if len(dims) != 1 or likelihood.data_dim != encoder.data_dim:
            raise ValueError("prior, likelihood and guide disagree on latent_dim or data_dim")
        self.prior, self.encoder = prior, encoder

    def model(self, x: torch.Tensor, num_data: int | None = None):
        """p(x, z) = p(z) p(x|z), one (z_n, x_n) pair per row of x."""
        with self.data_plate(x, num_data):
            z = pyro.sample("z", self.prior())
            pyro.sample("x", self.likelihood(z), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None):
        """q(z|x) = prod_n q(z_n | x_n)."""
        with self.data_plate(x, num_data):
            pyro.sample("z", self.encoder(x))

    @torch.no_grad()
    def elbo_terms(self, x: torch.Tensor):
        """Per-point ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)), each term estimated with one
        z ~ q(z|x); the KL analytic where torch has it for (q, p) (:func:`pyro_vae.objectives.elbo.elbo_terms`).
        Returns (log_lik, kl), shape (N,)."""
        return elbo_terms(self.model, self.guide, x)

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """E[x | z] for z ~ p(z) (the decoder's mean image, not a noisy draw), shape (num_samples, D)."""
        z = self.prior().sample((num_samples,))
        return self.likelihood.mean(z)
