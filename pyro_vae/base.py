"""The plumbing that the library's trainable models (:class:`pyro_vae.vae.VAE`,
:class:`pyro_vae.gmvae.GMVAE`) share: parameters in one ``nn.Module`` under a name of the
instance's own in Pyro's param store, a switch that bypasses the store, and the data plate.

A subclass writes its ``model(x, num_data=None)`` and ``guide(x, num_data=None)`` as plain Pyro
functions whose per-point sites sit inside ``with self.data_plate(x, num_data):``. With
``num_data`` = N > len(x) = B the batch is read as a subsample of N points, so Pyro scales each
per-point log-density by N / B and a loss on the batch estimates the loss on all N points.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from contextlib import contextmanager

import pyro
import torch
from pyro.poutine.util import is_validation_enabled
from torch import nn

from .checks import positive_int
from .likelihoods import Likelihood

# One counter per name prefix: vae0, vae1, ... and gmvae0, ... count apart.
_instance_counts = defaultdict(itertools.count)


class LatentVariableModel(nn.Module):
    """Base of a model p(x, latents) = p(latents) p(x | z) with a guide q(latents | x), whose
    parameters all live in this module.

    ``model`` and ``guide`` register the module with Pyro's param store under ``self.name``
    (``<name_prefix><k>``, k counting the instances of that prefix), so two instances in one
    process never share or overwrite each other's parameters.

    :param likelihood: p(x | z); fixes ``data_dim`` (D) and ``latent_dim`` (the size of z).
    :param name: the name in Pyro's param store; by default ``name_prefix`` and a counter.
    """

    name_prefix = "model"

    def __init__(self, likelihood: Likelihood, name: str | None = None):
        super().__init__()
        self.likelihood = likelihood
        self.data_dim, self.latent_dim = likelihood.data_dim, likelihood.latent_dim
        self.name = name or f"{self.name_prefix}{next(_instance_counts[self.name_prefix])}"
        self._use_param_store = True

    @contextmanager
    def without_param_store(self):
        """Run ``model`` and ``guide`` without registering parameters with Pyro's param store, for
        loops where a torch optimizer over ``self.parameters()`` owns them (``pyro_vae.train``).
        Registration walks every parameter on each call."""
        previous, self._use_param_store = self._use_param_store, False
        try:
            yield self
        finally:
            self._use_param_store = previous

    def check_x(self, x: torch.Tensor, what: str = "x") -> None:
        """A one-line ``ValueError`` unless ``x`` is a finite tensor of shape (N, D)."""
        self._check_shape(x, what)
        if not torch.isfinite(x).all():
            rows = (~torch.isfinite(x)).any(1).nonzero().flatten()
            raise ValueError(f"{what} has NaN or inf in {len(rows)} row(s) (first: {rows[:5].tolist()}); "
                             f"remove or impute them first")

    def _check_shape(self, x, what: str) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.data_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected {what} of shape (N, {self.data_dim}), got {shape}; flatten images first")

    def data_plate(self, x: torch.Tensor, num_data: int | None = None) -> pyro.plate:
        """Register the parameters (unless inside ``without_param_store``), check ``x`` and return
        ``pyro.plate("data", ...)`` over its rows.

        The check is :meth:`check_x` while Pyro's validation is enabled and the shape alone when it
        is not (``pyro_vae.train.fit`` checks the data once, then switches validation off).

        :param x: the batch, shape (B, D).
        :param num_data: N, the number of points the batch was drawn from (None: B). For N > B
            the plate subsamples the indices 0..B-1, which Pyro scales by N / B; giving the
            indices keeps Pyro from drawing a random subsample of its own from the RNG.
        """
        if self._use_param_store:
            pyro.module(self.name, self)
        if is_validation_enabled():
            self.check_x(x)
        else:
            self._check_shape(x, "x")
        batch = x.shape[0]
        if num_data is None or num_data == batch:
            return pyro.plate("data", batch)
        if positive_int(num_data, "num_data") < batch:
            raise ValueError(f"num_data={num_data} is smaller than the batch ({batch} rows); pass the "
                             f"number of points the batch was drawn from, or None")
        return pyro.plate("data", num_data, subsample=torch.arange(batch, device=x.device))

    @torch.no_grad()
    def encode(self, x: torch.Tensor, num_samples: int = 64) -> torch.Tensor:
        """A point summary of q(z | x), shape (N, latent_dim): the mean of ``self.encoder(x)`` (Monte
        Carlo over ``num_samples`` draws when the family has no closed form); for a model whose first
        latent comes from ``self.encoder``, the others override it."""
        q = self.encoder(x)
        try:
            return q.mean
        except NotImplementedError:
            return q.rsample((num_samples,)).mean(0)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x | z] at z = :meth:`encode` (x), shape (N, D)."""
        return self.likelihood.mean(self.encode(x))

    def initialize(self, data) -> None:
        """Start the model from the run's :class:`pyro_vae.data.RunData` before the trainer's
        epochs (default nothing; the GMVAE's VaDE-style start)."""

    def extra_summary(self, data) -> dict:
        """Numbers of this model's own for a run's summary.json (default none), given the run's
        :class:`pyro_vae.data.RunData`."""
        return {}

    def extra_figures(self, data, out_dir: str) -> None:
        """Figures of this model's own, written into ``out_dir`` beside the run's figures (default none)."""
