"""Priors p(z). Each is an ``nn.Module`` whose ``forward()`` returns a Pyro distribution over z
with ``event_shape == (latent_dim,)``; the VAE samples it inside the data plate, which broadcasts
its batch shape. Learnable priors keep their parameters as module parameters."""

from __future__ import annotations

import math
from typing import Sequence

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import nn
from torch.distributions import constraints

from .registry import Registry

PRIORS = Registry("prior")


class Prior(nn.Module):
    """Base class of priors p(z) over a ``latent_dim``-dimensional latent."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = int(latent_dim)

    def forward(self) -> dist.TorchDistribution:  # pragma: no cover - interface
        raise NotImplementedError


@PRIORS.register("standard_normal")
class StandardNormalPrior(Prior):
    """p(z) = N(z; 0, I)."""

    def __init__(self, latent_dim: int):
        super().__init__(latent_dim)
        # Buffers, not constants, so .to(device/dtype) moves the prior with the networks.
        self.register_buffer("loc", torch.zeros(self.latent_dim))
        self.register_buffer("scale", torch.ones(self.latent_dim))

    def forward(self):
        return dist.Normal(self.loc, self.scale).to_event(1)


@PRIORS.register("mixture")
class MixturePrior(Prior):
    """A learnable mixture of Gaussians with diagonal covariances,

        p(z) = sum_k pi_k N(z; m_k, diag s_k^2),   pi = softmax(logits),  s_k = softplus(.) + 1e-4,

    all of pi, m and s learned. Means start at N(0, init_spread^2) draws, scales at 1, weights equal.
    There is no closed-form KL(q || p): objectives fall back to Monte Carlo (see ``mean_field``).

    The small default spread starts p(z) close to N(0, I). At spread 1 in 50 dimensions the
    components start ~10 apart, the encoder settles on a few of them and the weights follow: on
    mnist5k (500 components, 100 epochs) 5 components kept the mass, scales and means barely moved
    from their start, and test log p(x) ended 12 nats below the standard-normal prior's (measured
    with torch's default initialization, before ``nets.mlp`` switched to He).

    :param num_components: K >= 1.
    :param init_spread: standard deviation of the initial means (0 makes all components equal).
    """

    def __init__(self, latent_dim: int, num_components: int = 10, init_spread: float = 0.1):
        super().__init__(latent_dim)
        if int(num_components) != num_components or num_components < 1:
            raise ValueError(f"prior.num_components must be an integer >= 1, got {num_components!r}")
        if init_spread < 0:
            raise ValueError(f"prior.init_spread must be >= 0, got {init_spread!r}")
        self.num_components = int(num_components)
        self.logits = nn.Parameter(torch.zeros(self.num_components))
        self.locs = nn.Parameter(init_spread * torch.randn(self.num_components, self.latent_dim))
        # softplus(0.5413) = 1: components start with unit scale.
        self.raw_scales = nn.Parameter(torch.full((self.num_components, self.latent_dim), 0.5413))

    def forward(self):
        return DiagonalNormalMixture(self.logits, self.locs, torch.nn.functional.softplus(self.raw_scales) + 1e-4)


class DiagonalNormalMixture(dist.TorchDistribution):
    """p(z) = Σ_k π_k N(z; m_k, diag s_k²), π = softmax(logits), scored with two matrix products:

        log N(z; m_k, s_k) = −½ (z² · s_k⁻² − 2 z · m_k s_k⁻² + Σ_d m_kd² s_kd⁻²) − Σ_d log s_kd − (D/2) log 2π

    in float64, where the three terms' cancellation near m_k costs nothing. Broadcasting z against
    (K, D) instead builds a (particles × points × K × D) tensor: with 500 components, the mnist5k
    test log p(x) took 39 min at 1000 particles that way, and takes 3–5 min at 5000 this way. The
    parameters stay (K, D); ``expand`` only records the batch shape the data plate asks for.
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
    """The VampPrior (Tomczak & Welling, 2018): the aggregate posterior at K learned pseudo-inputs,

        p(z) = (1/K) sum_k q(z | u_k),   u_k = hardtanh(v_k, 0, 1) in [0, 1]^D,

    where q is the model's own guide (shared encoder) and the v_k are learned. The v_k start at
    N(init_mean, init_std^2) per pixel, (0.05, 0.01) as in the reference code for MNIST (which maps
    them through a sigmoid, so its pseudo-inputs start mid-grey; ours start near black; starting
    from training images instead made no difference on mnist5k).

    Train it with a long KL warm-up: the reference code ramps the KL weight over 100 epochs. With a
    10-epoch warm-up the VampPrior settles on low-KL, poorly reconstructing solutions and ends
    below the standard prior on mnist5k; with 100 epochs it ends above it
    (experiments/compare_models/results.md). It needs more data than a free mixture: on mnist5k's
    3,600 training images it is level with or ahead of a 500-component ``MixturePrior`` on the
    training images but 1.4-2.2 nats behind on test images, its KL rising more from one to the other.

    :param encoder: the guide q(z|x) (``build_vae`` passes it); its parameters are shared, not copied.
    :param num_components: number of pseudo-inputs K.
    """

    def __init__(self, latent_dim: int, encoder: nn.Module, num_components: int = 500,
                 init_mean: float = 0.05, init_std: float = 0.01):
        super().__init__(latent_dim)
        if int(num_components) != num_components or num_components < 1:
            raise ValueError(f"prior.num_components must be an integer >= 1, got {num_components!r}")
        if getattr(encoder, "latent_dim", latent_dim) != latent_dim or not hasattr(encoder, "data_dim"):
            raise ValueError("the vamp prior needs the guide module (with data_dim and latent_dim) as encoder")
        self.encoder = encoder
        self.num_components = int(num_components)
        self.pseudo_inputs = nn.Parameter(init_mean + init_std * torch.randn(self.num_components, encoder.data_dim))

    def forward(self):
        u = torch.nn.functional.hardtanh(self.pseudo_inputs, 0.0, 1.0)
        components = self.encoder(u)  # batch shape (K,), event shape (latent_dim,)
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
    """A normalizing-flow prior: z = g(u), u ~ N(0, I), with g^{-1} = f_T o ... o f_1 a stack of
    ``num_flows`` autoregressive transforms from ``pyro.distributions.transforms`` (affine, or
    rational-quadratic ``spline``), with the order of the coordinates reversed between steps:

        log p(z) = log N(f(z); 0, I) + log |det df/dz|.

    The autoregressive transforms run in the *normalizing* direction f (the MAF arrangement), so
    scoring z (what training does) is one network pass per step; sampling inverts them, one pass
    per latent dimension (only figures sample the prior).

    :param num_flows: T >= 1 steps. :param flow_type: ``"affine"`` or ``"spline"``.
    :param flow_hidden: hidden layer sizes of each step's autoregressive network.
    """

    FLOW_TYPES = ("affine", "spline")

    def __init__(self, latent_dim: int, num_flows: int = 2, flow_type: str = "affine",
                 flow_hidden: Sequence[int] = (100,)):
        super().__init__(latent_dim)
        if flow_type not in self.FLOW_TYPES:
            raise ValueError(f"prior.flow_type must be one of {', '.join(self.FLOW_TYPES)}, got {flow_type!r}")
        if int(num_flows) != num_flows or num_flows < 1:
            raise ValueError(f"prior.num_flows must be an integer >= 1, got {num_flows!r}")
        if self.latent_dim < 2:
            raise ValueError("a flow prior needs latent_dim >= 2 (an autoregressive flow in 1-D is a constant map)")
        hidden = [int(h) for h in flow_hidden]
        make = T.affine_autoregressive if flow_type == "affine" else T.spline_autoregressive
        self.flows = nn.ModuleList([make(self.latent_dim, hidden_dims=hidden) for _ in range(int(num_flows))])
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
