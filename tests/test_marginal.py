"""estimate_log_px against exact answers: linear-Gaussian (continuous z) and Gaussian mixture (discrete c).

Tolerances come from the estimator's own standard errors (|estimate − truth| < 4 s.e. per point;
z-scores of independent points have mean 0 ± 4/√N) or from floating-point precision; seeds are fixed.
"""

import contextlib
import math

import pytest
import torch
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.ops.stats import fit_generalized_pareto

from pyro_vae.marginal import Batching, LogPxEstimate, estimate_log_px
from pyro_vae.psis import pareto_k_hat
from pyro_vae.exact.gaussian_mixture import GaussianMixture
from pyro_vae.exact.linear_gaussian import LinearGaussian, LinearGaussianGuide

F32_EPS = torch.finfo(torch.float32).eps


def estimate(model, guide, x, K, **kw):
    """estimate_log_px, seeded and silent; Batching's fields may be given as keywords."""
    kw.setdefault("progress", False)
    kw.setdefault("seed", 0)
    fields = {k: kw.pop(k) for k in ("max_batch", "particles", "points", "vectorize") if k in kw}
    return estimate_log_px(model, guide, x, K, batching=Batching(**fields), **kw)


def assert_within_stderr(result, exact, num_se=4.0):
    """Each point within num_se standard errors; the mean z-score within num_se/√N of 0."""
    z = (result.log_px - exact.double()) / result.stderr
    assert z.abs().max() < num_se, f"max |z| = {z.abs().max():.2f}"
    assert z.mean().abs() < num_se / math.sqrt(len(z)), f"mean z = {z.mean():.2f}"


@pytest.fixture(scope="module")
def lg():
    return LinearGaussian.random(D=5, d=2, sigma=0.5, seed=1)


# ---------------------------------------------------------------- exactness and convergence

