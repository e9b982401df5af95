"""Network builders: He initialization of every layer, the gated hidden layer, bad arguments; the
convolutional nets (model.net=conv): shapes, the image shape and its errors, every prior x guide x
likelihood with them."""

import itertools
import math

import pyro
import pytest
import torch
from torch import nn

from pyro_vae import build_model
from pyro_vae.guides import GUIDES
from pyro_vae.likelihoods import LIKELIHOODS
from pyro_vae.nets import NETS, GatedDense, image_shape_of, mlp
from pyro_vae.priors import PRIORS
from pyro_vae.train import evaluate_elbo


def test_mlp_is_he_initialized():
    """Weights ~ N(0, 2 / fan_in), biases 0: the sample variance of each layer's n weights is within
    5 standard errors (sqrt(2 / n) relative, for a normal sample) of 2 / fan_in."""
    torch.manual_seed(0)
    net = mlp([784, 200, 200, 100], "tanh")
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [type(m) for m in net] == [nn.Linear, nn.Tanh, nn.Linear, nn.Tanh, nn.Linear]
    for layer in linears:
        w, n = layer.weight.detach().double(), layer.weight.numel()
        ratio = w.var() / (2.0 / layer.in_features)
        assert abs(ratio - 1) < 5 * math.sqrt(2.0 / n), (layer, ratio)
        assert abs(w.mean()) < 5 * math.sqrt(2.0 / layer.in_features / n)
        assert (layer.bias == 0).all()


def test_mlp_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown activation 'gelu'; choose one of: elu, gated, relu, softplus, tanh"):
        mlp([3, 2], "gelu")
    with pytest.raises(ValueError, match="at least two positive layer sizes"):
        mlp([3], "tanh")


def test_gated_mlp_is_value_times_sigmoid_gate():
    """activation="gated": every hidden layer is h = (W x + b) * sigmoid(V x + c), both maps
    He-initialized; the output layer stays linear."""
    torch.manual_seed(0)
    net = mlp([6, 5, 4, 3], "gated")
    assert [type(m) for m in net] == [GatedDense, GatedDense, nn.Linear]
    x = torch.randn(7, 6)
    for layer in net[:2]:
        nn.init.normal_(layer.value.bias), nn.init.normal_(layer.gate.bias)  # nonzero, to test them
    h = x
    for layer in net[:2]:
        h = (h @ layer.value.weight.T + layer.value.bias) * torch.sigmoid(h @ layer.gate.weight.T + layer.gate.bias)
    expected = h @ net[2].weight.T + net[2].bias
    assert torch.allclose(net(x), expected, atol=1e-6)
    big = mlp([784, 300, 10], "gated")
    for layer in (big[0].value, big[0].gate):
        ratio = layer.weight.detach().double().var() / (2.0 / 784)
        assert abs(ratio - 1) < 5 * math.sqrt(2.0 / layer.weight.numel())


# --- model.net=conv ------------------------------------------------------------------------------

TINY_CONV = {"latent_dim": 3, "hidden": [16], "activation": "tanh", "net": "conv", "channels": [4, 8]}
TINY_OPTIONS = {"mixture": {"num_components": 3}, "vamp": {"num_components": 3},
                "flow": {"num_flows": 1, "flow_hidden": [8]}, "iaf": {"num_flows": 1, "context_dim": 4, "flow_hidden": [8]}}


@pytest.mark.parametrize("shape,sides", [((1, 8, 8), [(8, 8), (4, 4), (2, 2)]),
                                         ((1, 28, 28), [(28, 28), (14, 14), (7, 7)]),
                                         ((3, 5, 7), [(5, 7), (3, 4), (2, 2)])])
def test_conv_shapes(shape, sides):
    """Flat (..., D) in and out, any leading dims; the convolutions halve the sides (rounding up)
    and the transposed ones land back on the image, for digits, MNIST and an odd colour shape."""
    D = math.prod(shape)
    factory = NETS.build("conv", {"image_shape": list(shape)}, data_dim=D, hidden=[16], activation="relu")
    assert factory.image_shape == shape and factory.sides == sides
    encoder, decoder = factory.encoder(6), factory.decoder(5, outputs_per_pixel=3)
    assert isinstance(encoder[0], nn.Conv2d) and isinstance(encoder[-1], nn.Linear)
    assert any(isinstance(m, nn.ConvTranspose2d) for m in decoder)
    assert encoder(torch.rand(2, 4, D)).shape == (2, 4, 6)
    assert decoder(torch.randn(7, 2, 5)).shape == (7, 2, D * 3)
    # pixel-major outputs: pixel p's P outputs at [p P, (p + 1) P), pixel p the flat (C, H, W) index
    z = torch.randn(2, 5)
    images = nn.Sequential(*list(decoder))(z)                     # (2, C * P, H, W), channel c * P + k
    c, h, w = shape
    expected = images.reshape(2, c, 3, h, w).permute(0, 1, 3, 4, 2).reshape(2, D * 3)
    torch.testing.assert_close(decoder(z), expected)


