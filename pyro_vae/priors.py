"""Priors p(z). Each is an ``nn.Module`` whose ``forward()`` returns a Pyro distribution over z
with ``event_shape == (latent_dim,)``; the VAE samples it inside the data plate, which broadcasts
its batch shape. Learnable priors keep their parameters as module parameters, and a config picks
one by its registered name (``prior=mixture``)."""

from __future__ import annotations

import math
from typing import Sequence

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import nn
from torch.distributions import constraints

from .checks import positive_int
from .registry import Registry

PRIORS = Registry("prior")


class Prior(nn.Module):
    """Base class of priors p(z) over a ``latent_dim``-dimensional latent z.

    :param int latent_dim: dimension of z, >= 1.
    """

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = positive_int(latent_dim, "latent_dim")

    def forward(self) -> dist.TorchDistribution:  # pragma: no cover - interface
        raise NotImplementedError


@PRIORS.register("standard_normal")
class StandardNormalPrior(Prior):
    """The standard normal prior p(z) = N(z; 0, I), with nothing to learn.

    :param int latent_dim: dimension of z.
    """

    def __init__(self, latent_dim: int):
        super().__init__(latent_dim)
        # Buffers, not constants, so .to(device/dtype) moves the prior with the networks.
        self.register_buffer("loc", torch.zeros(self.latent_dim))
        self.register_buffer("scale", torch.ones(self.latent_dim))

    def forward(self):
        return dist.Normal(self.loc, self.scale).to_event(1)


@PRIORS.register("mixture")
class MixturePrior(Prior):
    """A learnable mixture of K Gaussians with diagonal covariances,

        p(z) = Σ_k π_k N(z; m_k, diag s_k²),   π = softmax(logits),   s_k = softplus(ρ_k) + 1e-4,

    with the logits, the means m_k and the raw scales ρ_k all learned. The means start at
    N(0, init_spread²) draws, the scales at 1 and the weights equal; ``forward()`` returns a
    :class:`DiagonalNormalMixture`. KL(q || p) has no closed form, so ``objective=mean_field``
    estimates it by Monte Carlo (its default ``fallback="mc"``).

    :param int latent_dim: dimension of z.
    :param int num_components: number of components K >= 1. Default is 10.
    :param float init_spread: standard deviation of the initial means, >= 0 (0 makes all components
        equal). Default is 0.1, so that p(z) starts close to N(0, I) and the components separate as
        they learn (why not 1: experiments/compare_models/results.md, section "Earlier
        disagreements, and why", paragraph "Mixture prior below the standard normal").
    """

    def __init__(self, latent_dim: int, num_components: int = 10, init_spread: float = 0.1):
        super().__init__(latent_dim)
        self.num_components = positive_int(num_components, "prior.num_components")
        if init_spread < 0:
            raise ValueError(f"prior.init_spread must be >= 0, got {init_spread!r}")
        self.logits = nn.Parameter(torch.zeros(self.num_components))
        self.locs = nn.Parameter(init_spread * torch.randn(self.num_components, self.latent_dim))
        # softplus(0.5413) = 1: components start with unit scale.
        self.raw_scales = nn.Parameter(torch.full((self.num_components, self.latent_dim), 0.5413))

    def forward(self):
        return DiagonalNormalMixture(self.logits, self.locs, torch.nn.functional.softplus(self.raw_scales) + 1e-4)