@pytest.mark.parametrize("K", [1, 7, 100])
def test_exact_posterior_guide_gives_log_px_for_every_K(lg, K):
    x = lg.sample(10, seed=2)
    result = estimate(lg.model, LinearGaussianGuide.exact(lg).guide, x, K)
    # w = p(x, z)/p(z|x) = p(x) for every z: no Monte Carlo error at all, only rounding.
    torch.testing.assert_close(result.log_px, lg.log_px(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(result.elbo, lg.log_px(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(result.ess, torch.full_like(result.ess, K), rtol=1e-10, atol=0)
    assert result.log_px.dtype == torch.float64 and result.log_px.shape == (10,)
    # k̂: NaN when K < 50 (cannot be fitted); −inf for equal, hence bounded, weights.
    assert (result.pareto_k == -math.inf).all() if K >= 50 else torch.isnan(result.pareto_k).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_imperfect_guide_converges_within_stderr(dtype):
    lg = LinearGaussian.random(D=5, d=2, sigma=0.5, seed=1, dtype=dtype)
    x = lg.sample(40, seed=2)
    guide = LinearGaussianGuide.perturbed(lg, loc_shift=0.7, scale_factor=1.4).guide
    result = estimate(lg.model, guide, x, 2000)
    exact = LinearGaussian(lg.W.double(), lg.b.double(), lg.sigma).log_px(x.double())
    assert_within_stderr(result, exact)
    assert result.log_px.dtype == torch.float64
    assert (result.pareto_k < 0.7).all() and (result.ess > 200).all()


def test_float32_exact_guide_to_float32_precision():
    lg = LinearGaussian.random(D=5, d=2, sigma=0.5, seed=1, dtype=torch.float32)
    x = lg.sample(10, seed=2)
    result = estimate(lg.model, LinearGaussianGuide.exact(lg).guide, x, 50)
    exact = LinearGaussian(lg.W.double(), lg.b.double(), lg.sigma).log_px(x.double())
    # float32 sums of D + 2d log-density terms, each O(|log p(x)| + D) in magnitude.
    tol = (5 + 2 * 2) * F32_EPS * (exact.abs() + 5)
    assert ((result.log_px - exact).abs() < tol).all()


def test_expected_log_px_rises_with_K_toward_log_px():
    # d = 6 and a too-wide, shifted guide: bounded weights, yet K = 100 is still visibly biased.
    lg = LinearGaussian.random(D=10, d=6, sigma=0.5, seed=1)
    x = lg.sample(200, seed=5)
    guide = LinearGaussianGuide.perturbed(lg, loc_shift=1.0, scale_factor=1.3).guide
    result = estimate(lg.model, guide, x, 1000, prefix_sizes=(1, 10, 100, 1000), warn=False)
    gap = {k: v - lg.log_px(x) for k, v in result.log_px_by_k.items()}
    sem = lambda t: t.std() / math.sqrt(len(t))  # noqa: E731
    for k_small, k_big in [(1, 10), (10, 100), (100, 1000)]:
        rise = gap[k_big] - gap[k_small]   # paired: the same first particles
        assert rise.mean() > 3 * sem(rise), (k_small, k_big, rise.mean().item(), sem(rise).item())
    for k, g in gap.items():           # a lower bound in expectation
        assert g.mean() < 3 * sem(g), (k, g.mean().item())
    torch.testing.assert_close(result.log_px_by_k[1000], result.log_px)


def test_elbo_plus_kl_is_log_px_by_monte_carlo(lg):
    x = lg.sample(30, seed=3)
    q = LinearGaussianGuide.perturbed(lg, loc_shift=1.0, scale_factor=1.3)
    result = estimate(lg.model, q.guide, x, 2000)
    closed_elbo = lg.elbo(x, q.loc(x), q.scale_tril)
    z = (result.elbo - closed_elbo) / result.elbo_stderr
    assert z.abs().max() < 4 and z.mean().abs() < 4 / math.sqrt(len(z))
    kl = lg.kl_to_posterior(x, q.loc(x), q.scale_tril)
    torch.testing.assert_close(closed_elbo + kl, lg.log_px(x), rtol=0, atol=1e-10)
    # log p̂ − ELBO estimates log p(x) − ELBO = KL; its s.e. is at most the sum of the two.
    assert ((result.log_px - result.elbo - kl).abs() < 4 * (result.stderr + result.elbo_stderr)).all()


# ---------------------------------------------------------------- the naive estimator (z from the prior)

def test_prior_sampling_agrees_in_low_dimension():
    lg = LinearGaussian.random(D=2, d=1, sigma=1.0, seed=0)
    x = lg.sample(30, seed=1)
    result = estimate(lg.model, None, x, 3000, method="prior")
    assert_within_stderr(result, lg.log_px(x))
    assert (result.pareto_k < 0.7).all()


def test_prior_sampling_fails_visibly_in_high_dimension():
    lg = LinearGaussian.random(D=100, d=30, sigma=0.3, seed=0)
    x = lg.sample(5, seed=1)
    with pytest.warns(UserWarning, match="pareto_k > 0.7"):
        naive = estimate(lg.model, None, x, 1000, method="prior")
    exact = lg.log_px(x)
    assert ((exact - naive.log_px) > 20).all()                      # off by tens of nats
    assert (naive.ess < 5).all() and (naive.pareto_k > 0.7).all()   # ESS and k̂ say so...
    assert torch.isnan(naive.stderr).all()                           # ...and no small stderr is printed
    good = estimate(lg.model, LinearGaussianGuide.perturbed(lg, 0.1, 1.05).guide, x, 1000)
    assert_within_stderr(good, exact)


def test_exact_method_uses_the_models_marginal(lg):
    x = lg.sample(4)
    result = estimate_log_px(lg.model, None, x, method="exact")
    torch.testing.assert_close(result.log_px, lg.log_px(x))
    with pytest.raises(ValueError, match="needs a model that knows its marginal"):
        estimate_log_px(lambda x: None, None, x, method="exact")


# ---------------------------------------------------------------- model structure: plates, sites, subsampling

def test_plate_inside_the_data_plate(lg):
    D, d = lg.dims
    q = LinearGaussianGuide.perturbed(lg)

    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(torch.zeros(d, dtype=x.dtype), 1.0).to_event(1))  # (…, n, 1, d)
            with pyro.plate("features", D, dim=-1):
                pyro.sample("x", dist.Normal((z @ lg.W.T + lg.b).squeeze(-2), lg.sigma), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.MultivariateNormal(q.loc(x).unsqueeze(-2), scale_tril=q.scale_tril))

    x = lg.sample(12, seed=4)
    nested = estimate(model, guide, x, 500)
    flat = estimate(lg.model, q.guide, x, 500)  # same draws, same densities, other plate layout
    torch.testing.assert_close(nested.log_px, flat.log_px, rtol=0, atol=1e-10)
    torch.testing.assert_close(nested.pareto_k, flat.pareto_k, rtol=0, atol=1e-8)


def _two_site_pair(lg, d1, exact=True):
    """z = (z1, z2) as two sites; guide q(z1) q(z2|z1) = the exact posterior, or mean-field if not exact."""
    W1, W2 = lg.W[:, :d1], lg.W[:, d1:]
    _, cov = lg.posterior(lg.b[None])
    S11, S12, S22 = cov[:d1, :d1], cov[:d1, d1:], cov[d1:, d1:]
    gain = torch.linalg.solve(S11, S12).T                    # Σ21 Σ11⁻¹
    cond_cov = S22 - gain @ S12 if exact else S22

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(torch.zeros(d1, dtype=x.dtype), 1.0).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(torch.zeros(W2.shape[1], dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z1 @ W1.T + z2 @ W2.T + lg.b, lg.sigma).to_event(1), obs=x)

    def guide(x):
        mean, _ = lg.posterior(x)
        m1, m2 = mean[:, :d1], mean[:, d1:]
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.MultivariateNormal(m1, covariance_matrix=S11))
            loc2 = m2 + (z1 - m1) @ gain.T if exact else m2
            pyro.sample("z2", dist.MultivariateNormal(loc2, covariance_matrix=cond_cov))

    return model, guide


def test_two_latent_sites():
    lg = LinearGaussian.random(D=6, d=3, sigma=0.6, seed=7)
    x = lg.sample(20, seed=8)
    model, exact_guide = _two_site_pair(lg, d1=1, exact=True)
    torch.testing.assert_close(estimate(model, exact_guide, x, 20).log_px, lg.log_px(x), rtol=0, atol=1e-10)
    model, mean_field = _two_site_pair(lg, d1=1, exact=False)
    assert_within_stderr(estimate(model, mean_field, x, 3000), lg.log_px(x))


def _subsampled(lg, q, plate):
    """Model and guide of ``lg`` (guide ``q``) whose data plate is ``plate(x)``, which yields the
    indices of the rows of x it covers."""
    d = lg.dims[1]

    def model(x):
        with plate(x) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(d, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ lg.W.T + lg.b, lg.sigma).to_event(1), obs=x[idx])

    def guide(x):
        with plate(x) as idx:
            pyro.sample("z", dist.MultivariateNormal(q.loc(x[idx]), scale_tril=q.scale_tril))
    return model, guide


def test_subsampled_data_plate_gives_the_same_per_point_answers(lg):
    """Plate subsampling (N/B) and poutine.scale multiply Pyro's trace log_prob; neither may leak in."""
    q, B = LinearGaussianGuide.perturbed(lg), 4
    picks_B = lambda x: pyro.plate("data", x.shape[0], subsample_size=B)  # noqa: E731  B random rows of x

    @contextlib.contextmanager
    def minibatch(x):  # x is a minibatch of a 10,000-point set, and everything scaled by 3
        with pyro.plate("data", 10_000, subsample=torch.arange(len(x))) as idx, poutine.scale(scale=3.0):
            yield idx

    x = lg.sample(12, seed=4)  # 12 = 3 B: the same draws in the same order as the plain run
    plain = estimate(lg.model, q.guide, x, 300, points=B)
    for plate in (picks_B, minibatch):
        model, guide = _subsampled(lg, q, plate)
        torch.testing.assert_close(estimate(model, guide, x, 300, points=B).log_px, plain.log_px,
                                   rtol=0, atol=1e-10)
    # Every point visited once also when B does not divide N (the last chunk wraps around).
    x = lg.sample(10, seed=1)
    exact = estimate(*_subsampled(lg, LinearGaussianGuide.exact(lg), picks_B), x, 5)
    torch.testing.assert_close(exact.log_px, lg.log_px(x), rtol=0, atol=1e-10)


def test_discrete_latent_sampled_by_the_guide():
    g = torch.Generator().manual_seed(0)
    gm = GaussianMixture(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
                         2.0 * torch.randn(3, 2, generator=g, dtype=torch.float64),
                         scales=0.5 + torch.rand(3, 2, generator=g, dtype=torch.float64))
    x, _ = gm.sample(40, generator=g)

    def categorical_guide(probs_fn):
        def guide(x):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("c", dist.Categorical(probs=probs_fn(x)))
        return guide

    exact = estimate(gm.model, categorical_guide(gm.posterior_probs), x, 10)
    torch.testing.assert_close(exact.log_px, gm.log_px(x), rtol=0, atol=1e-10)
    blurred = lambda x: 0.6 * gm.posterior_probs(x) + 0.4 / 3  # noqa: E731  deliberately imperfect
    result = estimate(gm.model, categorical_guide(blurred), x, 2000)
    assert_within_stderr(result, gm.log_px(x))
    z = (result.elbo - gm.elbo(x, blurred(x))) / result.elbo_stderr
    assert z.abs().max() < 4
    assert_within_stderr(estimate(gm.model, None, x, 2000, method="prior"), gm.log_px(x))


def test_model_only_latent_is_drawn_from_the_model(lg):
    # Guide for z1 only: z2 comes from its prior inside the model, and its density cancels in w.
    x = lg.sample(20, seed=3)
    model, exact_guide = _two_site_pair(lg, d1=1, exact=True)

    def z1_only(x):
        with poutine.block(hide=["z2"]):
            exact_guide(x)

    assert_within_stderr(estimate(model, z1_only, x, 3000), lg.log_px(x))


# ---------------------------------------------------------------- streaming, chunking, diagnostics

def test_streaming_matches_direct_computation(lg):
    x = lg.sample(7, seed=6)
    guide = LinearGaussianGuide.perturbed(lg, 0.8, 0.7).guide
    r = estimate(lg.model, guide, x, 503, particles=37, points=3, keep_log_weights=True,
                 prefix_sizes=(1, 40, 503), warn=False)
    lw, K = r.log_weights, 503
    torch.testing.assert_close(r.log_px, lw.logsumexp(1) - math.log(K))
    torch.testing.assert_close(r.elbo, lw.mean(1))
    torch.testing.assert_close(r.elbo_stderr, lw.std(1) / math.sqrt(K))
    w = (lw - lw.logsumexp(1, keepdim=True)).exp()
    torch.testing.assert_close(r.ess, 1 / w.pow(2).sum(1))
    mean_w = lw.exp().mean(1)
    delta = lw.exp().std(1) / math.sqrt(K) / mean_w  # withdrawn (NaN) where k̂ > 0.7
    torch.testing.assert_close(r.stderr, torch.where(r.pareto_k > 0.7, math.nan, delta), equal_nan=True)
    assert (r.pareto_k > 0.7).any() and (r.pareto_k <= 0.7).any()
    torch.testing.assert_close(r.pareto_k, pareto_k_hat(lw))
    torch.testing.assert_close(r.log_px_by_k[40], lw[:, :40].logsumexp(1) - math.log(40))
    torch.testing.assert_close(r.log_px_by_k[1], lw[:, 0])


def test_chunking_and_vectorization_do_not_change_the_answer(lg):
    x = lg.sample(9, seed=6)
    guide = LinearGaussianGuide.exact(lg).guide
    for kw in [dict(vectorize=False), dict(max_batch=5), dict(particles=3, points=2)]:
        torch.testing.assert_close(estimate(lg.model, guide, x, 11, **kw).log_px, lg.log_px(x), rtol=0, atol=1e-10)
    imperfect = LinearGaussianGuide.perturbed(lg).guide
    assert_within_stderr(estimate(lg.model, imperfect, x, 200, vectorize=False), lg.log_px(x))


def test_seed_reproduces_and_leaves_global_rng_alone(lg):
    x = lg.sample(5)
    guide = LinearGaussianGuide.perturbed(lg).guide
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = estimate(lg.model, guide, x, 50, seed=1), estimate(lg.model, guide, x, 50, seed=1)
    assert torch.equal(a.log_px, b.log_px) and torch.equal(torch.get_rng_state(), before)


def test_pareto_k_hat_matches_pyro():
    lw = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lw = lw * torch.tensor([0.1, 1.0, 2.0, 4.0], dtype=torch.float64)[:, None]
    ours = pareto_k_hat(lw)
    M = math.ceil(min(0.2 * 1000, 3 * math.sqrt(1000)))
    for row, k in zip(lw, ours):  # the recipe of pyro.infer.importance.psis_diagnostic
        row = (row - row.max()).sort().values
        cutoff = max(math.log(1e-15), row[-M - 1].item())
        tail = row[row > cutoff]
        assert k.item() == pytest.approx(fit_generalized_pareto(tail.exp() - math.exp(cutoff))[0], abs=1e-12)
    assert ours[0] < 0.5 < 0.7 < ours[3]
    one_dominates = torch.cat([torch.zeros(1), torch.full((99,), -40.0)]).double()[None]
    assert pareto_k_hat(one_dominates).item() == math.inf        # pyro's psis_diagnostic: inf too
    assert pareto_k_hat(torch.zeros(1, 100)).item() == -math.inf  # equal weights: bounded
    assert torch.isnan(pareto_k_hat(lw[:, :40])).all()  # K < 50: too few tail weights


# ---------------------------------------------------------------- errors

def test_latent_outside_data_plate_raises(lg):
    def model(x):
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        lg.model(x - shift)

    with pytest.raises(ValueError, match=r"latent site 'shift' of the model is outside pyro.plate\('data'\)"):
        estimate(model, LinearGaussianGuide.exact(lg).guide, lg.sample(3), 5)


def test_guide_only_site_and_missing_plate_raise(lg):
    q = LinearGaussianGuide.exact(lg)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(q.loc(x), scale_tril=q.scale_tril))
            pyro.sample("aux", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="guide site 'aux' does not appear in the model"):
        estimate(lg.model, guide, lg.sample(3), 5)
    with pytest.raises(ValueError, match="data_plate='<name>'"):
        estimate(lg.model, q.guide, lg.sample(3), 5, data_plate="batch")


