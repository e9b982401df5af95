"""Objectives: the IWAE bound (K = 1 is the ELBO; subsampling and scaling stay outside the
log-sum-exp; the linear-Gaussian model's exact log p(x) as oracle), the STL and DReG gradient
estimators against the standard one, the analytic KL of mean_field, the KL weight and warm-up."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_vae import build_model
from pyro_vae.exact.linear_gaussian import LinearGaussian, LinearGaussianGuide
from pyro_vae.objectives import IWAE, OBJECTIVES, MeanFieldELBO, TraceELBO
from pyro_vae.studies import linear_gaussian as linear_gaussian_study


@pytest.fixture
def lg():
    return LinearGaussian.random(D=4, d=2, sigma=0.5, seed=0)


def pair(lg, guide, num_data=None, model_scale=1.0, guide_scale=1.0):
    """Model and guide of ``lg`` with a data plate of ``num_data`` (subsampled to the rows of x)."""
    d = lg.dims[1]

    def plate(x):
        n = num_data or len(x)
        return pyro.plate("data", n, subsample=torch.arange(len(x)))

    def model(x):
        with plate(x), poutine.scale(scale=model_scale):
            z = pyro.sample("z", dist.Normal(torch.zeros(d, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ lg.W.T + lg.b, lg.sigma).to_event(1), obs=x)

    def guide_fn(x):
        with plate(x), poutine.scale(scale=guide_scale):
            pyro.sample("z", dist.MultivariateNormal(guide.loc(x), scale_tril=guide.scale_tril))
    return model, guide_fn


def repeat(fn, times, seed=0):
    torch.manual_seed(seed)
    return torch.stack([fn() for _ in range(times)])


def within(a, b, se, sigmas=4.0):
    return bool(((a - b).abs() <= sigmas * se + 1e-9).all())


# --- the bound -------------------------------------------------------------------------------

def test_iwae_with_one_particle_is_the_elbo_in_value_and_gradient(tiny_vae):
    """Same draws: every estimator's loss is Trace_ELBO's; the standard gradient is Trace_ELBO's
    and, at K = 1, DReG's gradient is STL's (w~ = 1)."""
    vae = tiny_vae(data_dim=8)
    x = torch.bernoulli(torch.full((6, 8), 0.4))
    results = []
    for objective in (TraceELBO(), IWAE(1, "standard"), IWAE(1, "stl"), IWAE(1, "dreg")):
        vae.zero_grad()
        torch.manual_seed(1)
        loss = objective.differentiable_loss(vae.model, vae.guide, x, num_data=30)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in vae.parameters()]))
    for loss, _ in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
    for (_, g1), (_, g2) in ((results[0], results[1]), (results[2], results[3])):
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b)
    stl_differs = any(not torch.allclose(a, b) for a, b in zip(results[0][1], results[2][1]))
    assert stl_differs  # STL drops the score term: equal only in expectation (tested below)


def test_iwae_with_the_exact_posterior_is_log_px_for_any_K(lg):
    x = lg.sample(10, seed=1).float().double()
    model, guide = pair(lg, LinearGaussianGuide.exact(lg))
    for K in (1, 7):
        bound, scale = IWAE(K).per_point(model, guide, x)
        torch.testing.assert_close(bound, lg.log_px(x))
        torch.testing.assert_close(scale, torch.ones(10, dtype=x.dtype))


def test_subsampling_and_scaling_multiply_the_bound_outside_the_logsumexp(lg):
    """With the same draws, a batch of B of N points gives N/B times its full-batch bound, and
    poutine.scale(s) on model and guide gives s times it. Without subsampling or scaling the bound
    is Pyro's RenyiELBO(alpha=0) with vectorized particles (same draws, same value); Pyro's puts the
    scale inside the log-sum-exp, so it is no reference once a plate subsamples."""
    x = lg.sample(8, seed=1)
    q = LinearGaussianGuide.perturbed(lg, loc_shift=1.0, scale_factor=0.8)
    K = 5
    reference = repeat(lambda: IWAE(K).differentiable_loss(*pair(lg, q), x), 1)[0]
    subsampled = repeat(lambda: IWAE(K).differentiable_loss(*pair(lg, q, num_data=32), x), 1)[0]
    scaled = repeat(lambda: IWAE(K).differentiable_loss(*pair(lg, q, model_scale=3.0, guide_scale=3.0), x), 1)[0]
    torch.testing.assert_close(subsampled, 4 * reference)
    torch.testing.assert_close(scaled, 3 * reference)
    renyi = pyro.infer.RenyiELBO(alpha=0, num_particles=K, vectorize_particles=True, max_plate_nesting=1)
    torch.testing.assert_close(repeat(lambda: torch.tensor(renyi.loss(*pair(lg, q), x), dtype=x.dtype), 1)[0],
                               reference.detach())
    # the bound by hand from the same draws: -(N/B) sum_n log mean_k p(x_n, z_nk) / q(z_nk | x_n)
    torch.manual_seed(0)
    z = dist.MultivariateNormal(q.loc(x), scale_tril=q.scale_tril).expand([K, 8]).sample()
    log_w = (dist.Normal(z @ lg.W.T + lg.b, lg.sigma).to_event(1).log_prob(x)
             + dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1).log_prob(z)
             - dist.MultivariateNormal(q.loc(x), scale_tril=q.scale_tril).log_prob(z))
    torch.testing.assert_close(subsampled.detach(), -4 * (log_w.logsumexp(0) - math.log(K)).sum())


def test_partitioned_minibatches_estimate_the_full_data_bound(lg):
    """Sum over a partition of x into minibatches of (B/N) * minibatch loss = the full-batch loss,
    each compared with its expectation from repeated draws; with K large the bound is within its
    bias of the exact log p(x) (the oracle), and never above it by more than noise."""
    x = lg.sample(12, seed=2)
    q = LinearGaussianGuide.perturbed(lg, loc_shift=0.5, scale_factor=1.3)
    K, reps = 100, 20
    full = repeat(lambda: IWAE(K).differentiable_loss(*pair(lg, q), x), reps)
    parts = repeat(lambda: sum(IWAE(K).differentiable_loss(*pair(lg, q, num_data=12), x[i:i + 4]) / 3
                               for i in range(0, 12, 4)), reps)
    se = math.sqrt(full.var() / reps + parts.var() / reps)
    assert abs(full.mean() - parts.mean()) < 4 * se
    exact = -lg.log_px(x).sum()
    assert full.mean() >= exact - 4 * full.std() / math.sqrt(reps)  # a bound: loss >= -log p(x)
    assert full.mean() - exact < 0.2  # and tight at K = 100 for this mildly wrong guide


def test_one_particle_bound_has_the_closed_form_elbo_as_expectation(lg):
    """Many copies of 3 points in one batch give independent draws of each point's bound."""
    x = lg.sample(3, seed=3)
    q = LinearGaussianGuide.perturbed(lg, loc_shift=1.0, scale_factor=0.7)
    model, guide = pair(lg, q)
    copies = x.repeat(4000, 1)
    torch.manual_seed(0)
    draws = IWAE(1).per_point(model, guide, copies)[0].reshape(4000, 3)
    assert within(draws.mean(0), lg.elbo(x, q.loc(x), q.scale_tril), draws.std(0) / math.sqrt(4000))
    # and the K-sample bound rises with K toward log p(x)
    means = [IWAE(K).per_point(model, guide, x.repeat(300, 1))[0].mean().item() for K in (1, 10, 100)]
    assert means[0] < means[1] < means[2] < lg.log_px(x).mean().item()