def test_conv_image_shape_inferred_as_a_square():
    assert image_shape_of(64) == (1, 8, 8) and image_shape_of(784) == (1, 28, 28)
    vae = build_model({"model": {**TINY_CONV, "channels": None}, "prior": {"name": "standard_normal"},
                       "guide": {"name": "diagonal_normal"}, "likelihood": {"name": "bernoulli"}}, 784)
    assert vae.encoder.net[0].in_channels == 1 and vae.encoder.net[2].out_channels == 64  # default [32, 64]


def test_conv_bad_shapes_are_one_line_errors():
    with pytest.raises(ValueError, match=r"data_dim=60 is not a square .*give the shape as model.image_shape=\[C,H,W\]"):
        NETS.build("conv", {}, data_dim=60, hidden=[8], activation="tanh")
    with pytest.raises(ValueError, match=r"model.image_shape must be \[C,H,W\].*= 64, got \[1, 3, 16\]"):
        NETS.build("conv", {"image_shape": [1, 3, 16]}, data_dim=64, hidden=[8], activation="tanh")
    with pytest.raises(ValueError, match="model.channels must be a list"):
        NETS.build("conv", {"channels": [0]}, data_dim=64, hidden=[8], activation="tanh")
    with pytest.raises(ValueError, match="needs a pointwise activation"):
        NETS.build("conv", {}, data_dim=64, hidden=[8], activation="gated")
    with pytest.raises(ValueError, match="net 'mlp' has no option 'image_shape'"):
        build_model({"model": {"latent_dim": 2, "hidden": [8], "net": "mlp", "image_shape": [1, 8, 8]},
                     "prior": {"name": "standard_normal"}, "guide": {"name": "diagonal_normal"},
                     "likelihood": {"name": "bernoulli"}}, 64)


@pytest.mark.parametrize("model", ["vae", "two_layer"])
def test_conv_every_prior_guide_likelihood_builds_and_has_a_finite_elbo(model):
    """Every prior x guide x likelihood with conv networks on 8x8 digits (for the two-layer VAE, the
    priors of z2 it takes): the guide's encoder (the IAF's context too) and the decoder are the
    conv ones, the ELBO is finite and its gradient reaches every parameter."""
    x = (torch.randint(0, 17, (12, 64)) / 16.0)
    def shipped(registry):  # other tests register components named test_*; those are not the library's
        return [n for n in registry.names() if not n.startswith("test_")]

    priors = [p for p in shipped(PRIORS) if model == "vae" or p != "vamp"]
    for prior, guide, likelihood in itertools.product(priors, shipped(GUIDES), shipped(LIKELIHOODS)):
        options = {**TINY_CONV, "name": model, **({"latent_dim2": 2, "hidden2": [8]} if model == "two_layer" else {})}
        vae = build_model({"model": options, "prior": {"name": prior, **TINY_OPTIONS.get(prior, {})},
                           "guide": {"name": guide, **TINY_OPTIONS.get(guide, {})},
                           "likelihood": {"name": likelihood}}, 64)
        assert isinstance(vae.encoder.net[0], nn.Conv2d), (prior, guide, likelihood)
        assert any(isinstance(m, nn.ConvTranspose2d) for m in vae.likelihood.net)
        data = torch.bernoulli(x) if vae.likelihood.binarize else x
        vae.likelihood.check_data(data)
        elbo = evaluate_elbo(vae, data, batch_size=12)
        assert all(math.isfinite(v) for v in elbo.values()), (prior, guide, likelihood, elbo)
        loss = pyro.infer.Trace_ELBO().differentiable_loss(vae.model, vae.guide, data)
        loss.backward()
        assert torch.isfinite(loss) and all(p.grad is not None for p in vae.parameters()), (prior, guide, likelihood)
