"""The mixture VAE (GMVAE): shapes, the enumerated ELBO against a hand computation, the drawn-c
guide against enumeration (ELBO and log p(x), the latter also against quadrature), encode and
sample against their definitions, a likelihood from the registry, clustering accuracy, a short
fit, the VaDE-style start (it recovers the clusters of a known mixture of decoders, leaves extra
clusters empty, is fixed by the seed), the CLI run (`pyro-vae train model=gmvae`: summary and
figures of the clustering), and one-line errors on bad input."""

import json
import math
import subprocess
import sys

import pyro
import pyro.optim
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, TraceEnum_ELBO

from pyro_vae import build_model, estimate_log_px
from pyro_vae.data import VAL_BINARIZATION_SEED, Splits, binarize_fixed, check_and_binarize, load_dataset
from pyro_vae.evaluation import load_run
from pyro_vae.gmvae import GMVAE, cluster_accuracy
from pyro_vae.objectives import TraceELBO
from pyro_vae.likelihoods import CategoricalLikelihood, GaussianLikelihood
from pyro_vae.train import TrainConfig, fit

C, L, D = 3, 2, 6


def config(latent_dim=L, likelihood="bernoulli", hidden=(8,), **model):
    return {"model": {"name": "gmvae", "latent_dim": latent_dim, "hidden": list(hidden), "num_clusters": C,
                      **model}, "likelihood": {"name": likelihood}}


def tiny(latent_dim=L, likelihood="bernoulli", dtype=torch.float64, **model):
    return build_model(config(latent_dim, likelihood, **model), D).to(dtype)


def data(n=5, dtype=torch.float64):
    return torch.bernoulli(torch.full((n, D), 0.4, dtype=dtype))


def enumerated_traces(g, x):
    guide = poutine.enum(g.guide, first_available_dim=-2)
    guide_tr = poutine.trace(guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(g.model, trace=guide_tr)).get_trace(x)
    return guide_tr, model_tr


def test_shapes_enumerated_and_drawn():
    g, x = tiny(), data(5)
    assert isinstance(g, GMVAE)
    guide_tr, model_tr = enumerated_traces(g, x)
    assert guide_tr.nodes["c"]["value"].shape == (C, 1)  # all clusters at once, at dim -2
    assert guide_tr.nodes["z"]["value"].shape == (C, 5, L)  # one z per cluster and point
    assert model_tr.nodes["x"]["fn"].batch_shape == (C, 5) and model_tr.nodes["x"]["fn"].event_shape == (D,)
    guide_tr = poutine.trace(g.guide).get_trace(x)  # a plain trace: the enumerate mark does nothing
    assert guide_tr.nodes["c"]["value"].shape == (5,) and guide_tr.nodes["z"]["value"].shape == (5, L)
    log_lik, kl = g.elbo_terms(x)
    assert log_lik.shape == kl.shape == (5,) and (kl >= 0).all()
    assert g.sample(4).shape == (4, D) and g.sample_per_cluster(4).shape == (C, 4, D)
    assert g.encode(x).shape == (5, L) and g.reconstruct(x).shape == (5, D)
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


def test_drawn_c_elbo_has_the_enumerated_expectation():
    """Per point, the mean of log p(x,c,z) − log q(c,z|x) over (c, z) ~ q equals the mean of the
    enumerated ELBO over z draws, within 4.5 combined standard errors."""
    g, x = tiny(), data(4)
    est = estimate_log_px(g.model, g.guide, x, num_samples=20000, seed=0, progress=False, warn=False)
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


