"""Gaussian mixture: the latent variable model in which every quantity is exact.

    c ~ Categorical(π),    x | c ~ N(μ_c, Σ_c),    c ∈ {0, …, C−1},  x ∈ R^D

    log p(x)    = logsumexp_c [log π_c + log N(x; μ_c, Σ_c)]
    p(c | x)    = exp(log π_c + log N(x; μ_c, Σ_c) − log p(x))
    ELBO(q; x)  = Σ_c q(c|x) [log p(x, c) − log q(c|x)] = log p(x) − KL(q(c|x) || p(c|x))

Because c is discrete and finite, each expectation over it is a finite sum, so the evidence,
the posterior and the ELBO of any categorical guide are computed exactly here. They are the
ground truth against which SVI and the estimators of :mod:`pyro_vae.marginal` are checked (the
trainable mixture of :mod:`pyro_vae.exact.mixture_svi` builds one from its parameters at each step).

Covariances are either ``"full"`` (Σ_c = L_c L_cᵀ, given by the Cholesky factor ``scale_tril``)
or ``"diag"`` (Σ_c = diag(σ_c²), given by ``scales``).
"""

from __future__ import annotations

import torch
import pyro
import pyro.distributions as dist

__all__ = ["GaussianMixture", "check_data"]


def check_data(x, dim: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Return ``x`` as a finite (N, D) tensor, or raise a one-line ``ValueError`` saying how to fix it.

    :param x: data, one row per point (tensor or array-like).
    :param dim: the expected D (the mixture's dimension), or None to accept any.
    :param dtype: cast to this floating dtype (the parameters'), or keep x's own.
    """
    x = torch.as_tensor(x)
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"x must hold real numbers, got dtype {x.dtype}; convert it with x.float()")
    if x.dim() != 2:
        hint = "x.reshape(-1, %d)" % dim if dim else "x.reshape(N, D)"
        raise ValueError(f"x must have shape (N, D), one row per data point, got shape "
                         f"{tuple(x.shape)}; reshape it, e.g. {hint}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"x has {x.shape[1]} columns but the mixture has dimension {dim}; "
                         f"pass data of shape (N, {dim})")
    if x.shape[0] == 0:
        raise ValueError("x has no rows; pass at least one data point")
    x = x.to(dtype if dtype is not None else (x.dtype if x.is_floating_point() else torch.get_default_dtype()))
    bad = ~torch.isfinite(x).all(dim=1)
    if bad.any():
        rows = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(f"x has {int(bad.sum())} row(s) with NaN or inf (first: {rows}); "
                         f"remove or impute them before using the mixture")
    return x


class GaussianMixture:
    """A Gaussian mixture with the given parameters: exact ``log_px``, ``posterior_probs``, ``elbo``.

    :param weights: mixing weights π, shape (C,), non-negative, summing to 1.
    :param locs: component means μ_c, shape (C, D).
    :param scale_tril: Cholesky factors L_c of Σ_c = L_c L_cᵀ, shape (C, D, D), positive diagonal
        (full covariance). Give exactly one of ``scale_tril`` and ``scales``.
    :param scales: standard deviations σ_c, shape (C, D), positive (diagonal covariance).

    The dtype of ``locs`` sets the dtype of every computation; data are cast to it. Tensors of the
    right dtype are kept, not copied, so every result is differentiable in parameters that require
    gradients (a trainable mixture builds one from its parameters at each step).
    """

    def __init__(self, weights, locs, scale_tril=None, scales=None):
        locs = torch.as_tensor(locs)
        if not locs.is_floating_point():
            locs = locs.to(torch.get_default_dtype())
        if locs.dim() != 2:
            raise ValueError(f"locs must have shape (C, D), got {tuple(locs.shape)}; one row per component")
        C, D = locs.shape
        weights = torch.as_tensor(weights, dtype=locs.dtype)
        if weights.shape != (C,):
            raise ValueError(f"weights must have shape ({C},) to match locs, got {tuple(weights.shape)}")
        if not torch.isfinite(weights).all() or (weights < 0).any() or abs(weights.sum().item() - 1) > 1e-5:
            raise ValueError(f"weights must be non-negative and sum to 1, got {weights.tolist()}; "
                             f"normalize them with weights / weights.sum()")
        if not torch.isfinite(locs).all():
            raise ValueError("locs contains NaN or inf; pass finite component means")
        if (scale_tril is None) == (scales is None):
            raise ValueError("give exactly one of scale_tril (full covariance) or scales (diagonal covariance)")
        if scale_tril is not None:
            scale = torch.as_tensor(scale_tril, dtype=locs.dtype)
            if scale.shape != (C, D, D):
                raise ValueError(f"scale_tril must have shape ({C}, {D}, {D}), got {tuple(scale.shape)}")
            diag = scale.diagonal(dim1=-2, dim2=-1)
            if not torch.equal(scale, scale.tril()):
                raise ValueError("scale_tril must be lower triangular; pass torch.linalg.cholesky(covariance)")
        else:
            scale = torch.as_tensor(scales, dtype=locs.dtype)
            if scale.shape != (C, D):
                raise ValueError(f"scales must have shape ({C}, {D}), got {tuple(scale.shape)}")
            diag = scale
        if not torch.isfinite(scale).all() or not (diag > 0).all():
            raise ValueError("covariances must be positive definite (positive Cholesky diagonal / scales) "
                             "and finite; a collapsed component has zero scale: add a floor, e.g. "
                             "covariance + 1e-6 * I")
        self.weights, self.locs = weights, locs
        self.covariance_type = "full" if scale_tril is not None else "diag"
        if scale_tril is not None:
            self.scale_tril = scale
        else:
            self.scales = scale

    @classmethod
    def from_covariances(cls, weights, locs, covariances) -> "GaussianMixture":
        """Full-covariance mixture from Σ_c of shape (C, D, D); raises if a Σ_c is not positive definite."""
        covariances = torch.as_tensor(covariances, dtype=torch.as_tensor(locs).dtype)
        scale_tril, info = torch.linalg.cholesky_ex(covariances)
        if (info != 0).any():
            bad = (info != 0).nonzero().flatten().tolist()
            raise ValueError(f"covariance of component(s) {bad} is not positive definite; "
                             f"add a floor, e.g. covariance + 1e-6 * I")
        return cls(weights, locs, scale_tril=scale_tril)

    @property
    def num_components(self) -> int:
        return self.locs.shape[0]

    @property
    def dim(self) -> int:
        return self.locs.shape[1]

    @property
    def covariances(self) -> torch.Tensor:
        """Σ_c, shape (C, D, D), for either covariance type."""
        if self.covariance_type == "full":
            return self.scale_tril @ self.scale_tril.transpose(-1, -2)
        return torch.diag_embed(self.scales**2)

    def _component(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.Distribution:
        # One code path for both covariance types: the event is the D coordinates of x.
        if self.covariance_type == "full":
            return dist.MultivariateNormal(loc, scale_tril=scale)
        return dist.Normal(loc, scale).to_event(1)

    def _scale(self) -> torch.Tensor:
        return self.scale_tril if self.covariance_type == "full" else self.scales

    def components(self) -> dist.Distribution:
        """The C Gaussians N(μ_c, Σ_c) as one distribution, batch shape (C,), event shape (D,)."""
        return self._component(self.locs, self._scale())

    def log_joint(self, x) -> torch.Tensor:
        """log p(x_n, c) = log π_c + log N(x_n; μ_c, Σ_c), shape (N, C)."""
        x = check_data(x, self.dim, self.locs.dtype)
        # x[:, None, :] broadcasts each point against the C components.
        return self.weights.log() + self.components().log_prob(x[:, None, :])

    def log_px(self, x) -> torch.Tensor:
        """Exact evidence log p(x_n) = logsumexp_c log p(x_n, c), shape (N,)."""
        return self.log_joint(x).logsumexp(-1)

    def posterior_log_probs(self, x) -> torch.Tensor:
        """Exact log p(c | x_n) = log p(x_n, c) − log p(x_n), shape (N, C)."""
        log_joint = self.log_joint(x)
        return log_joint - log_joint.logsumexp(-1, keepdim=True)

    def posterior_probs(self, x) -> torch.Tensor:
        """Exact posterior p(c | x_n) (the responsibilities), shape (N, C); rows sum to 1."""
        return self.posterior_log_probs(x).exp()

    def elbo(self, x, guide_probs: torch.Tensor) -> torch.Tensor:
        """Exact per-point ELBO of a categorical guide q(c | x_n) = ``guide_probs[n, c]``, shape (N,).

        ELBO_n = Σ_c q_nc [log p(x_n, c) − log q_nc], a finite sum (0 · log 0 := 0), which equals
        log p(x_n) − KL(q(c|x_n) || p(c|x_n)).
        """
        log_joint = self.log_joint(x)
        q = torch.as_tensor(guide_probs, dtype=log_joint.dtype)
        if q.shape != log_joint.shape:
            raise ValueError(f"guide_probs must have shape (N, C) = {tuple(log_joint.shape)}, "
                             f"got {tuple(q.shape)}; pass one row of C probabilities per data point")
        # xlogy gives 0 where q = 0, so a guide may put zero mass on a component.
        return (q * log_joint).sum(-1) - torch.xlogy(q, q).sum(-1)

    def model(self, x) -> None:
        """Pyro model: for each row of x, c ~ Categorical(π) and x ~ N(μ_c, Σ_c) (observed).

        The per-point latent ``"c"`` and observation ``"x"`` live in ``pyro.plate("data", N)``.
        Wrap with :func:`pyro.infer.config_enumerate` to sum c out under ``TraceEnum_ELBO``.
        """
        weights, locs, scale = self.weights, self.locs, self._scale()
        x = check_data(x, self.dim, locs.dtype)
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(weights))
            # Indexing by c works both for sampled c (N,) and enumerated c (C, 1).
            pyro.sample("x", self._component(locs[c], scale[c]), obs=x)

    def sample(self, num_samples: int, generator: torch.Generator | None = None):
        """Draw (x, c): x of shape (num_samples, D) and the labels c of shape (num_samples,)."""
        c = torch.multinomial(self.weights.detach(), num_samples, replacement=True, generator=generator)
        eps = torch.randn(num_samples, self.dim, dtype=self.locs.dtype, generator=generator)
        scale = self._scale().detach()
        if self.covariance_type == "full":
            x = self.locs.detach()[c] + (scale[c] @ eps[:, :, None]).squeeze(-1)
        else:
            x = self.locs.detach()[c] + scale[c] * eps
        return x, c

    def __repr__(self) -> str:
        return f"GaussianMixture(C={self.num_components}, D={self.dim}, covariance_type={self.covariance_type!r})"
