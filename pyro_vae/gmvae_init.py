"""The VaDE-style start of a GMVAE (Jiang et al. 2017): the phase that runs before the trainer's
epochs, on the training images, when ``model.init`` is ``vade`` (the default of ``model=gmvae``).

With f(x) the mean of q(z | x, c) when its per-cluster vectors e_c are 0 (one encoder for every
c) and p(x | z) the decoder:

1. **autoencoder**: ``pretrain_epochs`` epochs of  max Σ_n log p(g_n | z = f(x_n))  over f and the
   decoder (minibatches of 100, Adam at lr 1e-3). For a binary likelihood x_n ~ Bernoulli(g_n) is
   a fresh binarization of the grey image g_n and the decoder is scored on g_n itself:
   log p(g | z) = Σ_d g_d log p_d + (1 − g_d) log(1 − p_d) = E_{x' ~ Bernoulli(g)} log p(x' | z), the
   expected log-likelihood of an independent binarization. That is a denoising autoencoder whose
   corruption is the binarization (DEC and VaDE pretrain a denoising one); otherwise x_n = g_n;
2. **mixture on the codes**: scikit-learn's ``GaussianMixture`` (diagonal covariances, the best of
   ``gmm_restarts`` k-means-started fits) on the codes f(x_n) of the training images; p(z | c)
   starts at its components N(m_c, diag v_c), e_c at 0, and q(z | x, c) at N(f(x), s0² I) with
   s0 = 0.1 · mean_c,d √v_cd;
3. **q(c | x)** fitted to the responsibilities of that start, γ_c(x) = p(c | z = f(x)) ∝
   π_c N(f(x); μ_c, σ_c²), by ``pretrain_epochs`` epochs of  min −Σ_n Σ_c γ_c(x_n) log q(c | x_n);
4. **warm-up**: ``warmup_epochs`` epochs of the ELBO with the cluster term annealed,

       ELBO_w(x) = Σ_c q(c|x) [log p(x | z_c) + log p(z_c | c) − log q(z_c | x, c)] − w_t KL(q(c|x) || π),

   w_t = t / warmup_epochs in epoch t, π held uniform (learned only afterwards, and only with
   ``learn_weights``).

Every random draw (minibatch order, binarization, z, the mixture's seed) comes from torch's global
generator, so the start is fixed by the seed the caller sets. The measurements behind this
recipe are in experiments/gmvae/results.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, List

import pyro
import torch
import torch.nn.functional as F

from .checks import positive_int
from .guides import MIN_SCALE
from .train import TrainingDiverged

__all__ = ["INITS", "VaDEInit", "cluster_statistics"]

INITS = ("vade", "random")
BATCH_SIZE, LR, SCALE_FRACTION = 100, 1e-3, 0.1


@torch.no_grad()
def cluster_statistics(g, x: torch.Tensor) -> Dict[str, object]:
    """What q(c | x) does on the rows of x: ``entropy`` (mean H[q(c|x)]), ``kl_c`` (mean
    KL(q(c|x) || p(c))), ``occupancy`` (the fraction of rows with argmax_c q(c|x) = c, per c),
    ``smallest_share`` (its minimum) and ``clusters_used`` (the c with any row). A collapse onto
    one cluster shows as entropy 0 and one occupancy 1; an unused c (q(c|x) uniform) as entropy
    log C and kl_c 0."""
    log_q = g.cluster_posterior(x).logits
    q = log_q.exp()
    occupancy = torch.bincount(q.argmax(-1), minlength=g.num_clusters).double() / len(x)
    return {"entropy": -(q * log_q).sum(-1).mean().item(),
            "kl_c": (q * (log_q - g.cluster_prior().logits)).sum(-1).mean().item(),
            "occupancy": [round(v, 4) for v in occupancy.tolist()], "smallest_share": occupancy.min().item(),
            "clusters_used": int((occupancy > 0).sum())}


@dataclass
class VaDEInit:
    """The VaDE-style start (module docstring); ``init(g, train_x)`` runs it on a GMVAE ``g`` and
    returns what it measured per phase (losses, :func:`cluster_statistics` per warm-up epoch of
    ``stats_x`` when given, and the seconds it took).

    :param pretrain_epochs: epochs of the autoencoder and, after the mixture, of fitting q(c | x).
    :param warmup_epochs: epochs of the annealed cluster term with π uniform (0: none).
    :param gmm_restarts: fits of the Gaussian mixture; the one of highest likelihood is kept.
    """

    pretrain_epochs: int = 100
    warmup_epochs: int = 20
    gmm_restarts: int = 5

    def __post_init__(self):
        self.pretrain_epochs = positive_int(self.pretrain_epochs, "model.pretrain_epochs")
        self.warmup_epochs = positive_int(self.warmup_epochs, "model.warmup_epochs", minimum=0)
        self.gmm_restarts = positive_int(self.gmm_restarts, "model.gmm_restarts")

    def __call__(self, g, train_x: torch.Tensor, stats_x: torch.Tensor | None = None) -> Dict[str, List]:
        start, encoder = time.perf_counter(), g.latent_encoder
        with torch.no_grad():
            encoder.cluster.weight.zero_()
        zero = torch.zeros((), dtype=torch.long, device=train_x.device)

        def codes(x):
            return encoder(x, zero).mean

        autoencoder = [p for name, p in encoder.named_parameters() if not name.startswith("cluster.")]
        history = {"autoencoder_loss": _epochs(g, lambda x, grey: -g.likelihood(codes(x)).log_prob(grey),
                                               autoencoder + list(g.likelihood.parameters()), train_x,
                                               self.pretrain_epochs)}
        with torch.no_grad():
            x = torch.bernoulli(train_x) if g.likelihood.binarize else train_x
            history["mixture_log_likelihood"] = [self._fit_mixture(g, codes(x))]

        def cross_entropy(x, grey):
            with torch.no_grad():
                z = codes(x)
                gamma = (g.cluster_prior().logits + g.latent_prior(g._all_clusters()).log_prob(z).T).softmax(-1)
            return -(gamma * F.log_softmax(g.cluster_encoder(x), -1)).sum(-1)

        history["cluster_cross_entropy"] = _epochs(g, cross_entropy, g.cluster_encoder.parameters(), train_x,
                                                   self.pretrain_epochs)
        history["warmup"] = []
        trainable = [p for name, p in g.named_parameters() if name != "weight_logits"]  # π stays uniform
        optimizer = torch.optim.Adam(trainable, lr=LR)
        for epoch in range(1, self.warmup_epochs + 1):
            weight = epoch / self.warmup_epochs
            loss = _epochs(g, lambda x, grey: -g.enumerated_elbo(x, cluster_kl_weight=weight), optimizer, train_x,
                           1)[0]
            record = {"epoch": epoch, "cluster_kl_weight": weight, "train_loss": loss}
            if stats_x is not None:
                g.eval()
                record.update(cluster_statistics(g, stats_x))
            history["warmup"].append(record)
        history["seconds"] = [round(time.perf_counter() - start, 2)]
        return history

    def _fit_mixture(self, g, codes: torch.Tensor) -> float:
        """Fit the Gaussian mixture to the codes and start p(z | c) and q(z | x, c)'s scale there;
        the mixture's mean log-likelihood per code."""
        from sklearn.mixture import GaussianMixture  # lazy: the core imports only torch, pyro, numpy

        seed = int(torch.randint(2**31 - 1, ()).item())
        gmm = GaussianMixture(g.num_clusters, covariance_type="diag", n_init=self.gmm_restarts,
                              random_state=seed).fit(codes.cpu().double().numpy())
        like = dict(dtype=g.prior_locs.dtype, device=g.prior_locs.device)
        scales = torch.as_tensor(gmm.covariances_, **like).sqrt()
        g.prior_locs.copy_(torch.as_tensor(gmm.means_, **like))
        g.prior_raw_scales.copy_(_inverse_softplus(scales - MIN_SCALE))
        last, L = g.latent_encoder.rest[-1], g.latent_dim  # outputs [loc, raw scale]
        last.weight[L:].zero_()
        last.bias[L:].fill_(math.log(math.expm1(SCALE_FRACTION * scales.mean().item())))
        return float(gmm.score(codes.cpu().double().numpy()))


