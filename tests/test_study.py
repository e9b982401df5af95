"""Studies (`pyro-vae train -m +study=NAME`): every shipped variant composes and builds; a sweep
killed mid-run and repeated ends with the numbers of an uninterrupted sweep, its finished runs
skipped; two copies of one sweep share the work; `pyro-vae report` on the result; bad input is one
line. The subprocess tests are marked ``heavy``."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from helpers import ENV, FAST, pyro_vae, same_run
from pyro_vae import build_model, build_objective, cli, study
from pyro_vae.config import check_config
from pyro_vae.rundir import read_status

SMOKE = [*FAST, "data=digits", "seed=0"]  # tiny networks on digits, 2 epochs, K = 10, one seed


def variant_config(name, variant, conf_dir=cli.CONF_DIR):
    overrides = study.variant_overrides({**study.load_study(name), "variant": variant}, [f"+study={name}"])
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        cfg = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
    cfg.pop("study"), cfg.pop("resume")
    return check_config(cfg)


@pytest.mark.parametrize("name, variant", [(n, v) for n in study.study_names() for v in study.load_study(n)["variants"]])
def test_every_variant_of_every_study_builds(name, variant):
    """Each variant composes, passes the config check, builds, and its objective gives a finite
    loss: a typo in a variant would otherwise surface after hours of training the ones before it."""
    cfg = variant_config(name, variant)
    torch.manual_seed(0)
    vae, objective = build_model(cfg, 784), build_objective(cfg)
    x = torch.bernoulli(torch.full((3, 784), 0.3))
    with vae.without_param_store():
        assert torch.isfinite(objective.differentiable_loss(vae.model, vae.guide, x, num_data=3))


def test_a_variant_overrides_the_study_and_the_command_line_overrides_both():
    cfg = variant_config("compare_models", "vamp_prior_ref")
    assert cfg["data"]["name"] == "mnist5k" and cfg["eval"]["num_samples"] == 5000  # the study's
    assert cfg["model"] == {"name": "vae", "latent_dim": 40, "hidden": [300, 300], "activation": "gated",
                            "net": "mlp", "image_shape": None, "channels": None}
    assert cfg["train"]["epochs"] == 300 and cfg["train"]["patience"] == 10  # the variant's, the study's
    task = ["+study=compare_models", "study.variant=vae_ref", "train.epochs=2", "seed=1"]
    s = {**study.load_study("compare_models"), "variant": "vae_ref"}
    assert study.variant_overrides(s, task)[-2:] == ["train.epochs=2", "seed=1"]  # the command line last: it wins
    assert study.run_name({"seed": 1}, task) == "seed=1,train.epochs=2"
    assert study.run_name({"seed": 0}, ["+study=compare_models", "study.variant=vae", "progress=false"]) == "seed=0"


def sweep(root, *args, epochs=2):
    return ["train", "-m", "+study=compare_models", "study.variant=vae,iwae_k5", *SMOKE, f"train.epochs={epochs}",
            "train.early_stopping=false", f"study.dir={root}", *args]


def runs_of(root, epochs=8):
    name = study.run_name({"seed": 0}, sweep(root, epochs=epochs)[2:])
    return {v: os.path.join(root, v, name) for v in ("vae", "iwae_k5")}


@pytest.mark.heavy
def test_a_killed_sweep_repeated_ends_as_an_uninterrupted_one(tmp_path):
    """Kill the sweep (SIGKILL) after the first run's third epoch, repeat the command: the first
    run resumes from its state, the second trains, and both end with the numbers of an
    uninterrupted sweep; a third repeat skips both. Then `pyro-vae report` on the sweep."""
    killed, whole = str(tmp_path / "killed"), str(tmp_path / "whole")
    proc = subprocess.Popen([sys.executable, "-m", "pyro_vae.cli", *sweep(killed, epochs=8)], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = runs_of(killed)["vae"]
    deadline = time.monotonic() + 120
    while (read_status(first) or {}).get("epoch", 0) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before the kill"
        time.sleep(0.02)
    proc.kill()
    proc.communicate()
    assert read_status(first)["status"] == "interrupted" and not os.path.exists(runs_of(killed)["iwae_k5"])
    again = pyro_vae(*sweep(killed, epochs=8), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count(": best epoch 8, test ELBO") == 2
    assert pyro_vae(*sweep(whole, epochs=8), cwd=tmp_path).returncode == 0
    for variant, run in runs_of(killed).items():
        same_run(runs_of(whole)[variant], run)
    third = pyro_vae(*sweep(killed, epochs=8), cwd=tmp_path)
    assert third.returncode == 0 and third.stdout.count("has finished (best epoch 8); skipped") == 2, third.stdout
    out = pyro_vae("report", killed, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "| study.variant" in out.stdout and "| vae " in out.stdout and "| iwae_k5 " in out.stdout
    for name in ("report.md", "report.csv", "report_curves.png", "report_log_px_vs_k.png"):
        assert os.path.isfile(os.path.join(killed, name)), name


@pytest.mark.heavy
def test_two_copies_of_a_sweep_train_each_run_once(tmp_path):
    """The same command in two processes at once: each run is trained by one of them (its lock),
    the other skips it, and both finish."""
    root = str(tmp_path / "s")
    procs = [subprocess.Popen([sys.executable, "-m", "pyro_vae.cli", *sweep(root)], cwd=tmp_path, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert sum(out.count(": best epoch 2, test ELBO") for out, _ in outs) == 2, outs
    for run in runs_of(root, epochs=2).values():
        assert read_status(run)["status"] == "finished"
        assert len(os.listdir(os.path.join(run, "tensorboard"))) == 1  # one trainer wrote it


@pytest.fixture
def bad_study(tmp_path, monkeypatch):
    """The package's config directory with one more study, whose variant names an unknown option."""
    conf = tmp_path / "conf"
    shutil.copytree(cli.CONF_DIR, conf)
    (conf / "study" / "typo.yaml").write_text(
        "# @package _global_\nstudy:\n  name: typo\n  dir: runs/typo\n  variant: null\n"
        "  variants:\n    good: []\n    bad: [objective=iwae, objective.num_particle=5]\n"
        "    bad_choice: [prior=vampp]\n    bad_value: [train.lr=-1]\n")
    monkeypatch.setattr(cli, "CONF_DIR", str(conf))
    monkeypatch.setattr(study, "STUDY_DIR", str(conf / "study"))
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["+study=compare_modles"], "unknown study 'compare_modles'; choose one of: compare_models"),
    (["+study=compare_models", "study.variant=vea"], "study compare_models has no variant 'vea'; choose one of: vae, "),
    (["+study=compare_models"], "study compare_models: name a variant (study.variant=NAME), or sweep them all with -m"),
    (["-m", "+study=typo"], "study typo, variant bad: unknown key objective.num_particle; the objective section takes:"),
    (["+study=typo", "study.variant=bad_choice"], "study typo, variant bad_choice: unknown prior 'vampp'; choose one of:"),
    (["+study=typo", "study.variant=bad_value"], "study typo, variant bad_value: train.lr must be a number >= 0, got -1"),
])
def test_bad_studies_are_one_line_before_any_run(bad_study, tmp_path, monkeypatch, capsys, args, message):
    from pyro_vae import experiment

    monkeypatch.setattr(experiment, "fit", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", *SMOKE, *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not os.path.exists(tmp_path / "runs" / "typo" / "good")


def test_a_run_directory_of_another_config_is_refused(tmp_path):
    """The study changed since its run was trained: say which key, do not skip or resume it."""
    cfg = variant_config("compare_models", "vae")
    run = str(tmp_path / "run")
    os.makedirs(run)
    from pyro_vae import rundir

    rundir.claim(run)
    rundir.write_config(run, {**cfg, "train": {**cfg["train"], "lr": 0.01}})
    rundir.write_status(run, "finished")
    with pytest.raises(ValueError, match=r"holds a run of another config \(train.lr: 0.01 vs 0.001"):
        study.run_in(cfg, run)


@pytest.mark.parametrize("args, message", [
    (["report", "{tmp}"], "no runs under {tmp}"),
    (["report", "{tmp}/missing"], "{tmp}/missing is not a directory"),
    (["report", "{tmp}/two", "--by", "train.lr"], "the runs also differ in objective.estimator, which --by does not name"),
    (["report"], "the following arguments are required: dir"),
])
def test_report_mistakes_are_one_line(tmp_path, capsys, args, message):
    from test_report import write_run

    write_run(str(tmp_path / "two"), "a", 0, 0.001, -100.0)
    write_run(str(tmp_path / "two"), "b", 0, 0.003, -100.0, estimator="dreg")
    os.makedirs(tmp_path / "empty")
    args = [a.replace("{tmp}", str(tmp_path / "empty") if a == "{tmp}" else str(tmp_path)) for a in args]
    message = message.replace("{tmp}", str(tmp_path / "empty") if "no runs" in message else str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and message in lines[0], lines


def test_report_rows_are_a_studys_variants_and_read_ais(tmp_path):
    """Runs of a study are rows by variant name; an evaluation.json of another method (AIS) is a column."""
    from test_report import write_run
    from pyro_vae.report import report
    from pyro_vae.rundir import write_config

    root = str(tmp_path)
    for variant, lr in (("slow", 0.001), ("fast", 0.003)):
        for seed in (0, 1):
            write_run(root, f"{variant}{seed}", seed, lr, -100.0 - seed)
            d = os.path.join(root, f"{variant}{seed}")
            write_config(d, OmegaConf.to_container(OmegaConf.load(os.path.join(d, "config.yaml"))),
                         [f"study.variant={variant}", f"seed={seed}"])
            with open(os.path.join(d, "evaluation.json"), "w") as f:
                json.dump({"method": "ais", "log_px": {"mean": -97.0 - seed, "se": 0.1}}, f)
    df, keys = report(root)
    assert keys == ["study.variant"] and list(df["study.variant"]) == ["fast", "slow"]
    assert list(df["eval_log_px_ais_mean"]) == [-97.5, -97.5] and list(df["seeds"]) == [2, 2]
