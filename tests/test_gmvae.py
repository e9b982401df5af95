"""The mixture VAE (GMVAE): shapes, the enumerated ELBO against a hand computation, the sampled-c
guide against enumeration (ELBO and log p(x), the latter also against quadrature), clustering
accuracy, a short fit, and one-line errors on bad input."""

import math

import pyro
import pyro.optim
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, TraceEnum_ELBO

from pyro_vae import estimate_log_px
from pyro_vae.data import Splits, check_and_binarize
from pyro_vae.gmvae import GMVAE, cluster_accuracy
from pyro_vae.train import TrainConfig, fit

C, L, D = 3, 2, 6


def tiny(latent_dim=L, dtype=torch.float64, **kw):
    g = GMVAE(D, latent_dim=latent_dim, num_clusters=C, hidden=(8,), **kw).to(dtype)
    return g


def data(n=5, dtype=torch.float64):
    return torch.bernoulli(torch.full((n, D), 0.4, dtype=dtype))


def enumerated_traces(g, x):
    guide = poutine.enum(g.guide, first_available_dim=-2)
    guide_tr = poutine.trace(guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(g.model, trace=guide_tr)).get_trace(x)
    return guide_tr, model_tr


def test_shapes_enumerated_and_sampled():
    g, x = tiny(), data(5)
    guide_tr, model_tr = enumerated_traces(g, x)
    assert guide_tr.nodes["c"]["value"].shape == (C, 1)  # all clusters at once, at dim -2
    assert guide_tr.nodes["z"]["value"].shape == (C, 5, L)  # one z per cluster and point
    assert model_tr.nodes["x"]["fn"].batch_shape == (C, 5) and model_tr.nodes["x"]["fn"].event_shape == (D,)
    guide_tr = poutine.trace(g.sampled_guide).get_trace(x)
    assert guide_tr.nodes["c"]["value"].shape == (5,) and guide_tr.nodes["z"]["value"].shape == (5, L)
    log_lik, kl = g.elbo_terms(x)
    assert log_lik.shape == kl.shape == (5,) and (kl >= 0).all()
    assert g.sample(4).shape == (C, 4, D)
    probs = g.cluster_probs(x)
    assert probs.shape == (5, C) and torch.allclose(probs.sum(-1), torch.ones(5, dtype=probs.dtype))
    assert g.predict_cluster(x).shape == (5,)


def test_enumerated_elbo_is_the_hand_sum_over_clusters():
    """TraceEnum_ELBO's loss = −Σ_n Σ_c q(c|x_n)[log p(x_n|z_c) + log p(z_c|c) − log q(z_c|x_n,c)]
    + Σ_n KL(q(c|x_n) || π), with the same z draws (one rsample of shape (C, N, L))."""
    g, x = tiny(), data(5)
    torch.manual_seed(1)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(g.model, g.guide, x)
    torch.manual_seed(1)
    z = g.latent_encoder(x, torch.arange(C)[:, None]).rsample()
    q_c = torch.softmax(g.cluster_encoder(x), -1)
    pi = torch.full((C,), 1.0 / C, dtype=x.dtype)
    elbo = -(q_c * (q_c.log() - pi.log())).sum(-1)
    for c in range(C):
        q_z = g.latent_encoder(x, torch.tensor(c))
        p_z = torch.distributions.Normal(g.prior_locs[c], g.prior_scales[c])
        inner = (g.likelihood(z[c]).log_prob(x) + p_z.log_prob(z[c]).sum(-1) - q_z.log_prob(z[c]))
        elbo = elbo + q_c[:, c] * inner
    torch.testing.assert_close(-loss, elbo.sum())
    torch.manual_seed(1)
    torch.testing.assert_close(g.enumerated_elbo(x), elbo)


def test_subsampled_plate_scales_the_loss():
    g, x = tiny(), data(4)
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    torch.manual_seed(2)
    full = elbo.differentiable_loss(g.model, g.guide, x)
    torch.manual_seed(2)
    scaled = elbo.differentiable_loss(g.model, g.guide, x, num_data=40)
    torch.testing.assert_close(scaled, 10 * full)


