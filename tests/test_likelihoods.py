"""Likelihoods: log p(x|z) against the formulas, the decoder base, what the binarize flag means,
the support checks and bad options."""

import itertools
import math

import pyro.distributions as dist
import pytest
import pyro
import torch

from pyro_vae.likelihoods import (LIKELIHOODS, BernoulliLikelihood, CategoricalLikelihood,
                                  ContinuousBernoulliLikelihood, DecoderLikelihood, GaussianLikelihood, GreyLevels)

D, d = 5, 2


def grey_levels(n=4, levels=17):
    return torch.randint(0, levels, (n, D), generator=torch.Generator().manual_seed(0)).float() / (levels - 1)


def test_continuous_bernoulli_includes_its_normalizer():
    torch.manual_seed(0)
    lik, z, x = ContinuousBernoulliLikelihood(D, d, hidden=[8]), torch.randn(4, d), grey_levels()
    lam = torch.sigmoid(lik.net(z)).double()
    log_c = torch.log(2 * torch.atanh(1 - 2 * lam) / (1 - 2 * lam))  # C(lambda), lambda != 1/2
    by_hand = (log_c + x * torch.log(lam) + (1 - x) * torch.log1p(-lam)).sum(-1)
    assert torch.allclose(lik(z).log_prob(x).double(), by_hand, atol=1e-4)


@pytest.mark.parametrize("scale_type,size", [("global", 1), ("per_dim", D)])
def test_gaussian_with_learned_scale(scale_type, size):
    torch.manual_seed(0)
    lik = GaussianLikelihood(D, d, hidden=[8], scale_type=scale_type, init_scale=0.3)
    assert lik.raw_scale.shape == (size,) and torch.allclose(lik.scale, torch.full((size,), 0.3))
    z, x = torch.randn(4, d), grey_levels()
    mu, s = lik.net(z), lik.scale
    by_hand = (-0.5 * ((x - mu) / s) ** 2 - torch.log(s) - 0.5 * math.log(2 * math.pi)).sum(-1)
    assert torch.allclose(lik(z).log_prob(x), by_hand, atol=1e-5)
    lik(z).log_prob(x).sum().backward()
    assert lik.raw_scale.grad.abs().sum() > 0  # the scale is learned


def test_categorical_over_grey_levels():
    torch.manual_seed(0)
    lik, z, x = CategoricalLikelihood(D, d, hidden=[8], num_levels=17), torch.randn(4, d), grey_levels()
    logits = lik.net(z).reshape(4, D, 17).log_softmax(-1)
    k = (x * 16).round().long()
    by_hand = logits.gather(-1, k[..., None]).squeeze(-1).sum(-1)
    assert torch.allclose(lik(z).log_prob(x), by_hand, atol=1e-5)
    # a proper distribution on the levels: probabilities sum to 1, samples are levels, mean = sum p_k k/16
    levels = GreyLevels(logits)
    all_levels = torch.arange(17).float().div(16)[:, None, None].expand(17, 4, D)
    assert torch.allclose(levels.log_prob(all_levels).exp().sum(0), torch.ones(4, D), atol=1e-5)
    s = levels.sample((3,))
    assert torch.allclose(s * 16, (s * 16).round())
    assert torch.allclose(levels.mean, (logits.exp() * torch.arange(17) / 16).sum(-1), atol=1e-6)


NAMES = ["bernoulli", "continuous_bernoulli", "gaussian", "categorical"]


def build(name, **options):
    return LIKELIHOODS.build(name, options, data_dim=D, latent_dim=d, hidden=[8, 4], activation="tanh")


@pytest.mark.parametrize("name", NAMES)
def test_binarize_exactly_when_a_distribution_over_binary_pixels(name):
    """``binarize`` says the likelihood is a distribution over binary images: then p(x|z) sums to 1
    over the 2^D binary x; for the grey-value likelihoods it does not."""
    torch.manual_seed(0)
    lik, z = build(name), torch.randn(3, d)
    corners = torch.tensor(list(itertools.product([0.0, 1.0], repeat=D)))[:, None, :]  # (2^D, 1, D)
    total = lik(z).log_prob(corners).exp().sum(0)
    assert torch.allclose(total, torch.ones(3), atol=1e-5) == lik.binarize, (name, total)


@pytest.mark.parametrize("name, outputs", [("bernoulli", D), ("continuous_bernoulli", D), ("gaussian", D),
                                           ("categorical", 17 * D)])
