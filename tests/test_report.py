"""`pyro-vae report`: runs grouped by the config keys that differ (seed excepted), mean ± SE over
seeds against a hand computation, unfinished runs counted apart, figures, and one-line errors."""

import json
import math
import os

import pytest
import yaml

from pyro_vae.report import report


def write_run(root, name, seed, lr, elbo, status="finished", estimator="standard"):
    d = os.path.join(root, name)
    os.makedirs(d)
    cfg = {"seed": seed, "progress": False, "train": {"lr": lr, "epochs": 3},
           "objective": {"name": "iwae", "estimator": estimator}, "data": {"name": "digits", "path": None}}
    with open(os.path.join(d, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        for epoch in (1, 2, 3):
            f.write(json.dumps({"epoch": epoch, "val_iwae5": elbo + epoch}) + "\n")
    if status == "finished":
        summary = {"test_elbo": elbo, "test_log_px": {"mean": elbo + 2, "se": 0.1}, "best_epoch": 3,
                   "train_seconds": 10.0, "selection_metric": "val_iwae5"}
        with open(os.path.join(d, "summary.json"), "w") as f:
            json.dump(summary, f)
        with open(os.path.join(d, "evaluation.json"), "w") as f:
            json.dump({"log_px_by_k": {"1": {"mean": elbo}, "10": {"mean": elbo + 1}},
                       "fraction_pareto_k_above_0.7": 0.5}, f)


def test_report_groups_by_the_differing_keys_and_averages_over_seeds(tmp_path):
    root = str(tmp_path)
    for seed, elbo in enumerate((-100.0, -102.0, -104.0)):
        write_run(root, f"a{seed}", seed, 0.001, elbo)
    write_run(root, "b0", 0, 0.003, -90.0)
    write_run(root, "b1", 1, 0.003, -91.0)
    write_run(root, "b2", 2, 0.003, -95.0, status="running")  # counted, not averaged
    df, _ = report(root)
    assert list(df["train.lr"]) == [0.001, 0.003] and list(df["seeds"]) == [3, 2]
    assert list(df["not_finished"]) == [0, 1]
    a = df.iloc[0]
    assert a["test_elbo_mean"] == pytest.approx(-102.0)
    assert a["test_elbo_se"] == pytest.approx(2.0 / math.sqrt(3))  # sd 2 over 3 seeds
    assert a["test_log_px_mean"] == pytest.approx(-100.0) and a["frac_pareto_k_above_0.7_mean"] == 0.5
    text = open(os.path.join(root, "report.md")).read()
    assert "-102.00 ± 1.15" in text and "train.lr" in text and "seed" not in df.columns
    assert os.path.isfile(os.path.join(root, "report.csv"))
    for name in ("report_curves.png", "report_log_px_vs_k.png"):
        assert open(os.path.join(root, name), "rb").read(4) == b"\x89PNG"


def test_report_refuses_what_it_cannot_average(tmp_path):
    with pytest.raises(ValueError, match="no runs under") as e:
        report(str(tmp_path))
    assert "\n" not in str(e.value)
    write_run(str(tmp_path), "a", 0, 0.001, -100.0)
    write_run(str(tmp_path), "b", 0, 0.003, -100.0, estimator="dreg")
    with pytest.raises(ValueError, match="also differ in objective.estimator, which --by does not name"):
        report(str(tmp_path), by=["train.lr"])
    with pytest.raises(ValueError, match="--by train.lrr: no run has that config key"):
        report(str(tmp_path), by=["train.lrr"])
    df, _ = report(str(tmp_path), by=["train.lr", "objective.estimator"])
    assert len(df) == 2
    with pytest.raises(ValueError, match="is not a directory"):
        report(str(tmp_path / "missing"))
