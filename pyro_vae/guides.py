"""Amortized guides q(z|x). Each is an ``nn.Module`` whose ``forward(x)`` maps a batch x of shape
(B, D) to a reparameterizable Pyro distribution over z with batch shape (B,) and event shape
(latent_dim,), in two parts: the encoder network ``net`` gives the raw parameters of each point,
and :meth:`Guide.distribution` builds the distribution from them (so a distribution can also be
built from per-point parameters of one's own, as :mod:`pyro_vae.gaps` does). The VAE samples it
at site "z" inside the data plate."""

from __future__ import annotations

from typing import Sequence

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
import torch.nn.functional as F
from pyro.nn import ConditionalAutoRegressiveNN
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence, register_kl
from torch import nn

from .checks import positive_int
from .nets import MLP
from .registry import Registry

GUIDES = Registry("guide")

MIN_SCALE = 1e-5  # keeps sigma(x) away from 0, where log q(z|x) overflows


class Guide(nn.Module):
    """Base class of amortized guides q(z|x) over a ``latent_dim``-dimensional z given a
    ``data_dim``-dimensional x.

    :param int data_dim: dimension D of x, >= 1.
    :param int latent_dim: dimension d of z, >= 1.
    """

    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__()
        self.data_dim = positive_int(data_dim, "data_dim")
        self.latent_dim = positive_int(latent_dim, "latent_dim")

    def forward(self, x) -> dist.TorchDistribution:
        """q(z|x) = :meth:`distribution` of ``net(x)``."""
        return self.distribution(self.net(x))

    def distribution(self, params: torch.Tensor) -> dist.TorchDistribution:  # pragma: no cover - interface
        """The distribution of z given the raw parameters ``params`` (B, P) the encoder would output."""
        raise NotImplementedError


def _encoder(net, data_dim, hidden, activation, n_out):
    """The encoder network x -> n_out raw outputs: ``net.encoder`` (a :data:`pyro_vae.nets.NETS`
    factory), or the MLP ``data_dim -> hidden -> n_out`` when ``net`` is None."""
    return (net if net is not None else MLP(data_dim, hidden, activation)).encoder(n_out)


@GUIDES.register("diagonal_normal")
class DiagonalNormalGuide(Guide):
    """The diagonal Gaussian guide

        q(z|x) = N(z; μ(x), diag σ(x)²),   [μ(x), ρ(x)] = encoder(x),   σ(x) = softplus(ρ(x)) + MIN_SCALE,

    with one encoder MLP ``D -> hidden -> 2 d``. Sampling is reparameterized:
    z = μ(x) + σ(x) ε, ε ~ N(0, I).

    :param int data_dim: dimension D of x.
    :param int latent_dim: dimension d of z.
    :param hidden: the encoder's hidden layer sizes. Default is (200, 200).
    :param str activation: the encoder's activation (see :func:`pyro_vae.nets.mlp`). Default is ``"tanh"``.
    :param net: the factory of the encoder network (an entry of :data:`pyro_vae.nets.NETS`, e.g. the
        convolutional one), which then supplies hidden and activation; default an MLP of those two.
    """

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (200, 200),
                 activation: str = "tanh", net=None):
        super().__init__(data_dim, latent_dim)
        self.net = _encoder(net, self.data_dim, hidden, activation, 2 * self.latent_dim)

    def distribution(self, params):
        loc, raw_scale = params.chunk(2, dim=-1)
        return dist.Normal(loc, F.softplus(raw_scale) + MIN_SCALE).to_event(1)