# --- gradient estimators -----------------------------------------------------------------------

def gradient_draws(lg, estimator, K, reps=3000, seed=0):
    """(reps, P) independent per-point gradients of the IWAE loss w.r.t. a linear guide's parameters
    (A, c, L: the first 13 entries) and the model offset b, at one x (the study's draws)."""
    q = LinearGaussianGuide.perturbed(lg, loc_shift=1.0, scale_factor=1.5)
    return linear_gaussian_study.gradient_draws(lg, q, lg.sample(1, seed=5), estimator, K, reps, seed)


@pytest.mark.parametrize("estimator,K", [("stl", 1), ("dreg", 1), ("dreg", 5)])
def test_stl_and_dreg_have_the_standard_gradient_as_expectation(lg, estimator, K):
    standard = gradient_draws(lg, "standard", K, seed=1)
    other = gradient_draws(lg, estimator, K, seed=2)
    se = (standard.var(0) / len(standard) + other.var(0) / len(other)).sqrt()
    assert within(other.mean(0), standard.mean(0), se)
    # and a smaller variance for the guide's parameters (A, c, L: the first 13 entries)
    assert other.var(0)[:13].sum() < standard.var(0)[:13].sum()


def test_stl_is_biased_for_k_above_one(lg):
    """Tucker et al. (2018): dropping the score term biases the IWAE gradient when K > 1."""
    standard = gradient_draws(lg, "standard", 5, seed=1)
    stl = gradient_draws(lg, "stl", 5, seed=2)
    se = (standard.var(0) / len(standard) + stl.var(0) / len(stl)).sqrt()
    assert not within(stl.mean(0)[:13], standard.mean(0)[:13], se[:13])


