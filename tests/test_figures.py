"""Figures: they plot the numbers they are given, are PNG files written atomically, and leave
pyplot and the library core alone."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pyro_vae import figures
from pyro_vae.marginal import estimate_log_px
from pyro_vae.metrics import mean_se
from pyro_vae.exact.linear_gaussian import LinearGaussian, LinearGaussianGuide

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def estimates():
    lg = LinearGaussian.random(D=5, d=2, sigma=0.5, seed=1)
    x = lg.sample(20)
    kw = dict(num_samples=100, seed=0, progress=False)
    return lg, x, {"guide": estimate_log_px(lg.model, LinearGaussianGuide.perturbed(lg).guide, x, **kw),
                   "prior": estimate_log_px(lg.model, None, x, method="prior", warn=False, **kw)}


def test_the_core_imports_no_plotting_and_figures_leave_pyplot_alone(tmp_path):
    code = ("import sys; from pyro_vae.marginal import estimate_log_px; import pyro_vae.experiment; "
            "import pyro_vae.exact.linear_gaussian; assert 'matplotlib' not in sys.modules; "
            "from pyro_vae import figures; "
            f"figures.elbo_curves([{{'epoch': 1, 'train_elbo': -3.0}}], {str(tmp_path / 'c.png')!r}); "
            "assert 'matplotlib' in sys.modules and 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG


def test_log_px_vs_k_plots_the_mean_and_se_of_each_prefix(estimates, tmp_path):
    lg, x, results = estimates
    exact = lg.log_px(x).mean().item()
    fig = figures.plot_log_px_vs_k(results, exact=exact)
    ax = fig.axes[0]
    assert len(ax.containers) == 2  # one error-bar curve per estimate
    for container, (label, result) in zip(ax.containers, results.items()):
        line, _, (bars,) = container.lines
        ks = sorted(result.log_px_by_k)
        stats = [mean_se(result.log_px_by_k[k]) for k in ks]
        np.testing.assert_array_equal(line.get_xdata(), ks)
        np.testing.assert_allclose(np.asarray(line.get_ydata(), float), [s["mean"] for s in stats], rtol=1e-12)
        half_widths = [(seg[1, 1] - seg[0, 1]) / 2 for seg in bars.get_segments()]
        paired = [mean_se(result.log_px_by_k[k] - result.log_px_by_k[ks[-1]])["se"] for k in ks]  # to the largest K
        np.testing.assert_allclose(half_widths, paired, rtol=1e-9, atol=1e-12)
        assert container.get_label() == f"{label} (K ≤ 100)"
    assert [tuple(line.get_ydata()) for line in ax.lines if line.get_linestyle() == "--"] == [(exact, exact)]
    assert ax.get_xscale() == "log"
    figures.save_figure(fig, str(tmp_path / "log_px.png"))
    assert (tmp_path / "log_px.png").read_bytes()[:8] == PNG


def test_log_px_vs_k_refuses_an_estimate_without_prefixes(estimates):
    lg, x, _ = estimates
    exact = estimate_log_px(lg.model, None, x, method="exact", progress=False)
    with pytest.raises(ValueError, match="has no log_px_by_k"):
        figures.plot_log_px_vs_k(exact)


def test_elbo_curves_plot_the_history(tmp_path):
    history = [{"epoch": e, "train_elbo": -10.0 + e, "val_elbo": -11.0 + e, "train_log_lik": -9.0 + e,
                "val_log_lik": -9.5 + e, "train_kl": 1.0 / e, "val_kl": 1.5 / e} for e in (1, 2, 3)]
    fig = figures.elbo_curves(history, str(tmp_path / "curves.png"))
    for ax, key in zip(fig.axes, ("elbo", "log_lik", "kl")):
        plotted = {line.get_label(): list(line.get_ydata()) for line in ax.lines}
        assert plotted == {split: [r[f"{split}_{key}"] for r in history] for split in ("train", "val")}
        assert list(ax.lines[0].get_xdata()) == [1, 2, 3]
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG


def test_latent_space_projects_on_the_principal_components(tmp_path):
    rng = np.random.RandomState(0)
    z = rng.randn(200, 3) * [5.0, 1.0, 0.1]  # the first axis carries most of the variance
    fig = figures.latent_space(z, rng.randint(0, 10, 200), str(tmp_path / "z.png"))
    offsets = fig.axes[0].collections[0].get_offsets()
    np.testing.assert_allclose(np.abs(offsets[:, 0]), np.abs(z[:, 0] - z[:, 0].mean()), rtol=0.05, atol=0.3)
    assert fig.axes[0].get_xlabel().startswith("PC1 (9")


def test_image_grid_shows_the_images(tmp_path):
    rows = [np.linspace(0, 1, 2 * 64).reshape(2, 64), np.zeros((2, 64))]
    fig = figures.image_grid(rows, (8, 8), str(tmp_path / "grid.png"), ["a", "b"])
    assert len(fig.axes) == 4
    np.testing.assert_array_equal(fig.axes[1].images[0].get_array(), rows[0][1].reshape(8, 8))
    assert fig.axes[2].get_ylabel() == "b"


def test_a_figure_is_written_atomically(tmp_path, monkeypatch):
    path = str(tmp_path / "f.png")
    figures.save_figure(figures.elbo_curves([{"epoch": 1, "train_elbo": -3.0}], path), path)
    assert os.listdir(tmp_path) == ["f.png"]  # no temporary file left behind
    before = open(path, "rb").read()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        figures.image_grid([np.zeros((1, 64))], (8, 8), path)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["f.png"]


def test_mean_se():
    assert mean_se(torch.tensor([1.0, 2.0, 3.0, 6.0])) == pytest.approx({"mean": 3.0, "se": np.sqrt(14 / 3) / 2})
    assert mean_se([4.0])["mean"] == 4.0 and np.isnan(mean_se([4.0])["se"])
