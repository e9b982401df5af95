"""Likelihoods p(x|z) of the data given the latent. Each is an ``nn.Module`` whose ``forward(z)``
returns a Pyro distribution over x with event shape (data_dim,) and batch shape ``z.shape[:-1]``;
``mean(z)`` is E[x | z] (the image figures show); ``check_data(x)`` rejects data outside the
support with a one-line error before any training starts.

The four registered likelihoods are :class:`DecoderLikelihood` s: pixels independent given z, each
with a distribution whose parameters are one decoder network's outputs.
"""

from __future__ import annotations

from typing import Sequence

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

from .nets import MLP
from .registry import Registry

LIKELIHOODS = Registry("likelihood")


class Likelihood(nn.Module):
    """Base class of likelihoods p(x|z) over x in R^D given z in R^latent_dim.

    ``binarize`` is True for a distribution over binary pixels: the trainer then binarizes each
    training batch afresh when it is drawn, and evaluation data are binarized once, with a fixed seed.

    :param data_dim: D, the number of pixels.
    :param latent_dim: the size of z.
    """

    binarize = False

    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__()
        self.data_dim, self.latent_dim = int(data_dim), int(latent_dim)

    def check_data(self, x: torch.Tensor, what: str = "data") -> None:
        """A one-line ``ValueError`` naming ``what`` unless every value of x is finite."""
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).nonzero()[0].tolist()
            raise ValueError(
                f"{what} holds NaN or inf (first at index {bad}); clean or impute it before training"
            )

    def forward(self, z) -> dist.TorchDistribution:  # pragma: no cover - interface
        raise NotImplementedError

    def mean(self, z) -> torch.Tensor:
        """E[x | z], shape z.shape[:-1] + (D,)."""
        return self(z).mean


class DecoderLikelihood(Likelihood):
    """p(x|z) = prod_d p(x_d; theta_d(z)): pixels independent given z, the parameters theta(z) of
    all D pixels the output of one decoder MLP f: latent_dim -> reversed(hidden) -> D * P, with
    P = ``outputs_per_pixel`` outputs for each pixel. A subclass says which distribution each pixel
    has: ``pixel_distribution(f(z))``, a Pyro distribution of batch shape ``z.shape[:-1] + (D,)``.

    :param hidden: the encoder's hidden layer sizes; the decoder mirrors them.
    :param activation: the hidden layers' activation (see :func:`pyro_vae.nets.mlp`).
    :param net: the factory of the decoder network (an entry of :data:`pyro_vae.nets.NETS`, e.g. the
        transposed-convolutional one), which then supplies hidden and activation; default the MLP.
    """

    outputs_per_pixel = 1
    unit_interval = False  # True: the data must lie in [0, 1]

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (200, 200),
                 activation: str = "tanh", net=None):
        super().__init__(data_dim, latent_dim)
        net = net if net is not None else MLP(self.data_dim, hidden, activation)
        self.net = net.decoder(self.latent_dim, self.outputs_per_pixel)

    def pixel_distribution(self, outputs: torch.Tensor) -> dist.TorchDistribution:  # pragma: no cover
        raise NotImplementedError

    def forward(self, z):
        return self.pixel_distribution(self.net(z)).to_event(1)

    def check_data(self, x, what="data"):
        super().check_data(x, what)
        if not self.unit_interval:
            return
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            name = next((n for n in LIKELIHOODS.names() if LIKELIHOODS.get(n) is type(self)), type(self).__name__)
            raise ValueError(f"{what} lies in [{lo:g}, {hi:g}] but the {name} likelihood needs values in "
                             f"[0, 1]; rescale it (e.g. divide by the maximum pixel value)")


@LIKELIHOODS.register("bernoulli")
class BernoulliLikelihood(DecoderLikelihood):
    """p(x|z) = prod_d Bernoulli(x_d; sigmoid(f(z)_d)), a distribution over binary pixels. Grey
    values in [0, 1] are read as pixel-on probabilities and binarized (``binarize``)."""

    binarize = True
    unit_interval = True

    def pixel_distribution(self, outputs):
        return _Bernoulli(logits=outputs)


class _Bernoulli(dist.Bernoulli):
    """``dist.Bernoulli`` with a faster log_prob for binary x, the support:

        log p(x) = -softplus((1 - 2x) l),    l = logits, x in {0, 1},

    two new (particles x pixels) tensors where torch's -BCE(l, x) makes five; on a K-particle
    log p(x) pass, fresh tensors of that size cost more than the arithmetic
    (experiments/benchmarks/results_log_px.md). Same values and gradients. Values outside
    {0, 1} (grey, with validation off) get torch's -BCE(l, x)."""

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        if value.is_floating_point() and bool(((value == 0) | (value == 1)).all()):
            return F.softplus(self.logits * (1 - 2 * value)).neg_()  # the check ran on x, before broadcasting
        logits, value = broadcast_all(self.logits, value)
        return F.binary_cross_entropy_with_logits(logits, value, reduction="none").neg_()