class DiagonalNormalMixture(dist.TorchDistribution):
    """A mixture of K diagonal Gaussians over D-dimensional z,

        p(z) = Σ_k π_k N(z; m_k, diag s_k²),   π = softmax(logits),

    scored with two matrix products:

        log N(z; m_k, s_k) = −½ (z² · s_k⁻² − 2 z · m_k s_k⁻² + Σ_d m_kd² s_kd⁻²) − Σ_d log s_kd − (D/2) log 2π,

    in float64, where the three terms' cancellation near m_k costs nothing. Its intermediates have
    shapes (..., D) and (..., K), where broadcasting z against the (K, D) parameters builds a
    (..., K, D) tensor (particles × points × K × D under the particle and data plates; timings:
    experiments/benchmarks/results_log_px.md, section "The mixture prior's density"). The
    parameters stay (K, D); ``expand`` only records the batch shape the data plate asks for.
    Sampling is not reparameterized (``has_rsample`` is False).

    :param torch.Tensor logits: mixture logits, shape (K,).
    :param torch.Tensor locs: component means m, shape (K, D).
    :param torch.Tensor scales: component standard deviations s > 0, shape (K, D).
    :param batch_shape: the batch shape to report; ``log_prob`` broadcasts its result to it.
    """

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, logits, locs, scales, batch_shape=torch.Size(), validate_args=None):
        self.logits, self.locs, self.scales = logits, locs, scales
        super().__init__(torch.Size(batch_shape), locs.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return DiagonalNormalMixture(self.logits, self.locs, self.scales, batch_shape)

    def log_prob(self, z):
        if self._validate_args:
            self._validate_sample(z)
        s, m, z64 = self.scales.double(), self.locs.double(), z.double()             # (K, D), (K, D), (..., D)
        precision = s.pow(-2)
        quad = z64.pow(2) @ precision.T - 2 * z64 @ (m * precision).T + (m.pow(2) * precision).sum(-1)
        log_norm = s.log().sum(-1) + 0.5 * m.shape[-1] * math.log(2 * math.pi)
        log_p = (torch.log_softmax(self.logits.double(), -1) - 0.5 * quad - log_norm).logsumexp(-1)
        return log_p.to(z.dtype).expand(torch.broadcast_shapes(log_p.shape, self.batch_shape))

    def sample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape
        with torch.no_grad():
            k = torch.distributions.Categorical(logits=self.logits).sample(shape)
            return self.locs[k] + self.scales[k] * torch.randn(shape + self.event_shape, dtype=self.locs.dtype,
                                                               device=self.locs.device)

    @property
    def mean(self):
        mean = (torch.softmax(self.logits, -1)[:, None] * self.locs).sum(0)
        return mean.expand(self.batch_shape + self.event_shape)


@PRIORS.register("vamp")
class VampPrior(Prior):
    """The VampPrior (Tomczak & Welling, 2018): the guide's posterior averaged over K learned
    pseudo-inputs,

        p(z) = (1/K) Σ_k q(z | u_k),   u_k = hardtanh(v_k, 0, 1) ∈ [0, 1]^D,

    where q is the model's own guide (its encoder is shared, not copied) and the v_k ∈ R^D are
    learned, starting at N(init_mean, init_std²) draws per pixel. ``forward()`` returns a
    :class:`DiagonalNormalMixture` for the diagonal guide; for a flow guide (``iaf``), the mixture
    of its Gaussian bases, p(z) = (1/K) Σ_k q0(z | u_k), since scoring z under the flow itself at
    every u_k would invert the flow K times for every point, one network pass per latent dimension
    each (a batch of 100 then took all 24 GB of this machine: experiments/benchmarks/results_pairs.md);
    for any other guide, a mixture that scores z against each component. Train it with a long KL
    warm-up, e.g.
    ``objective.warmup_epochs=100`` as in the reference code (why, and how it compares with
    :class:`MixturePrior`: experiments/compare_models/results.md, section "The VampPrior: the
    warm-up was too short, and 3,600 images are few for it").

    :param int latent_dim: dimension of z; must equal the encoder's.
    :param encoder: the guide q(z|x), a :class:`~pyro_vae.guides.Guide` with ``data_dim`` and
        ``latent_dim`` (the config builder passes the model's own guide).
    :param int num_components: number of pseudo-inputs K >= 1. Default is 500.
    :param float init_mean: mean of the initial v_k. Default is 0.05.
    :param float init_std: standard deviation of the initial v_k. Default is 0.01 (with
        ``init_mean``, the reference code's values for MNIST).
    """

    def __init__(self, latent_dim: int, encoder: nn.Module, num_components: int = 500,
                 init_mean: float = 0.05, init_std: float = 0.01):
        super().__init__(latent_dim)
        num_components = positive_int(num_components, "prior.num_components")
        if getattr(encoder, "latent_dim", latent_dim) != latent_dim or not hasattr(encoder, "data_dim"):
            raise ValueError("the vamp prior needs the guide module (with data_dim and latent_dim) as encoder")
        self.encoder = encoder
        self.num_components = num_components
        self.pseudo_inputs = nn.Parameter(init_mean + init_std * torch.randn(self.num_components, encoder.data_dim))

    def forward(self):
        u = torch.nn.functional.hardtanh(self.pseudo_inputs, 0.0, 1.0)
        components = self.encoder(u)  # batch shape (K,), event shape (latent_dim,)
        if isinstance(components, dist.TransformedDistribution):  # a flow: its Gaussian base q0(z | u_k)
            components = components.base_dist
        weights = u.new_zeros(self.num_components)
        normal = getattr(components, "base_dist", None)
        if isinstance(components, dist.Independent) and isinstance(normal, dist.Normal) \
                and components.reinterpreted_batch_ndims == 1:  # the diagonal guide: the fast mixture
            return DiagonalNormalMixture(weights, normal.loc, normal.scale)
        return _ExpandingMixture(dist.Categorical(logits=weights), components)


class _ExpandingMixture(dist.MixtureSameFamily):
    """MixtureSameFamily that expands z to every component before scoring it, so components whose
    log_prob does not broadcast (flows inverted with a per-component context) work too."""

    def log_prob(self, z):
        z = z.unsqueeze(-1 - self._event_ndims)
        batch = torch.broadcast_shapes(z.shape[:z.dim() - self._event_ndims], self._component_distribution.batch_shape)
        log_p = self._component_distribution.log_prob(z.expand(batch + z.shape[z.dim() - self._event_ndims:]))
        return torch.logsumexp(log_p + torch.log_softmax(self._mixture_distribution.logits, -1), -1)


@PRIORS.register("flow")
class FlowPrior(Prior):
    """A normalizing-flow prior: z = g(u), u ~ N(0, I), with g⁻¹ = f = f_T ∘ ... ∘ f_1 a stack of
    ``num_flows`` autoregressive transforms from ``pyro.distributions.transforms`` (affine, or
    rational-quadratic ``spline``), with the order of the coordinates reversed between steps:

        log p(z) = log N(f(z); 0, I) + log |det ∂f/∂z|.

    The autoregressive transforms run in the *normalizing* direction f (the MAF arrangement), so
    scoring z (what training does) is one network pass per step; sampling inverts them, one pass
    per latent dimension (only figures sample the prior).

    :param int latent_dim: dimension of z, >= 2 (an autoregressive flow in 1-D is a constant map).
    :param int num_flows: number of steps T >= 1. Default is 2.
    :param str flow_type: ``"affine"`` or ``"spline"``. Default is ``"affine"``.
    :param flow_hidden: hidden layer sizes of each step's autoregressive network. Default is (100,).
    """

    FLOW_TYPES = ("affine", "spline")

    def __init__(self, latent_dim: int, num_flows: int = 2, flow_type: str = "affine",
                 flow_hidden: Sequence[int] = (100,)):
        super().__init__(latent_dim)
        if flow_type not in self.FLOW_TYPES:
            raise ValueError(f"prior.flow_type must be one of {', '.join(self.FLOW_TYPES)}, got {flow_type!r}")
        num_flows = positive_int(num_flows, "prior.num_flows")
        if self.latent_dim < 2:
            raise ValueError("a flow prior needs latent_dim >= 2 (an autoregressive flow in 1-D is a constant map)")
        hidden = [positive_int(h, "prior.flow_hidden") for h in flow_hidden]
        make = T.affine_autoregressive if flow_type == "affine" else T.spline_autoregressive
        self.flows = nn.ModuleList([make(self.latent_dim, hidden_dims=hidden) for _ in range(num_flows)])
        self.register_buffer("loc", torch.zeros(self.latent_dim))
        self.register_buffer("scale", torch.ones(self.latent_dim))
        self.register_buffer("reverse", torch.arange(self.latent_dim - 1, -1, -1))

    def normalizing_transforms(self):
        """f_1, reverse, f_2, reverse, ..., f_T: the map z -> u."""
        steps = []
        for i, flow in enumerate(self.flows):
            steps += [flow] if i == 0 else [T.Permute(self.reverse), flow]
        return steps

    def forward(self):
        f = T.ComposeTransform(self.normalizing_transforms())
        return dist.TransformedDistribution(dist.Normal(self.loc, self.scale).to_event(1), [f.inv])
