"""Network builders: He initialization of every layer, the gated hidden layer, bad arguments."""

import math

import pytest
import torch
from torch import nn

from pyro_vae.nets import GatedDense, mlp


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
