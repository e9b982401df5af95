"""Priors: log p(z) against hand computations, sampling, invertibility of the flow, bad options."""

import math

import pyro.distributions as dist
import pytest
import torch

from pyro_vae.guides import DiagonalNormalGuide
from pyro_vae.priors import PRIORS, DiagonalNormalMixture, FlowPrior, MixturePrior, StandardNormalPrior, VampPrior


def normal_log_pdf(z, loc, scale):
    return (-0.5 * ((z - loc) / scale) ** 2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)).sum(-1)


def test_standard_normal_prior_is_N0I_over_latent_dim_and_moves_with_the_module():
    """N(0, I) with event shape (latent_dim,) and no batch shape (the data plate broadcasts it), no
    learnable parameters, and loc/scale buffers that .to(dtype) converts with the networks."""
    prior = StandardNormalPrior(3)
    p = prior()
    assert p.event_shape == (3,) and p.batch_shape == ()
    assert list(prior.parameters()) == []
    z = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]])
    assert torch.allclose(p.log_prob(z), -0.5 * (z ** 2).sum(-1) - 1.5 * math.log(2 * math.pi))
    p64 = prior.to(torch.float64)()
    assert p64.mean.dtype == torch.float64 and p64.log_prob(z.double()).dtype == torch.float64


def test_mixture_log_prob_is_logsumexp_of_weighted_components():
    torch.manual_seed(0)
    prior = MixturePrior(3, num_components=4)
    with torch.no_grad():
        prior.logits.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
        prior.raw_scales.add_(torch.randn(4, 3) * 0.3)
    z = torch.randn(6, 3)
    scales = torch.nn.functional.softplus(prior.raw_scales) + 1e-4
    log_pi = torch.log_softmax(prior.logits, 0)
    by_hand = torch.stack([log_pi[k] + normal_log_pdf(z, prior.locs[k], scales[k]) for k in range(4)], -1)
    assert torch.allclose(prior().log_prob(z), by_hand.logsumexp(-1), atol=1e-5)


def test_mixture_samples_have_the_mixture_mean():
    torch.manual_seed(1)
    prior = MixturePrior(2, num_components=3, init_spread=2.0)
    p = prior()
    s = p.sample((40000,))
    pi = torch.softmax(prior.logits, 0)
    mean = (pi[:, None] * prior.locs).sum(0)
    se = s.std(0) / math.sqrt(len(s))
    assert ((s.mean(0) - mean).abs() < 4 * se).all()


