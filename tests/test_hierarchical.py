"""The two-stochastic-layer VAE (model=two_layer): its two sites' log-densities against a hand
computation, IWAE K = 1 = ELBO, the generic log p(x) estimator, and the STL / DReG estimators
with two latent sites on a linear-Gaussian chain whose exact posterior is known; a CLI run."""

import json
import math
import os

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from torch.distributions import Bernoulli, Normal

from pyro_vae import build_model, estimate_log_px
from pyro_vae.guides import MIN_SCALE
from pyro_vae.hierarchical import HierarchicalVAE
from pyro_vae.objectives import IWAE, OBJECTIVES, TraceELBO

from helpers import pyro_vae

CFG = {"model": {"name": "two_layer", "latent_dim": 4, "hidden": [16], "latent_dim2": 3, "hidden2": [8]},
       "prior": {"name": "standard_normal"}, "guide": {"name": "diagonal_normal"},
       "likelihood": {"name": "bernoulli"}, "objective": {"name": "elbo"}}


def tiny(**model):
    return build_model({**CFG, "model": {**CFG["model"], **model}}, 10)


def test_builds_burda_sizes_by_default():
    cfg = {**CFG, "model": {"name": "two_layer"}}
    vae = build_model(cfg, 784)
    assert isinstance(vae, HierarchicalVAE) and (vae.latent_dim, vae.top_latent_dim) == (100, 50)
    sizes = lambda net: [(m.in_features, m.out_features) for m in net if isinstance(m, torch.nn.Linear)]  # noqa: E731
    assert sizes(vae.encoder.net) == [(784, 200), (200, 200), (200, 200)]          # q(z1|x): loc and scale of 100
    assert sizes(vae.top_encoder.net) == [(100, 100), (100, 100), (100, 100)]      # q(z2|z1): 2 x 50
    assert sizes(vae.top_decoder.net) == [(50, 100), (100, 100), (100, 200)]       # p(z1|z2): 2 x 100
    assert sizes(vae.likelihood.net) == [(100, 200), (200, 200), (200, 784)]       # p(x|z1)
    assert all(isinstance(m, torch.nn.Tanh) for m in vae.encoder.net[1::2])


def test_two_site_log_densities_match_a_hand_computation():
    """log p(x, z1, z2) and log q(z1, z2 | x) of the traces, per point, against torch.distributions
    applied to the networks' outputs by hand."""
    vae = tiny()
    x = torch.bernoulli(torch.full((5, 10), 0.3))
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    z1, z2 = guide_tr.nodes["z1"]["value"], guide_tr.nodes["z2"]["value"]

    def normal(net, inputs):
        loc, raw = net(inputs).chunk(2, -1)
        return Normal(loc, F.softplus(raw) + MIN_SCALE)
    log_q = normal(vae.encoder.net, x).log_prob(z1).sum(-1) + normal(vae.top_encoder.net, z1).log_prob(z2).sum(-1)
    log_p = (Normal(0.0, 1.0).log_prob(z2).sum(-1) + normal(vae.top_decoder.net, z2).log_prob(z1).sum(-1)
             + Bernoulli(logits=vae.likelihood.net(z1)).log_prob(x).sum(-1))
    sites = lambda tr, names: sum(tr.nodes[n]["fn"].log_prob(tr.nodes[n]["value"]) for n in names)  # noqa: E731
    torch.testing.assert_close(sites(guide_tr, ["z1", "z2"]), log_q)
    torch.testing.assert_close(sites(model_tr, ["z2", "z1", "x"]), log_p)
    # both latent sites inside the data plate
    for tr in (guide_tr, model_tr):
        assert all([f.name for f in tr.nodes[n]["cond_indep_stack"]] == ["data"] for n in ("z1", "z2"))
    # elbo_terms: one draw of the same two sites, all Monte Carlo
    torch.manual_seed(3)
    log_lik, kl = vae.elbo_terms(x)
    torch.manual_seed(3)
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    torch.testing.assert_close(log_lik, model_tr.nodes["x"]["fn"].log_prob(x).detach())
    torch.testing.assert_close(kl, (sites(guide_tr, ["z1", "z2"]) - sites(model_tr, ["z1", "z2"])).detach())