@pytest.mark.parametrize("bad, error, match", [
    (dict(x="wrong_width"), ValueError, "shape"),
    (dict(x="nan"), ValueError, "NaN in 1 row"),
    (dict(x="list"), TypeError, "torch.Tensor"),
    (dict(num_samples=0), ValueError, "num_samples must be an integer >= 1"),
    (dict(num_samples=2.5), ValueError, "num_samples must be an integer >= 1"),
    (dict(method="smc"), ValueError, "method must be"),
    (dict(guide=None), ValueError, "needs a guide"),
])
def test_bad_input_gives_one_line_errors(lg, bad, error, match):
    x = lg.sample(4)
    args = dict(x=x, num_samples=5, method="guide", guide=LinearGaussianGuide.exact(lg).guide)
    args.update(bad)
    if args["x"] == "wrong_width":
        args["x"] = torch.zeros(4, 7, dtype=x.dtype)
    elif args["x"] == "nan":
        args["x"] = x.clone().index_put_((torch.tensor([2]), torch.tensor([1])), torch.tensor(float("nan"), dtype=x.dtype))
    elif args["x"] == "list":
        args["x"] = x.tolist()
    with pytest.raises(error, match=match) as info:
        estimate_log_px(lg.model, args["guide"], args["x"], args["num_samples"], method=args["method"], progress=False)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- the library's VAE