def test_log_px_drawn_and_enumerated_agree_with_quadrature():
    """With a 1-D z, log p(x) = logsumexp_c [log π_c + log ∫ N(z; μ_c, σ_c²) p(x|z) dz] by a fine grid;
    estimate_log_px with the guide (c drawn) and log_px_enumerated both recover it."""
    g, x = tiny(latent_dim=1, prior_spread=0.5), data(4)
    with torch.no_grad():  # widen q(z|x,c) so that it covers p(z|c, x): light-tailed weights
        g.latent_encoder.rest[-1].bias[1:] += 1.5
    grid = torch.linspace(-15, 15, 6001, dtype=x.dtype)
    with torch.no_grad():
        log_lik = g.likelihood(grid[:, None, None].expand(-1, len(x), 1)).log_prob(x)  # (G, N)
        log_pz = torch.distributions.Normal(g.prior_locs[:, 0], g.prior_scales[:, 0]).log_prob(grid[:, None])  # (G, C)
        exact = ((log_pz - math.log(C))[:, :, None] + log_lik[:, None, :]).flatten(0, 1).logsumexp(0) \
            + math.log(grid[1] - grid[0])
    est = estimate_log_px(g.model, g.guide, x, num_samples=20000, seed=0, progress=False, warn=False)
    assert ((est.log_px - exact).abs() < 5 * est.stderr + 1e-3).all(), (est.log_px, exact, est.stderr)
    # log_px_enumerated's p̂(x) is unbiased: R independent estimates of p̂(x) / p(x) average to 1
    # within 5 standard errors of their mean.
    torch.manual_seed(0)
    R = 20
    ratio = torch.stack([(g.log_px_enumerated(x, num_samples=500, chunk=500) - exact).exp() for _ in range(R)])
    mean, se = ratio.mean(0), ratio.std(0) / math.sqrt(R)
    assert ((mean - 1).abs() < 5 * se).all(), (mean, se)
    assert (se < 0.05).all(), se  # and precise enough for that to mean something


def test_encode_is_the_mean_of_z_under_the_guide():
    """encode(x) = E_q[z | x] = Σ_c q(c|x) m(x, c): against the mean of z drawn by the guide
    (c and z both drawn), within 5 standard errors per coordinate."""
    g, x = tiny(prior_spread=1.0), data(3)
    R = 20000
    torch.manual_seed(0)
    z = poutine.trace(g.guide).get_trace(x.repeat(R, 1)).nodes["z"]["value"].detach().reshape(R, 3, L)
    se = z.std(0) / math.sqrt(R)
    assert ((z.mean(0) - g.encode(x)).abs() < 5 * se).all(), (z.mean(0), g.encode(x), se)


def test_sample_draws_the_cluster_from_its_weights():
    """With σ_c ≈ 0, each sample is the decoded mean of μ_c for one c: the counts of each c among
    the samples are Multinomial(n, π), within 5 standard errors each; sample_per_cluster's row c
    is the decoded μ_c."""
    g = tiny(prior_spread=3.0, learn_weights=True)
    with torch.no_grad():
        g.weight_logits.copy_(torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64).log())
        g.prior_raw_scales.fill_(-50.0)  # σ_c = MIN_SCALE + softplus(−50): z = μ_c to 1e-5
    decoded = g.likelihood.mean(g.prior_locs).detach()  # (C, D)
    torch.manual_seed(0)
    n = 3000
    samples = g.sample(n)
    nearest = torch.cdist(samples, decoded).argmin(-1)
    assert torch.cdist(samples, decoded).min(-1).values.max() < 1e-3  # every sample is one decoded μ_c
    counts, pi = torch.bincount(nearest, minlength=C).double(), torch.tensor([0.6, 0.3, 0.1])
    se = (n * pi * (1 - pi)).sqrt()
    assert ((counts - n * pi).abs() < 5 * se).all(), counts
    per_cluster = g.sample_per_cluster(4)
    torch.testing.assert_close(per_cluster, decoded[:, None].expand(C, 4, D), atol=1e-3, rtol=0)


