"""Annealed importance sampling and BDMC against the linear-Gaussian model's exact log p(x), with
poor guides (narrow and shifted, like a trained VAE's); tolerances from standard errors over
data points or seeds, seeds fixed."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vae import bdmc, estimate_log_px, traces
from pyro_vae.ais import AIS
from pyro_vae.exact.linear_gaussian import LinearGaussian, LinearGaussianGuide


def ais(model, guide, x, M, T, **kw):
    kw.setdefault("seed", 0)
    return estimate_log_px(model, guide, x, M, method="ais", num_steps=T, progress=False, warn=False, **kw)


def error(result, exact):
    """(mean, standard error) over the data points of log p̂ − log p."""
    d = result.log_px - exact.double()
    return d.mean().item(), (d.std() / math.sqrt(len(d))).item()


def poor_guide(lg):
    return LinearGaussianGuide.perturbed(lg, loc_shift=1.0, scale_factor=0.6)


@pytest.mark.parametrize("d", [1, 4])
def test_ais_converges_to_the_exact_log_px_as_T_grows(d):
    lg = LinearGaussian.random(D=10, d=d, sigma=0.4, seed=d)
    x = lg.sample(20, seed=1)
    q = poor_guide(lg)
    (m0, se0), (m2, se2) = [error(ais(lg.model, q.guide, x, 8, T), lg.log_px(x)) for T in (0, 300)]
    assert m0 < -0.5 and m0 < m2 - 3 * se0  # importance sampling with 8 draws is far below log p(x)...
    assert abs(m2) < 4 * se2 + 0.02 and se2 < se0 / 2  # ...AIS at T = 300 is not, and spreads less


def test_zero_steps_is_importance_sampling_with_M_samples():
    lg = LinearGaussian.random(D=6, d=2, sigma=0.5, seed=0)
    x, q = lg.sample(7, seed=2), poor_guide(lg)
    zero = ais(lg.model, q.guide, x, 30, 0, keep_log_weights=True)
    importance = estimate_log_px(lg.model, q.guide, x, 30, seed=0, progress=False, warn=False, keep_log_weights=True)
    torch.testing.assert_close(zero.log_weights, importance.log_weights)
    torch.testing.assert_close(zero.log_px, importance.log_px)


def test_forward_is_a_lower_and_reverse_an_upper_bound_over_seeds():
    """Over 40 seeds, the mean forward estimate lies below log p(x) and the mean reverse estimate
    (from exact posterior samples) above it, each by more than 4 standard errors at T = 5, and the
    reverse run's expected 1/p̂ is 1/p(x): E[exp(log p(x) − upper)] = 1 within 4 SE."""
    lg = LinearGaussian.random(D=8, d=3, sigma=0.4, seed=3)
    x, q = lg.sample(4, seed=4), poor_guide(lg)
    exact = lg.log_px(x)
    mean, cov = lg.posterior(x)
    options = AIS(num_steps=5)
    lower, upper = [], []
    for seed in range(40):
        lower.append(ais(lg.model, q.guide, x, 4, 5, seed=seed).log_px)
        torch.manual_seed(seed)
        z = dist.MultivariateNormal(mean, covariance_matrix=cov).sample((4,))  # (M, n, d): one per chain
        layout = traces.inspect(lg.model, q.guide, (x,))
        log_w, _, _ = options.run(lg.model, q.guide, (x,), {}, layout, 4, initial={"z": z})
        upper.append(-(log_w.logsumexp(0) - math.log(4)))
    lower, upper = torch.stack(lower) - exact, torch.stack(upper) - exact  # (seeds, points)
    se = lambda t: t.std(0) / math.sqrt(len(t))  # noqa: E731
    assert (lower.mean(0) < 4 * se(lower)).all() and (upper.mean(0) > -4 * se(upper)).all()  # per point
    pooled = lambda t: t.mean(1).std() / math.sqrt(len(t))  # noqa: E731  over seeds, of the mean over points
    assert lower.mean() < -4 * pooled(lower) and upper.mean() > 4 * pooled(upper)  # and strictly, on average
    inverse = (-upper).exp()  # M = 4 chains started from one exact sample each: unbiased for 1/p(x)
    assert ((inverse.mean(0) - 1).abs() < 4 * se(inverse)).all()


def test_bdmc_interval_contains_the_exact_log_px_and_closes_as_T_grows():
    lg = LinearGaussian.random(D=10, d=3, sigma=0.4, seed=5)
    q = poor_guide(lg)
    x = lg.sample(30, seed=6)
    gaps = []
    for T in (2, 200):
        result = bdmc(lg.model, q.guide, x, 8, T, seed=0, progress=False)
        assert result.x.shape == x.shape and not torch.equal(result.x, x)  # data simulated from the model
        exact = lg.log_px(result.x)
        below, above = result.lower - exact, result.upper - exact
        assert below.mean() < 4 * below.std() / math.sqrt(30) and above.mean() > -4 * above.std() / math.sqrt(30)
        gaps.append(result.gap.mean().item())
    assert gaps[1] < gaps[0] / 4 and gaps[1] < 0.2


# ---------------------------------------------------------------- model structure