def test_vae_matches_direct_importance_sampling_and_ignores_num_data():
    from pyro_vae import build_model
    torch.manual_seed(0)
    cfg = {"model": {"latent_dim": 4, "hidden": [16], "activation": "tanh"}, "prior": {"name": "standard_normal"},
           "guide": {"name": "diagonal_normal"}, "likelihood": {"name": "bernoulli"}}
    vae = build_model(cfg, data_dim=12).eval()
    x = torch.bernoulli(torch.full((15, 12), 0.3), generator=torch.Generator().manual_seed(1))
    ours = estimate(vae.model, vae.guide, x, 2000, points=15, particles=2000, seed=0, warn=False)
    # The same estimator written against the VAE's distributions, no Pyro traces. Same seed and the
    # same rsample call (the guide's, expanded by the particle and data plates, one chunk): the same z.
    torch.manual_seed(0)
    with torch.no_grad():
        q = vae.encoder(x)
        z = q.rsample((2000,))
        terms = [vae.likelihood(z).log_prob(x), vae.prior().log_prob(z), -q.log_prob(z)]
    log_w = sum(t.double() for t in terms)
    direct = log_w.logsumexp(0) - math.log(2000)
    # float32 terms summed in another order: a few float32 ulps of the largest terms.
    tol = 4 * F32_EPS * sum(t.abs().double() for t in terms).max(0).values
    assert ((ours.log_px - direct).abs() <= tol).all()
    # A minibatch's subsampling scale (num_data / len(x)) must not reach the per-point estimate.
    scaled = estimate(vae.model, vae.guide, x, 2000, points=15, particles=2000, kwargs={"num_data": 60000},
                      seed=0, warn=False)
    torch.testing.assert_close(scaled.log_px, ours.log_px, rtol=0, atol=1e-10)