@GUIDES.register("full_normal")
class FullNormalGuide(Guide):
    """The full-covariance Gaussian guide

        q(z|x) = N(z; μ(x), L(x) L(x)ᵀ),   L_ii = softplus(ρ_i(x)) + MIN_SCALE,   L_ij = c · a_ij(x) (i > j),

    where one encoder MLP ``D -> hidden -> 2 d + d(d-1)/2`` outputs μ, the raw diagonal ρ of the
    Cholesky factor L and its d(d-1)/2 strictly lower entries a, and c is ``off_diagonal_scale``.
    The off-diagonal head starts at zero, so q starts diagonal. Sampling is reparameterized:
    z = μ(x) + L(x) ε, ε ~ N(0, I).

    :param int data_dim: dimension D of x.
    :param int latent_dim: dimension d of z.
    :param hidden: the encoder's hidden layer sizes. Default is (200, 200).
    :param str activation: the encoder's activation (see :func:`pyro_vae.nets.mlp`). Default is ``"tanh"``.
    :param net: the factory of the encoder network (an entry of :data:`pyro_vae.nets.NETS`, e.g. the
        convolutional one), which then supplies hidden and activation; default an MLP of those two.
    :param float off_diagonal_scale: c > 0. Default is 0.1: under Adam, whose steps have a fixed
        size whatever the gradient's, it slows the noisy off-diagonal head tenfold (why:
        experiments/compare_models/results.md, section "Earlier disagreements, and why",
        paragraph "Full covariance below diagonal").
    """

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (200, 200),
                 activation: str = "tanh", off_diagonal_scale: float = 0.1, net=None):
        super().__init__(data_dim, latent_dim)
        d = self.latent_dim
        if not off_diagonal_scale > 0:
            raise ValueError(f"guide.off_diagonal_scale must be > 0, got {off_diagonal_scale!r}")
        self.off_diagonal_scale = float(off_diagonal_scale)
        self.net = _encoder(net, self.data_dim, hidden, activation, 2 * d + d * (d - 1) // 2)
        self.register_buffer("lower", torch.tril_indices(d, d, offset=-1))
        # Start from a diagonal covariance: with a random head each row of L sums up to d-1 random
        # off-diagonal outputs, which inflates the initial KL(q || p) (experiments/compare_models/
        # results.md, paragraph "Full covariance below diagonal").
        with torch.no_grad():
            self.net[-1].weight[2 * d:].zero_()
            self.net[-1].bias[2 * d:].zero_()

    def distribution(self, params):
        d = self.latent_dim
        loc, raw_diag, off = params[..., :d], params[..., d:2 * d], params[..., 2 * d:]
        tril = torch.diag_embed(F.softplus(raw_diag) + MIN_SCALE)
        tril[..., self.lower[0], self.lower[1]] = self.off_diagonal_scale * off
        return dist.MultivariateNormal(loc, scale_tril=tril)


@GUIDES.register("iaf")
class IAFGuide(Guide):
    """An amortized inverse autoregressive flow (Kingma et al., 2016) on a diagonal Gaussian:

        [μ, ρ, a] = encoder(x),   σ = softplus(ρ) + MIN_SCALE,   h(x) = tanh(a)
        z_0 = μ + σ ε,   ε ~ N(0, I)
        [m_t, l_t] = AR_t(z_{t-1}, h(x)),   s_t = sigmoid(l_t + 2),   t = 1..T
        z_t = s_t z_{t-1} + (1 - s_t) m_t
        log q(z_T|x) = log N(z_0; μ, diag σ²) - Σ_t Σ_i log s_t,i

    AR_t is an autoregressive network (MADE) that also takes the context h(x), and s_t a sigmoid
    gate (Pyro's ``ConditionalAffineAutoregressive(stable=True)``, whose default logit bias is the
    2); the order of the coordinates is reversed between steps. Sampling is one network pass
    per step, and scoring the sample just drawn reuses the cached intermediate z_t; scoring any
    other z inverts the flow (one pass per latent dimension per step).

    :param int data_dim: dimension D of x.
    :param int latent_dim: dimension d of z, >= 2 (an autoregressive flow in 1-D is a constant map).
    :param hidden: the encoder's hidden layer sizes. Default is (200, 200).
    :param str activation: the encoder's activation (see :func:`pyro_vae.nets.mlp`). Default is ``"tanh"``.
    :param net: the factory of the encoder network (an entry of :data:`pyro_vae.nets.NETS`, e.g. the
        convolutional one), which then supplies hidden and activation; default an MLP of those two.
    :param int num_flows: number of steps T >= 1. Default is 2.
    :param int context_dim: size of h(x), >= 1. Default is 50.
    :param flow_hidden: hidden layer sizes of each AR_t. Default is (100,).
    """

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (200, 200),
                 activation: str = "tanh", num_flows: int = 2, context_dim: int = 50,
                 flow_hidden: Sequence[int] = (100,), net=None):
        super().__init__(data_dim, latent_dim)
        num_flows = positive_int(num_flows, "guide.num_flows")
        if self.latent_dim < 2:
            raise ValueError("an IAF guide needs latent_dim >= 2 (an autoregressive flow in 1-D is a constant map)")
        self.context_dim = positive_int(context_dim, "guide.context_dim")
        flow_hidden = [positive_int(h, "guide.flow_hidden") for h in flow_hidden]
        self.net = _encoder(net, self.data_dim, hidden, activation, 2 * self.latent_dim + self.context_dim)
        self.flows = nn.ModuleList([
            T.ConditionalAffineAutoregressive(
                ConditionalAutoRegressiveNN(self.latent_dim, self.context_dim, flow_hidden), stable=True)
            for _ in range(num_flows)])
        self.register_buffer("reverse", torch.arange(self.latent_dim - 1, -1, -1))

    def distribution(self, params):
        d = self.latent_dim
        loc, raw_scale, h = params[..., :d], params[..., d:2 * d], torch.tanh(params[..., 2 * d:])
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
