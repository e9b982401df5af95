"""The linear-Gaussian study (`pyro-vae exact linear_gaussian`): the closed-form second moment of
the importance weight against Monte Carlo, the IWAE bound's measured gap against its closed forms
(the KL at K = 1, (I − 1)/2K for large K), a smoke run of the command, and its one-line errors."""

import json
import math

import pyro.distributions as dist
import pytest
import torch

from helpers import one_line_error, pyro_vae
from pyro_vae.exact.linear_gaussian import LinearGaussian, LinearGaussianGuide, log_weight_second_moment
from pyro_vae.studies import linear_gaussian as study
from pyro_vae.studies import load_config

TINY = ["bounds.num_points=20", "bounds.repeats=2", "bounds.num_particles=[1,10]", "gradients.num_draws=50",
        "gradients.num_particles=[1,5]"]


@pytest.fixture
def lg():
    return LinearGaussian.random(D=4, d=2, sigma=0.5, seed=0)


def posterior_and_guide(lg, x, scale_factor):
    mean, cov = lg.posterior(x)
    q = LinearGaussianGuide.perturbed(lg, loc_shift=1.0, scale_factor=scale_factor)
    return mean, torch.linalg.cholesky(cov), q


def test_second_moment_of_the_weight_matches_monte_carlo(lg):
    x = lg.sample(2, seed=1)
    mean, tril, q = posterior_and_guide(lg, x, 1.5)
    assert torch.allclose(log_weight_second_moment(mean, tril, mean, tril), torch.zeros(2, dtype=x.dtype),
                          atol=1e-12)  # q = p: the weight is 1
    closed = log_weight_second_moment(q.loc(x), q.scale_tril, mean, tril).exp()
    qd, pd = dist.MultivariateNormal(q.loc(x), scale_tril=q.scale_tril), dist.MultivariateNormal(mean, scale_tril=tril)
    torch.manual_seed(0)
    z = qd.sample((200_000,))
    ratio2 = (2 * (pd.log_prob(z) - qd.log_prob(z))).exp()  # (p/q)², bounded: q is wider than p
    se = ratio2.std(0) / math.sqrt(len(z))
    assert ((ratio2.mean(0) - closed).abs() < 4 * se).all(), (ratio2.mean(0), closed, se)
    # q narrower than p / sqrt(2) in some direction: the weight's variance is infinite
    _, _, narrow = posterior_and_guide(lg, x, 0.6)
    assert torch.isinf(log_weight_second_moment(narrow.loc(x), narrow.scale_tril, mean, tril)).all()


def test_measured_gap_is_the_kl_at_one_particle_and_the_asymptote_at_many(lg):
    q = LinearGaussianGuide.perturbed(lg, loc_shift=1.0, scale_factor=1.5)
    cfg = {"num_points": 1000, "repeats": 20, "num_particles": [1, 200], "seed": 1}
    df = study._bounds(lg, q, cfg, progress=False).set_index("K")
    assert abs(df.loc[1, "gap"] - df.attrs["kl"]) < 4 * df.loc[1, "gap SE"]  # exact at K = 1
    # (I − 1)/2K is first order: the O(1/K²) rest is ~ (I − 1)²/K² here, below 1e-4 nats
    asymptote = (df.attrs["second_moment"] - 1) / 400
    assert abs(df.loc[200, "gap"] - asymptote) < 4 * df.loc[200, "gap SE"] + (df.attrs["second_moment"] - 1) ** 2 / 200**2
    assert df.loc[200, "gap SE"] < asymptote / 4  # the check has power: the asymptote is 4 SE from 0


def test_the_command_writes_its_tables_figures_and_numbers(tmp_path):
    out = pyro_vae("exact", "linear_gaussian", *TINY, "--out", str(tmp_path / "lg"), "--no-progress", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert {p.name for p in (tmp_path / "lg").iterdir()} == {"results.md", "results.json", "gap_vs_k.png",
                                                              "gradients_vs_k.png"}
    def strict(constant):
        raise AssertionError(f"results.json holds {constant}, which is not JSON")

    saved = json.loads((tmp_path / "lg" / "results.json").read_text(), parse_constant=strict)
    assert saved["overrides"] == TINY and saved["config"]["bounds"]["num_points"] == 20
    r = saved["results"]
    assert [row["K"] for row in r["bounds"]] == [1, 10] and len(r["gradients"]) == 2 * 3
    assert r["bounds"][0]["closed form"] == pytest.approx(r["kl"])
    assert all(row["gap"] > -4 * row["gap SE"] for row in r["bounds"])  # bounds: below log p(x)
    text = (tmp_path / "lg" / "results.md").read_text()
    assert "pyro-vae exact linear_gaussian bounds.num_points=20" in text and "| dreg" in text


@pytest.mark.parametrize("args, fragments", [
    (["linear_gausian"], ["unknown study 'linear_gausian'", "linear_gaussian", "compare_models"]),
    (["compare_models"], ["training study", "pyro-vae train -m +study=compare_models"]),
    (["linear_gaussian", "bounds.num_pointz=3"], ["no key 'bounds.num_pointz'", "num_points, repeats"]),
    (["linear_gaussian", "seed"], ["bad argument 'seed'", "KEY=VALUE"]),
    (["linear_gaussian", "bounds.num_points=0"], ["bounds.num_points", "integer >= 1", "got 0"]),
    (["linear_gaussian", "gradients.num_draws=1"], ["gradients.num_draws", ">= 2", "got 1"]),
    (["linear_gaussian", "guide.scale_factor=-1"], ["guide.scale_factor", "> 0", "got -1"]),
    (["linear_gaussian", "gradients.estimators=[dreg,iwae]"], ["'iwae'", "standard, stl, dreg"]),
])
def test_mistakes_are_one_line_before_any_file(tmp_path, args, fragments):
    out = pyro_vae("exact", *args, "--out", str(tmp_path / "out"), cwd=tmp_path)
    one_line_error(out, *fragments)
    assert not (tmp_path / "out").exists()


def test_training_command_names_the_exact_study_command(tmp_path):
    one_line_error(pyro_vae("train", "+study=linear_gaussian", cwd=tmp_path), "pyro-vae exact linear_gaussian")


def test_overrides_parse_as_yaml_values():
    cfg = load_config("linear_gaussian", ["bounds.num_particles=[1,2]", "model.sigma=0.25", "guide.seed=3"])
    assert cfg["bounds"]["num_particles"] == [1, 2] and cfg["model"]["sigma"] == 0.25 and cfg["guide"]["seed"] == 3
