"""`pyro-vae evaluate method=ais|bdmc` and `pyro-vae gaps` on a tiny digits run: their entries sit
beside the importance-sampling figures of evaluation.json, each figure is written, and bad values
are one line naming the key. In this process (the CLI's main), but for the subprocess tests, marked
``heavy``."""

import json

import pytest

from helpers import one_line_error, pyro_vae, run_config
from pyro_vae import cli
from pyro_vae.experiment import train_run

AIS = ["method=ais", "ais.num_steps=3", "ais.num_chains=2", "num_points=12", "num_samples=20", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ais") / "run"
    train_run(run_config(train={"epochs": 2}, eval={"num_samples": None}), str(path), progress=False)
    return path


def evaluation(run_dir):
    return json.loads((run_dir / "evaluation.json").read_text())


def test_ais_and_bdmc_entries_sit_beside_the_importance_sampling_ones(run_dir, capsys):
    cli.main(["evaluate", str(run_dir), "num_samples=10", "--no-progress"])
    importance = evaluation(run_dir)
    cli.main(["evaluate", str(run_dir), *AIS])
    cli.main(["evaluate", str(run_dir), *AIS, "ais.num_steps=6"])
    cli.main(["evaluate", str(run_dir), *AIS])  # the same setting again: replaces its entry
    cli.main(["evaluate", str(run_dir), "method=bdmc", "ais.num_steps=3", "ais.num_chains=2", "num_points=5",
              "--no-progress"])
    out = capsys.readouterr().out
    assert "AIS test log p(x) = " in out and "(T=6, M=2, 12 images)" in out and "BDMC on 5 simulated images" in out
    result = evaluation(run_dir)
    assert {k: result[k] for k in importance} == importance  # the IS figures are untouched
    assert [(e["num_steps"], e["num_chains"], e["num_points"]) for e in result["ais"]] == [(3, 2, 12), (6, 2, 12)]
    entry = result["ais"][0]
    assert set(entry["is_log_px_by_k"]) == {"1", "10", "20"} and entry["is_num_samples"] == 20
    assert entry["ais_minus_is"]["mean"] == pytest.approx(entry["log_px"]["mean"] - entry["is_log_px_by_k"]["20"]["mean"])
    assert 0 < entry["accept_rate"] <= 1
    (bdmc,) = result["bdmc"]
    assert bdmc["num_points"] == 5 and bdmc["gap"]["mean"] == pytest.approx(bdmc["upper"]["mean"] - bdmc["lower"]["mean"])
    assert (run_dir / "figures" / "log_px_vs_steps.png").read_bytes()[:4] == b"\x89PNG"
    cli.main(["evaluate", str(run_dir), "num_samples=10", "--no-progress"])  # IS again keeps ais and bdmc
    assert evaluation(run_dir)["ais"] == result["ais"] and evaluation(run_dir)["bdmc"] == result["bdmc"]


@pytest.mark.parametrize("args, message", [
    (["method=foo"], "argument --method: invalid choice: 'foo'"),
    (["method=ais", "ais.num_steps=0"], "ais.num_steps must be an integer >= 1, got 0"),
    (["method=ais", "ais.num_steps=-3"], "ais.num_steps must be an integer >= 1, got -3"),
    (["method=bdmc", "ais.num_chains=0"], "ais.num_chains must be an integer >= 1, got 0"),
    (["method=ais", "ais.num_steps=many"], "argument --ais.num-steps: invalid int value: 'many'"),
    (["method=ais", "num_points=0"], "num_points must be an integer >= 1, got 0"),
    (["num_points=3"], "num_points is an option of method=ais and method=bdmc"),
    (["method=ais", "ais.step=3"], "unrecognized arguments: --ais.step=3"),
])
def test_bad_values_are_one_line_naming_the_key(run_dir, capsys, args, message):
    before = (run_dir / "evaluation.json").read_bytes() if (run_dir / "evaluation.json").exists() else None
    with pytest.raises(SystemExit) as exit_:
        cli.main(["evaluate", str(run_dir), *args, "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    after = (run_dir / "evaluation.json").read_bytes() if (run_dir / "evaluation.json").exists() else None
    assert after == before


def test_gaps_writes_its_table_json_and_figure(run_dir, capsys):
    cli.main(["gaps", str(run_dir), "num_points=6", "ais.num_steps=3", "ais.num_chains=2", "opt_steps=200",
              "flexible=true", "--no-progress"])
    out = capsys.readouterr().out
    assert "6 test images, AIS T=3 M=2" in out and "amortization gap" in out and "full covariance" in out
    gaps = json.loads((run_dir / "gaps.json").read_text())
    assert gaps["num_points"] == 6 and len(gaps["per_image"]["elbo_optimized"]) == 6
    assert gaps["inference_gap"]["mean"] == pytest.approx(
        gaps["approximation_gap"]["mean"] + gaps["amortization_gap"]["mean"])
    # the per-image optimum starts at the encoder's output: it can only be as good or better
    assert gaps["amortization_gap"]["mean"] > -3 * gaps["amortization_gap"]["se"]
    assert (run_dir / "figures" / "gaps.png").read_bytes()[:4] == b"\x89PNG"
    assert not gaps["log_px_reused"]
    cli.main(["gaps", str(run_dir), "num_points=6", "ais.num_steps=3", "ais.num_chains=2", "opt_steps=100",
              "--no-progress"])  # the same AIS settings: its log p(x) is reused, the guides trained again
    again = json.loads((run_dir / "gaps.json").read_text())
    assert again["log_px_reused"] and again["per_image"]["log_px"] == gaps["per_image"]["log_px"]
    assert "elbo_flexible" not in again["per_image"] and again["opt_steps"] == 100
    with pytest.raises(SystemExit):
        cli.main(["gaps", str(run_dir), "num_points=0"])
    assert "num_points must be an integer >= 1, got 0" in capsys.readouterr().err


@pytest.mark.heavy
def test_help_lists_the_new_options_and_a_subprocess_error_is_one_line(run_dir):
    out = pyro_vae("evaluate", "--help", cwd=run_dir)
    assert out.returncode == 0
    for option in ("--method {is,ais,bdmc}", "--ais.num-steps", "--ais.num-chains", "--num-points"):
        assert option in out.stdout, option
    assert "--num-points" in pyro_vae("gaps", "--help", cwd=run_dir).stdout
    one_line_error(pyro_vae("evaluate", str(run_dir), "method=ais", "ais.num_steps=0", cwd=run_dir),
                   "ais.num_steps must be an integer >= 1, got 0")