def test_likelihood_comes_from_the_registry():
    """A Gaussian likelihood: the model's x site is N(f(z), σ²) with σ the likelihood's learned
    scale, elbo_terms' log_lik is Σ_c q(c|x) log N(x; f(z_c), σ²) by hand, and σ gets gradients."""
    g = tiny(likelihood="gaussian")
    assert isinstance(g.likelihood, GaussianLikelihood)
    assert any(name == "likelihood.raw_scale" for name, _ in g.named_parameters())
    x = torch.rand(5, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # grey values
    g.likelihood.check_data(x)  # a Gaussian accepts grey values, a Bernoulli would binarize them
    model_tr = poutine.trace(g.model).get_trace(x)
    torch.testing.assert_close(model_tr.nodes["x"]["fn"].base_dist.scale[0], g.likelihood.scale.expand(D))
    torch.manual_seed(3)
    log_lik, _ = g.elbo_terms(x)
    torch.manual_seed(3)
    with torch.no_grad():
        z = g.latent_encoder(x, torch.arange(C)[:, None]).rsample()  # the same draws, (C, N, L)
        mu, s = g.likelihood.net(z), g.likelihood.scale
        by_hand = (-0.5 * ((x - mu) / s) ** 2 - s.log() - 0.5 * math.log(2 * math.pi)).sum(-1)  # (C, N)
        by_hand = (g.cluster_probs(x) * by_hand.T).sum(-1)
    torch.testing.assert_close(log_lik, by_hand)
    TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(g.model, g.guide, x).backward()
    assert g.likelihood.raw_scale.grad.abs().item() > 0
    levels = tiny(likelihood="categorical")
    assert isinstance(levels.likelihood, CategoricalLikelihood)
    assert torch.isfinite(levels.elbo_terms(torch.randint(0, 17, (4, D)).double() / 16)[0]).all()


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


def test_short_fit_on_digits_raises_the_validation_elbo(tmp_path):
    """Five epochs of fit on 240 digits from the random start (no ``initialize``) raise the mean
    validation ELBO by more than 4 standard errors of the paired per-image difference, without
    collapsing q(c|x) onto one cluster."""
    d = load_dataset("digits")
    xs, ys = d.train_x[:300], d.train_y[:300]
    splits = Splits("digits", (8, 8), xs[:240], ys[:240], xs[240:], ys[240:], xs[240:], ys[240:])
    cfg = {"model": {"name": "gmvae", "latent_dim": 4, "hidden": [32], "num_clusters": 10},
           "likelihood": {"name": "bernoulli"}}
    g = build_model(cfg, 64)
    val_x = binarize_fixed(splits.val_x, VAL_BINARIZATION_SEED).repeat(20, 1)  # 20 z draws a point

    def val_elbo():
        torch.manual_seed(0)
        return torch.sub(*g.elbo_terms(val_x)).reshape(20, -1).mean(0)

    before = val_elbo()
    result = fit(g, check_and_binarize(splits, g.likelihood), TraceEnum_ELBO(max_plate_nesting=1),
                 TrainConfig(epochs=5, batch_size=60, lr=3e-3), progress=False)
    gain = val_elbo() - before
    assert gain.mean() > 4 * gain.std() / math.sqrt(len(gain)), (gain.mean(), gain.std())
    assert result.best_score == max(r["val_elbo"] for r in result.history)
    # the random start (all p(z|c) at N(0, I), distinct q(z|x,c) branches) does not collapse q(c|x)
    # onto one cluster in the first epochs, as random cluster means did on mnist5k
    assert g.predict_cluster(binarize_fixed(splits.test_x, 0)).unique().numel() > 1


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
    for call in (g.elbo_terms, g.predict_cluster, g.guide, g.log_px_enumerated, g.encode):
        with pytest.raises(ValueError, match=r"NaN or inf in 1 row\(s\) \(first: \[3\]\)") as e:
            call(x)
        assert _one_line(e)
    with pytest.raises(ValueError, match="NaN") as e:
        estimate_log_px(g.model, g.guide, x, num_samples=4, progress=False)
    assert _one_line(e)
    bad = Splits("toy", (2, 3), x.float(), torch.zeros(5, dtype=torch.long), x.float(),
                 torch.zeros(5, dtype=torch.long), x.float(), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN") as e:
        check_and_binarize(bad, build_model(config(), D).likelihood)
    assert _one_line(e)
    for cfg, message in [
        (config(num_clusters=0), "model.num_clusters must be an integer >= 1, got 0"),
        (config(prior_spread=-1.0), "model.prior_spread must be >= 0, got -1.0"),
        (config(hidden=()), r"needs at least one hidden layer, got model.hidden=\[\]"),
        (config(activation="gated"), "needs a pointwise activation, got 'gated'"),
        (config(num_cluster=5), "model 'gmvae' has no option 'num_cluster'; its options are: latent_dim, "),
        ({**config(), "prior": {"name": "vamp"}}, r"model 'gmvae' has its own prior .* remove the prior section"),
        ({"model": {"name": "gmvae"}}, r"model 'gmvae' needs a 'likelihood' section: a name \(bernoulli, "),
        ({**config(), "model": {"name": "hmm"}}, "unknown model 'hmm'; choose one of: gmvae, two_layer, vae"),
        (config(init="kmeans"), "unknown model.init 'kmeans'; choose one of: vade, random"),
        (config(pretrain_epochs=0), "model.pretrain_epochs must be an integer >= 1, got 0"),
        (config(warmup_epochs=-1), "model.warmup_epochs must be an integer >= 0, got -1"),
    ]:
        with pytest.raises(ValueError, match=message) as e:
            build_model(cfg, D)
        assert _one_line(e)
    for labels, message in [(None, "cluster accuracy needs the true labels, got None"),
                            ([0, 1, 1], "labels and clusters must be non-empty and of one length, got 3 and 2")]:
        with pytest.raises(ValueError, match=message) as e:
            cluster_accuracy(labels, [0, 1])
        assert _one_line(e)


# ---------------------------------------------------------------- the VaDE-style start

TRUE_CLUSTERS, TOY_D = 3, 24


def mixture_of_decoders(n, generator):
    """n points of a known, well-separated mixture of decoders: c ~ Uniform{0, 1, 2}, z ~ N(0, I_2),
    x_d ~ Bernoulli(sigmoid(4 s_cd + (A_c z)_d)) with s_c a fixed ±1 pattern and A_c a fixed
    24 x 2 matrix per cluster (patterns differ in about 12 of the 24 pixels)."""
    patterns = torch.randint(0, 2, (TRUE_CLUSTERS, TOY_D), generator=torch.Generator().manual_seed(0)) * 2.0 - 1
    loadings = torch.randn(TRUE_CLUSTERS, TOY_D, 2, generator=torch.Generator().manual_seed(1))
    c = torch.randint(0, TRUE_CLUSTERS, (n,), generator=generator)
    logits = 4 * patterns[c] + torch.einsum("ndl,nl->nd", loadings[c], torch.randn(n, 2, generator=generator))
    return torch.bernoulli(torch.sigmoid(logits), generator=generator), c


def toy_splits(n_train=600, n_test=300):
    gen = torch.Generator().manual_seed(2)
    (xtr, ytr), (xva, yva), (xte, yte) = (mixture_of_decoders(n, gen) for n in (n_train, 150, n_test))
    return Splits("toy", (4, 6), xtr, ytr, xva, yva, xte, yte)


def started_gmvae(splits, num_clusters, epochs=10, **model):
    """A GMVAE built, started (``initialize``) and trained as ``train_run`` does, seed 0."""
    torch.manual_seed(0)
    cfg = {"model": {"name": "gmvae", "latent_dim": 2, "hidden": [32], "num_clusters": num_clusters,
                     "pretrain_epochs": 10, "warmup_epochs": 5, **model}, "likelihood": {"name": "bernoulli"}}
    g = build_model(cfg, TOY_D)
    data = check_and_binarize(splits, g.likelihood)
    g.initialize(data)
    torch.manual_seed(0)
    if epochs:
        fit(g, data, TraceELBO(), TrainConfig(epochs=epochs), progress=False)
    return g, data


def test_vade_start_recovers_the_clusters_of_a_known_mixture():
    """On 300 test points of a well-separated mixture of 3 decoders, argmax q(c|x) after the start
    and 10 epochs is the true cluster (up to relabelling) for all but a number of points consistent
    with an error rate of at most 1%: errors <= n p + 3 sqrt(n p (1 - p)), p = 0.01 (binomial SE).
    From the random start (init=random) the same training leaves about 16% wrong."""
    splits = toy_splits()
    g, data = started_gmvae(splits, TRUE_CLUSTERS)
    n, p = len(splits.test_y), 0.01
    errors = round(n * (1 - cluster_accuracy(splits.test_y, g.predict_cluster(data.test_x))))
    assert errors <= n * p + 3 * math.sqrt(n * p * (1 - p)), errors
    stats = g.cluster_statistics(data.test_x)
    assert stats["clusters_used"] == 3 and stats["smallest_share"] > 0.25, stats
    assert len(g.init_history["warmup"]) == 5 and g.init_history["warmup"][-1]["cluster_kl_weight"] == 1.0


def test_more_clusters_than_classes_leave_the_extra_ones_nearly_empty():
    """With 6 clusters for 3 true ones the start and training run, and the 3 smallest clusters
    together hold under 5% of the test points."""
    splits = toy_splits()
    g, data = started_gmvae(splits, 6)
    shares = sorted(g.cluster_statistics(data.test_x)["occupancy"])
    assert sum(shares[:3]) < 0.05, shares
    assert torch.isfinite(torch.sub(*g.elbo_terms(data.test_x))).all()


def test_vade_start_is_fixed_by_the_seed():
    """Two starts under one seed give the same parameters; another seed gives others."""
    splits = toy_splits(n_train=200, n_test=50)
    states = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        g = build_model(config(hidden=(16,), pretrain_epochs=2, warmup_epochs=1, gmm_restarts=2), TOY_D).float()
        g.initialize(check_and_binarize(splits, g.likelihood))
        states.append(g.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not torch.equal(states[0]["prior_locs"], states[2]["prior_locs"])


def test_random_start_leaves_the_model_as_built():
    splits = toy_splits(n_train=200, n_test=50)
    torch.manual_seed(0)
    g = build_model(config(init="random"), TOY_D).float()
    before = {k: v.clone() for k, v in g.state_dict().items()}
    g.initialize(check_and_binarize(splits, g.likelihood))
    assert all(torch.equal(before[k], v) for k, v in g.state_dict().items()) and g.init_history == {}


def test_extra_summary_reports_the_clustering_and_kmeans():
    """summary.json's clustering numbers of a started model: accuracy of argmax q(c|x) on the test
    set, occupancy and the k-means baseline; without test labels the accuracies are left out."""
    splits = toy_splits(n_train=200, n_test=60)
    g, data = started_gmvae(splits, TRUE_CLUSTERS, epochs=0)
    summary = g.extra_summary(data)
    assert summary["cluster_accuracy"] == cluster_accuracy(splits.test_y, g.predict_cluster(data.test_x))
    assert 0 <= summary["kmeans_accuracy"] <= 1 and 0 <= summary["cluster_accuracy_grey"] <= 1
    assert sum(summary["cluster"]["occupancy"]) == pytest.approx(1, abs=1e-3)
    assert summary["cluster"]["smallest_share"] == min(summary["cluster"]["occupancy"])
    assert summary["init"]["warmup"][-1]["epoch"] == 5 and summary["init"]["seconds"] > 0
    splits.test_y = None
    unlabelled = g.extra_summary(data)
    assert "cluster_accuracy" not in unlabelled and "cluster" in unlabelled


# ---------------------------------------------------------------- pyro-vae train model=gmvae

def pyro_vae(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pyro_vae.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_cli_trains_evaluates_and_draws_a_gmvae(tmp_path):
    fast = ["model=gmvae", "model.num_clusters=3", "model.hidden=[16]", "model.latent_dim=2", "train.epochs=2",
            "model.pretrain_epochs=2", "model.warmup_epochs=1", "eval.num_samples=10", "progress=false"]
    out = pyro_vae("train", *fast, "hydra.run.dir=run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["num_test"] == 359
    assert summary["test_elbo"] == pytest.approx(summary["test_log_lik"] - summary["test_kl"], abs=1e-4)
    assert math.isfinite(summary["test_log_px"]["mean"]) and summary["test_log_px"]["num_samples"] == 10
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs[1]["val_elbo"] > epochs[0]["val_elbo"]  # it trains: early gains are nats, noise 0.1
    assert 0 <= summary["cluster_accuracy"] <= 1 and 0 <= summary["kmeans_accuracy"] <= 1
    assert len(summary["cluster"]["occupancy"]) == 3 and summary["init"]["warmup"][0]["epoch"] == 1
    for name in ("elbo_curves.png", "reconstructions.png", "prior_samples.png", "latent_space.png",
                 "cluster_samples.png", "latent_clusters.png"):
        assert (run / "figures" / name).read_bytes()[:4] == b"\x89PNG", name
    written = (run / "config.yaml").read_text()
    assert "name: gmvae" in written and "num_clusters: 3" in written and "prior:" not in written
    out = pyro_vae("evaluate", str(run), "num_samples=20", "--no-progress", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads((run / "evaluation.json").read_text())["num_samples"] == 20
    model, _, _ = load_run(str(run))  # the run rebuilds as the GMVAE it trained
    assert isinstance(model, GMVAE) and model.num_clusters == 3


@pytest.mark.parametrize("args, message", [
    (["model=gmvaee"], "unknown model 'gmvaee'; choose one of: gmvae, two_layer, vae"),
    (["model=gmvae", "prior=vamp"], "model 'gmvae' has its own prior p(c) p(z|c) and guide q(c|x) q(z|x,c); "
                                    "remove the prior section"),
])
def test_cli_model_errors_are_one_line(tmp_path, args, message):
    out = pyro_vae("train", *args, "train.epochs=1", "progress=false", "hydra.run.dir=run", cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