def test_every_row_is_validated_even_beyond_the_first_pass():
    from pyro_vae import build_model
    cfg = {"model": {"latent_dim": 2, "hidden": [8], "activation": "tanh"}, "prior": {"name": "standard_normal"},
           "guide": {"name": "diagonal_normal"}, "likelihood": {"name": "bernoulli"}}
    vae = build_model(cfg, data_dim=5)
    x = torch.bernoulli(torch.full((30, 5), 0.5), generator=torch.Generator().manual_seed(0))
    x[23, 1] = 0.5  # not a binary pixel: outside the Bernoulli support
    with pytest.raises(ValueError, match="the model rejects rows 20-29 of x") as info:
        estimate(vae.model, vae.guide, x, 100, max_batch=10)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- slow: calibration at scale

@pytest.mark.slow
def test_standard_errors_are_calibrated_over_many_points():
    # z = (log p̂ − log p) / s.e. over 1000 independent points: mean 0 ± 4/√N, sd 1 ± 4/√(2N).
    lg = LinearGaussian.random(D=8, d=3, sigma=0.4, seed=11)
    x = lg.sample(1000, seed=12)
    result = estimate(lg.model, LinearGaussianGuide.perturbed(lg, 0.8, 1.5).guide, x, 5000)
    z = (result.log_px - lg.log_px(x)) / result.stderr
    assert z.mean().abs() < 4 / math.sqrt(1000)
    assert (z.std() - 1).abs() < 4 / math.sqrt(2 * 1000)