def test_vamp_prior_is_the_mean_of_the_guide_at_the_pseudo_inputs():
    torch.manual_seed(0)
    encoder = DiagonalNormalGuide(5, 3, hidden=[8])
    prior = VampPrior(3, encoder, num_components=4)
    z = torch.randn(7, 3)
    u = prior.pseudo_inputs.clamp(0, 1)
    comps = [encoder(u[k:k + 1]) for k in range(4)]
    by_hand = torch.stack([c.log_prob(z) for c in comps], -1).logsumexp(-1) - math.log(4)
    assert torch.allclose(prior().log_prob(z), by_hand, atol=1e-5)
    assert prior().sample((3,)).shape == (3, 3)
    # the encoder is shared, not copied: its parameters are the prior's, and get gradients from log p(z)
    assert {id(p) for p in encoder.parameters()} <= {id(p) for p in prior.parameters()}
    prior().log_prob(z).sum().backward()
    assert prior.pseudo_inputs.grad.abs().sum() > 0 and encoder.net[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("flow_type", ["affine", "spline"])
def test_flow_prior_is_normalized_invertible_and_matches_the_change_of_variables(flow_type):
    torch.manual_seed(0)
    prior = FlowPrior(2, num_flows=2, flow_type=flow_type, flow_hidden=[8])
    with torch.no_grad():  # move away from the identity-like initialization
        for p in prior.parameters():
            p.add_(0.1 * torch.randn_like(p))
    p = prior()

    def f(z):
        for t in prior.normalizing_transforms():
            z = t(z)
        return z

    # change of variables by hand, the Jacobian by autograd: log N(f(z)) + log|det df/dz|
    z = torch.randn(10, 2)
    log_det = torch.stack([torch.linalg.slogdet(torch.autograd.functional.jacobian(
        lambda a: f(a[None])[0], zi))[1] for zi in z])
    assert torch.allclose(p.log_prob(z), normal_log_pdf(f(z), torch.zeros(2), torch.ones(2)) + log_det, atol=1e-4)
    # sampling inverts f: pushing samples back through f recovers Gaussian noise with the same density
    s = p.sample((500,))
    back = f(s.clone())
    for t in reversed(prior.normalizing_transforms()):
        back = t.inv(back)
    assert torch.allclose(back, s, atol=1e-4)
    # normalized: the integral of p, E_r[p(z) / r(z)] with a wide Gaussian r, is 1 within 4 SE
    r = torch.distributions.Normal(0.0, 2.5)
    z = r.sample((200000, 2))
    with torch.no_grad():
        ratio = (p.log_prob(z) - r.log_prob(z).sum(-1)).exp()
    assert abs(ratio.mean().item() - 1) < 4 * ratio.std().item() / math.sqrt(len(ratio))


def test_bad_prior_options_say_what_is_allowed():
    with pytest.raises(ValueError, match="num_components must be an integer >= 1"):
        MixturePrior(2, num_components=0)
    with pytest.raises(ValueError, match=r"prior.num_components must be an integer >= 1, got 2.5"):
        VampPrior(2, DiagonalNormalGuide(4, 2, hidden=[8]), num_components=2.5)
    with pytest.raises(ValueError, match=r"prior.num_flows must be an integer >= 1, got True"):
        FlowPrior(2, num_flows=True)
    with pytest.raises(ValueError, match=r"prior.flow_hidden must be an integer >= 1, got 0"):
        FlowPrior(2, flow_hidden=[0])
    with pytest.raises(ValueError, match="flow_type must be one of affine, spline"):
        FlowPrior(2, flow_type="planar")
    with pytest.raises(ValueError, match="latent_dim >= 2"):
        FlowPrior(1)
    with pytest.raises(ValueError, match="has no option 'num_componets'; its options are: num_components"):
        PRIORS.build("mixture", {"num_componets": 3}, latent_dim=2)
    with pytest.raises(ValueError, match="unknown prior 'vampp'; choose one of: flow, mixture, standard_normal, (.*, )?vamp"):
        PRIORS.get("vampp")


def test_diagonal_normal_mixture_matches_broadcast_scoring_under_a_plate_and_far_from_zero():
    """The matrix-product scoring equals torch's MixtureSameFamily computed in float64, in float32
    with components far from the origin and narrow (where the expanded quadratic cancels), and
    under the batch shape a particle plate × data plate gives it."""
    torch.manual_seed(0)
    K, D = 7, 4
    logits, locs, scales = torch.randn(K), 20 + torch.randn(K, D), 0.05 + torch.rand(K, D)
    fast = DiagonalNormalMixture(logits, locs, scales).expand((3, 5))
    z = locs[torch.randint(K, (3, 5))] + 0.1 * torch.randn(3, 5, D)
    exact = dist.MixtureSameFamily(dist.Categorical(logits=logits.double()),
                                   dist.Normal(locs.double(), scales.double()).to_event(1)).log_prob(z.double())
    assert fast.batch_shape == (3, 5) and fast.log_prob(z).dtype == torch.float32
    assert torch.allclose(fast.log_prob(z).double(), exact, rtol=1e-6, atol=1e-5)
    assert fast.sample((2,)).shape == (2, 3, 5, D)


def test_vamp_prior_under_a_flow_guide_is_the_mean_of_its_gaussian_bases():
    from pyro_vae.guides import IAFGuide
    torch.manual_seed(0)
    encoder = IAFGuide(data_dim=6, latent_dim=3, hidden=[8], num_flows=2, context_dim=4)
    prior = VampPrior(3, encoder, num_components=5)
    z = torch.randn(7, 3)
    bases = encoder(torch.nn.functional.hardtanh(prior.pseudo_inputs, 0.0, 1.0)).base_dist  # batch (5,)
    expected = bases.log_prob(z[:, None]).logsumexp(-1) - math.log(5)
    torch.testing.assert_close(prior().log_prob(z), expected)