@LIKELIHOODS.register("continuous_bernoulli")
class ContinuousBernoulliLikelihood(DecoderLikelihood):
    """p(x|z) = prod_d CB(x_d; lambda_d(z)), lambda = sigmoid(f(z)), the continuous Bernoulli
    (Loaiza-Ganem & Cunningham, 2019) on grey values x in [0, 1]:

        CB(x; lambda) = C(lambda) lambda^x (1 - lambda)^(1 - x),
        C(lambda) = 2 atanh(1 - 2 lambda) / (1 - 2 lambda)   (2 at lambda = 1/2),

    the normalizer C(lambda) being what a Bernoulli likelihood on grey values omits."""

    unit_interval = True

    def pixel_distribution(self, outputs):
        return dist.ContinuousBernoulli(logits=outputs)


@LIKELIHOODS.register("gaussian")
class GaussianLikelihood(DecoderLikelihood):
    """p(x|z) = prod_d N(x_d; mu_d(z), sigma_d^2), mu = f(z) unconstrained, with a learned scale
    that does not depend on z: sigma = softplus(r) + min_scale, starting at ``init_scale``.

    :param scale_type: ``"global"``, one sigma for all pixels, or ``"per_dim"``, one per pixel.
    :param init_scale: sigma at initialization, > min_scale.
    :param min_scale: floor on sigma, > 0; without one, pixels that are constant in the training
        data (the borders of digits) drive sigma -> 0 and log p(x|z) -> infinity.
    """

    SCALE_TYPES = ("global", "per_dim")

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (200, 200),
                 activation: str = "tanh", scale_type: str = "global", init_scale: float = 0.3,
                 min_scale: float = 0.01, net=None):
        if scale_type not in self.SCALE_TYPES:
            raise ValueError(f"likelihood.scale_type must be one of {', '.join(self.SCALE_TYPES)}, got {scale_type!r}")
        if not (min_scale > 0 and init_scale > min_scale):
            raise ValueError(f"likelihood needs 0 < min_scale < init_scale, got min_scale={min_scale}, "
                             f"init_scale={init_scale}")
        super().__init__(data_dim, latent_dim, hidden, activation, net)
        self.min_scale = float(min_scale)
        raw = torch.log(torch.expm1(torch.tensor(float(init_scale - min_scale))))  # softplus^-1
        self.raw_scale = nn.Parameter(raw.expand(1 if scale_type == "global" else self.data_dim).clone())

    @property
    def scale(self) -> torch.Tensor:
        """sigma, shape (1,) or (D,)."""
        return F.softplus(self.raw_scale) + self.min_scale

    def pixel_distribution(self, outputs):
        return dist.Normal(outputs, self.scale.expand(outputs.shape))


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
class CategoricalLikelihood(DecoderLikelihood):
    """p(x|z) = prod_d Categorical(k_d; softmax(f(z)_d)) over L grey levels, x_d = k_d / (L - 1)
    (:class:`GreyLevels`): the decoder outputs L logits per pixel.

    :param num_levels: L >= 2; 17 matches digits (values k/16), 256 8-bit images (values k/255).
    """

    unit_interval = True

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (200, 200),
                 activation: str = "tanh", num_levels: int = 17, net=None):
        if int(num_levels) != num_levels or num_levels < 2:
            raise ValueError(f"likelihood.num_levels must be an integer >= 2, got {num_levels!r}")
        self.num_levels = int(num_levels)  # read by DecoderLikelihood.__init__ to size the decoder
        super().__init__(data_dim, latent_dim, hidden, activation, net)

    @property
    def outputs_per_pixel(self) -> int:
        return self.num_levels

    def check_data(self, x, what="data"):
        super().check_data(x, what)
        scaled = x * (self.num_levels - 1)
        off = (scaled - scaled.round()).abs()
        if off.max() > 1e-4:
            bad = x.flatten()[off.flatten().argmax()].item()
            last = self.num_levels - 1
            raise ValueError(f"{what} holds {bad:g}, not one of the {self.num_levels} grey levels k/{last}, "
                             f"k = 0..{last}; set likelihood.num_levels to the data's number of grey levels "
                             f"(17 for digits, 256 for 8-bit images)")

    def pixel_distribution(self, outputs):
        return GreyLevels(outputs.reshape(*outputs.shape[:-1], self.data_dim, self.num_levels))
