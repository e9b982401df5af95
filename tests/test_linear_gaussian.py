"""The linear-Gaussian model's closed forms, each checked by an independent route."""

import pytest
import torch
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine

from pyro_vae.exact.linear_gaussian import LinearGaussian, LinearGaussianGuide, gaussian_kl


@pytest.fixture
def lg():
    return LinearGaussian.random(D=6, d=3, sigma=0.7, seed=3)


def test_bayes_identity_links_evidence_and_posterior(lg):
    # log p(x) = log p(x|z) + log p(z) − log p(z|x) for every z: checks log_px and posterior together.
    x = lg.sample(8, seed=1)
    z = torch.randn(8, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mean, cov = lg.posterior(x)
    log_joint = (dist.Normal(z @ lg.W.T + lg.b, lg.sigma).log_prob(x).sum(-1)
                 + dist.Normal(0.0, 1.0).log_prob(z).sum(-1))
    log_post = dist.MultivariateNormal(mean, covariance_matrix=cov).log_prob(z)
    torch.testing.assert_close(log_joint - log_post, lg.log_px(x), rtol=0, atol=1e-10)


def test_elbo_plus_kl_is_log_px_in_closed_form(lg):
    x = lg.sample(8, seed=1)
    g = torch.Generator().manual_seed(4)
    loc = torch.randn(8, 3, generator=g, dtype=torch.float64)
    tril = torch.randn(3, 3, generator=g, dtype=torch.float64).tril(-1) + torch.diag(torch.rand(3, generator=g) + 0.3).double()
    total = lg.elbo(x, loc, tril) + lg.kl_to_posterior(x, loc, tril)
    torch.testing.assert_close(total, lg.log_px(x), rtol=0, atol=1e-10)
    assert (lg.kl_to_posterior(x, loc, tril) > 0).all()


def test_elbo_matches_monte_carlo(lg):
    x = lg.sample(4, seed=1)
    q = LinearGaussianGuide.perturbed(lg, loc_shift=1.0, scale_factor=0.8)
    qz = dist.MultivariateNormal(q.loc(x), scale_tril=q.scale_tril)
    z = qz.sample((20000,))
    log_w = (dist.Normal(z @ lg.W.T + lg.b, lg.sigma).log_prob(x).sum(-1)
             + dist.Normal(0.0, 1.0).log_prob(z).sum(-1) - qz.log_prob(z))
    stderr = log_w.std(0) / 20000**0.5
    assert ((log_w.mean(0) - lg.elbo(x, q.loc(x), q.scale_tril)).abs() < 4 * stderr).all()


def test_gaussian_kl_matches_torch():
    g = torch.Generator().manual_seed(0)
    loc_q, loc_p = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    tril_q, tril_p = (torch.randn(2, 3, 3, generator=g, dtype=torch.float64).tril(-1)
                      + torch.eye(3, dtype=torch.float64))
    expected = torch.distributions.kl_divergence(dist.MultivariateNormal(loc_q, scale_tril=tril_q),
                                                 dist.MultivariateNormal(loc_p, scale_tril=tril_p))
    torch.testing.assert_close(gaussian_kl(loc_q, tril_q, loc_p, tril_p), expected)
    assert gaussian_kl(loc_q, tril_q, loc_q, tril_q).abs().max() < 1e-12


def test_exact_guide_is_the_posterior_and_perturbed_is_not(lg):
    x = lg.sample(5, seed=1)
    mean, cov = lg.posterior(x)
    exact = LinearGaussianGuide.exact(lg)
    torch.testing.assert_close(exact.loc(x), mean)
    torch.testing.assert_close(exact.scale_tril @ exact.scale_tril.T, cov)
    assert lg.kl_to_posterior(x, exact.loc(x), exact.scale_tril).abs().max() < 1e-10
    bad = LinearGaussianGuide.perturbed(lg, loc_shift=0.5, scale_factor=1.3)
    assert (lg.kl_to_posterior(x, bad.loc(x), bad.scale_tril) > 0.05).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pyro_model_and_guide_sites(dtype):
    lg = LinearGaussian.random(D=4, d=2, seed=0, dtype=dtype)
    x = lg.sample(7)
    guide = LinearGaussianGuide.exact(lg).guide
    guide_tr = poutine.trace(guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(lg.model, trace=guide_tr)).get_trace(x)
    assert guide_tr.nodes["z"]["value"].shape == (7, 2) and guide_tr.nodes["z"]["value"].dtype == dtype
    assert model_tr.nodes["x"]["is_observed"]
    assert [f.name for f in model_tr.nodes["x"]["cond_indep_stack"]] == ["data"]
    # With the exact posterior as guide, log p(x, z) − log q(z|x) = log p(x) at any z.
    log_w = (model_tr.nodes["x"]["fn"].log_prob(x) + model_tr.nodes["z"]["fn"].log_prob(guide_tr.nodes["z"]["value"])
             - guide_tr.nodes["z"]["fn"].log_prob(guide_tr.nodes["z"]["value"]))
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(log_w.double(), lg.log_px(x).double(), rtol=0, atol=tol)


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="sigma"):
        LinearGaussian(torch.ones(3, 2), torch.zeros(3), 0.0)
    with pytest.raises(ValueError, match="W must be"):
        LinearGaussian(torch.ones(3, 2), torch.zeros(2), 1.0)


def test_model_and_guide_have_no_parameters(lg):
    """The fixed model and guide neither read nor write Pyro's param store: a parameter already in
    the store is left as it was and neither trace has a param site."""
    sentinel = pyro.param("sentinel", torch.ones(2))
    x = lg.sample(3)
    guide = LinearGaussianGuide.exact(lg).guide
    guide_tr = poutine.trace(guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(lg.model, trace=guide_tr)).get_trace(x)
    for tr in (guide_tr, model_tr):
        assert not any(site["type"] == "param" for site in tr.nodes.values())
    assert list(pyro.get_param_store().keys()) == ["sentinel"]
    assert pyro.param("sentinel") is sentinel and torch.equal(sentinel, torch.ones(2))