# --- mean field, KL weight, warm-up --------------------------------------------------------------

@pytest.mark.parametrize("guide", ["diagonal_normal", "full_normal"])
def test_analytic_and_monte_carlo_kl_agree(tiny_vae, guide):
    from pyro_vae.guides import GUIDES
    vae = tiny_vae(data_dim=8)
    encoder = GUIDES.build(guide, {}, data_dim=8, latent_dim=3, hidden=[16], activation="tanh")
    q, p = encoder(torch.rand(5, 8)), vae.prior()
    analytic = torch.distributions.kl_divergence(q, p).detach()
    z = q.sample((20000,))
    mc = (q.log_prob(z) - p.log_prob(z)).detach()
    assert within(mc.mean(0), analytic, mc.std(0) / math.sqrt(len(mc)))


def test_mean_field_has_the_elbo_as_expectation_with_less_variance(tiny_vae):
    vae = tiny_vae(data_dim=8)
    x = torch.bernoulli(torch.full((6, 8), 0.4))
    with torch.no_grad():
        elbo = repeat(lambda: TraceELBO().differentiable_loss(vae.model, vae.guide, x), 200)
        mf = repeat(lambda: MeanFieldELBO().differentiable_loss(vae.model, vae.guide, x), 200)
    assert abs(elbo.mean() - mf.mean()) < 4 * math.sqrt(elbo.var() / 200 + mf.var() / 200)
    assert mf.var() < elbo.var()


def test_mean_field_without_a_closed_form_kl_falls_back_or_refuses(tiny_vae):
    cfg = {"model": {"latent_dim": 3, "hidden": [16], "activation": "tanh"},
           "prior": {"name": "mixture", "num_components": 3}, "guide": {"name": "diagonal_normal"},
           "likelihood": {"name": "bernoulli"}}
    vae = build_model(cfg, 8)
    x = torch.bernoulli(torch.full((6, 8), 0.4))
    assert torch.isfinite(MeanFieldELBO(fallback="mc").differentiable_loss(vae.model, vae.guide, x))
    with pytest.raises(ValueError, match=r"no closed-form KL\(Independent \|\| DiagonalNormalMixture\) at site 'z'; "
                                         r"use objective.fallback=mc"):
        MeanFieldELBO(fallback="error").differentiable_loss(vae.model, vae.guide, x)


def test_kl_weight_scales_the_latent_terms_for_every_objective(tiny_vae):
    vae = tiny_vae(data_dim=8)
    x = torch.bernoulli(torch.full((6, 8), 0.4))

    def loss(objective):
        torch.manual_seed(3)
        return objective.differentiable_loss(vae.model, vae.guide, x).detach()
    # for fixed draws the loss is linear in beta: -(log p(x|z) + beta (log p(z) - log q(z|x)))
    l0, l1, lhalf = loss(TraceELBO(beta=0.0)), loss(TraceELBO()), loss(TraceELBO(beta=0.5))
    torch.testing.assert_close(lhalf, (l0 + l1) / 2)
    torch.testing.assert_close(loss(IWAE(1, beta=0.5)), lhalf)


def test_linear_warmup_schedule():
    objective = OBJECTIVES.build("iwae", {"beta": 2.0, "warmup_epochs": 4})
    weights = []
    for epoch in range(1, 7):
        objective.on_epoch(epoch)
        weights.append(objective.kl_weight)
    assert weights == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


