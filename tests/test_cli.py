"""End to end: `pyro-vae train` writes a complete run directory, `pyro-vae evaluate` reloads it,
and bad names or paths give one-line errors. The subprocess tests are marked ``heavy``."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from helpers import ENV, FAST, no_run_left, one_line_error, pyro_vae
from pyro_vae.checkpoint import load_checkpoint


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
    (["train", "train.epoch=5"], "unknown key train.epoch; the train section takes: epochs, batch_size,"),
    (["train", "train.epochs=abc"], "train.epochs must be an integer >= 1, got 'abc'"),
    (["fly"], "unknown command 'fly'; choose one of: train, evaluate"),
    (["evaluate", "/no/such/run"], "no checkpoint at /no/such/run/checkpoint.pt"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    """In a real subprocess: exit status 2, one line on stderr, no traceback, no run directory."""
    out = pyro_vae(args[0], *(FAST if args[0] == "train" else []), *args[1:], cwd=tmp_path)
    one_line_error(out, message)
    assert no_run_left(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["train.batch_size=0"], "train.batch_size must be an integer >= 1, got 0"),
    (["train.epochs=0"], "train.epochs must be an integer >= 1, got 0"),
    (["+train.epoch=5"], "unknown key train.epoch; the train section takes: epochs, batch_size, lr,"),
    (["train.epoch=5"], "unknown key train.epoch; the train section takes: epochs, batch_size, lr,"),
    (["+foo=1"], "unknown key foo; a run config takes: seed, device, progress, data,"),
    (["foo=1"], "unknown key foo; a run config takes: data,"),
    (["train.epochs=["], "bad override (no viable alternative at input '['"),
    (["train.lr=-1"], "train.lr must be a number >= 0, got -1"),
    (["model.latent_dim=0"], "model.latent_dim must be an integer >= 1, got 0"),
    (["model.hidden=[16,0]"], "model.hidden must be an integer >= 1, got 0"),
    (["eval.num_samples=0"], "eval.num_samples must be an integer >= 1, got 0"),
    (["seed=-1"], "seed must be an integer >= 0, got -1"),
    (["device=tpu"], "device must be cpu, cuda or cuda:N, got 'tpu'"),
    (["progress=maybe"], "progress must be true or false, got 'maybe'"),
    (["prior=vamp", "prior.num_components=0"], "prior.num_components must be an integer >= 1, got 0"),
    (["resume=nowhere"], "nowhere does not exist: it is not a pyro-vae run directory"),
])
def test_every_config_mistake_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, args, message):
    """The CLI in this process (the subprocess tests above show the same path has no traceback):
    each mistake is one line naming the key and the bad value, and no run directory is left."""
    from pyro_vae import cli, experiment

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(experiment, "fit", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", *FAST, *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert no_run_left(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path, monkeypatch, capsys):
    from pyro_vae import cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        cli.main(["train", *FAST, "device=cuda"])
    err = capsys.readouterr().err.strip()
    assert err == (f"pyro-vae: error: device=cuda but torch sees no CUDA GPU on this machine (torch "
                   f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use device=cpu")


def test_help_says_what_each_command_does(capsys):
    from pyro_vae import cli

    cli.main(["--help"])
    out = capsys.readouterr().out
    assert "train     train a model" in out and "evaluate  estimate the test log p(x)" in out
    assert "`pyro-vae train --help` lists every choice" in out


@pytest.mark.heavy
def test_train_help_lists_every_choice(tmp_path):
    out = pyro_vae("train", "--help", cwd=tmp_path)
    assert out.returncode == 0
    for group in ("data: digits, mnist, mnist5k", "prior: flow, mixture, standard_normal, vamp",
                  "objective: elbo, iwae, mean_field", "resume=RUN_DIR"):
        assert group in out.stdout, group


@pytest.mark.heavy
def test_two_runs_started_at_once_get_a_directory_each(tmp_path):
    """Two `pyro-vae train` processes asking for the same directory at the same moment: each gets a
    directory of its own (run, run-1), with its own config, checkpoint and events."""
    argv = [sys.executable, "-m", "pyro_vae.cli", "train", *FAST, "eval.num_samples=null", "hydra.run.dir=run"]
    procs = [subprocess.Popen([*argv, f"seed={seed}"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(os.listdir(tmp_path)) == ["run", "run-1"]
    seeds = set()
    for name in ("run", "run-1"):
        run = tmp_path / name
        cfg = OmegaConf.load(run / "config.yaml")
        seeds.add(cfg.seed)
        assert load_checkpoint(str(run / "checkpoint.pt"))[1]["config"]["seed"] == cfg.seed
        assert json.loads((run / "status.json").read_text())["status"] == "finished"
        assert len(os.listdir(run / "tensorboard")) == 1
        assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert seeds == {0, 1}
    assert sorted(f"run {tmp_path / name}:" in outs[0][0] + outs[1][0] for name in ("run", "run-1")) == [True, True]


@pytest.mark.heavy
def test_evaluate_refuses_a_damaged_checkpoint_in_one_line(run_dir, tmp_path):
    good = (run_dir / "checkpoint.pt").read_bytes()
    for name, data in (("truncated", good[: len(good) // 2]), ("empty", b"")):
        broken = tmp_path / name
        broken.mkdir()
        (broken / "checkpoint.pt").write_bytes(data)
        out = pyro_vae("evaluate", str(broken), "num_samples=10", cwd=tmp_path)
        one_line_error(out, f"{broken / 'checkpoint.pt'} is damaged ({len(data)} bytes",
                       "it was truncated or overwritten")


@pytest.mark.heavy
def test_ctrl_c_stops_cleanly_and_the_run_resumes(tmp_path):
    """SIGINT during training: exit status 130, one line saying where the run stands; status.json
    says interrupted, what was written is intact, and `resume=` finishes the run."""
    argv = [sys.executable, "-m", "pyro_vae.cli", "train", *FAST, "train.epochs=30", "train.early_stopping=false",
            "eval.num_samples=null", "hydra.run.dir=run"]
    # Ctrl-C's default in the child even when this test runs as a background job (which ignores SIGINT)
    proc = subprocess.Popen(argv, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(lambda: (tmp_path / "run" / "state.pt").exists(), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 130 and len(lines) == 1, err
    assert lines[0].startswith(f"pyro-vae: error: stopped by Ctrl-C; {tmp_path / 'run'} keeps epochs 1-")
    assert lines[0].endswith(f"continue with `pyro-vae train resume={tmp_path / 'run'}`")
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "interrupted" and status["epoch"] >= 1
    state, meta = load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    assert meta["epoch"] == status["best_epoch"]
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, status["epoch"] + 1))
    out = pyro_vae("train", "resume=run", "train.epochs=3", cwd=tmp_path)
    one_line_error(out, f"train.epochs=3 would change what run {tmp_path / 'run'} computes")
    out = pyro_vae("train", "resume=run", "train.epochs=30", cwd=tmp_path)  # the run's own value: no change
    assert out.returncode == 0 and out.stdout.startswith(f"run {tmp_path / 'run'}: best epoch"), out.stderr
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 31))
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "finished"


def wait_for(condition, proc, timeout=120.0):
    """Poll ``condition`` until it holds (the subprocess must still be running)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the subprocess did not get there"
        time.sleep(0.05)


def test_the_summary_line_says_when_log_px_was_skipped():
    from pyro_vae.cli import summary_line

    summary = {"best_epoch": 4, "test_elbo": -30.123, "test_log_px": {"mean": -28.456, "se": 0.5, "num_samples": 10}}
    assert summary_line("R", summary) == ("run R: best epoch 4, test ELBO -30.12, "
                                          "test log p(x) -28.46 ± 0.50 (K=10) nats per image")
    del summary["test_log_px"]
    assert summary_line("R", summary) == "run R: best epoch 4, test ELBO -30.12, " \
                                         "test log p(x) skipped (eval.num_samples: null)"