def _epochs(g, loss, parameters, train_x: torch.Tensor, epochs: int) -> List[float]:
    """``epochs`` passes over ``train_x`` (grey rows) in random minibatches, each an Adam step on
    the batch mean of ``loss(x, grey)``, x binarized afresh from the grey rows when the likelihood is
    binary (else x = grey); the mean loss of each pass. ``parameters``: an optimizer, or the
    parameters of a new one."""
    optimizer = parameters if isinstance(parameters, torch.optim.Optimizer) else torch.optim.Adam(parameters, lr=LR)
    losses = []
    g.train()
    with pyro.validation_enabled(False):  # grey targets: the Bernoulli's log_prob is then -BCE
        for epoch in range(epochs):
            total = 0.0
            for idx in torch.randperm(len(train_x), device=train_x.device).split(BATCH_SIZE):
                grey = train_x[idx]
                value = loss(torch.bernoulli(grey) if g.likelihood.binarize else grey, grey).mean()
                if not torch.isfinite(value):
                    raise TrainingDiverged(f"the GMVAE's start diverged: loss {value.item()} in pass {epoch + 1}")
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                total += value.item() * len(idx)
            losses.append(total / len(train_x))
    g.eval()
    return losses


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """softplus⁻¹(y) = y + log(1 − e^(−y)), for y > 0."""
    return y + torch.log(-torch.expm1(-y))