def test_decoder_mirrors_the_encoder_and_outputs_the_pixel_parameters(name, outputs):
    lik = build(name)
    assert isinstance(lik, DecoderLikelihood)
    sizes = [m.in_features for m in lik.net if isinstance(m, torch.nn.Linear)] + [lik.net[-1].out_features]
    assert sizes == [d, 4, 8, outputs]
    z = torch.randn(7, 2, d)
    assert lik(z).batch_shape == (7, 2) and lik(z).event_shape == (D,) and lik.mean(z).shape == (7, 2, D)


def test_a_new_decoder_likelihood_is_one_method():
    """A Laplace likelihood on the base: two decoder outputs per pixel (location, log scale)."""

    class Laplace(DecoderLikelihood):
        outputs_per_pixel = 2

        def pixel_distribution(self, outputs):
            loc, log_scale = outputs.reshape(*outputs.shape[:-1], self.data_dim, 2).unbind(-1)
            return dist.Laplace(loc, log_scale.exp())

    torch.manual_seed(0)
    lik, z, x = Laplace(D, d, hidden=[8]), torch.randn(4, d), grey_levels()
    loc, log_scale = lik.net(z).reshape(4, D, 2).unbind(-1)
    by_hand = (-(x - loc).abs() / log_scale.exp() - log_scale - math.log(2)).sum(-1)
    torch.testing.assert_close(lik(z).log_prob(x), by_hand)


@pytest.mark.parametrize("name", ["bernoulli", "continuous_bernoulli", "categorical"])
def test_data_outside_the_unit_interval_is_rejected(name):
    lik = LIKELIHOODS.build(name, {}, data_dim=D, latent_dim=d, hidden=[8], activation="tanh")
    lik.check_data(grey_levels(), "digits train data")  # in support: no error
    with pytest.raises(ValueError, match=rf"digits train data lies in \[0, 16\] but the {name} likelihood needs "
                                         r"values in \[0, 1\]; rescale it"):
        lik.check_data(grey_levels() * 16, "digits train data")


@pytest.mark.parametrize("name", ["bernoulli", "continuous_bernoulli", "gaussian", "categorical"])
def test_nan_is_rejected(name):
    lik = LIKELIHOODS.build(name, {}, data_dim=D, latent_dim=d, hidden=[8], activation="tanh")
    x = grey_levels()
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"data holds NaN or inf \(first at index \[1, 2\]\)"):
        lik.check_data(x)


def test_categorical_rejects_values_between_levels():
    lik = CategoricalLikelihood(D, d, hidden=[8], num_levels=17)
    x = grey_levels()
    x[0, 0] = 0.5 + 1 / 64
    with pytest.raises(ValueError, match=r"holds 0.515625, not one of the 17 grey levels k/16.*set likelihood.num_levels"):
        lik.check_data(x)
    CategoricalLikelihood(D, d, hidden=[8], num_levels=256).check_data(torch.tensor([[0, 1, 128, 255, 7]]) / 255.0)


def test_bad_likelihood_options():
    with pytest.raises(ValueError, match="scale_type must be one of global, per_dim"):
        GaussianLikelihood(D, d, scale_type="full")
    with pytest.raises(ValueError, match="0 < min_scale < init_scale"):
        GaussianLikelihood(D, d, init_scale=0.001)
    with pytest.raises(ValueError, match="num_levels must be an integer >= 2"):
        CategoricalLikelihood(D, d, num_levels=1)
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'; choose one of: bernoulli, categorical, "
                                         "continuous_bernoulli, gaussian"):
        LIKELIHOODS.get("poisson")


def test_bernoulli_log_prob_and_gradient_equal_torch():
    """The likelihood's Bernoulli (-softplus((1 - 2x) l) for binary x, -BCE for grey x with validation
    off): values and gradients are torch's Bernoulli's, to rounding."""
    torch.manual_seed(0)
    lik = BernoulliLikelihood(data_dim=6, latent_dim=3, hidden=[5])
    z = 3 * torch.randn(4, 2, 3)
    for x in (torch.bernoulli(torch.full((2, 6), 0.4)), torch.rand(2, 6)):
        with pyro.validation_enabled(False):
            ours = lik(z).log_prob(x)
        ours_grad = torch.autograd.grad(ours.sum(), list(lik.parameters()))
        theirs = torch.distributions.Bernoulli(logits=lik.net(z), validate_args=False).log_prob(x).sum(-1)
        theirs_grad = torch.autograd.grad(theirs.sum(), list(lik.parameters()))
        assert ours.shape == (4, 2)
        torch.testing.assert_close(ours, theirs)
        for a, b in zip(ours_grad, theirs_grad):
            torch.testing.assert_close(a, b)

