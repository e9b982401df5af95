"""Likelihoods p(x|z) whose parameters come from a decoder network. Each is an ``nn.Module``:
``forward(z)`` returns a Pyro distribution over x with event shape (data_dim,); ``mean(z)`` is the
expected image (for figures); ``check_data(x)`` rejects data outside the support with a one-line
error before any training starts."""

from __future__ import annotations

from typing import Sequence

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

from .nets import mlp
from .registry import Registry

LIKELIHOODS = Registry("likelihood")


class Likelihood(nn.Module):
    """Base class. ``binarize`` = True means the model is of binary pixels: training batches are
    binarized afresh each time they are drawn and evaluation data once, with a fixed seed."""

    support = "real numbers"
    binarize = False

    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__()
        self.data_dim, self.latent_dim = int(data_dim), int(latent_dim)

    def check_data(self, x: torch.Tensor, what: str = "data") -> None:
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).nonzero()[0].tolist()
            raise ValueError(
                f"{what} holds NaN or inf (first at index {bad}); clean or impute it before training"
            )

    def forward(self, z) -> dist.TorchDistribution:  # pragma: no cover - interface
        raise NotImplementedError

    def mean(self, z) -> torch.Tensor:
        return self(z).mean


def _check_range(x, what, name, lo_ok, hi_ok, hint):
    lo, hi = float(x.min()), float(x.max())
    if lo < lo_ok or hi > hi_ok:
        raise ValueError(f"{what} lies in [{lo:g}, {hi:g}] but the {name} likelihood needs values in "
                         f"[{lo_ok:g}, {hi_ok:g}]; {hint}")


@LIKELIHOODS.register("bernoulli")
class BernoulliLikelihood(Likelihood):
    """p(x|z) = prod_d Bernoulli(x_d; sigmoid(f(z))_d), f a decoder MLP ``latent -> hidden -> D``.
    Data are grey values in [0, 1], read as pixel-on probabilities and binarized."""

    support = "binary pixels; grey values in [0, 1] are binarized"
    binarize = True

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (200, 200),
                 activation: str = "tanh"):
        super().__init__(data_dim, latent_dim)
        self.net = mlp([self.latent_dim, *reversed(list(hidden)), self.data_dim], activation)

    def check_data(self, x, what="data"):
        super().check_data(x, what)
        _check_range(x, what, "bernoulli", 0, 1, "rescale it (e.g. divide by the maximum pixel value)")

    def forward(self, z):
        return _Bernoulli(logits=self.net(z)).to_event(1)


class _Bernoulli(dist.Bernoulli):
    """``dist.Bernoulli`` whose log_prob, log p(x) = −BCE(logits, x), negates in place: torch's
    allocates a second (particles × pixels) tensor for the sign, a fifth of the time of a K-particle
    log p(x) pass (experiments/benchmarks/bench_log_px.py). Same values, same gradients."""

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        logits, value = broadcast_all(self.logits, value)
        return F.binary_cross_entropy_with_logits(logits, value, reduction="none").neg_()


@LIKELIHOODS.register("continuous_bernoulli")
class ContinuousBernoulliLikelihood(Likelihood):
    """p(x|z) = prod_d CB(x_d; lambda_d(z)), the continuous Bernoulli (Loaiza-Ganem & Cunningham,
    2019): CB(x; lambda) = C(lambda) lambda^x (1 - lambda)^(1 - x) on x in [0, 1], with the
    normalizer C(lambda) that a Bernoulli likelihood on grey values omits. lambda = sigmoid(f(z))."""

    support = "grey values in [0, 1]"

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (200, 200),
                 activation: str = "tanh"):
        super().__init__(data_dim, latent_dim)
        self.net = mlp([self.latent_dim, *reversed(list(hidden)), self.data_dim], activation)

    def check_data(self, x, what="data"):
        super().check_data(x, what)
        _check_range(x, what, "continuous_bernoulli", 0, 1, "rescale it (e.g. divide by the maximum pixel value)")

    def forward(self, z):
        return dist.ContinuousBernoulli(logits=self.net(z)).to_event(1)


