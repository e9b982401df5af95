"""A mixture VAE (GMVAE): a discrete cluster c and a continuous z with a Gaussian prior per cluster.

    model(x):  for n in data plate:  c_n ~ Categorical(π);  z_n ~ N(μ_c, diag σ_c²);  x_n ~ p(x | z_n)
    guide(x):  for n in data plate:  c_n ~ q(c | x_n);      z_n ~ q(z | x_n, c_n) = N(m(x_n, c), diag s(x_n, c)²)

p(z | c) (μ_c, σ_c) is learned; π is uniform unless ``learn_weights=True``. The decoder p(x | z) is
:class:`pyro_vae.likelihoods.BernoulliLikelihood`. Because c is finite, the expectation over
q(c | x) is a sum, and with one z_c ~ q(z | x, c) drawn for every value of c:

    ELBO(x) = Σ_c q(c|x) [log p(x | z_c) + log p(z_c | c) − log q(z_c | x, c)] − KL(q(c|x) || π)
            = E_q[log p(x | z)] − KL(q(c, z | x) || p(c, z))

``guide`` marks c for parallel enumeration (``config_enumerate``), so ``TraceEnum_ELBO(max_plate_nesting=1)``
computes exactly this sum, and :func:`pyro_vae.train.fit` trains the model as it trains a VAE.
``sampled_guide`` draws c instead: the proposal that :func:`pyro_vae.estimate_log_px` needs
(importance weights p(x, c, z) / q(c, z | x) over both latents), and a REINFORCE-style
estimator with the same expectation as the enumerated ELBO.
"""

from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from typing import Sequence

import numpy as np
import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import config_enumerate
from pyro.poutine.util import is_validation_enabled
from torch import nn
from torch.distributions import kl_divergence

from .guides import MIN_SCALE
from .likelihoods import BernoulliLikelihood
from .nets import ACTIVATIONS, he_linear, mlp

__all__ = ["GMVAE", "cluster_accuracy"]

_instance_ids = itertools.count()


class ClusterEncoder(nn.Module):
    """q(z | x, c) = N(m(x, c), diag s(x, c)²): the first layer adds a learned per-cluster vector to
    W x + b, so x goes through it once and c broadcasts (enumerated c has shape (C, 1), a sampled
    one (N,) or (particles, N))."""

    def __init__(self, data_dim, latent_dim, num_clusters, hidden: Sequence[int], activation: str,
                 embedding_std: float = 1.0):
        super().__init__()
        hidden = list(hidden)
        if activation not in ACTIVATIONS:  # the cluster vector is added before a pointwise activation
            raise ValueError(f"the GMVAE's encoder needs a pointwise activation, got {activation!r}; "
                             f"choose one of: {', '.join(sorted(ACTIVATIONS))}")
        self.input = he_linear(data_dim, hidden[0])
        self.cluster = nn.Embedding(num_clusters, hidden[0])
        nn.init.normal_(self.cluster.weight, std=embedding_std)
        self.act = ACTIVATIONS[activation]()
        self.rest = mlp([*hidden, 2 * latent_dim], activation)

    def forward(self, x, c) -> dist.TorchDistribution:
        h = self.act(self.input(x) + self.cluster(c))
        loc, raw_scale = self.rest(h).chunk(2, dim=-1)
        return dist.Normal(loc, F.softplus(raw_scale) + MIN_SCALE).to_event(1)