@pytest.mark.parametrize("kl_weight", [1.0, 0.3])
def test_iwae_with_one_particle_is_the_elbo(kl_weight):
    """Same draws: IWAE(K=1) with each estimator has Trace_ELBO's value, at the full KL weight and
    inside a warm-up (both latent sites scaled); the standard estimator's gradient is Trace_ELBO's."""
    vae = tiny()
    x = torch.bernoulli(torch.full((6, 10), 0.4))
    results = []
    for objective in (TraceELBO(), IWAE(1, "standard"), IWAE(1, "stl"), IWAE(1, "dreg")):
        objective.kl_weight = kl_weight
        vae.zero_grad()
        torch.manual_seed(1)
        loss = objective.differentiable_loss(vae.model, vae.guide, x, num_data=30)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in vae.parameters()]))
    for loss, _ in results[1:]:
        torch.testing.assert_close(loss, results[0][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def test_estimate_log_px_is_generic_and_bounds_the_elbo():
    """The generic importance-sampling estimator takes the two-site model as it is: finite, and
    above the mean ELBO (Jensen). Its exactness with two sites: test_estimate_log_px_is_exact_..."""
    vae = tiny()
    x = torch.bernoulli(torch.full((8, 10), 0.4))
    estimate = estimate_log_px(vae.model, vae.guide, x, num_samples=2000, seed=0, progress=False, warn=False)
    elbo = torch.stack([sum(vae.elbo_terms(x)[i] * (1 - 2 * i) for i in (0, 1)) for _ in range(200)]).mean(0)
    assert torch.isfinite(estimate.log_px).all() and (estimate.log_px > elbo).all()


# --- STL and DReG with two latent sites: the chain z2 -> z1 -> x, linear and Gaussian ----------

A, S1, B, S0 = 1.5, 0.7, 2.0, 0.5  # z2 ~ N(0, 1), z1 | z2 ~ N(A z2, S1^2), x | z1 ~ N(B z1, S0^2)


def exact_guide():
    """q(z1|x) = p(z1|x) and q(z2|z1) = p(z2|z1, x) = p(z2|z1): (m1, c1, s1, m2, c2, s2) with
    q(z1|x) = N(m1 x + c1, s1^2), q(z2|z1) = N(m2 z1 + c2, s2^2)."""
    prec1 = 1 / (A ** 2 + S1 ** 2) + B ** 2 / S0 ** 2
    prec2 = 1 + A ** 2 / S1 ** 2
    return [B / S0 ** 2 / prec1, 0.0, prec1 ** -0.5, A / S1 ** 2 / prec2, 0.0, prec2 ** -0.5]


def chain_gradients(estimator, K, params, reps=3000, seed=0):
    """(reps, 6) independent gradient draws of the IWAE loss w.r.t. the guide's (m1, c1, s1, m2,
    c2, s2): one data point repeated ``reps`` times, each copy with its own parameters."""
    theta = [torch.full((reps, 1), float(p), dtype=torch.float64, requires_grad=True) for p in params]
    x = torch.full((reps, 1), 0.8, dtype=torch.float64)
    model, guide = chain(theta, reps)
    torch.manual_seed(seed)
    grads = torch.autograd.grad(IWAE(K, estimator).differentiable_loss(model, guide, x), theta)
    return torch.cat(grads, 1)


def chain(params, reps):
    """Model and guide of the chain, the guide's parameters ``params`` (tensors or floats)."""
    m1, c1, s1, m2, c2, s2 = params

    def model(x):
        with pyro.plate("data", reps):
            z2 = pyro.sample("z2", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
            z1 = pyro.sample("z1", dist.Normal(A * z2, S1).to_event(1))
            pyro.sample("x", dist.Normal(B * z1, S0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", reps):
            z1 = pyro.sample("z1", dist.Normal(m1 * x + c1, s1).to_event(1))
            pyro.sample("z2", dist.Normal(m2 * z1 + c2, s2).to_event(1))
    return model, guide


def test_estimate_log_px_is_exact_with_the_exact_two_site_posterior():
    """q = p(z1, z2 | x): every importance weight is p(x), so the estimate is log N(x; 0, B^2 (A^2 + S1^2) + S0^2)
    for any K."""
    x = torch.linspace(-2, 2, 7, dtype=torch.float64)[:, None]
    model, guide = chain(exact_guide(), 7)
    exact = Normal(0.0, math.sqrt(B ** 2 * (A ** 2 + S1 ** 2) + S0 ** 2)).log_prob(x[:, 0])
    for K in (1, 13):
        estimate = estimate_log_px(model, guide, x, num_samples=K, seed=0, progress=False, warn=False)
        torch.testing.assert_close(estimate.log_px, exact)


@pytest.mark.parametrize("estimator,K", [("stl", 1), ("stl", 4), ("dreg", 4)])
def test_path_estimators_vanish_at_the_exact_posterior(estimator, K):
    """With q = p(z1, z2 | x), log w = log p(x) for every z, so d log w / dz = 0 and every STL or
    DReG draw of the guide's gradient is 0, while the standard one is not. Dropping the path
    through q(z2 | z1)'s input z1 leaves a nonzero gradient here."""
    assert chain_gradients("standard", K, exact_guide(), reps=50).abs().max() > 1e-2
    torch.testing.assert_close(chain_gradients(estimator, K, exact_guide(), reps=50),
                               torch.zeros(50, 6, dtype=torch.float64), atol=1e-10, rtol=0)


@pytest.mark.parametrize("estimator,K", [("stl", 1), ("dreg", 1), ("dreg", 5)])
def test_path_estimators_have_the_standard_gradient_as_expectation(estimator, K):
    """Away from the posterior: the mean of 3000 draws of STL (K = 1) and DReG (any K) matches the
    standard estimator's within 4 standard errors, with less variance."""
    params = [p + shift for p, shift in zip(exact_guide(), [0.3, 0.5, 0.4, -0.4, 0.3, 0.6])]
    standard = chain_gradients("standard", K, params, seed=1)
    other = chain_gradients(estimator, K, params, seed=2)
    se = (standard.var(0) / len(standard) + other.var(0) / len(other)).sqrt()
    assert ((other.mean(0) - standard.mean(0)).abs() <= 4 * se).all(), (other.mean(0), standard.mean(0), se)
    assert other.var(0).sum() < standard.var(0).sum()


def test_trains_with_every_objective_and_warmup():
    """A few Adam steps of ELBO, IWAE (standard, stl, dreg) and a warmed-up ELBO on the tiny model:
    finite losses, every parameter touched."""
    x = torch.bernoulli(torch.full((20, 10), 0.4))
    for name, options in [("elbo", {"warmup_epochs": 3}), ("iwae", {"num_particles": 3}),
                          ("iwae", {"num_particles": 3, "estimator": "stl"}),
                          ("iwae", {"num_particles": 3, "estimator": "dreg", "warmup_epochs": 2})]:
        vae, objective = tiny(), OBJECTIVES.build(name, options)
        opt = torch.optim.Adam(vae.parameters(), 1e-2)
        for epoch in range(1, 4):
            objective.on_epoch(epoch)
            loss = objective.differentiable_loss(vae.model, vae.guide, x)
            opt.zero_grad()
            loss.backward()
            assert torch.isfinite(loss) and all(p.grad is not None for p in vae.parameters()), (name, options)
            opt.step()


def test_refuses_the_vamp_prior():
    with pytest.raises(ValueError, match="model 'two_layer' cannot take prior=vamp"):
        build_model({**CFG, "prior": {"name": "vamp"}}, 10)


@pytest.mark.heavy
def test_cli_trains_two_layer_with_iwae_dreg_and_warmup(tmp_path):
    out = pyro_vae("train", "model=two_layer", "model.latent_dim=4", "model.hidden=[16]", "model.latent_dim2=2",
                   "model.hidden2=[8]", "objective=iwae", "objective.num_particles=3", "objective.estimator=dreg",
                   "objective.warmup_epochs=2", "train.epochs=3", "eval.num_samples=10", "progress=false",
                   "hydra.run.dir=run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    summary = json.load(open(os.path.join(tmp_path, "run", "summary.json")))
    assert summary["epochs_run"] == 3 and math.isfinite(summary["test_log_px"]["mean"])
