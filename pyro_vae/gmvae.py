"""A mixture VAE (GMVAE): a discrete cluster c and a continuous z with a Gaussian prior per cluster.

    model(x):  for n in data plate:  c_n ~ Categorical(π);  z_n ~ N(μ_c, diag σ_c²);  x_n ~ p(x | z_n)
    guide(x):  for n in data plate:  c_n ~ q(c | x_n);      z_n ~ q(z | x_n, c_n) = N(m(x_n, c), diag s(x_n, c)²)

p(z | c) (μ_c, σ_c) is learned; π is uniform unless ``learn_weights=True``; p(x | z) is any
likelihood of :mod:`pyro_vae.likelihoods`. Because c is finite, the expectation over q(c | x) is a
sum, and with one z_c ~ q(z | x, c) drawn for every value of c:

    ELBO(x) = Σ_c q(c|x) [log p(x | z_c) + log p(z_c | c) − log q(z_c | x, c)] − KL(q(c|x) || π)
            = E_q[log p(x | z)] − KL(q(c, z | x) || p(c, z))

``guide`` marks c for parallel enumeration, so ``TraceEnum_ELBO`` computes exactly this sum (c takes
all C values at once, at a plate dim left of the data plate). Under a plain trace (``Trace_ELBO``,
:func:`pyro_vae.estimate_log_px`) the mark does nothing and c is drawn, so the same guide is the
importance proposal q(c, z | x) over both latents.

``pyro-vae train model=gmvae`` builds one (``pyro_vae/conf/model/gmvae.yaml``). By default
(``init="vade"``) the run starts it from its training images before the trainer's epochs
(:meth:`GMVAE.initialize`, :mod:`pyro_vae.gmvae_init`): an autoencoder, a Gaussian mixture on its
codes as p(z|c), q(c|x) fitted to that mixture, a warm-up with the cluster term annealed. The run's
summary gets the clustering of the test images (:meth:`GMVAE.extra_summary`: accuracy, occupancy,
k-means on the pixels of the same split) and its figures the samples per cluster and the latent
space by cluster. The study and its measurements are in experiments/gmvae/results.md.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import kl_divergence

from . import clustering, figures
from .base import LatentVariableModel
from .checks import positive_int
from .gmvae_init import INITS, VaDEInit, cluster_statistics
from .guides import MIN_SCALE
from .likelihoods import Likelihood
from .nets import ACTIVATIONS, he_linear, mlp

__all__ = ["GMVAE", "cluster_accuracy"]

cluster_accuracy = clustering.cluster_accuracy


class ClusterEncoder(nn.Module):
    """q(z | x, c) = N(m(x, c), diag s(x, c)²), s = softplus(.) + MIN_SCALE: an MLP whose first
    layer adds a learned vector e_c to W x + b, h = act(W x + b + e_c). x goes through W once and c
    broadcasts (enumerated c has shape (C, 1), a drawn one (N,) or (particles, N)).

    :param embedding_std: the e_c start as N(0, embedding_std²) draws, so the C branches of
        q(z | x, c) differ from the start.
    """

    def __init__(self, data_dim, latent_dim, num_clusters, hidden: Sequence[int], activation: str,
                 embedding_std: float = 1.0):
        super().__init__()
        hidden = list(hidden)
        if activation not in ACTIVATIONS:  # e_c is added before a pointwise activation
            raise ValueError(f"the GMVAE's encoder needs a pointwise activation, got {activation!r}; "
                             f"choose one of: {', '.join(sorted(ACTIVATIONS))}")
        if not hidden:
            raise ValueError("the GMVAE's encoder needs at least one hidden layer, got model.hidden=[]")
        self.input = he_linear(data_dim, hidden[0])
        self.cluster = nn.Embedding(num_clusters, hidden[0])
        nn.init.normal_(self.cluster.weight, std=embedding_std)
        self.act = ACTIVATIONS[activation]()
        self.rest = mlp([*hidden, 2 * latent_dim], activation)

    def forward(self, x, c) -> dist.TorchDistribution:
        h = self.act(self.input(x) + self.cluster(c))
        loc, raw_scale = self.rest(h).chunk(2, dim=-1)
        return dist.Normal(loc, F.softplus(raw_scale) + MIN_SCALE).to_event(1)


class GMVAE(LatentVariableModel):
    """Gaussian-mixture VAE with ``num_clusters`` clusters and the likelihood ``likelihood``.

    q(c | x) is an MLP D -> hidden -> C (logits), q(z | x, c) a :class:`ClusterEncoder`.
    Parameters live in this module and are registered with Pyro's param store as ``gmvae0``,
    ``gmvae1``, ... (see :class:`pyro_vae.base.LatentVariableModel`).

    :param likelihood: p(x | z), e.g. ``LIKELIHOODS.build("bernoulli", ...)``; fixes D and the size of z.
    :param num_clusters: C >= 1.
    :param hidden: hidden layer sizes of both encoders (at least one layer).
    :param activation: their pointwise activation (see :data:`pyro_vae.nets.ACTIVATIONS`).
    :param prior_spread: the μ_c start as ``prior_spread`` · N(0, I) draws, σ_c at 1; the default 0
        starts every p(z | c) at N(0, I) and leaves breaking the symmetry to ``embedding_std``.
    :param embedding_std: scale of the per-cluster vectors of q(z | x, c) at initialization.
    :param learn_weights: learn π = softmax(logits) instead of keeping it uniform.
    :param init: how :meth:`initialize` starts the model from the training data: ``"vade"``
        (:class:`pyro_vae.gmvae_init.VaDEInit` with ``init_options``) or ``"random"`` (as built).
    :param init_options: options of :class:`pyro_vae.gmvae_init.VaDEInit` (``pretrain_epochs``,
        ``warmup_epochs``, ``gmm_restarts``); unused for ``init="random"``.
    :param name: the name in Pyro's param store (default ``gmvae<k>``).
    """

    name_prefix = "gmvae"

    def __init__(self, likelihood: Likelihood, num_clusters: int = 10, hidden: Sequence[int] = (200, 200),
                 activation: str = "tanh", prior_spread: float = 0.0, embedding_std: float = 1.0,
                 learn_weights: bool = False, init: str = "vade", init_options: dict | None = None,
                 name: str | None = None):
        super().__init__(likelihood, name)
        self.num_clusters = positive_int(num_clusters, "model.num_clusters")
        if init not in INITS:
            raise ValueError(f"unknown model.init {init!r}; choose one of: {', '.join(INITS)}")
        self.init = VaDEInit(**(init_options or {})) if init == "vade" else None
        self.init_history: dict = {}
        for key, value in (("prior_spread", prior_spread), ("embedding_std", embedding_std)):
            if not value >= 0:
                raise ValueError(f"model.{key} must be >= 0, got {value!r}")
        C, D, L = self.num_clusters, self.data_dim, self.latent_dim
        self.cluster_encoder = mlp([D, *hidden, C], activation)  # logits of q(c|x)
        self.latent_encoder = ClusterEncoder(D, L, C, hidden, activation, embedding_std)
        self.prior_locs = nn.Parameter(prior_spread * torch.randn(C, L))
        self.prior_raw_scales = nn.Parameter(torch.full((C, L), math.log(math.e - 1)))  # softplus⁻¹(1)
        if learn_weights:
            self.weight_logits = nn.Parameter(torch.zeros(C))
        else:
            self.register_buffer("weight_logits", torch.zeros(C))

    # -- the distributions ----------------------------------------------------------------------
    @property
    def prior_scales(self) -> torch.Tensor:
        """σ_c, shape (C, latent_dim)."""
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

    def _all_clusters(self) -> torch.Tensor:
        """c = 0..C-1 of shape (C, 1), as enumeration lays them out left of the data plate."""
        return torch.arange(self.num_clusters, device=self.prior_locs.device)[:, None]

    # -- Pyro model and guide -------------------------------------------------------------------
    def model(self, x: torch.Tensor, num_data: int | None = None):
        """p(x, c, z) = p(c) p(z | c) p(x | z), one (c_n, z_n, x_n) per row of x."""
        with self.data_plate(x, num_data):
            c = pyro.sample("c", self.cluster_prior())
            z = pyro.sample("z", self.latent_prior(c))
            pyro.sample("x", self.likelihood(z), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None):
        """q(c, z | x) = q(c | x) q(z | x, c), c marked for parallel enumeration: under
        ``TraceEnum_ELBO`` c has shape (C, 1) and z (C, N, latent_dim); else c is drawn, shape (N,)."""
        with self.data_plate(x, num_data):
            c = pyro.sample("c", self.cluster_posterior(x), infer={"enumerate": "parallel"})
            pyro.sample("z", self.latent_encoder(x, c))

    # -- per-point quantities -------------------------------------------------------------------
    def _per_cluster_terms(self, x):
        """For every c: log q(c|x) (N, C) and, with one z_c ~ q(z|x,c), log p(x|z_c), the analytic
        KL(q(z|x,c) || p(z|c)) and the single-draw log q(z_c|x,c) − log p(z_c|c), each (C, N)."""
        self.check_x(x)
        log_qc = self.cluster_posterior(x).logits  # normalized log-probabilities
        c = self._all_clusters()
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

    def enumerated_elbo(self, x: torch.Tensor, cluster_kl_weight: float = 1.0) -> torch.Tensor:
        """Per-point ELBO exactly as ``TraceEnum_ELBO`` computes it (Monte Carlo KL for z, sum over
        c), differentiable; shape (N,). ``cluster_kl_weight`` w multiplies its cluster term,
        Σ_c q(c|x)[log p(x|z_c) − log q(z_c|x,c) + log p(z_c|c)] − w KL(q(c|x) || π) (the warm-up
        of :mod:`pyro_vae.gmvae_init`); w = 1 is the ELBO."""
        log_qc, log_lik, _, kl_z_mc = self._per_cluster_terms(x)
        qc = log_qc.exp()
        kl_c = (qc * (log_qc - self.cluster_prior().logits)).sum(-1)
        return (qc * (log_lik - kl_z_mc).T).sum(-1) - cluster_kl_weight * kl_c

    @torch.no_grad()
    def log_px_enumerated(self, x: torch.Tensor, num_samples: int = 1000, chunk: int = 100) -> torch.Tensor:
        """Stratified importance sampling with c summed out: K draws z_kc ~ q(z|x,c) for every c and

            log p̂(x) = log (1/K) Σ_k Σ_c p(c) p(z_kc|c) p(x|z_kc) / q(z_kc|x,c),

        unbiased for p(x) like ``estimate_log_px`` with ``guide`` (which draws c), at C times its
        decoder passes: a cross-check of that estimate. Shape (N,), float64."""
        self.check_x(x)
        c = self._all_clusters()
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

    def cluster_statistics(self, x: torch.Tensor) -> dict:
        """Entropy, KL to p(c) and occupancy of q(c | x) on the rows of x
        (:func:`pyro_vae.gmvae_init.cluster_statistics`)."""
        self.check_x(x)
        return cluster_statistics(self, x)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """E_q[z | x] = Σ_c q(c|x) m(x, c), shape (N, latent_dim)."""
        probs = self.cluster_probs(x)  # checks x
        loc = self.latent_encoder(x, self._all_clusters()).mean  # (C, N, L)
        return torch.einsum("nc,cnl->nl", probs, loc)

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Decoder mean images E[x | z] for c ~ p(c), z ~ p(z | c), shape (num_samples, D)."""
        c = self.cluster_prior().sample((num_samples,))
        return self.likelihood.mean(self.latent_prior(c).sample())

    @torch.no_grad()
    def sample_per_cluster(self, num_per_cluster: int) -> torch.Tensor:
        """Decoder mean images E[x | z] for z ~ p(z | c), shape (C, num_per_cluster, D)."""
        z = self.latent_prior(self._all_clusters().expand(-1, num_per_cluster)).sample()
        return self.likelihood.mean(z)

    # -- the run's hooks (pyro_vae.experiment.train_run) -----------------------------------------
    def initialize(self, data) -> None:
        """Start from the training images before the trainer's epochs: with ``init="vade"`` run
        :class:`pyro_vae.gmvae_init.VaDEInit` on ``data.train_x`` (cluster statistics per warm-up
        epoch on the validation set) and keep what it measured in ``init_history``."""
        if self.init is not None:
            stats_x = data.val_x if len(data.val_x) else data.train_eval_x
            self.init_history = self.init(self, data.train_x, stats_x)

    def extra_summary(self, data) -> dict:
        """The clustering of the test split by argmax_c q(c | x), for the run's summary.json:
        ``cluster`` (:meth:`cluster_statistics` of the binarized test set); with labels,
        ``cluster_accuracy`` (:func:`pyro_vae.clustering.cluster_accuracy` on the binarized test
        set, the images the model is evaluated on), ``cluster_accuracy_grey`` (q(c | x) at the grey
        test images) and ``kmeans_accuracy`` (k-means on the grey pixels, fitted to the training
        split, seeded from torch's generator); and ``init``, what :meth:`initialize` measured."""
        splits, C = data.splits, self.num_clusters
        summary = {"cluster": self.cluster_statistics(data.test_x)}
        if splits.test_y is not None:
            grey = splits.test_x.to(data.test_x.device)
            seed = int(torch.randint(2**31 - 1, ()).item())
            summary.update(
                cluster_accuracy=cluster_accuracy(splits.test_y, self.predict_cluster(data.test_x)),
                cluster_accuracy_grey=cluster_accuracy(splits.test_y, self.predict_cluster(grey)),
                kmeans_accuracy=cluster_accuracy(splits.test_y, clustering.kmeans_clusters(
                    splits.train_x, splits.test_x, C, seed)))
        if self.init_history:
            last = {k: v[-1] for k, v in self.init_history.items() if k != "warmup" and v}
            summary["init"] = {**last, "warmup": self.init_history["warmup"]}
        return summary

    def extra_figures(self, data, out_dir: str) -> None:
        """cluster_samples.png (one row per cluster c: E[x | z], z ~ p(z | c), with the share of
        test images assigned to c) and latent_clusters.png (the test set's E_q[z | x] coloured by
        argmax_c q(c | x))."""
        shape, occupancy = data.splits.image_shape, self.cluster_statistics(data.test_x)["occupancy"]
        figures.image_grid(list(self.sample_per_cluster(10).cpu().numpy()), shape,
                           os.path.join(out_dir, "cluster_samples.png"),
                           [f"c={c} ({share:.0%})" for c, share in enumerate(occupancy)],
                           "E[x|z], z ~ p(z|c): one row per cluster (share of test images)")
        figures.latent_space(self.encode(data.test_x).cpu().numpy(), self.predict_cluster(data.test_x).cpu().numpy(),
                             os.path.join(out_dir, "latent_clusters.png"), label_name="cluster assigned")
