"""Amortized guides q(z|x). Each is an ``nn.Module`` whose ``forward(x)`` maps a batch x of shape
(B, D) to a reparameterizable Pyro distribution over z with batch shape (B,) and event shape
(latent_dim,). The VAE samples it at site "z" inside the data plate."""

from __future__ import annotations

from typing import Sequence

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
import torch.nn.functional as F
from pyro.nn import ConditionalAutoRegressiveNN
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence, register_kl
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


@GUIDES.register("full_normal")
class FullNormalGuide(Guide):
    """q(z|x) = N(z; mu(x), L(x) L(x)^T) with a full covariance: the encoder MLP outputs mu, the
    diagonal of the Cholesky factor L (softplus(.) + MIN_SCALE > 0) and its d(d-1)/2 strictly lower
    entries, times ``off_diagonal_scale``. Reparameterized: z = mu(x) + L(x) eps, eps ~ N(0, I).

    The scale (default 0.1) slows the off-diagonal head under Adam, whose steps have a fixed size
    whatever the gradient's: at scale 1 and lr 1e-3, one-sample gradients for the 1225 entries
    (d = 50) are mostly noise and training *lowers* the ELBO of a guide started at a trained
    diagonal one (mnist5k: −122.0 → −126.3 in 3 epochs, frozen decoder); at 0.1 it rises above the
    diagonal guide's (−121.3 vs −121.6). Measured with torch's default initialization, before
    ``nets.mlp`` switched to He; see experiments/compare_models/frozen_decoder.py."""

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (200, 200),
                 activation: str = "tanh", off_diagonal_scale: float = 0.1):
        super().__init__(data_dim, latent_dim)
        d = self.latent_dim
        if not off_diagonal_scale > 0:
            raise ValueError(f"guide.off_diagonal_scale must be > 0, got {off_diagonal_scale!r}")
        self.off_diagonal_scale = float(off_diagonal_scale)
        self.net = mlp([self.data_dim, *hidden, 2 * d + d * (d - 1) // 2], activation)
        self.register_buffer("lower", torch.tril_indices(d, d, offset=-1))
        # Start from a diagonal covariance: with a random head each row of L sums up to d-1 random
        # off-diagonal outputs, which nearly doubled the initial KL(q || p) at d = 50 on mnist5k
        # (9.4 vs 5.3 nats per image, measured with torch's default initialization).
        with torch.no_grad():
            self.net[-1].weight[2 * d:].zero_()
            self.net[-1].bias[2 * d:].zero_()

    def forward(self, x):
        d = self.latent_dim
        out = self.net(x)
        loc, raw_diag, off = out[..., :d], out[..., d:2 * d], out[..., 2 * d:]
        tril = torch.diag_embed(F.softplus(raw_diag) + MIN_SCALE)
        tril[..., self.lower[0], self.lower[1]] = self.off_diagonal_scale * off
        return dist.MultivariateNormal(loc, scale_tril=tril)


@GUIDES.register("iaf")
class IAFGuide(Guide):
    """An amortized inverse autoregressive flow (Kingma et al., 2016) on a diagonal Gaussian:

        z_0 = mu(x) + sigma(x) * eps,   eps ~ N(0, I);   [mu, sigma, h] = encoder(x)
        z_t = s_t * z_{t-1} + (1 - s_t) * m_t,   [m_t, logit s_t] = AR_t(z_{t-1}, h(x)),  t = 1..T
        log q(z_T|x) = log N(z_0; mu, sigma^2) - sum_t sum_i log s_t,i

    AR_t is an autoregressive network (MADE) that also takes the context h(x); s_t is a sigmoid
    gate (Pyro's ``ConditionalAffineAutoregressive(stable=True)``); the order of the coordinates is
    reversed between steps. Sampling is one network pass per step, and scoring the sample just
    drawn reuses the cached intermediate z_t; scoring any other z inverts the flow (one pass per
    latent dimension per step).

    :param num_flows: T >= 1. :param context_dim: size of h(x). :param flow_hidden: AR hidden sizes.
    """

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (200, 200),
                 activation: str = "tanh", num_flows: int = 2, context_dim: int = 50,
                 flow_hidden: Sequence[int] = (100,)):
        super().__init__(data_dim, latent_dim)
        if int(num_flows) != num_flows or num_flows < 1:
            raise ValueError(f"guide.num_flows must be an integer >= 1, got {num_flows!r}")
        if self.latent_dim < 2:
            raise ValueError("an IAF guide needs latent_dim >= 2 (an autoregressive flow in 1-D is a constant map)")
        self.context_dim = int(context_dim)
        self.net = mlp([self.data_dim, *hidden, 2 * self.latent_dim + self.context_dim], activation)
        self.flows = nn.ModuleList([
            T.ConditionalAffineAutoregressive(
                ConditionalAutoRegressiveNN(self.latent_dim, self.context_dim, [int(h) for h in flow_hidden]),
                stable=True)
            for _ in range(int(num_flows))])
        self.register_buffer("reverse", torch.arange(self.latent_dim - 1, -1, -1))

    def forward(self, x):
        d = self.latent_dim
        out = self.net(x)
        loc, raw_scale, h = out[..., :d], out[..., d:2 * d], torch.tanh(out[..., 2 * d:])
        steps = []
        for i, flow in enumerate(self.flows):
            steps += ([] if i == 0 else [T.Permute(self.reverse)]) + [flow.condition(h)]
        base = dist.Normal(loc, F.softplus(raw_scale) + MIN_SCALE).to_event(1)
        return dist.TransformedDistribution(base, steps)


@register_kl(MultivariateNormal, Independent)
def _kl_full_normal_diagonal_normal(q, p):
    """KL(N(mu, S) || N(m, diag s^2)) in closed form, so ``objective=mean_field`` has an analytic KL for
    the full_normal guide with a diagonal-Gaussian prior (torch registers only MVN || MVN)."""
    if not (isinstance(p.base_dist, Normal) and p.reinterpreted_batch_ndims == 1):
        raise NotImplementedError
    return kl_divergence(q, MultivariateNormal(p.base_dist.loc, scale_tril=torch.diag_embed(p.base_dist.scale)))
