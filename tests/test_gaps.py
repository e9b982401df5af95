"""The inference-gap decomposition against the linear-Gaussian model, where the posterior, the best
Gaussian of each family and every KL are closed form; tolerances from standard errors over data
points, seeds fixed."""

import math

import pytest
import torch

from pyro_vae.exact.linear_gaussian import LinearGaussian, LinearGaussianGuide, gaussian_kl
from pyro_vae.gaps import inference_gaps
from pyro_vae.guides import MIN_SCALE, DiagonalNormalGuide, FullNormalGuide


def softplus_inv(y):
    y = y - MIN_SCALE
    return y + torch.log(-torch.expm1(-y))


def linear_encoder(lg, q: LinearGaussianGuide, diagonal: bool):
    """A library guide with a linear encoder (no hidden layer) set to q(z|x) = N(A x + c, L Lᵀ), in
    float64 (diagonal: the diagonal of L only)."""
    D, d = lg.dims
    enc = (DiagonalNormalGuide if diagonal else FullNormalGuide)(D, d, hidden=()).double()
    layer = enc.net[-1]
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[:d] = q.A
        layer.bias[:d] = q.c
        layer.bias[d:2 * d] = softplus_inv(q.scale_tril.diagonal())
        if not diagonal:
            lower = torch.tril_indices(d, d, offset=-1)
            layer.bias[2 * d:] = q.scale_tril[lower[0], lower[1]] / enc.off_diagonal_scale
    return enc


def mean_se(t):
    return t.mean().item(), (t.std() / math.sqrt(len(t))).item()


@pytest.fixture(scope="module")
def problem():
    lg = LinearGaussian.random(D=10, d=3, sigma=0.5, seed=5)
    x = lg.sample(40, seed=6)
    q = LinearGaussianGuide.perturbed(lg, loc_shift=1.0, scale_factor=0.6)  # narrow and shifted
    return lg, x, q


def run(lg, x, enc, **kw):
    return inference_gaps(lg.model, enc, x, num_chains=8, num_steps=200, num_elbo_samples=500, opt_steps=2000,
                          opt_particles=8, lr=2e-2, progress=False, **kw)


def test_full_covariance_family_has_no_approximation_gap_and_its_amortization_gap_is_the_kl(problem):
    """The family holds the exact posterior: q* = p(z|x), so log p(x) − ELBO(q*) = 0 and
    ELBO(q*) − ELBO(q_φ) = KL(q_φ || p(z|x)), the closed form of the linear-Gaussian model."""
    lg, x, q = problem
    r = run(lg, x, linear_encoder(lg, q, diagonal=False))
    m, se = mean_se(r.approximation)
    assert abs(m) < 4 * se + 1e-3, (m, se)
    kl = lg.kl_to_posterior(x, q.loc(x), q.scale_tril)
    assert kl.mean() > 1.0  # a poor guide: the test has something to find
    m, se = mean_se(r.amortization - kl)
    assert abs(m) < 4 * se, (m, se)
    # q* is the posterior: its ELBO is log p(x) exactly, point by point
    torch.testing.assert_close(r.elbo_optimized, lg.log_px(x), atol=1e-3, rtol=0)
    torch.testing.assert_close(r.total, r.approximation + r.amortization)


def test_diagonal_family_approximation_gap_is_the_mean_field_kl(problem):
    """The best diagonal Gaussian of p(z|x) = N(m, Λ⁻¹) is N(m, diag(1/Λ_ii)); its KL to the posterior
    is the approximation gap. A per-point full covariance (``flexible``) closes it."""
    lg, x, q = problem
    d = lg.dims[1]
    r = run(lg, x, linear_encoder(lg, q, diagonal=True), flexible=True)
    mean, cov = lg.posterior(x)
    precision = torch.linalg.inv(cov)
    mean_field = torch.diag_embed(precision.diagonal().rsqrt()).expand(len(x), d, d)
    kl = gaussian_kl(mean, mean_field, mean, torch.linalg.cholesky(cov)).expand(len(x))
    assert kl.mean() > 0.05
    m, se = mean_se(r.approximation - kl)
    assert abs(m) < 4 * se + 1e-3, (m, se)
    diagonal_q = torch.diag_embed(q.scale_tril.diagonal()).expand(len(x), d, d)
    m, se = mean_se(r.elbo_optimized - (lg.log_px(x) - kl))  # λ* is the mean-field optimum (no AIS in it)
    assert abs(m) < 4 * se + 1e-3, (m, se)
    m, se = mean_se(r.amortization - (lg.kl_to_posterior(x, q.loc(x), diagonal_q) - kl))
    assert abs(m) < 4 * se, (m, se)
    m, se = mean_se(r.log_px - r.elbo_flexible)
    assert abs(m) < 4 * se + 1e-3, (m, se)
    summary = r.summary()
    assert summary["num_points"] == len(x) and "approximation_gap_flexible" in summary


def test_bad_options_get_one_line_errors(problem):
    lg, x, q = problem
    enc = linear_encoder(lg, q, diagonal=True)
    for key, value in (("opt_steps", 0), ("num_elbo_samples", -1)):
        with pytest.raises(ValueError, match=f"{key} must be an integer >= 1"):
            inference_gaps(lg.model, enc, x, progress=False, **{key: value})
