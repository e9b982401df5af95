"""Guides: log q(z|x) against torch distributions built by hand, the IAF against its recursion and
its inverse, shapes under plates, bad options."""

import math

import pyro
import pytest
import torch
import torch.nn.functional as F

from pyro_vae.guides import GUIDES, MIN_SCALE, DiagonalNormalGuide, FullNormalGuide, IAFGuide


def test_diagonal_normal_matches_torch_normal():
    torch.manual_seed(0)
    guide, x = DiagonalNormalGuide(6, 3, hidden=[8]), torch.rand(4, 6)
    loc, raw = guide.net(x).chunk(2, -1)
    ref = torch.distributions.Normal(loc, F.softplus(raw) + MIN_SCALE)
    z = torch.randn(4, 3)
    assert torch.allclose(guide(x).log_prob(z), ref.log_prob(z).sum(-1), atol=1e-5)


def test_full_normal_matches_torch_multivariate_normal_with_covariance_L_Lt():
    torch.manual_seed(0)
    guide, x = FullNormalGuide(6, 3, hidden=[8], off_diagonal_scale=0.5), torch.rand(4, 6)
    assert (guide(x).scale_tril.tril(-1) == 0).all()  # starts diagonal: the off-diagonal head is zero
    with torch.no_grad():
        guide.net[-1].weight[6:].normal_()  # give the off-diagonal head something to place
    out = guide.net(x)
    loc, diag, off = out[:, :3], F.softplus(out[:, 3:6]) + MIN_SCALE, 0.5 * out[:, 6:]
    assert off.shape == (4, 3) and (off != 0).all()  # d(d-1)/2 strictly lower entries
    L = torch.zeros(4, 3, 3)
    L[:, range(3), range(3)] = diag
    L[:, [1, 2, 2], [0, 0, 1]] = off
    ref = torch.distributions.MultivariateNormal(loc, covariance_matrix=L @ L.transpose(-1, -2))
    q = guide(x)
    z = torch.randn(5, 4, 3)
    assert torch.allclose(q.log_prob(z), ref.log_prob(z), atol=1e-4)
    assert torch.allclose(q.scale_tril, L)
    # reparameterized: z = mu + L eps carries gradients to the encoder
    q.rsample().sum().backward()
    assert guide.net[0].weight.grad.abs().sum() > 0


def test_iaf_log_density_follows_the_recursion_of_its_docstring():
    """z_0 = mu + sigma eps from the encoder, then per step z_t = s_t z_{t-1} + (1 - s_t) m_t with
    [m_t, l_t] = AR_t(z_{t-1}, h), s_t = sigmoid(l_t + 2), h = tanh(encoder's context head), the
    coordinates reversed between steps; log q(z_T|x) = log N(z_0; mu, sigma^2) - sum log s_t.
    Computed here from the guide's networks, then scored by the guide on both of its paths."""
    torch.manual_seed(0)
    d = 3
    guide, x = IAFGuide(6, d, hidden=[8], num_flows=3, context_dim=4, flow_hidden=[8]), torch.rand(5, 6)
    with torch.no_grad():
        for p in guide.flows.parameters():
            p.add_(0.3 * torch.randn_like(p))
    out = guide.net(x)
    loc, scale, h = out[:, :d], F.softplus(out[:, d:2 * d]) + MIN_SCALE, torch.tanh(out[:, 2 * d:])
    z = loc + scale * torch.randn(5, d)
    log_q = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
    for t, flow in enumerate(guide.flows):
        if t > 0:
            z = z.flip(-1)
        mean, logit = flow.nn(z, context=h)
        s = torch.sigmoid(logit + 2.0)
        z = s * z + (1 - s) * mean
        log_q = log_q - s.log().sum(-1)
    q = guide(x)
    assert torch.allclose(q.log_prob(z.detach().clone()), log_q, atol=1e-4)  # inverse path (scoring)
    sample = q.rsample()
    assert torch.allclose(q.log_prob(sample), q.log_prob(sample.detach().clone()), atol=1e-4)  # cached path


def test_iaf_density_is_normalized():
    torch.manual_seed(1)
    guide = IAFGuide(4, 2, hidden=[8], num_flows=2, context_dim=3, flow_hidden=[8])
    with torch.no_grad():
        for p in guide.flows.parameters():
            p.add_(0.2 * torch.randn_like(p))
    q = guide(torch.rand(1, 4))
    r = torch.distributions.Normal(q.base_dist.base_dist.loc.detach(), 3.0)
    z = r.sample((100000,))  # (100000, 1, 2)
    with torch.no_grad():
        ratio = (q.log_prob(z) - r.log_prob(z).sum(-1)).exp().flatten()
    assert abs(ratio.mean().item() - 1) < 4 * ratio.std().item() / math.sqrt(len(ratio))


@pytest.mark.parametrize("name", ["diagonal_normal", "full_normal", "iaf"])
def test_guides_broadcast_over_particle_and_data_plates(name):
    guide = GUIDES.build(name, {}, data_dim=6, latent_dim=3, hidden=[8], activation="tanh")
    x = torch.rand(4, 6)
    with pyro.plate("particles", 5, dim=-2), pyro.plate("data", 4, dim=-1):
        z = pyro.sample("z", guide(x))
    assert z.shape == (5, 4, 3)
    assert guide(x).has_rsample and guide(x).batch_shape == (4,) and guide(x).event_shape == (3,)


def test_bad_guide_options():
    with pytest.raises(ValueError, match="off_diagonal_scale must be > 0"):
        FullNormalGuide(4, 2, off_diagonal_scale=0)
    with pytest.raises(ValueError, match="num_flows must be an integer >= 1"):
        IAFGuide(4, 2, num_flows=0)
    with pytest.raises(ValueError, match=r"guide.context_dim must be an integer >= 1, got 2.5"):
        IAFGuide(4, 2, context_dim=2.5)
    with pytest.raises(ValueError, match=r"guide.flow_hidden must be an integer >= 1, got 0"):
        IAFGuide(4, 2, flow_hidden=[8, 0])
    with pytest.raises(ValueError, match=r"latent_dim must be an integer >= 1, got 0"):
        DiagonalNormalGuide(4, 0)
    with pytest.raises(ValueError, match="latent_dim >= 2"):
        IAFGuide(4, 1)
    with pytest.raises(ValueError, match="has no option 'numflows'; its options are: num_flows, context_dim, flow_hidden"):
        GUIDES.build("iaf", {"numflows": 2}, data_dim=4, latent_dim=2, hidden=[8], activation="tanh")
    with pytest.raises(ValueError, match="unknown guide 'maf'; choose one of: diagonal_normal, full_normal, iaf"):
        GUIDES.get("maf")