@LIKELIHOODS.register("gaussian")
class GaussianLikelihood(Likelihood):
    """p(x|z) = prod_d N(x_d; mu_d(z), sigma_d^2) with a learned scale that does not depend on z:
    one sigma for all pixels (``scale_type="global"``) or one per pixel (``"per_dim"``),
    sigma = softplus(.) + min_scale, starting at ``init_scale``. mu = f(z), unconstrained.

    :param min_scale: floor on sigma; without one, pixels that are constant in the training data
        (the borders of digits) drive sigma -> 0 and log p(x|z) -> infinity.
    """

    support = "real numbers"
    SCALE_TYPES = ("global", "per_dim")

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (200, 200),
                 activation: str = "tanh", scale_type: str = "global", init_scale: float = 0.3,
                 min_scale: float = 0.01):
        super().__init__(data_dim, latent_dim)
        if scale_type not in self.SCALE_TYPES:
            raise ValueError(f"likelihood.scale_type must be one of {', '.join(self.SCALE_TYPES)}, got {scale_type!r}")
        if not (min_scale > 0 and init_scale > min_scale):
            raise ValueError(f"likelihood needs 0 < min_scale < init_scale, got min_scale={min_scale}, "
                             f"init_scale={init_scale}")
        self.min_scale = float(min_scale)
        self.net = mlp([self.latent_dim, *reversed(list(hidden)), self.data_dim], activation)
        raw = torch.log(torch.expm1(torch.tensor(float(init_scale - min_scale))))  # softplus^-1
        self.raw_scale = nn.Parameter(raw.expand(1 if scale_type == "global" else self.data_dim).clone())

    @property
    def scale(self) -> torch.Tensor:
        return torch.nn.functional.softplus(self.raw_scale) + self.min_scale

    def forward(self, z):
        loc = self.net(z)
        return dist.Normal(loc, self.scale.expand(loc.shape)).to_event(1)


class GreyLevels(dist.TorchDistribution):
    """Per pixel, x = k / (L - 1) with k ~ Categorical(softmax(logits)): a distribution on the L
    grey levels 0, 1/(L-1), ..., 1. ``logits`` has shape batch_shape + (L,); no event dims."""

    arg_constraints = {}
    support = constraints.unit_interval  # the L levels; log_prob rounds to the nearest one

    def __init__(self, logits: torch.Tensor, validate_args=None):
        self.logits = logits - logits.logsumexp(-1, keepdim=True)
        self.num_levels = logits.shape[-1]
        super().__init__(logits.shape[:-1], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return GreyLevels(self.logits.expand(batch_shape + (self.num_levels,)))

    def log_prob(self, value):
        k = (value * (self.num_levels - 1)).round().long().clamp(0, self.num_levels - 1)
        shape = torch.broadcast_shapes(k.shape, self.batch_shape)
        logits = self.logits.expand(shape + (self.num_levels,))
        return logits.gather(-1, k.expand(shape).unsqueeze(-1)).squeeze(-1)

    def sample(self, sample_shape=torch.Size()):
        k = torch.distributions.Categorical(logits=self.logits).sample(sample_shape)
        return k.to(self.logits.dtype) / (self.num_levels - 1)

    @property
    def mean(self):
        levels = torch.linspace(0, 1, self.num_levels, dtype=self.logits.dtype, device=self.logits.device)
        return (self.logits.exp() * levels).sum(-1)


@LIKELIHOODS.register("categorical")
class CategoricalLikelihood(Likelihood):
    """p(x|z) = prod_d Categorical(k_d; softmax(f(z)_d)) over L grey levels, x_d = k_d / (L - 1):
    the decoder outputs L logits per pixel. ``num_levels=17`` matches digits (values k/16);
    ``256`` matches 8-bit images (values k/255)."""

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (200, 200),
                 activation: str = "tanh", num_levels: int = 17):
        super().__init__(data_dim, latent_dim)
        if int(num_levels) != num_levels or num_levels < 2:
            raise ValueError(f"likelihood.num_levels must be an integer >= 2, got {num_levels!r}")
        self.num_levels = int(num_levels)
        self.support = f"the {self.num_levels} grey levels k/{self.num_levels - 1}, k = 0..{self.num_levels - 1}"
        self.net = mlp([self.latent_dim, *reversed(list(hidden)), self.data_dim * self.num_levels], activation)

    def check_data(self, x, what="data"):
        super().check_data(x, what)
        _check_range(x, what, "categorical", 0, 1, "rescale it (e.g. divide by the maximum pixel value)")
        scaled = x * (self.num_levels - 1)
        off = (scaled - scaled.round()).abs()
        if off.max() > 1e-4:
            bad = x.flatten()[off.flatten().argmax()].item()
            raise ValueError(f"{what} holds {bad:g}, not one of {self.support}; set likelihood.num_levels to "
                             f"the data's number of grey levels (17 for digits, 256 for 8-bit images)")

    def forward(self, z):
        logits = self.net(z)
        return GreyLevels(logits.reshape(*logits.shape[:-1], self.data_dim, self.num_levels)).to_event(1)