def test_two_latent_sites_an_inner_plate_and_float32():
    """z split into two sites, the data plate at dim -2 with a plate over the coordinates of x
    inside it, and a float32 model: AIS still reaches the exact log p(x)."""
    lg = LinearGaussian.random(D=8, d=3, sigma=0.5, seed=7, dtype=torch.float32)
    x = lg.sample(15, seed=8)
    W1, W2 = lg.W[:, :1], lg.W[:, 1:]
    q = poor_guide(lg)

    def model(x):
        with pyro.plate("data", len(x), dim=-2):
            z1 = pyro.sample("z1", dist.Normal(torch.zeros(1), 1.0).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            with pyro.plate("pixels", 8, dim=-1):
                pyro.sample("x", dist.Normal((z1 @ W1.T + z2 @ W2.T + lg.b).squeeze(-2), lg.sigma), obs=x)

    def guide(x):
        loc = q.loc(x)[:, None]
        with pyro.plate("data", len(x), dim=-2):
            pyro.sample("z1", dist.Normal(loc[..., :1], 0.3).to_event(1))
            pyro.sample("z2", dist.Normal(loc[..., 1:], 0.3).to_event(1))
    result = ais(model, guide, x, 8, 300)
    assert result.log_px.shape == (15,) and result.accept_rate.shape == result.step_size.shape == (15,)
    mean, se = error(result, lg.log_px(x))
    assert abs(mean) < max(4 * se, 0.05), (mean, se)
    assert ((result.accept_rate > 0.4) & (result.accept_rate < 0.95)).all()  # the step sizes adapted


def test_constrained_latent_runs_in_unconstrained_space():
    """z ~ LogNormal: with y = log z the model is the linear-Gaussian one, so log p(x) is exact; HMC
    must move in log z and carry the log-Jacobian to get it."""
    lg = LinearGaussian.random(D=6, d=2, sigma=0.4, seed=9)
    x = lg.sample(15, seed=10)
    q = poor_guide(lg)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.LogNormal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.log() @ lg.W.T + lg.b, lg.sigma).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.LogNormal(q.loc(x) + 0.3, 0.1).to_event(1))
    exact = lg.log_px(x) - 0.0  # p(x) is invariant under the change of variables z = exp(y)
    far = error(ais(model, guide, x, 8, 0), exact)
    near = error(ais(model, guide, x, 8, 300), exact)
    assert far[0] < -0.5 and abs(near[0]) < max(4 * near[1], 0.05), (far, near)


def test_subsampled_data_plate_visits_every_point():
    lg = LinearGaussian.random(D=6, d=2, sigma=0.5, seed=11)
    x, q = lg.sample(10, seed=12), poor_guide(lg)

    def model(x):
        with pyro.plate("data", len(x), subsample_size=4) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ lg.W.T + lg.b, lg.sigma).to_event(1), obs=x[idx])

    def guide(x):
        with pyro.plate("data", len(x), subsample_size=4) as idx:
            pyro.sample("z", dist.MultivariateNormal(q.loc(x[idx]), scale_tril=q.scale_tril))
    result = ais(model, guide, x, 8, 100)
    mean, se = error(result, lg.log_px(x))
    assert abs(mean) < max(4 * se, 0.05) and torch.isfinite(result.log_px).all()


def test_prior_as_the_start_distribution():
    lg = LinearGaussian.random(D=6, d=2, sigma=0.5, seed=13)
    x = lg.sample(15, seed=14)
    result = ais(lg.model, None, x, 8, 300, start="prior")
    mean, se = error(result, lg.log_px(x))
    assert abs(mean) < max(4 * se, 0.05)


def test_a_user_schedule_is_used_as_given():
    lg = LinearGaussian.random(D=6, d=2, sigma=0.5, seed=0)
    x, q = lg.sample(5, seed=2), poor_guide(lg)
    linear = torch.linspace(0, 1, 12).tolist()
    a = ais(lg.model, q.guide, x, 4, 10, schedule=linear)
    b = ais(lg.model, q.guide, x, 4, 10)
    assert not torch.equal(a.log_px, b.log_px)  # the sigmoidal default differs from the linear schedule
    assert AIS(num_steps=3).betas().tolist()[0] == 0.0 and AIS(num_steps=3).betas().tolist()[-1] == 1.0


# ---------------------------------------------------------------- bad input

def test_bad_input_gives_one_line_errors():
    lg = LinearGaussian.random(D=4, d=2, sigma=0.5, seed=0)
    x, q = lg.sample(3), poor_guide(lg)

    def discrete_model(x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(c[..., None], 1.0).expand([len(x), 4]).to_event(1), obs=x)

    def discrete_guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("c", dist.Bernoulli(0.5))

    def no_plate_guide(x):
        pyro.sample("z", dist.Normal(torch.zeros(len(x), 2, dtype=x.dtype), 1.0).to_event(2))
    cases = [
        (dict(model=discrete_model, guide=discrete_guide), "AIS needs continuous latents, but site 'c'"),
        (dict(num_steps=-1), "num_steps must be an integer >= 0, got -1"),
        (dict(num_steps=2.5), "num_steps must be an integer >= 0, got 2.5"),
        (dict(guide=no_plate_guide), r"latent site 'z' of the guide is outside pyro.plate\('data'\)"),
        (dict(schedule=[0.0, 0.5, 0.4, 1.0], num_steps=2), "schedule must be num_steps \\+ 2 = 4 increasing"),
        (dict(start="posterior"), "start must be 'guide' or 'prior'"),
        (dict(num_chains=4), r"unknown AIS option\(s\) \['num_chains'\]"),
    ]
    for change, match in cases:
        kw = {"model": lg.model, "guide": q.guide, "num_steps": 3, **change}
        model, guide = kw.pop("model"), kw.pop("guide")
        with pytest.raises(ValueError, match=match) as info:
            estimate_log_px(model, guide, x, 4, method="ais", progress=False, **kw)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="'num_steps' is an option of method='ais', not of method='guide'"):
        estimate_log_px(lg.model, q.guide, x, 4, num_steps=3, progress=False)