def test_objectives_work_with_pyro_svi(tiny_vae):
    vae = tiny_vae(data_dim=8)
    x = torch.bernoulli(torch.full((6, 8), 0.4))
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), IWAE(3, "dreg"))
    before = [p.detach().clone() for p in vae.parameters()]
    assert math.isfinite(svi.step(x))
    assert any((a != b.detach()).any() for a, b in zip(before, vae.parameters()))


# --- bad input -------------------------------------------------------------------------------------

def test_bad_objective_options():
    with pytest.raises(ValueError, match="estimator must be one of standard, stl, dreg, got 'reinforce'"):
        IWAE(5, "reinforce")
    with pytest.raises(ValueError, match="num_particles must be an integer >= 1, got 0"):
        IWAE(0)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        TraceELBO(beta=-1)
    with pytest.raises(ValueError, match="warmup_epochs must be an integer >= 0"):
        TraceELBO(warmup_epochs=1.5)
    with pytest.raises(ValueError, match="fallback must be one of mc, error"):
        MeanFieldELBO(fallback="ignore")
    with pytest.raises(ValueError, match="objective 'iwae' has no option 'k'; its options are: num_particles, estimator"):
        OBJECTIVES.build("iwae", {"k": 5})


def test_iwae_rejects_models_it_cannot_weight_per_point(lg):
    x = lg.sample(4, seed=0)

    def global_latent_model(x):
        s = pyro.sample("s", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(s, 1.0).expand([len(x), 4]).to_event(1), obs=x)

    def global_latent_guide(x):
        pyro.sample("s", dist.Normal(0.0, 1.0))
    with pytest.raises(ValueError, match=r"latent site 's' of the guide is outside pyro.plate\('data'\)"):
        IWAE(3).differentiable_loss(global_latent_model, global_latent_guide, x)

    def discrete_model(x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c[..., None], 1.0).expand([len(x), 4]).to_event(1), obs=x)

    def discrete_guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("c", dist.Bernoulli(0.5))
    with pytest.raises(ValueError, match="needs reparameterized guide sites, but 'c' .* has no rsample; use objective=elbo"):
        IWAE(3).differentiable_loss(discrete_model, discrete_guide, x)


# --- plates: every objective on every model the estimator accepts ------------------------------

def nested_pair(lg, q):
    """``pair(lg, q)`` with the data plate at dim -2 and an inner plate over the coordinates of x."""
    D, d = lg.dims

    def model(x):
        with pyro.plate("data", len(x), dim=-2):
            z = pyro.sample("z", dist.Normal(torch.zeros(d, dtype=x.dtype), 1.0).to_event(1))
            with pyro.plate("pixels", D, dim=-1):
                pyro.sample("x", dist.Normal((z @ lg.W.T + lg.b).squeeze(-2), lg.sigma), obs=x)

    def guide(x):
        with pyro.plate("data", len(x), dim=-2):
            pyro.sample("z", dist.MultivariateNormal(q.loc(x)[:, None], scale_tril=q.scale_tril))
    return model, guide


OBJECTIVE_CHOICES = [lambda: TraceELBO(), lambda: TraceELBO(num_particles=3), lambda: MeanFieldELBO(),
                     lambda: MeanFieldELBO(num_particles=3), lambda: IWAE(4), lambda: IWAE(4, "stl"),
                     lambda: IWAE(4, "dreg")]


@pytest.mark.parametrize("make", OBJECTIVE_CHOICES)
def test_every_objective_takes_a_data_plate_at_dim_minus_two(lg, make):
    """Same draws (the guide's z has the same shape up to a singleton dim), same loss and gradient as
    on the flat model; and an object used on the flat model first is not stuck with its plates."""
    x = lg.sample(6, seed=4)
    q = LinearGaussianGuide.perturbed(lg, loc_shift=0.5, scale_factor=1.2)
    b = lg.b.clone().requires_grad_()
    lg_b = LinearGaussian(lg.W, b, lg.sigma)

    def loss_and_grad(objective, model_guide):
        torch.manual_seed(5)
        loss = objective.differentiable_loss(*model_guide, x)
        return loss.detach(), torch.autograd.grad(loss, b)[0]
    flat, nested = pair(lg_b, q), nested_pair(lg_b, q)
    reused = make()
    expected = loss_and_grad(reused, flat)
    for got in (loss_and_grad(make(), nested), loss_and_grad(reused, nested)):
        torch.testing.assert_close(got, expected)
