"""The Gaussian-mixture study (`pyro-vae exact gaussian_mixture`): a smoke run of the command, whose
numbers must obey what is exact (ELBO ≤ log p(x), zero variance of the enumerated gradients, the
K = 1 gap equal to the exact KL), and its one-line errors."""

import json

import pytest

from helpers import one_line_error, pyro_vae

TINY = ["data.num_points=200", "fit.num_steps=30", "gradient_variance.num_draws=5",
        "gradient_variance.batch_sizes=[null,20]", "bounds.num_points=50", "bounds.num_samples=10"]


def test_the_command_writes_its_tables_figures_and_numbers(tmp_path):
    out = pyro_vae("exact", "gaussian_mixture", *TINY, "--out", str(tmp_path / "gm"), "--no-progress", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert {p.name for p in (tmp_path / "gm").iterdir()} == {"results.md", "results.json", "fit.png",
                                                              "convergence.png", "bounds.png"}
    saved = json.loads((tmp_path / "gm" / "results.json").read_text())
    assert saved["overrides"] == TINY and saved["config"]["fit"]["num_steps"] == 30
    r = saved["results"]
    enumerated, amortized = r["fits"]
    assert enumerated["mean ELBO"] == pytest.approx(enumerated["mean log p(x)"], abs=1e-12)  # no guide: exact
    assert amortized["mean ELBO"] < amortized["mean log p(x)"]
    assert r["em"]["mean log p(x)"] > max(enumerated["mean log p(x)"], amortized["mean log p(x)"])  # 30 steps only
    grads = {(row["at"], row["batch"], row["estimator"]): row for row in r["gradient_variance"]}
    assert len(grads) == 2 * 2 * 3
    for at in ("init", "trained"):  # summed over c on the full batch: no randomness left
        assert grads[at, "full", "enumerate"]["θ tr Cov"] == 0 and grads[at, "full", "enumerate"]["φ tr Cov"] is None
        assert grads[at, "full", "amortized_enumerated"]["φ tr Cov"] < 1e-20
        assert grads[at, "full", "amortized"]["φ tr Cov"] > 0 and grads[at, 20, "enumerate"]["θ tr Cov"] > 0
    assert [(row["guide"], row["K"]) for row in r["bounds"]] == [(g, k) for g in ("untrained q", "trained q")
                                                                 for k in (1, 10)]
    for row in r["bounds"]:
        assert row["gap"] > -4 * row["gap SE"]  # a bound: below log p(x)
        if row["K"] == 1:  # the ELBO: its gap is the exact KL
            assert abs(row["gap"] - (row["exact log p(x)"] - row["exact ELBO"])) < 4 * row["gap SE"]
    text = (tmp_path / "gm" / "results.md").read_text()
    assert "pyro-vae exact gaussian_mixture data.num_points=200" in text and "| (b) amortized" in text


@pytest.mark.parametrize("args, fragments", [
    (["fit.num_stepz=3"], ["no key 'fit.num_stepz'", "num_components, covariance_type"]),
    (["fit.num_steps=0"], ["fit.num_steps", "integer >= 1", "got 0"]),
    (["gradient_variance.num_draws=1"], ["gradient_variance.num_draws", ">= 2", "got 1"]),
    (["gradient_variance.batch_sizes=[null,0]"], ["gradient_variance.batch_sizes", "integer >= 1", "got 0"]),
    (["fit.covariance_type=spherical"], ["fit.covariance_type", "full or diag", "'spherical'"]),
    (["bounds.num_points=5000"], ["bounds.num_points", "at most data.num_points = 1000", "got 5000"]),
    (["fit.final_lr=-1"], ["fit.final_lr", "> 0", "got -1"]),
    (["data.weights=[0.5,0.6,0.4]"], ["data.weights", "sum to 1"]),
])
def test_mistakes_are_one_line_before_any_file(tmp_path, args, fragments):
    out = pyro_vae("exact", "gaussian_mixture", *args, "--out", str(tmp_path / "out"), cwd=tmp_path)
    one_line_error(out, *fragments)
    assert not (tmp_path / "out").exists()