def test_sampled_guide_elbo_has_the_enumerated_expectation():
    """Per point, the mean of log p(x,c,z) − log q(c,z|x) over (c, z) ~ q equals the mean of the
    enumerated ELBO over z draws, within 4.5 combined standard errors."""
    g, x = tiny(), data(4)
    est = estimate_log_px(g.model, g.sampled_guide, x, num_samples=20000, seed=0, progress=False, warn=False)
    R = 4000
    x_rep = x.repeat(R, 1)  # R independent z draws per point in one pass
    torch.manual_seed(0)
    with torch.no_grad():
        draws = g.enumerated_elbo(x_rep).reshape(R, len(x))
    enum_mean, enum_se = draws.mean(0), draws.std(0) / math.sqrt(R)
    tol = 4.5 * (est.elbo_stderr**2 + enum_se**2).sqrt()
    assert ((est.elbo - enum_mean).abs() < tol).all(), (est.elbo, enum_mean, tol)
    # the analytic-KL terms of elbo_terms estimate the same ELBO
    terms = torch.sub(*g.elbo_terms(x_rep)).reshape(R, len(x))
    assert ((terms.mean(0) - enum_mean).abs() < 4.5 * (terms.std(0) / math.sqrt(R) + enum_se)).all()


def test_log_px_sampled_and_enumerated_agree_with_quadrature():
    """With a 1-D z, log p(x) = logsumexp_c [log π_c + log ∫ N(z; μ_c, σ_c²) p(x|z) dz] by a fine grid;
    estimate_log_px with the sampled-c guide and log_px_enumerated both recover it."""
    g, x = tiny(latent_dim=1, prior_spread=0.5), data(4)
    with torch.no_grad():  # widen q(z|x,c) so that it covers p(z|c, x): light-tailed weights
        g.latent_encoder.rest[-1].bias[1:] += 1.0
    grid = torch.linspace(-15, 15, 6001, dtype=x.dtype)
    with torch.no_grad():
        log_lik = g.likelihood(grid[:, None, None].expand(-1, len(x), 1)).log_prob(x)  # (G, N)
        log_pz = torch.distributions.Normal(g.prior_locs[:, 0], g.prior_scales[:, 0]).log_prob(grid[:, None])  # (G, C)
        exact = ((log_pz - math.log(C))[:, :, None] + log_lik[:, None, :]).flatten(0, 1).logsumexp(0) \
            + math.log(grid[1] - grid[0])
    est = estimate_log_px(g.model, g.sampled_guide, x, num_samples=20000, seed=0, progress=False, warn=False)
    assert ((est.log_px - exact).abs() < 5 * est.stderr + 1e-3).all(), (est.log_px, exact, est.stderr)
    # log_px_enumerated's p̂(x) is unbiased: R independent estimates of p̂(x) / p(x) average to 1
    # within 5 standard errors of their mean.
    torch.manual_seed(0)
    R = 20
    ratio = torch.stack([(g.log_px_enumerated(x, num_samples=500, chunk=500) - exact).exp() for _ in range(R)])
    mean, se = ratio.mean(0), ratio.std(0) / math.sqrt(R)
    assert ((mean - 1).abs() < 5 * se).all(), (mean, se)
    assert (se < 0.05).all(), se  # and precise enough for that to mean something


