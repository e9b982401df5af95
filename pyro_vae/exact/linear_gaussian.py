"""Linear-Gaussian model (probabilistic PCA): the continuous latent variable model with exact answers.

    z ~ N(0, I_d),    x | z ~ N(W z + b, σ² I_D),    W ∈ R^{D×d}

    log p(x)  = log N(x; b, C),            C = W Wᵀ + σ² I_D
    p(z | x)  = N(m(x), Σ),                Σ = (I_d + WᵀW / σ²)⁻¹,  m(x) = Σ Wᵀ (x − b) / σ²
    ELBO(q)   = E_q[log p(x|z)] − KL(q || p(z)) = log p(x) − KL(q || p(z|x))

For a Gaussian q = N(μ, S) every term is closed form, so the estimators of
:mod:`pyro_vae.marginal` can be checked against the truth. :class:`LinearGaussianGuide` is an
amortized linear guide q(z|x) = N(A x + c, L Lᵀ) that can be set to the exact posterior or
deliberately perturbed.
"""

from __future__ import annotations

import math

import torch
import pyro
import pyro.distributions as dist

__all__ = ["LinearGaussian", "LinearGaussianGuide", "gaussian_kl", "log_weight_second_moment"]


def gaussian_kl(loc_q, tril_q, loc_p, tril_p) -> torch.Tensor:
    """KL(N(μ_q, S_q) || N(μ_p, S_p)) = ½[tr(S_p⁻¹S_q) + δᵀS_p⁻¹δ − d + log|S_p| − log|S_q|], δ = μ_p − μ_q.

    Covariances are given by lower Cholesky factors; all arguments broadcast over batch dims.
    """
    d = loc_q.shape[-1]
    tril_q, tril_p = torch.broadcast_tensors(tril_q, tril_p)
    whitened = torch.linalg.solve_triangular(tril_p, tril_q, upper=False)        # L_p⁻¹ L_q
    delta = torch.linalg.solve_triangular(tril_p, (loc_p - loc_q).unsqueeze(-1), upper=False)
    logdet = lambda tril: 2 * tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)      # noqa: E731
    return 0.5 * (whitened.pow(2).sum((-2, -1)) + delta.pow(2).sum((-2, -1)) - d
                  + logdet(tril_p) - logdet(tril_q))


def log_weight_second_moment(loc_q, tril_q, loc_p, tril_p) -> torch.Tensor:
    """log E_q[(p(z)/q(z))²] = log ∫ p² / q dz = log(1 + χ²(p || q)) for Gaussians p = N(μ_p, S_p),
    q = N(μ_q, S_q), given by lower Cholesky factors; broadcasts over batch dims.

    With A = S_p⁻¹ − ½ S_q⁻¹, b = S_p⁻¹ μ_p − ½ S_q⁻¹ μ_q and c = μ_pᵀ S_p⁻¹ μ_p − ½ μ_qᵀ S_q⁻¹ μ_q,

        log ∫ p²/q = −log|2π S_p| + ½ log|2π S_q| + (d/2) log π − ½ log|A| + bᵀ A⁻¹ b − c,

    finite only if A is positive definite (q wider than p/√2 in every direction); +inf otherwise.
    With p the posterior p(z|x) and q the guide, p/q = w / p(x) is the normalized importance weight,
    so this is the relative variance 1 + Var_q[w] / p(x)² that sets the IWAE bound's gap for large
    K: log p(x) − E[L_K] = (E_q[(p/q)²] − 1) / (2K) + O(1/K²).
    """
    d = loc_q.shape[-1]
    prec_p, prec_q = torch.cholesky_inverse(tril_p), torch.cholesky_inverse(tril_q)
    A = prec_p - 0.5 * prec_q
    b = (prec_p @ loc_p.unsqueeze(-1) - 0.5 * prec_q @ loc_q.unsqueeze(-1)).squeeze(-1)
    c = (loc_p.unsqueeze(-2) @ prec_p @ loc_p.unsqueeze(-1) - 0.5 * loc_q.unsqueeze(-2) @ prec_q
         @ loc_q.unsqueeze(-1)).squeeze((-2, -1))
    tril_a, info = torch.linalg.cholesky_ex(A)
    logdet = lambda tril: 2 * tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)      # noqa: E731
    quad = torch.cholesky_solve(b.unsqueeze(-1), tril_a).squeeze(-1)
    value = (-logdet(tril_p) - d * math.log(2 * math.pi) + 0.5 * logdet(tril_q) + 0.5 * d * math.log(2 * math.pi)
             + 0.5 * d * math.log(math.pi) - 0.5 * logdet(tril_a) + (b * quad).sum(-1) - c)
    return torch.where(info == 0, value, torch.full_like(value, math.inf))


