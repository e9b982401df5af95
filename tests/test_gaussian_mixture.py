"""Gaussian mixture: the library's exact formulas (pyro_vae.exact) against brute force, and the
trainable mixture's SVI (pyro_vae.exact.mixture_svi) against the truth and scikit-learn.

Statistical tolerances are a stated number of standard errors (SE), with fixed seeds.
"""

import math

import numpy as np
import pytest
import pyro
import pyro.distributions as dist
import pyro.optim
import torch
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from scipy.stats import multivariate_normal

from pyro_vae.exact import GaussianMixture
from pyro_vae.exact.mixture_svi import CategoricalGuide, TrainableGaussianMixture, fit, gradient_moments, init_params
from pyro_vae.marginal import estimate_log_px


DTYPE = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second intra-op thread only spins (measured ~10x slower on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_mixture(C=3, D=2, covariance_type="full", seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(C, generator=g, dtype=DTYPE) + 0.2
    locs = 3 * torch.randn(C, D, generator=g, dtype=DTYPE)
    if covariance_type == "diag":
        return GaussianMixture(weights / weights.sum(), locs, scales=torch.rand(C, D, generator=g, dtype=DTYPE) + 0.5)
    A = torch.randn(C, D, D, generator=g, dtype=DTYPE)
    return GaussianMixture.from_covariances(weights / weights.sum(), locs, A @ A.mT + 0.5 * torch.eye(D, dtype=DTYPE))


def well_separated(covariance_type="full"):
    """Three clusters whose means are > 8 standard deviations apart."""
    weights, locs = torch.tensor([0.2, 0.3, 0.5], dtype=DTYPE), torch.tensor([[-6.0, 0], [6, 0], [0, 8]], dtype=DTYPE)
    if covariance_type == "diag":
        return GaussianMixture(weights, locs, scales=torch.tensor([[1.0, 0.5], [0.7, 1.2], [0.6, 0.9]], dtype=DTYPE))
    cov = torch.tensor([[[1.0, 0.5], [0.5, 1.0]], [[0.5, 0.0], [0.0, 1.5]], [[1.0, -0.3], [-0.3, 0.4]]], dtype=DTYPE)
    return GaussianMixture.from_covariances(weights, locs, cov)


class LinearGuide:
    """An arbitrary amortized q(c | x) = Categorical(softmax(x A + b)), A and b fixed random draws."""

    def __init__(self, dim, num_components, seed):
        g = torch.Generator().manual_seed(seed)
        self.A = 0.2 * torch.randn(dim, num_components, generator=g, dtype=DTYPE)
        self.b = 0.5 * torch.randn(num_components, generator=g, dtype=DTYPE)

    def probs(self, x):
        return (x @ self.A + self.b).softmax(-1)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Categorical(self.probs(x)))


def mixture_points_and_guide(C, num_points, seed):
    """A random mixture, points drawn from it, and an imperfect q(c|x)."""
    gm = random_mixture(C=C)
    x, _ = gm.sample(num_points, torch.Generator().manual_seed(seed))
    return gm, x, LinearGuide(2, C, seed)


# ---------------------------------------------------------------- exact formulas vs brute force

@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_log_px_and_posterior_match_scipy_explicit_sum(covariance_type):
    gm = random_mixture(covariance_type=covariance_type)
    x, _ = gm.sample(20, torch.Generator().manual_seed(1))
    # Bayes' rule written out term by term with scipy's Gaussian density.
    joint = np.stack([gm.weights[c].item() * multivariate_normal(gm.locs[c].numpy(), gm.covariances[c].numpy()).pdf(x.numpy())
                      for c in range(gm.num_components)], axis=1)
    np.testing.assert_allclose(gm.log_px(x).numpy(), np.log(joint.sum(1)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(gm.posterior_probs(x).numpy(), joint / joint.sum(1, keepdims=True), rtol=0, atol=1e-12)


def test_density_integrates_to_one_numerically():
    gm = random_mixture(C=3, D=1, seed=2)
    grid = torch.linspace(-40, 40, 200_001, dtype=DTYPE)[:, None]
    assert torch.trapezoid(gm.log_px(grid).exp(), grid[:, 0]).item() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_enumerated_model_loss_is_exact_negative_log_px(covariance_type):
    gm = random_mixture(covariance_type=covariance_type)
    x, _ = gm.sample(30, torch.Generator().manual_seed(3))
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(config_enumerate(gm.model), lambda x: None, x)
    assert loss == pytest.approx(-gm.log_px(x).sum().item(), abs=1e-10)


def test_elbo_equals_log_px_minus_kl_per_point_and_matches_pyro():
    gm, x, q = mixture_points_and_guide(C=4, num_points=8, seed=4)
    with torch.no_grad():
        probs = q.probs(x)
        post = gm.posterior_probs(x)
        kl = torch.tensor([sum(probs[n, c] * math.log(probs[n, c] / post[n, c]) for c in range(4)) for n in range(8)])
        elbo = gm.elbo(x, probs)
        assert torch.allclose(elbo, gm.log_px(x) - kl, atol=1e-12, rtol=0)
        assert (elbo <= gm.log_px(x)).all()
        # Pyro's enumerated ELBO for each point alone gives the same finite sum.
        pyro_elbo = [-TraceEnum_ELBO(max_plate_nesting=1).loss(gm.model, config_enumerate(q.guide), x[n:n + 1])
                     for n in range(8)]
        assert torch.allclose(torch.tensor(pyro_elbo, dtype=DTYPE), elbo, atol=1e-10, rtol=0)
        # The exact posterior as guide closes the gap: ELBO = log p(x).
        assert torch.allclose(gm.elbo(x, post), gm.log_px(x), atol=1e-12, rtol=0)


def test_sampled_guide_elbo_matches_enumerated_in_expectation():
    """R batch means of 100 sampled ELBO draws each: their mean is the exact ELBO within 4 SE, and
    their variance is the exact one, Σ_n Var_q[log p(x_n, c) − log q(c|x_n)] / 100, a finite sum
    over c, within 4 standard deviations of a variance estimate from R draws (√(2/(R−1)) relative)."""
    gm, x, q = mixture_points_and_guide(C=3, num_points=10, seed=5)
    R = 200
    with torch.no_grad():
        probs = q.probs(x)
        exact = gm.elbo(x, probs).sum().item()
        log_w = gm.log_joint(x) - probs.log()  # (N, C): the ELBO's integrand at each c
        exact_var = ((probs * log_w**2).sum(-1) - (probs * log_w).sum(-1) ** 2).sum().item() / 100
        sampled = Trace_ELBO(num_particles=100, vectorize_particles=True, max_plate_nesting=1)
        means = torch.tensor([-sampled.loss(gm.model, q.guide, x) for _ in range(R)], dtype=DTYPE)
    assert abs(means.mean().item() - exact) < 4 * math.sqrt(exact_var / R)
    assert abs(means.var().item() / exact_var - 1) < 4 * math.sqrt(2 / (R - 1))


@pytest.mark.slow
def test_sampled_elbo_standard_errors_are_calibrated():
    # z = (sampled ELBO mean − exact ELBO) / SE over 200 repetitions: mean 0 ± 4/√R, sd 1 ± 4/√(2R).
    gm, x, q = mixture_points_and_guide(C=3, num_points=10, seed=14)
    sampled = Trace_ELBO(num_particles=200, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        exact = gm.elbo(x, q.probs(x)).sum().item()
        draws = torch.tensor([[-sampled.loss(gm.model, q.guide, x) for _ in range(20)] for _ in range(200)])
    z = (draws.mean(1) - exact) / (draws.std(1) / math.sqrt(20))
    assert z.mean().abs() < 4 / math.sqrt(200)
    assert (z.std() - 1).abs() < 4 / math.sqrt(2 * 200) + 0.05  # + t(19) excess spread, sd ≈ 1.05


def test_sampled_gradient_is_unbiased_and_enumerated_has_zero_variance():
    """Same parameters: Trace_ELBO (score function for q) vs TraceEnum_ELBO (exact sum over c)."""
    x, _ = random_mixture(C=3).sample(40, torch.Generator().manual_seed(6))
    pyro.set_rng_seed(1)
    mixture = TrainableGaussianMixture(**init_params(x, 3, seed=0))
    q = CategoricalGuide(2, 3).to(DTYPE)
    params = list(mixture.parameters()) + list(q.parameters())
    enum = TraceEnum_ELBO(max_plate_nesting=1)
    exact_mean, exact_var = gradient_moments(lambda: enum.differentiable_loss(
        mixture.model, config_enumerate(q.guide), x), params, num_draws=3)
    assert exact_var.max().item() < 1e-20
    sampled = Trace_ELBO(num_particles=20, vectorize_particles=True, max_plate_nesting=1)
    mean, var = gradient_moments(lambda: sampled.differentiable_loss(mixture.model, q.guide, x), params, num_draws=300)
    # Every coordinate is noisy but the unused upper triangle of the C = 3 Cholesky parameters,
    # whose gradient is exactly 0: the guide's included, so it gets score-function gradients.
    silent = [torch.zeros(3 + 3 * 2), torch.ones(3, 2, 2).triu(1).flatten(), torch.zeros(len(var) - 9 - 12)]
    noisy = var > 0
    assert torch.equal(~noisy, torch.cat(silent).bool())
    assert torch.equal(mean[~noisy], exact_mean[~noisy])
    z = (mean - exact_mean)[noisy] / (var[noisy] / 300).sqrt()
    # ~60 coordinates: a 5-SE bound on the largest |z| fails by chance with probability < 1e-4.
    assert z.abs().max().item() < 5


def test_importance_weighted_estimates_with_the_amortized_guide_converge_to_exact_log_px():
    gm, x, q = mixture_points_and_guide(C=4, num_points=20, seed=13)  # q far from p(c|x): K matters
    result = estimate_log_px(gm.model, q.guide, x, num_samples=2000, seed=0, progress=False)
    with torch.no_grad():
        exact_elbo, exact_log_px = gm.elbo(x, q.probs(x)), gm.log_px(x)
    # Per point, 20 points: a 5-SE bound on the largest |z| fails by chance with probability < 1e-4.
    assert ((result.elbo - exact_elbo).abs() < 5 * result.elbo_stderr).all()
    assert ((result.log_px - exact_log_px).abs() < 5 * result.stderr).all()
    # The bound tightens with K: the gap to log p(x) at K = 1000 is a fraction of the ELBO's KL gap.
    mean_by_k = result.mean_log_px_by_k()
    gap_elbo = (exact_log_px - exact_elbo).mean().item()
    assert gap_elbo > 0.1
    assert abs(mean_by_k[1000] - exact_log_px.mean().item()) < 0.05 * gap_elbo


# ---------------------------------------------------------------- fitting

def matched_by_nearest_mean(fitted, true):
    order = torch.cdist(true.locs, fitted.locs).argmin(1)
    assert len(set(order.tolist())) == true.num_components, "two true clusters matched one fitted component"
    return order


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_svi_enumerated_recovers_true_parameters(covariance_type):
    true = well_separated(covariance_type)
    N = 600
    x, _ = true.sample(N, torch.Generator().manual_seed(7))
    fitted = fit(x, 3, "enumerate", covariance_type, num_steps=200, lr=0.1, final_lr=1e-2).mixture.fixed()
    k = matched_by_nearest_mean(fitted, true)
    n_c = N * true.weights                                              # expected points per cluster
    var = true.covariances.diagonal(dim1=-2, dim2=-1)                   # (C, D)
    se_w = (true.weights * (1 - true.weights) / N).sqrt()
    se_mu = (var / n_c[:, None]).sqrt()
    cov = true.covariances
    se_cov = ((var[:, :, None] * var[:, None, :] + cov**2) / n_c[:, None, None]).sqrt()
    assert ((fitted.weights[k] - true.weights).abs() < 4 * se_w).all()
    assert ((fitted.locs[k] - true.locs).abs() < 4 * se_mu).all()
    assert ((fitted.covariances[k] - cov).abs() < 4 * se_cov).all()


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_svi_enumerated_matches_sklearn_em_from_matched_init(covariance_type):
    sklearn_mixture = pytest.importorskip("sklearn.mixture")
    x, _ = random_mixture(C=3, covariance_type=covariance_type, seed=8).sample(300, torch.Generator().manual_seed(8))
    init = init_params(x, 3, covariance_type, seed=0)
    precisions = torch.linalg.inv(init["covariances"])
    if covariance_type == "diag":
        precisions = precisions.diagonal(dim1=-2, dim2=-1)
    em = sklearn_mixture.GaussianMixture(3, covariance_type=covariance_type, tol=1e-12, max_iter=5000,
                                         weights_init=init["weights"].numpy(), means_init=init["locs"].numpy(),
                                         precisions_init=precisions.numpy()).fit(x.numpy())
    fitted = fit(x, 3, "enumerate", covariance_type, init=init, num_steps=300, lr=0.1, final_lr=1e-2).mixture.fixed()
    # Same optimum (both float64, same reg_covar = 1e-6): mean log-likelihood within 1e-8 nats
    # per point (measured: ~1e-11), parameters within 1e-4 (measured: ~1e-6).
    assert fitted.log_px(x).mean().item() == pytest.approx(em.score(x.numpy()), abs=1e-8)
    np.testing.assert_allclose(fitted.weights.numpy(), em.weights_, atol=1e-4)
    np.testing.assert_allclose(fitted.locs.numpy(), em.means_, atol=1e-4)
    em_cov = em.covariances_ if covariance_type == "full" else np.stack([np.diag(v) for v in em.covariances_])
    np.testing.assert_allclose(fitted.covariances.numpy(), em_cov, atol=1e-4)


def test_amortized_svi_reaches_the_maximum_likelihood_fit():
    x, _ = well_separated().sample(300, torch.Generator().manual_seed(9))
    init = init_params(x, 3, seed=0)
    mle = fit(x, 3, "enumerate", init=init, num_steps=300, lr=0.1, final_lr=1e-2).log_px[-1][2]
    result = fit(x, 3, "amortized", init=init, num_steps=400, lr=0.05, final_lr=1e-3)
    assert result.log_px[-1][2] == pytest.approx(mle, abs=1e-2)
    with torch.no_grad():
        fitted = result.mixture.fixed()
        elbo = fitted.elbo(x, result.guide.probs(x))
        assert (elbo <= fitted.log_px(x) + 1e-9).all()


def test_pyro_svi_trains_the_mixture_and_instances_do_not_share_parameters():
    x, _ = well_separated().sample(100, torch.Generator().manual_seed(10))
    a, b = TrainableGaussianMixture(**init_params(x, 3, seed=0)), TrainableGaussianMixture(**init_params(x, 3, seed=1))
    b_before = b.locs.detach().clone()
    svi = SVI(config_enumerate(a.model), lambda x: None, pyro.optim.Adam({"lr": 0.1}), TraceEnum_ELBO(max_plate_nesting=1))
    first = svi.step(x)
    for _ in range(30):
        last = svi.step(x)
    assert last < first
    assert torch.equal(b.locs.detach(), b_before)


def test_float32_works():
    gm = random_mixture()
    gm32 = GaussianMixture(gm.weights.float(), gm.locs.float(), scale_tril=gm.scale_tril.float())
    x, _ = gm.sample(10, torch.Generator().manual_seed(11))
    assert gm32.log_px(x).dtype == torch.float32
    assert torch.allclose(gm32.log_px(x).double(), gm.log_px(x), atol=1e-4)
    assert fit(x.float(), 2, num_steps=5).mixture.fixed().log_px(x).dtype == torch.float32


# ---------------------------------------------------------------- bad input

def test_bad_data_raises_one_line_value_errors():
    gm = random_mixture()
    for bad, message in [(torch.zeros(2), "shape"), (torch.zeros(3, 5), "columns"),
                         (torch.tensor([[0.0, float("nan")]]), "NaN"), (torch.zeros(0, 2), "no rows")]:
        for call in (gm.log_px, gm.posterior_probs, gm.model):
            with pytest.raises(ValueError, match=message) as info:
                call(bad)
            assert "\n" not in str(info.value)


def test_bad_parameters_raise_value_errors():
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture([0.5, 0.6], torch.zeros(2, 1), scales=torch.ones(2, 1))
    with pytest.raises(ValueError, match="positive"):
        GaussianMixture([0.5, 0.5], torch.zeros(2, 1), scales=torch.tensor([[1.0], [0.0]]))
    with pytest.raises(ValueError, match="not positive definite"):
        GaussianMixture.from_covariances([1.0], torch.zeros(1, 2), torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="exactly one"):
        GaussianMixture([1.0], torch.zeros(1, 2))


def test_more_components_than_points_raises():
    with pytest.raises(ValueError, match="num_components=5 but x has 3 rows"):
        fit(torch.randn(3, 2), 5)


def test_collapsing_component_stays_finite_thanks_to_the_covariance_floor():
    # Ten copies of one point plus a spread-out cluster: maximum likelihood without a floor
    # would shrink a component onto the copies, Σ → 0 and log p(x) → ∞.
    x = torch.cat([torch.zeros(10, 2, dtype=DTYPE), torch.randn(50, 2, generator=torch.Generator().manual_seed(12),
                                                                 dtype=DTYPE) + 5])
    result = fit(x, 2, "enumerate", num_steps=300, lr=0.2, reg_covar=1e-3)
    assert all(math.isfinite(loss) for loss in result.losses)
    fitted = result.mixture.fixed()
    assert torch.isfinite(fitted.log_px(x)).all()
    assert torch.linalg.eigvalsh(fitted.covariances).min() >= 1e-3 * (1 - 1e-6)
    # All points identical: both covariance types stay finite too.
    for covariance_type in ("full", "diag"):
        same = fit(torch.ones(5, 2), 2, "enumerate", covariance_type, num_steps=50, lr=0.2)
        assert all(math.isfinite(loss) for loss in same.losses)