@pytest.mark.slow
def test_gaussian_mixture_full_covariance_prior_and_guide_at_K_5000():
    g = torch.Generator().manual_seed(3)
    C, D = 5, 4
    tril = torch.randn(C, D, D, generator=g, dtype=torch.float64).tril(-1) * 0.3 + torch.eye(D, dtype=torch.float64)
    gm = GaussianMixture(torch.full((C,), 1.0 / C, dtype=torch.float64),
                         3 * torch.randn(C, D, generator=g, dtype=torch.float64), scale_tril=tril)
    x, _ = gm.sample(300, generator=g)

    def guide(x):  # deliberately imperfect: the posterior mixed with 30% uniform
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Categorical(probs=0.7 * gm.posterior_probs(x) + 0.3 / C))

    for method, proposal in [("guide", guide), ("prior", None)]:
        result = estimate(gm.model, proposal, x, 5000, method=method)
        assert_within_stderr(result, gm.log_px(x))


def test_fraction_pareto_k_above_counts_fitted_points_and_a_dominant_weight():
    k = torch.tensor([0.2, 0.9, math.inf, -math.inf, math.nan], dtype=torch.float64)
    est = LogPxEstimate(log_px=torch.zeros(5), elbo=torch.zeros(5), stderr=torch.zeros(5),
                        elbo_stderr=torch.zeros(5), ess=torch.ones(5), pareto_k=k, num_samples=100, method="guide")
    assert est.fraction_pareto_k_above(0.7) == 2 / 4  # 0.9 and +inf of the four fitted points
    assert est.summary()["frac_pareto_k_above_0.7"] == 0.5
    none = LogPxEstimate(**{**est.__dict__, "pareto_k": torch.full((5,), math.nan, dtype=torch.float64)})
    assert none.fraction_pareto_k_above(0.7) is None
