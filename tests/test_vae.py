"""The VAE's model and guide as Pyro functions: shapes, the ELBO decomposition, direct SVI use,
subsample scaling and parameter isolation."""

import math

import pyro
import pyro.optim
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from pyro_vae import build_model
from pyro_vae.data import load_dataset
from pyro_vae.exact.linear_gaussian import LinearGaussian, gaussian_kl


def _traces(vae, x, **kwargs):
    guide_tr = poutine.trace(vae.guide).get_trace(x, **kwargs)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x, **kwargs)
    return guide_tr, model_tr


def test_shapes_and_reparameterized_latent(tiny_vae):
    vae = tiny_vae(data_dim=64, latent_dim=3)
    x = torch.bernoulli(torch.full((7, 64), 0.3))
    guide_tr, model_tr = _traces(vae, x)
    assert guide_tr.nodes["z"]["value"].shape == (7, 3)
    assert guide_tr.nodes["z"]["fn"].has_rsample
    assert model_tr.nodes["z"]["fn"].batch_shape == (7,) and model_tr.nodes["z"]["fn"].event_shape == (3,)
    assert model_tr.nodes["x"]["is_observed"] and model_tr.nodes["x"]["fn"].event_shape == (64,)
    assert vae.sample(5).shape == (5, 64) and vae.reconstruct(x).shape == (7, 64)
    assert vae.encode(x).shape == (7, 3)


def test_wrong_shape_is_a_clear_error(tiny_vae):
    vae = tiny_vae(data_dim=64)
    with pytest.raises(ValueError, match=r"expected x of shape \(N, 64\), got \(2, 8, 8\)"):
        vae.model(torch.zeros(2, 8, 8))


def test_trace_elbo_loss_is_minus_the_sum_of_per_point_log_weights(tiny_vae):
    """With one z ~ q per point, Trace_ELBO's loss is −Σ_n [log p(x_n|z_n) + log p(z_n) − log q(z_n|x_n)]."""
    vae = tiny_vae()
    x = torch.bernoulli(torch.full((5, 64), 0.4))
    torch.manual_seed(1)
    loss = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    torch.manual_seed(1)
    g, m = _traces(vae, x)
    per_point = m.nodes["x"]["fn"].log_prob(x) + m.nodes["z"]["fn"].log_prob(g.nodes["z"]["value"]) \
        - g.nodes["z"]["fn"].log_prob(g.nodes["z"]["value"])
    assert per_point.shape == (5,)
    torch.testing.assert_close(-loss, per_point.sum())


def test_elbo_terms_average_to_the_exact_elbo():
    """On a VAE whose ELBO is closed form, a linear encoder and decoder with a Gaussian likelihood
    and N(0, I) prior (the linear-Gaussian model with q = N(μ(x), diag σ(x)²)):

        E_q[log p(x|z)] = −D/2 log(2πs²) − (‖x − Wμ − b‖² + tr(W diag(σ²) Wᵀ)) / (2s²),
        ELBO            = E_q[log p(x|z)] − KL(q || N(0, I)),

    elbo_terms' log_lik and log_lik − kl, averaged over R = 20000 draws per point, match them
    within 5 standard errors of the mean of the draws (0.005-0.03 nats here)."""
    cfg = {"model": {"latent_dim": 3, "hidden": [], "activation": "tanh"}, "prior": {"name": "standard_normal"},
           "guide": {"name": "diagonal_normal"}, "likelihood": {"name": "gaussian", "init_scale": 1.0}}
    torch.manual_seed(0)
    vae = build_model(cfg, 6).double()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        vae.likelihood.net[0].weight.mul_(0.2)  # a flatter decoder: log p(x|z) varies less with z
        decoder, q = vae.likelihood.net[0], vae.encoder(x).base_dist  # one linear layer each
        lg = LinearGaussian(decoder.weight, decoder.bias, vae.likelihood.scale.item())
        exact_elbo = lg.elbo(x, q.loc, torch.diag_embed(q.scale))
        exact_log_lik = exact_elbo + gaussian_kl(q.loc, torch.diag_embed(q.scale), torch.zeros(3, dtype=x.dtype),
                                                 torch.eye(3, dtype=x.dtype))
    R = 20000
    log_lik, kl = (t.reshape(R, 5) for t in vae.elbo_terms(x.repeat(R, 1)))
    for draws, exact in ((log_lik, exact_log_lik), (log_lik - kl, exact_elbo)):
        se = draws.std(0) / math.sqrt(R)
        assert ((draws.mean(0) - exact).abs() < 5 * se).all(), (draws.mean(0), exact, se)


