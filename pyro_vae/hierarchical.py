"""The VAE with two stochastic layers of Burda et al. (2015), x <- z1 <- z2:

    model(x):  for n in data plate:  z2_n ~ p(z2);   z1_n ~ p(z1 | z2_n);   x_n ~ p(x | z1_n)   (observed)
    guide(x):  for n in data plate:  z1_n ~ q(z1 | x_n);   z2_n ~ q(z2 | z1_n)                 (reparameterized)

Both latent sites sit inside the data plate, so every objective (ELBO, IWAE with its three
estimators, the KL warm-up, which scales both latent sites) and the generic log p(x) estimators
take it as they take the one-layer VAE, with no special case.
"""

from __future__ import annotations

import pyro
import torch

from .base import LatentVariableModel
from .guides import Guide
from .likelihoods import Likelihood
from .objectives.elbo import elbo_terms
from .priors import Prior


class HierarchicalVAE(LatentVariableModel):
    """p(x, z1, z2) = p(z2) p(z1 | z2) p(x | z1) with the guide q(z1, z2 | x) = q(z1 | x) q(z2 | z1).

    Burda et al.'s sizes (the builder's defaults, ``model=two_layer``): q(z1|x) is D -> 200 -> 200
    -> z1 (100), q(z2|z1) is z1 -> 100 -> 100 -> z2 (50); p(z1|z2) is z2 -> 100 -> 100 -> z1 and
    p(x|z1) is z1 -> 200 -> 200 -> D, tanh throughout; the conditionals between the latent layers
    are diagonal Gaussians.

    Parameters live in this module, registered with Pyro's param store as ``hvae0``, ``hvae1``, ...

    :param prior: p(z2), a :class:`pyro_vae.priors.Prior` over z2.
    :param top_decoder: p(z1 | z2), a conditional distribution over z1 given z2 (a
        :class:`pyro_vae.guides.DiagonalNormalGuide` with data_dim = dim z2).
    :param likelihood: p(x | z1), a :class:`pyro_vae.likelihoods.Likelihood` with latent_dim = dim z1.
    :param encoder: q(z1 | x), a :class:`pyro_vae.guides.Guide`.
    :param top_encoder: q(z2 | z1), a :class:`pyro_vae.guides.Guide` with data_dim = dim z1.
    :param name: the name in Pyro's param store (default ``hvae<k>``).
    """

    name_prefix = "hvae"

    def __init__(self, prior: Prior, top_decoder: Guide, likelihood: Likelihood, encoder: Guide,
                 top_encoder: Guide, name: str | None = None):
        super().__init__(likelihood, name)
        z1, z2 = likelihood.latent_dim, prior.latent_dim
        if (encoder.data_dim, encoder.latent_dim) != (likelihood.data_dim, z1) \
                or (top_encoder.data_dim, top_encoder.latent_dim) != (z1, z2) \
                or (top_decoder.data_dim, top_decoder.latent_dim) != (z2, z1):
            raise ValueError("the two-layer VAE's networks disagree on data_dim or the latent sizes")
        self.prior, self.top_decoder, self.encoder, self.top_encoder = prior, top_decoder, encoder, top_encoder
        self.top_latent_dim = z2

    def model(self, x: torch.Tensor, num_data: int | None = None):
        """p(x, z1, z2) = p(z2) p(z1|z2) p(x|z1), one (z2_n, z1_n, x_n) per row of x."""
        with self.data_plate(x, num_data):
            z2 = pyro.sample("z2", self.prior())
            z1 = pyro.sample("z1", self.top_decoder(z2))
            pyro.sample("x", self.likelihood(z1), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None):
        """q(z1, z2 | x) = prod_n q(z1_n | x_n) q(z2_n | z1_n)."""
        with self.data_plate(x, num_data):
            z1 = pyro.sample("z1", self.encoder(x))
            pyro.sample("z2", self.top_encoder(z1))

    @torch.no_grad()
    def elbo_terms(self, x: torch.Tensor):
        """Per-point ELBO(x) = E_q[log p(x|z1)] - E_q[log q(z1,z2|x) - log p(z1,z2)], both terms with
        one (z1, z2) ~ q. The KL term is Monte Carlo at every site: z2 is drawn given z1, so the
        closed-form KL(q(z1|x) || p(z1|z2)) at that z2 would be biased. Returns (log_lik, kl), shape (N,)."""
        return elbo_terms(self.model, self.guide, x, analytic_kl=False)

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """E[x | z1] for z2 ~ p(z2), z1 ~ p(z1|z2), shape (num_samples, D)."""
        z2 = self.prior().sample((num_samples,))
        return self.likelihood.mean(self.top_decoder(z2).sample())