class GMVAE(nn.Module):
    """Gaussian-mixture VAE with ``num_clusters`` clusters, a ``latent_dim``-dimensional z and a
    Bernoulli decoder; encoders and decoder are tanh MLPs with layer sizes ``hidden``.

    :param prior_spread: the cluster means μ_c start as ``prior_spread`` · N(0, I) (σ_c at 1).
        The default 0 starts every p(z|c) at N(0, I): with random μ_c, the cluster whose μ_c lies
        nearest the encoder's initial outputs has the smallest KL for *every* x, q(c|x) sends all
        points there within the first epoch and the mixture collapses to one cluster (seen on
        mnist5k with spread 1 and 3; experiments/gmvae). Symmetry is broken by the encoder instead.
        The price: the μ_c then stay close and clusters need not align with classes. On digits,
        ``prior_spread=1, embedding_std=0.1`` did not collapse and clustered better (accuracy 0.68
        vs 0.34), so try both; neither is a cure (see experiments/gmvae/figures/results.json).
        Those numbers predate He initialization (``nets.mlp``); with it, the default settings
        collapsed q(c|x) to one cluster on mnist5k (seed 0) and reached 0.30 on digits.
    :param embedding_std: scale of the random per-cluster vectors added in q(z|x,c)'s first layer, so
        the C branches of q(z|x,c) differ from the start and pull the μ_c apart.
    :param learn_weights: learn π (softmax of logits) instead of keeping it uniform.

    Parameters live in this module and are registered with Pyro's param store under a name unique to
    the instance (``gmvae0``, ...); ``without_param_store()`` skips that for a torch optimizer."""

    def __init__(self, data_dim: int, latent_dim: int = 10, num_clusters: int = 10,
                 hidden: Sequence[int] = (200, 200), activation: str = "tanh",
                 prior_spread: float = 0.0, embedding_std: float = 1.0, learn_weights: bool = False,
                 name: str | None = None):
        super().__init__()
        if num_clusters < 1 or latent_dim < 1 or data_dim < 1:
            raise ValueError(f"data_dim, latent_dim and num_clusters must be >= 1, got "
                             f"{data_dim}, {latent_dim}, {num_clusters}")
        self.data_dim, self.latent_dim, self.num_clusters = int(data_dim), int(latent_dim), int(num_clusters)
        self.likelihood = BernoulliLikelihood(data_dim, latent_dim, hidden, activation)
        self.cluster_encoder = mlp([data_dim, *hidden, num_clusters], activation)  # logits of q(c|x)
        self.latent_encoder = ClusterEncoder(data_dim, latent_dim, num_clusters, hidden, activation, embedding_std)
        self.prior_locs = nn.Parameter(prior_spread * torch.randn(num_clusters, latent_dim))
        self.prior_raw_scales = nn.Parameter(torch.full((num_clusters, latent_dim), math.log(math.e - 1)))
        if learn_weights:
            self.weight_logits = nn.Parameter(torch.zeros(num_clusters))
        else:
            self.register_buffer("weight_logits", torch.zeros(num_clusters))
        self.name = name or f"gmvae{next(_instance_ids)}"
        self._use_param_store = True

    # -- the generative model's pieces ----------------------------------------------------------
    @property
    def prior_scales(self) -> torch.Tensor:
        return F.softplus(self.prior_raw_scales) + MIN_SCALE

    def cluster_prior(self) -> dist.Categorical:
        """p(c) = Categorical(π)."""
        return dist.Categorical(logits=self.weight_logits)

    def latent_prior(self, c) -> dist.TorchDistribution:
        """p(z | c) = N(μ_c, diag σ_c²); batch shape c.shape."""
        return dist.Normal(self.prior_locs[c], self.prior_scales[c]).to_event(1)

    def cluster_posterior(self, x) -> dist.Categorical:
        """q(c | x); batch shape (N,)."""
        return dist.Categorical(logits=self.cluster_encoder(x))

    # -- Pyro model and guides ------------------------------------------------------------------
    @contextmanager
    def without_param_store(self):
        """Run ``model``/``guide`` without registering parameters with Pyro's param store (for
        ``pyro_vae.train.fit``, whose torch optimizer owns them)."""
        previous, self._use_param_store = self._use_param_store, False
        try:
            yield self
        finally:
            self._use_param_store = previous

    def check_x(self, x, what: str = "x") -> None:
        """One-line ValueError unless x is a finite float tensor of shape (N, data_dim)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.data_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected {what} of shape (N, {self.data_dim}), got {shape}; flatten images first")
        if not torch.isfinite(x).all():
            rows = (~torch.isfinite(x)).any(1).nonzero().flatten()
            raise ValueError(f"{what} has NaN or inf in {len(rows)} row(s) (first: {rows[:5].tolist()}); "
                             f"remove or impute them first")

    def _data_plate(self, x, num_data):
        if self._use_param_store:
            pyro.module(self.name, self)
        if is_validation_enabled():  # fit() switches validation off after checking the data once
            self.check_x(x)
        elif x.dim() != 2 or x.shape[1] != self.data_dim:
            raise ValueError(f"expected x of shape (N, {self.data_dim}), got {tuple(x.shape)}; flatten images first")
        batch = x.shape[0]
        if num_data is None or num_data == batch:
            return pyro.plate("data", batch)
        # A minibatch of num_data points: the plate scales log-densities by num_data / batch.
        return pyro.plate("data", num_data, subsample=torch.arange(batch, device=x.device))

    def model(self, x: torch.Tensor, num_data: int | None = None):
        """p(x, c, z) = p(c) p(z | c) p(x | z), one (c_n, z_n, x_n) per row of x."""
        with self._data_plate(x, num_data):
            c = pyro.sample("c", self.cluster_prior())
            z = pyro.sample("z", self.latent_prior(c))
            pyro.sample("x", self.likelihood(z), obs=x)

    def sampled_guide(self, x: torch.Tensor, num_data: int | None = None):
        """q(c, z | x) = q(c | x) q(z | x, c) with c drawn: the proposal for ``estimate_log_px``."""
        with self._data_plate(x, num_data):
            c = pyro.sample("c", self.cluster_posterior(x))
            pyro.sample("z", self.latent_encoder(x, c))

    def guide(self, x: torch.Tensor, num_data: int | None = None):
        """q(c, z | x) with c marked for parallel enumeration: under ``TraceEnum_ELBO`` c takes
        all C values at once (shape (C, 1)) and z is drawn for each, shape (C, N, latent_dim)."""
        return config_enumerate(self.sampled_guide, default="parallel")(x, num_data)

    # -- per-point quantities -------------------------------------------------------------------
    def _per_cluster_terms(self, x):
        """For every c: q(c|x) (N, C) and, with one z_c ~ q(z|x,c), log p(x|z_c), the analytic
        KL(q(z|x,c) || p(z|c)) and the single-draw log q(z_c|x,c) − log p(z_c|c), each (C, N)."""
        self.check_x(x)
        log_qc = self.cluster_posterior(x).logits  # normalized log-probabilities, (N, C)
        c = torch.arange(self.num_clusters, device=x.device)[:, None]  # (C, 1), as enumerated
        q_z, p_z = self.latent_encoder(x, c), self.latent_prior(c)
        z = q_z.rsample()  # (C, N, L)
        log_lik = self.likelihood(z).log_prob(x)
        return log_qc, log_lik, kl_divergence(q_z, p_z), q_z.log_prob(z) - p_z.log_prob(z)

    @torch.no_grad()
    def elbo_terms(self, x: torch.Tensor):
        """Per-point (log_lik, kl), shape (N,), with ELBO = log_lik − kl:

            log_lik = Σ_c q(c|x) log p(x | z_c)                                   (one z_c per c)
            kl      = KL(q(c|x) || π) + Σ_c q(c|x) KL(q(z|x,c) || p(z|c))     (both analytic)
        """
        log_qc, log_lik, kl_z, _ = self._per_cluster_terms(x)
        qc = log_qc.exp()
        kl_c = (qc * (log_qc - self.cluster_prior().logits)).sum(-1)
        return (qc * log_lik.T).sum(-1), kl_c + (qc * kl_z.T).sum(-1)

    def enumerated_elbo(self, x: torch.Tensor) -> torch.Tensor:
        """Per-point ELBO exactly as ``TraceEnum_ELBO`` computes it (Monte Carlo KL for z, sum over
        c), differentiable; shape (N,)."""
        log_qc, log_lik, _, kl_z_mc = self._per_cluster_terms(x)
        qc = log_qc.exp()
        return (qc * (log_lik - kl_z_mc).T).sum(-1) - (qc * (log_qc - self.cluster_prior().logits)).sum(-1)

    @torch.no_grad()
    def log_px_enumerated(self, x: torch.Tensor, num_samples: int = 1000, chunk: int = 100) -> torch.Tensor:
        """Stratified importance sampling with c summed out: K draws z_kc ~ q(z|x,c) for every c and

            log p̂(x) = log (1/K) Σ_k Σ_c p(c) p(z_kc|c) p(x|z_kc) / q(z_kc|x,c),

        unbiased for p(x) like ``estimate_log_px`` with ``sampled_guide`` (which draws c), at C
        times its decoder passes: a cross-check of that estimate. Shape (N,), float64."""
        self.check_x(x)
        c = torch.arange(self.num_clusters, device=x.device)[:, None]
        q_z, p_z, log_pc = self.latent_encoder(x, c), self.latent_prior(c), self.cluster_prior().logits
        parts = []
        for start in range(0, num_samples, chunk):
            z = q_z.sample((min(chunk, num_samples - start),))  # (P, C, N, L)
            log_w = log_pc[:, None] + p_z.log_prob(z) + self.likelihood(z).log_prob(x) - q_z.log_prob(z)
            parts.append(log_w.double().flatten(0, 1).logsumexp(0))  # over particles and c
        return torch.stack(parts).logsumexp(0) - math.log(num_samples)

    @torch.no_grad()
    def cluster_probs(self, x: torch.Tensor) -> torch.Tensor:
        """q(c | x), shape (N, C)."""
        self.check_x(x)
        return self.cluster_posterior(x).probs

    @torch.no_grad()
    def predict_cluster(self, x: torch.Tensor) -> torch.Tensor:
        """argmax_c q(c | x), shape (N,)."""
        return self.cluster_probs(x).argmax(-1)

    @torch.no_grad()
    def sample(self, num_per_cluster: int) -> torch.Tensor:
        """Decoder mean images E[x | z] for z ~ p(z | c), shape (C, num_per_cluster, data_dim)."""
        c = torch.arange(self.num_clusters, device=self.prior_locs.device)[:, None]
        z = self.latent_prior(c.expand(-1, num_per_cluster)).sample()
        return self.likelihood.mean(z)


def cluster_accuracy(labels, clusters) -> float:
    """Unsupervised clustering accuracy: the fraction of points whose cluster, mapped one-to-one to
    a label by the best matching (Hungarian method on the cluster × label contingency table), is
    their label. Clusters left without a label (more clusters than labels) count as wrong."""
    from scipy.optimize import linear_sum_assignment  # lazy: the core imports only torch, pyro, numpy

    labels, clusters = (np.asarray(a.cpu() if isinstance(a, torch.Tensor) else a).reshape(-1)
                        for a in (labels, clusters))
    if labels.shape != clusters.shape or labels.size == 0:
        raise ValueError(f"labels and clusters must be non-empty and of one length, got {labels.size} "
                         f"and {clusters.size}")
    _, label_idx = np.unique(labels, return_inverse=True)
    _, cluster_idx = np.unique(clusters, return_inverse=True)
    table = np.zeros((cluster_idx.max() + 1, label_idx.max() + 1), dtype=np.int64)
    np.add.at(table, (cluster_idx, label_idx), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / labels.size)
