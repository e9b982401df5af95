"""device=cuda end to end: data, parameters and generators on the GPU, a run and its evaluation,
an exact resume, and two NCCL ranks. Skipped without a GPU (CI has none); device=cuda on a machine
without one is a one-line error (tests/test_cli.py)."""

import os
import subprocess
import sys

import pytest
import torch

from helpers import ENV, FAST, run_config, same_run
from pyro_vae import evaluation, experiment, train
from pyro_vae.experiment import RunInterrupted, prepare, resume_run, train_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CFG = run_config(device="cuda", train={"epochs": 4, "patience": 3})


def test_a_run_keeps_its_data_parameters_and_generators_on_the_gpu(tmp_path):
    run = prepare(CFG)
    data = run.data
    assert all(x.is_cuda for x in (data.train_x, data.train_eval_x, data.val_x, data.test_x))
    assert all(p.is_cuda for p in run.vae.parameters()) and all(b.is_cuda for b in run.vae.buffers())
    summary = train_run(CFG, str(tmp_path / "run"), progress=False)
    assert summary["device"] == "cuda" and torch.isfinite(torch.tensor(summary["test_elbo"]))
    again = evaluation.evaluate_run(str(tmp_path / "run"), num_samples=7, progress=False)
    assert again["log_px"]["mean"] == summary["test_log_px"]["mean"] and again["test_elbo"] == summary["test_elbo"]


def test_a_resumed_run_on_the_gpu_has_the_uninterrupted_numbers(tmp_path, monkeypatch):
    whole = train_run(CFG, str(tmp_path / "whole"), progress=False)["run_dir"]
    original = train.train_epoch

    def interrupted(*args, **kwargs):
        if args[5] == 3:
            raise KeyboardInterrupt()
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "train_epoch", interrupted)
    with pytest.raises(RunInterrupted):
        train_run(CFG, str(tmp_path / "run"), progress=False)
    monkeypatch.undo()
    resume_run(str(tmp_path / "run"), progress=False)
    same_run(whole, str(tmp_path / "run"))


@pytest.mark.heavy
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_nccl_ranks_train_and_evaluate(tmp_path):
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pyro_vae.cli",
            "train", *FAST, "device=cuda", "hydra.run.dir=run"]
    out = subprocess.run(argv, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert experiment.rundir.read_status(str(tmp_path / "run"))["world_size"] == 2
    assert os.path.isfile(tmp_path / "run" / "summary.json")
