"""Network builders for encoders and decoders: He-initialized linear layers, the gated hidden layer,
the MLP, and the registry ``NETS`` of the networks a guide's encoder and a likelihood's decoder
are made of (``model.net=mlp``, the default, or ``conv``).

A net factory in ``NETS`` is built once per model from the data dimension and the model's
``hidden`` and ``activation`` (and its own options), and hands out ``encoder(n_out)``, a module
(..., D) -> (..., n_out), and ``decoder(n_in, outputs_per_pixel)``, a module (..., n_in) ->
(..., D * outputs_per_pixel) with pixel p's outputs at [p * P, (p + 1) * P). Data stay (N, D)
flat outside the networks; a convolutional net reshapes them to images inside.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .registry import Registry

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


NETS = Registry("net")


@NETS.register("mlp")
class MLP:
    """Fully connected networks: encoder ``D -> hidden -> n_out``, decoder ``n_in -> reversed(hidden)
    -> D * P`` (:func:`mlp`).

    :param int data_dim: D.
    :param hidden: hidden layer sizes of the encoder; the decoder mirrors them.
    :param str activation: see :func:`mlp`.
    """

    def __init__(self, data_dim: int, hidden: Sequence[int] = (200, 200), activation: str = "tanh"):
        self.data_dim, self.hidden, self.activation = int(data_dim), [int(h) for h in hidden], activation

    def encoder(self, n_out: int) -> nn.Module:
        return mlp([self.data_dim, *self.hidden, n_out], self.activation)

    def decoder(self, n_in: int, outputs_per_pixel: int = 1) -> nn.Module:
        return mlp([n_in, *reversed(self.hidden), self.data_dim * outputs_per_pixel], self.activation)


def image_shape_of(data_dim: int, image_shape: Sequence[int] | None = None) -> tuple:
    """(C, H, W) of flat images of dimension D: ``image_shape`` if given (C·H·W must be D), else
    1 × √D × √D when D is a square; else a one-line error that says to give ``model.image_shape``."""
    if image_shape is None:
        side = math.isqrt(int(data_dim))
        if side * side != data_dim:
            raise ValueError(f"model.net=conv needs images, but data_dim={data_dim} is not a square (1 x H x H); "
                             f"give the shape as model.image_shape=[C,H,W] with C*H*W = {data_dim}")
        return (1, side, side)
    shape = tuple(image_shape) if isinstance(image_shape, (list, tuple)) else ()
    if len(shape) != 3 or not all(isinstance(s, int) and s >= 1 for s in shape) or math.prod(shape) != data_dim:
        raise ValueError(f"model.image_shape must be [C,H,W], three positive integers with C*H*W = data_dim "
                         f"= {data_dim}, got {image_shape!r}")
    return shape


def _he(layer: nn.Module) -> nn.Module:
    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    nn.init.zeros_(layer.bias)
    return layer


class _ConvEncoder(nn.Sequential):
    """Sequential over images (N, C, H, W); ``forward`` takes flat (..., D) and returns (..., n_out)."""

    def __init__(self, image_shape, layers):
        super().__init__(*layers)
        self.image_shape = tuple(image_shape)

    def forward(self, x):
        lead = x.shape[:-1]
        return super().forward(x.reshape(-1, *self.image_shape)).reshape(*lead, -1)


class _ConvDecoder(nn.Sequential):
    """Sequential (N, n_in) -> (N, C * P, H, W); ``forward`` returns flat (..., D * P), pixel-major."""

    def __init__(self, image_shape, outputs_per_pixel, layers):
        super().__init__(*layers)
        self.image_shape, self.outputs_per_pixel = tuple(image_shape), int(outputs_per_pixel)

    def forward(self, z):
        lead = z.shape[:-1]
        out = super().forward(z.reshape(-1, z.shape[-1]))              # (N, C * P, H, W)
        (c, h, w), p = self.image_shape, self.outputs_per_pixel
        out = out.reshape(-1, c, p, h, w).permute(0, 1, 3, 4, 2)        # (N, C, H, W, P)
        return out.reshape(*lead, c * h * w * p)


@NETS.register("conv")
class Conv:
    """Convolutional networks for images of shape (C, H, W) (:func:`image_shape_of`):

        encoder:  x -> [Conv 3x3 stride 2 -> act] per entry of ``channels`` -> flatten -> hidden -> n_out
        decoder:  z -> reversed(hidden) -> C_L h_L w_L -> act -> [ConvTranspose 3x3 stride 2] per entry of
                  reversed(channels), act between them, the last to C·P channels at H × W

    Each stride-2 convolution (padding 1) halves the side, rounding up (28 -> 14 -> 7, 8 -> 4 -> 2);
    each transposed one doubles it back, with an output padding that lands on the encoder's sizes,
    so any image shape works. Weights He-initialized, biases zero, as in :func:`mlp`.

    :param int data_dim: D = C·H·W.
    :param hidden: sizes of the fully connected layers between the convolutions and the output.
    :param str activation: a pointwise activation (not ``"gated"``).
    :param image_shape: [C, H, W]; default 1 × √D × √D.
    :param channels: output channels of the encoder's convolutions. Default is (32, 64).
    """

    def __init__(self, data_dim: int, hidden: Sequence[int] = (200, 200), activation: str = "tanh",
                 image_shape: Sequence[int] | None = None, channels: Sequence[int] = (32, 64)):
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.net=conv needs a pointwise activation ({', '.join(sorted(ACTIVATIONS))}), "
                             f"got {activation!r}")
        if not isinstance(channels, (list, tuple)) or not channels or \
                not all(isinstance(c, int) and c >= 1 for c in channels):
            raise ValueError(f"model.channels must be a list of positive channel counts, e.g. [32, 64], got {channels!r}")
        self.image_shape = image_shape_of(data_dim, image_shape)
        self.hidden, self.activation, self.channels = [int(h) for h in hidden], activation, list(channels)
        self.sides = [self.image_shape[1:]]
        for _ in self.channels:
            h, w = self.sides[-1]
            self.sides.append(((h + 1) // 2, (w + 1) // 2))

    def _act(self):
        return ACTIVATIONS[self.activation]()

    def encoder(self, n_out: int) -> nn.Module:
        layers, c_in = [], self.image_shape[0]
        for c in self.channels:
            layers += [_he(nn.Conv2d(c_in, c, 3, stride=2, padding=1)), self._act()]
            c_in = c
        h, w = self.sides[-1]
        layers.append(nn.Flatten())
        return _ConvEncoder(self.image_shape, layers + list(mlp([c_in * h * w, *self.hidden, n_out], self.activation)))

    def decoder(self, n_in: int, outputs_per_pixel: int = 1) -> nn.Module:
        (h, w), c_top = self.sides[-1], self.channels[-1]
        layers = list(mlp([n_in, *reversed(self.hidden), c_top * h * w], self.activation))
        layers += [self._act(), nn.Unflatten(1, (c_top, h, w))]
        outs = [*reversed(self.channels[:-1]), self.image_shape[0] * outputs_per_pixel]
        c_in = c_top
        for i, c in enumerate(outs):
            (h0, w0), (h1, w1) = self.sides[len(outs) - i], self.sides[len(outs) - i - 1]
            pad = (h1 - 2 * h0 + 1, w1 - 2 * w0 + 1)
            layers.append(_he(nn.ConvTranspose2d(c_in, c, 3, stride=2, padding=1, output_padding=pad)))
            if i < len(outs) - 1:
                layers.append(self._act())
            c_in = c
        return _ConvDecoder(self.image_shape, outputs_per_pixel, layers)
