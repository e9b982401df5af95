"""The VAE: a prior p(z), a likelihood p(x|z) with a decoder and an amortized guide q(z|x).

    model(x):  for n in data plate:  z_n ~ p(z);   x_n ~ p(x | z_n)   (observed)
    guide(x):  for n in data plate:  z_n ~ q(z | x_n)                  (reparameterized)

Both are plain Pyro functions, usable with any ``pyro.infer`` ELBO and ``pyro.infer.SVI``:

    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    svi.step(x_batch, num_data=len(train_x))

With ``num_data`` > len(x) the data plate is subsampled, so Pyro scales each per-point term by
num_data / len(x) and the loss estimates the full-data ELBO.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import pyro
import torch
from torch import nn

from . import traces
from .guides import Guide
from .likelihoods import Likelihood
from .priors import Prior

_instance_ids = itertools.count()


class VAE(nn.Module):
    """Composes ``prior``, ``likelihood`` and ``encoder`` (the guide family q(z|x)).

    Parameters live in this module; ``model`` and ``guide`` register them with Pyro's param store
    under a name unique to the instance (``vae0``, ``vae1``, ...), so two VAEs in one process never
    share or overwrite each other's parameters."""

    def __init__(self, prior: Prior, likelihood: Likelihood, encoder: Guide, name: str | None = None):
        super().__init__()
        dims = {prior.latent_dim, likelihood.latent_dim, encoder.latent_dim}
        if len(dims) != 1 or likelihood.data_dim != encoder.data_dim:
            raise ValueError("prior, likelihood and guide disagree on latent_dim or data_dim")
        self.prior, self.likelihood, self.encoder = prior, likelihood, encoder
        self.data_dim, self.latent_dim = likelihood.data_dim, prior.latent_dim
        self.name = name or f"vae{next(_instance_ids)}"
        self._use_param_store = True

    @contextmanager
    def without_param_store(self):
        """Run ``model``/``guide`` without registering parameters with Pyro's param store, for
        loops where a torch optimizer over ``self.parameters()`` owns them (``pyro_vae.train``).
        Registration walks every parameter on each call: about 1 ms a training step."""
        previous, self._use_param_store = self._use_param_store, False
        try:
            yield self
        finally:
            self._use_param_store = previous

    def _data_plate(self, x, num_data):
        if x.dim() != 2 or x.shape[1] != self.data_dim:
            raise ValueError(
                f"expected x of shape (N, {self.data_dim}), got {tuple(x.shape)}; flatten images first"
            )
        batch = x.shape[0]
        if num_data is None or num_data == batch:
            return pyro.plate("data", batch)
        # The batch is a subsample of num_data points: the plate scales log-densities by
        # num_data / batch. Passing the indices (not subsample_size) keeps Pyro from drawing a
        # random subsample of its own, which would consume the RNG.
        return pyro.plate("data", num_data, subsample=torch.arange(batch, device=x.device))

    def model(self, x: torch.Tensor, num_data: int | None = None):
        """p(x, z) = p(z) p(x|z), one (z_n, x_n) pair per row of x."""
        if self._use_param_store:
            pyro.module(self.name, self)
        with self._data_plate(x, num_data):
            z = pyro.sample("z", self.prior())
            pyro.sample("x", self.likelihood(z), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None):
        """q(z|x) = prod_n q(z_n | x_n)."""
        if self._use_param_store:
            pyro.module(self.name, self)
        with self._data_plate(x, num_data):
            pyro.sample("z", self.encoder(x))

    @torch.no_grad()
    def elbo_terms(self, x: torch.Tensor):
        """Per-point ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)), each term estimated with one
        z ~ q(z|x); the KL analytic where torch has it for (q, p) (:func:`pyro_vae.traces.elbo_terms`).
        Returns (log_lik, kl), shape (N,)."""
        return traces.elbo_terms(self.model, self.guide, x)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, num_samples: int = 64) -> torch.Tensor:
        """A point summary of q(z|x): its mean (Monte Carlo when the family has no closed form)."""
        q = self.encoder(x)
        try:
            return q.mean
        except NotImplementedError:
            return q.rsample((num_samples,)).mean(0)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x | z] at z = the guide's mean for x."""
        return self.likelihood.mean(self.encode(x))

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """E[x | z] for z ~ p(z) (the decoder's mean image, not a noisy draw)."""
        z = self.prior().sample((num_samples,))
        return self.likelihood.mean(z)