def test_kl_term_matches_the_analytic_gaussian_kl(tiny_vae):
    vae = tiny_vae(latent_dim=3)
    x = torch.bernoulli(torch.full((4, 64), 0.5))
    _, kl = vae.elbo_terms(x)
    q = vae.encoder(x).base_dist
    mu, var = q.loc, q.scale**2
    by_hand = 0.5 * (var + mu**2 - 1 - var.log()).sum(-1)  # KL(N(mu, var) || N(0, I))
    torch.testing.assert_close(kl, by_hand.detach())
    # The Monte Carlo estimate E_q[log q - log p] agrees within 4 standard errors.
    n = 20000
    z = vae.encoder(x).sample((n,))
    samples = (vae.encoder(x).log_prob(z) - vae.prior().log_prob(z)).detach()
    se = samples.std(0) / math.sqrt(n)
    assert ((samples.mean(0) - kl).abs() < 4 * se).all()


def test_subsampled_data_plate_scales_to_the_full_dataset(tiny_vae):
    vae = tiny_vae()
    x = torch.bernoulli(torch.full((10, 64), 0.3))
    torch.manual_seed(3)
    full = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    torch.manual_seed(3)
    scaled = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, num_data=1000)
    torch.testing.assert_close(scaled, full * 100)


def test_direct_svi_trains_on_digits(tiny_vae):
    data = load_dataset("digits")
    vae = tiny_vae(data_dim=64, latent_dim=5, hidden=[64])
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 3e-3}), Trace_ELBO())
    x = torch.bernoulli(data.train_x[:500], generator=torch.Generator().manual_seed(0))
    losses = [svi.step(x[i % 5 * 100:(i % 5 + 1) * 100], num_data=500) / 500 for i in range(300)]
    first, last = sum(losses[:25]) / 25, sum(losses[-25:]) / 25
    assert last < first - 5  # nats per image: an untrained net is ~44, a trained one below 30


def test_trainer_loss_and_gradients_equal_svi(tiny_vae):
    """The trainer's differentiable_loss path computes what SVI computes: same loss, same grads."""
    vae = tiny_vae()
    x = torch.bernoulli(torch.full((8, 64), 0.3))
    torch.manual_seed(5)
    with poutine.trace(param_only=True) as params:
        svi_loss = Trace_ELBO().loss_and_grads(vae.model, vae.guide, x, num_data=80)
    svi_grads = {name: site["value"].unconstrained().grad.clone() for name, site in params.trace.nodes.items()}
    vae.zero_grad()
    torch.manual_seed(5)
    loss = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, num_data=80)
    loss.backward()
    assert loss.item() == pytest.approx(svi_loss, rel=1e-6)
    for name, p in vae.named_parameters():
        torch.testing.assert_close(p.grad, svi_grads[f"{vae.name}$$${name}"])


def test_two_vaes_never_share_parameters(tiny_vae):
    a, b = tiny_vae(), tiny_vae()
    assert a.name != b.name
    b_before = {k: v.clone() for k, v in b.state_dict().items()}
    x = torch.bernoulli(torch.full((8, 64), 0.3))
    svi = SVI(a.model, a.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(5):
        svi.step(x)
    svi_b = SVI(b.model, b.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    svi_b.evaluate_loss(x)  # registers b's parameters next to a's
    for k, v in b.state_dict().items():
        torch.testing.assert_close(v, b_before[k])
    store = pyro.get_param_store()
    names = list(store.keys())
    assert any(n.startswith(a.name + "$$$") for n in names) and any(n.startswith(b.name + "$$$") for n in names)
    for n in names:  # every stored tensor is the live parameter of exactly one module
        owner, local = n.split("$$$")
        module = a if owner == a.name else b
        assert store[n] is dict(module.named_parameters())[local]
