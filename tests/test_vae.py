"""The VAE's model and guide as Pyro functions: shapes, the ELBO decomposition, direct SVI use,
subsample scaling and parameter isolation."""

import math

import pyro
import pyro.optim
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from pyro_vae.data import load_dataset


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


def test_elbo_is_expected_loglik_minus_kl(tiny_vae):
    """Per point, with one z ~ q: log p(x,z) - log q(z|x) = log p(x|z) - [log q(z|x) - log p(z)],
    and the Trace_ELBO loss is minus its sum, exactly."""
    vae = tiny_vae()
    x = torch.bernoulli(torch.full((5, 64), 0.4))
    guide_tr, model_tr = _traces(vae, x)
    z = guide_tr.nodes["z"]["value"]
    log_lik = model_tr.nodes["x"]["fn"].log_prob(x)
    kl_mc = guide_tr.nodes["z"]["fn"].log_prob(z) - model_tr.nodes["z"]["fn"].log_prob(z)
    torch.manual_seed(1)
    loss = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    torch.manual_seed(1)
    g, m = _traces(vae, x)
    per_point = m.nodes["x"]["fn"].log_prob(x) + m.nodes["z"]["fn"].log_prob(g.nodes["z"]["value"]) \
        - g.nodes["z"]["fn"].log_prob(g.nodes["z"]["value"])
    torch.testing.assert_close(-loss, per_point.sum())
    assert log_lik.shape == kl_mc.shape == (5,)


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
