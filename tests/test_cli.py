"""End to end: `pyro-vae train` writes a complete run directory, `pyro-vae evaluate` reloads it,
and bad names or paths give one-line errors. The subprocess tests are marked ``heavy``."""

import json
import os
import subprocess
import sys

import pytest

FAST = ["train.epochs=2", "model.hidden=[16]", "model.latent_dim=2", "eval.num_samples=10", "progress=false"]


def pyro_vae(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pyro_vae.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    out = pyro_vae("train", *FAST, "hydra.run.dir=run", cwd=root)
    assert out.returncode == 0, out.stderr
    assert "test log p(x)" in out.stdout
    return root / "run"


@pytest.mark.heavy
def test_train_writes_the_run_directory(run_dir):
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "summary.json"):
        assert (run_dir / name).is_file(), name
    for name in ("elbo_curves.png", "reconstructions.png", "prior_samples.png", "latent_space.png"):
        assert (run_dir / "figures" / name).read_bytes()[:4] == b"\x89PNG", name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir / "tensorboard"))
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert {"train_elbo", "train_log_lik", "train_kl", "val_elbo", "val_log_lik", "val_kl"} <= set(lines[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_elbo"] == pytest.approx(summary["test_log_lik"] - summary["test_kl"], abs=1e-4)
    assert summary["test_log_px"]["num_samples"] == 10 and summary["test_log_px"]["mean"] < 0
    assert "latent_dim: 2" in (run_dir / "config.yaml").read_text()


@pytest.mark.heavy
def test_evaluate_reloads_the_run(run_dir):
    """`evaluate` rebuilds the model from the checkpoint and repeats the run's evaluation phase (same
    seed, same binarized test set): at the training run's K it gives the summary's numbers exactly."""
    out = pyro_vae("evaluate", str(run_dir), "num_samples=10", "--no-progress", cwd=run_dir)
    assert out.returncode == 0, out.stderr
    result = json.loads((run_dir / "evaluation.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert result["num_samples"] == 10 and result["num_test"] == 359
    assert result["log_px"] == {k: summary["test_log_px"][k] for k in ("mean", "se")}
    assert result["test_elbo"] == summary["test_elbo"]
    assert f"test log p(x) = {result['log_px']['mean']:.3f} ± {result['log_px']['se']:.3f} nats (K=10" in out.stdout
    assert (run_dir / "figures" / "log_px_vs_k.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.heavy
def test_sweep_makes_one_run_per_seed(tmp_path):
    from omegaconf import OmegaConf

    skip_log_px = [a if not a.startswith("eval.num_samples=") else "eval.num_samples=null" for a in FAST]
    out = pyro_vae("train", "-m", "seed=0,1", *skip_log_px, "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    runs = sorted(d for d in os.listdir(tmp_path / "sweep") if d.isdigit())
    assert [OmegaConf.load(tmp_path / "sweep" / d / "config.yaml").seed for d in runs] == [0, 1]
    summaries = [json.loads((tmp_path / "sweep" / d / "summary.json").read_text()) for d in runs]
    assert all("test_log_px" not in s and "test_elbo" in s for s in summaries)
    assert out.stdout.count("test log p(x) skipped (eval.num_samples: null)") == 2


@pytest.mark.heavy
@pytest.mark.parametrize("args, message", [
    (["train", "prior=vampp"], "unknown prior 'vampp'; choose one of: "),
    (["train", "data=cifar"], "unknown data 'cifar'; choose one of: digits, mnist, mnist5k"),
    (["train", "data=mnist", "data.path=/no/such/dir"], "mnist: directory /no/such/dir does not exist"),
    (["fly"], "unknown command 'fly'; choose one of: train, evaluate"),
    (["evaluate", "/no/such/run"], "no checkpoint at /no/such/run/checkpoint.pt"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    out = pyro_vae(*args, *(FAST if args[0] == "train" else []), cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr


def test_the_summary_line_says_when_log_px_was_skipped():
    from pyro_vae.cli import summary_line

    summary = {"best_epoch": 4, "test_elbo": -30.123, "test_log_px": {"mean": -28.456, "se": 0.5, "num_samples": 10}}
    assert summary_line("R", summary) == ("run R: best epoch 4, test ELBO -30.12, "
                                          "test log p(x) -28.46 ± 0.50 (K=10) nats per image")
    del summary["test_log_px"]
    assert summary_line("R", summary) == "run R: best epoch 4, test ELBO -30.12, " \
                                         "test log p(x) skipped (eval.num_samples: null)"
