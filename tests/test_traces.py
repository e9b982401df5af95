"""The trace engine: layouts from one dry run, per-point reduction over inner plates, and the
ELBO terms against the linear-Gaussian model's closed forms."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_vae.guides  # noqa: F401  (registers KL(MultivariateNormal || Independent Normal))
from pyro_vae import traces
from pyro_vae.objectives.elbo import elbo_terms
from pyro_vae.exact.linear_gaussian import LinearGaussian, LinearGaussianGuide, gaussian_kl


@pytest.fixture
def lg():
    return LinearGaussian.random(D=4, d=2, sigma=0.5, seed=0)


def pixel_plate_model(lg):
    """lg.model with the data plate at dim -2 and an inner plate over the D coordinates of x."""
    D, d = lg.dims

    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(torch.zeros(d, dtype=x.dtype), 1.0).to_event(1))
            with pyro.plate("pixels", D, dim=-1):
                pyro.sample("x", dist.Normal((z @ lg.W.T + lg.b).squeeze(-2), lg.sigma), obs=x)
    return model


def pixel_plate_guide(q):
    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.MultivariateNormal(q.loc(x)[:, None], scale_tril=q.scale_tril))
    return guide


def test_layout_and_per_point_sum_over_an_inner_plate(lg):
    q = LinearGaussianGuide.perturbed(lg)
    x = lg.sample(5, seed=1)
    model, guide = pixel_plate_model(lg), pixel_plate_guide(q)
    layout = traces.inspect(model, guide, (x,))
    assert (layout.data_dim, layout.max_plate_nesting, layout.subsample_size) == (-2, 2, None)
    torch.manual_seed(0)
    guide_tr, model_tr = traces.trace_pair(model, guide, (x,), {}, layout, 3)
    site = model_tr.nodes["x"]
    assert site["value"].shape == (5, 4) and site["fn"].batch_shape == (3, 5, 4)
    per = traces.per_point(traces.site_log_prob(site), site, layout, 3)
    z = guide_tr.nodes["z"]["value"]  # (3, 5, 1, 2)
    direct = dist.Normal(z[:, :, 0] @ lg.W.T + lg.b, lg.sigma).log_prob(x).sum(-1)
    torch.testing.assert_close(per, direct)
    log_p, log_r = traces.log_densities(guide_tr, model_tr, layout, 3)
    assert log_p.shape == log_r.shape == (3, 5) and log_p.dtype == torch.float64


def test_elbo_terms_have_the_closed_form_kl_and_elbo(lg):
    q = LinearGaussianGuide.perturbed(lg, loc_shift=1.0, scale_factor=0.7)
    x = lg.sample(3, seed=2)
    copies = x.repeat(4000, 1)
    torch.manual_seed(0)
    log_lik, kl = elbo_terms(lg.model, q.guide, copies)
    exact_kl = gaussian_kl(q.loc(copies), q.scale_tril, torch.zeros(2, dtype=x.dtype), torch.eye(2, dtype=x.dtype))
    torch.testing.assert_close(kl, exact_kl)  # analytic, not a Monte Carlo draw
    elbo = (log_lik - kl).reshape(4000, 3)
    se = elbo.std(0) / math.sqrt(4000)
    assert ((elbo.mean(0) - lg.elbo(x, q.loc(x), q.scale_tril)).abs() < 4 * se).all()


def test_elbo_terms_fall_back_to_monte_carlo_and_sum_inner_plates(lg):
    """An inner pixel plate, and a guide family without a closed-form KL against the prior: the KL
    term is then log q(z|x) - log p(z) at the draw, and its mean the exact KL."""
    q = LinearGaussianGuide.perturbed(lg, loc_shift=0.5, scale_factor=1.2)
    x = lg.sample(2, seed=3).repeat(3000, 1)

    def guide(x):  # the same q, as a (no closed form) transformed distribution
        with pyro.plate("data", x.shape[0], dim=-2):
            base = dist.MultivariateNormal(torch.zeros(2, dtype=x.dtype), scale_tril=q.scale_tril)
            pyro.sample("z", dist.TransformedDistribution(base.expand([x.shape[0], 1]),
                                                          [dist.transforms.AffineTransform(q.loc(x)[:, None], 1.0,
                                                                                           event_dim=1)]))
    torch.manual_seed(1)
    log_lik, kl = elbo_terms(pixel_plate_model(lg), guide, x)
    assert log_lik.shape == kl.shape == (6000,)
    exact_kl = gaussian_kl(q.loc(x), q.scale_tril, torch.zeros(2, dtype=x.dtype), torch.eye(2, dtype=x.dtype))
    diff = (kl - exact_kl).reshape(3000, 2)
    assert (diff.mean(0).abs() < 4 * diff.std(0) / math.sqrt(3000)).all() and diff.std() > 0.1