class LinearGaussian:
    """z ~ N(0, I_d), x | z ~ N(W z + b, σ² I_D), with exact evidence, posterior and ELBO.

    :param W: loading matrix, shape (D, d). Its dtype is the model's dtype.
    :param b: offset, shape (D,).
    :param sigma: observation noise σ > 0 (a number).
    """

    def __init__(self, W, b, sigma: float):
        self.W = torch.as_tensor(W)
        self.b = torch.as_tensor(b, dtype=self.W.dtype)
        if self.W.dim() != 2 or self.b.shape != self.W.shape[:1]:
            raise ValueError(f"W must be (D, d) and b (D,), got {tuple(self.W.shape)} and {tuple(self.b.shape)}")
        if not float(sigma) > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)

    @classmethod
    def random(cls, D: int, d: int, sigma: float = 0.5, seed: int = 0, dtype=torch.float64) -> "LinearGaussian":
        """Random parameters: W_ij ~ N(0, 1/d) (so Var[Wz]_i = 1), b_i ~ N(0, 1)."""
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(D, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        return cls(W.to(dtype), torch.randn(D, generator=g, dtype=torch.float64).to(dtype), sigma)

    @property
    def dims(self) -> tuple[int, int]:
        """(D, d): data and latent dimension."""
        return tuple(self.W.shape)

    def model(self, x: torch.Tensor) -> None:
        """Pyro model: per row of x, latent ``"z"`` and observed ``"x"`` inside ``pyro.plate("data")``."""
        D, d = self.dims
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(self.W.new_zeros(d), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1), obs=x)

    def sample(self, num_samples: int, seed: int = 0) -> torch.Tensor:
        """Draw x of shape (num_samples, D) from p(x)."""
        g = torch.Generator().manual_seed(seed)
        D, d = self.dims
        z = torch.randn(num_samples, d, generator=g, dtype=self.W.dtype)
        return z @ self.W.T + self.b + self.sigma * torch.randn(num_samples, D, generator=g, dtype=self.W.dtype)

    def marginal(self) -> dist.MultivariateNormal:
        """p(x) = N(b, W Wᵀ + σ² I)."""
        D = self.dims[0]
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(D, dtype=self.W.dtype)
        return dist.MultivariateNormal(self.b, covariance_matrix=cov)

    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x_n), shape (N,)."""
        return self.marginal().log_prob(x)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact p(z | x_n) = N(m_n, Σ): returns (m of shape (N, d), Σ of shape (d, d))."""
        d = self.dims[1]
        precision = torch.eye(d, dtype=self.W.dtype) + self.W.T @ self.W / self.sigma**2
        cov = torch.cholesky_inverse(torch.linalg.cholesky(precision))
        return (x - self.b) @ self.W @ cov / self.sigma**2, cov      # Σ symmetric: (Σ Wᵀ r)ᵀ = rᵀ W Σ

    def kl_to_posterior(self, x, loc, scale_tril) -> torch.Tensor:
        """Exact KL(N(loc_n, L Lᵀ) || p(z | x_n)), shape (N,)."""
        mean, cov = self.posterior(x)
        return gaussian_kl(loc, scale_tril, mean, torch.linalg.cholesky(cov))

    def elbo(self, x, loc, scale_tril) -> torch.Tensor:
        """Closed-form ELBO of q = N(μ, S), S = L Lᵀ, shape (N,), computed without log p(x):

        E_q[log p(x|z)] = −D/2 log(2πσ²) − (‖x − Wμ − b‖² + tr(W S Wᵀ)) / (2σ²),
        KL(q || N(0, I)) = ½ (tr S + ‖μ‖² − d − log|S|).
        """
        D, d = self.dims
        resid = x - loc @ self.W.T - self.b
        trace_wsw = (self.W @ scale_tril).pow(2).sum((-2, -1))
        expected_ll = -0.5 * D * math.log(2 * math.pi * self.sigma**2) - (
            resid.pow(2).sum(-1) + trace_wsw) / (2 * self.sigma**2)
        zeros, eye = torch.zeros_like(loc), torch.eye(d, dtype=loc.dtype)
        return expected_ll - gaussian_kl(loc, scale_tril, zeros, eye)


class LinearGaussianGuide:
    """Amortized linear-Gaussian guide q(z | x) = N(A x + c, L Lᵀ), L lower triangular.

    The exact posterior of :class:`LinearGaussian` has this form (A = Σ Wᵀ/σ², c = −A b,
    L = chol Σ), so :meth:`exact` gives a perfect guide and :meth:`perturbed` a deliberately
    imperfect one.
    """

    def __init__(self, A, c, scale_tril):
        self.A, self.c, self.scale_tril = A, c, scale_tril

    @classmethod
    def exact(cls, lg: LinearGaussian) -> "LinearGaussianGuide":
        """The exact posterior p(z | x) as an amortized guide."""
        _, cov = lg.posterior(lg.b[None])
        A = cov @ lg.W.T / lg.sigma**2
        return cls(A, -A @ lg.b, torch.linalg.cholesky(cov))

    @classmethod
    def perturbed(cls, lg: LinearGaussian, loc_shift: float = 0.5, scale_factor: float = 1.3,
                  seed: int = 0) -> "LinearGaussianGuide":
        """The exact posterior with its mean moved by ``loc_shift`` posterior standard deviations
        (m + loc_shift · L ε, one fixed ε ~ N(0, I) for all x) and its Cholesky factor multiplied
        by ``scale_factor`` (> 1: too wide, bounded weights; < 1: too narrow, heavy-tailed weights)."""
        exact = cls.exact(lg)
        g = torch.Generator().manual_seed(seed)
        eps = torch.randn(lg.dims[1], generator=g, dtype=torch.float64).to(lg.W.dtype)
        return cls(exact.A, exact.c + loc_shift * exact.scale_tril @ eps, scale_factor * exact.scale_tril)

    def loc(self, x: torch.Tensor) -> torch.Tensor:
        """The mean A x + c, shape (N, d)."""
        return x @ self.A.T + self.c

    def guide(self, x: torch.Tensor) -> None:
        """Pyro guide: per row of x, samples ``"z"`` inside ``pyro.plate("data")``."""
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(self.loc(x), scale_tril=self.scale_tril))