def test_cluster_accuracy_by_hand():
    labels = [0, 0, 1, 1, 2, 2]
    assert cluster_accuracy(labels, [2, 2, 0, 0, 1, 1]) == 1.0  # a relabelling is perfect
    assert cluster_accuracy(torch.tensor(labels), torch.tensor([7, 7, 3, 3, 5, 5])) == 1.0
    # best one-to-one map: 1->0 (2 right), 0->1 (1 right), 2->2 (2 right): 5 of 6
    assert cluster_accuracy(labels, [1, 1, 0, 2, 2, 2]) == pytest.approx(5 / 6)
    # more clusters than labels: the unmatched cluster's points count as wrong
    assert cluster_accuracy(labels, [0, 0, 1, 1, 2, 3]) == pytest.approx(5 / 6)
    # one cluster for everything: only the largest label's points can be right
    assert cluster_accuracy([0, 0, 0, 1], [4, 4, 4, 4]) == 0.75
    with pytest.raises(ValueError, match="one length"):
        cluster_accuracy([0, 1], [0])


def test_short_fit_on_digits_subset_is_finite(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    xs = torch.as_tensor(d.data[:300] / 16.0, dtype=torch.float32)
    ys = torch.as_tensor(d.target[:300])
    splits = Splits("digits", (8, 8), xs[:240], ys[:240], xs[240:], ys[240:], xs[240:], ys[240:])
    g = GMVAE(64, latent_dim=4, num_clusters=10, hidden=(32,))
    result = fit(g, check_and_binarize(splits, g.likelihood), TraceEnum_ELBO(max_plate_nesting=1),
                 TrainConfig(epochs=3, batch_size=60), progress=False)
    assert result.epochs_run == 3 and math.isfinite(result.best_score)
    assert all(math.isfinite(v) for r in result.history for v in r.values())
    assert result.history[-1]["train_elbo"] > result.history[0]["train_elbo"] - 5  # no blow-up
    clusters = g.predict_cluster(torch.bernoulli(splits.test_x))
    assert 0 <= cluster_accuracy(splits.test_y, clusters) <= 1
    # the default init (all p(z|c) at N(0, I), distinct q(z|x,c) branches) does not collapse q(c|x)
    # onto one cluster in the first epochs, as random cluster means did on mnist5k
    assert clusters.unique().numel() > 1


def test_svi_with_pyro_optimizer_and_separate_param_stores():
    g1, g2, x = tiny(), tiny(), data(6)
    assert g1.name != g2.name
    svi = SVI(g1.model, g1.guide, pyro.optim.Adam({"lr": 1e-2}), TraceEnum_ELBO(max_plate_nesting=1))
    losses = [svi.step(x) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    names = set(pyro.get_param_store().keys())
    assert any(n.startswith(g1.name + "$$$") for n in names) and not any(n.startswith(g2.name + "$$$") for n in names)


def _one_line(excinfo):
    return "\n" not in str(excinfo.value)


def test_bad_input_gives_one_line_errors(tmp_path):
    g = tiny()
    with pytest.raises(ValueError, match=r"expected x of shape \(N, 6\), got \(2, 2, 3\)") as e:
        g.model(torch.zeros(2, 2, 3, dtype=torch.float64))
    assert _one_line(e)
    with pytest.raises(ValueError, match=r"got \(5, 7\)") as e:
        g.elbo_terms(torch.zeros(5, 7, dtype=torch.float64))
    assert _one_line(e)
    x = data(5)
    x[3, 1] = float("nan")
    for call in (g.elbo_terms, g.predict_cluster, g.guide, g.log_px_enumerated):
        with pytest.raises(ValueError, match=r"NaN or inf in 1 row\(s\) \(first: \[3\]\)") as e:
            call(x)
        assert _one_line(e)
    with pytest.raises(ValueError, match="NaN") as e:
        estimate_log_px(g.model, g.sampled_guide, x, num_samples=4, progress=False)
    assert _one_line(e)
    bad = Splits("toy", (2, 3), x.float(), torch.zeros(5, dtype=torch.long), x.float(),
                 torch.zeros(5, dtype=torch.long), x.float(), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN") as e:
        check_and_binarize(bad, GMVAE(6, latent_dim=2, num_clusters=2, hidden=(4,)).likelihood)
    assert _one_line(e)
    with pytest.raises(ValueError, match="must be >= 1"):
        GMVAE(6, num_clusters=0)
