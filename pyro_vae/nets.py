"""Network builders for encoders and decoders: He-initialized linear layers, the gated hidden layer
and the MLP that every guide and likelihood is built from."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "softplus": nn.Softplus}
GATED = "gated"


def he_linear(n_in: int, n_out: int) -> nn.Linear:
    """A linear layer ``n_in -> n_out`` with weights drawn N(0, 2 / n_in) (He et al. 2015) and zero
    biases.

    :param int n_in: input size (fan-in).
    :param int n_out: output size.
    """
    linear = nn.Linear(int(n_in), int(n_out))
    nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
    nn.init.zeros_(linear.bias)
    return linear


class GatedDense(nn.Module):
    """The gated hidden layer (Dauphin et al. 2017) of the VampPrior reference code (Tomczak &
    Welling 2018), selected by ``activation="gated"``:

        h = (W x + b) ⊙ sigmoid(V x + c),

    with both linear maps He-initialized (:func:`he_linear`).

    :param int n_in: input size.
    :param int n_out: output size.
    """

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.value, self.gate = he_linear(n_in, n_out), he_linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value(x) * torch.sigmoid(self.gate(x))


def mlp(sizes: Sequence[int], activation: str = "tanh") -> nn.Sequential:
    """A multilayer perceptron ``sizes[0] -> ... -> sizes[-1]``, with ``activation`` after every
    layer but the last (whose output is a distribution's raw parameters); ``"gated"`` makes every
    hidden layer a :class:`GatedDense` instead of a linear layer and a pointwise activation.

    Every weight is drawn N(0, 2 / fan_in) (He et al. 2015) and every bias is zero, as in the
    VampPrior's reference code (Tomczak & Welling 2018), not torch's default U(±1/√fan_in) (why:
    experiments/compare_models/results.md, section "The initialization: why the VampPrior
    collapsed, and what it cost every other row").

    :param sizes: layer sizes, at least two, each >= 1.
    :param str activation: ``"tanh"``, ``"relu"``, ``"elu"``, ``"softplus"`` or ``"gated"``.
        Default is ``"tanh"``.
    """
    if activation not in ACTIVATIONS and activation != GATED:
        raise ValueError(
            f"unknown activation {activation!r}; choose one of: {', '.join(sorted([*ACTIVATIONS, GATED]))}"
        )
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"an MLP needs at least two positive layer sizes, got {list(sizes)}")
    layers = []
    for n_in, n_out in zip(sizes[:-2], sizes[1:-1]):
        if activation == GATED:
            layers.append(GatedDense(n_in, n_out))
        else:
            layers += [he_linear(n_in, n_out), ACTIVATIONS[activation]()]
    layers.append(he_linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)
