"""A run's life in one process: interrupted and resumed to the same numbers, the refusals of resume
(finished, no state, another config, damaged or unsafe state, an override that changes the run),
the status that evaluate reads, evaluation with the data moved, and the trainer's warnings."""

import json
import os
import shutil

import pytest
import torch
from pyro.infer import Trace_ELBO

from helpers import run_config, same_run
from pyro_vae import evaluation, train
from pyro_vae.checkpoint import load_checkpoint
from pyro_vae.cli import resume_changes
from pyro_vae.data import Splits, check_and_binarize, load_dataset
from pyro_vae.experiment import RunFinished, RunInterrupted, resume_run, train_run
from pyro_vae.rundir import read_status
from pyro_vae.train import TrainConfig, fit

CFG = run_config(objective={"name": "iwae", "num_particles": 3}, train={"epochs": 5, "patience": 3})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train_run(CFG, str(tmp_path_factory.mktemp("runs") / "whole"), progress=False)["run_dir"]


def interrupt_at(monkeypatch, epoch):
    """Make train_epoch raise KeyboardInterrupt (Ctrl-C) when it starts ``epoch``."""
    original = train.train_epoch

    def interrupted(*args, **kwargs):
        if args[5] == epoch:
            raise KeyboardInterrupt()
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "train_epoch", interrupted)


def test_an_interrupted_run_resumes_to_the_numbers_of_an_uninterrupted_one(uninterrupted, tmp_path, monkeypatch):
    interrupt_at(monkeypatch, 3)
    with pytest.raises(RunInterrupted, match=r"stopped by Ctrl-C; .*/run keeps epochs 1-2 \(best epoch 2 in "
                                             r"checkpoint.pt\); continue with `pyro-vae train resume=.*/run`$"):
        train_run(CFG, str(tmp_path / "run"), progress=False)
    status = read_status(str(tmp_path / "run"))
    assert (status["status"], status["epoch"]) == ("interrupted", 2)
    with pytest.warns(UserWarning, match=r"is interrupted \(stopped by Ctrl-C.*evaluating its best epoch so far, 2"):
        evaluation.load_run(str(tmp_path / "run"))
    monkeypatch.undo()
    resume_run(str(tmp_path / "run"), progress=False)
    same_run(uninterrupted, str(tmp_path / "run"))
    assert read_status(str(tmp_path / "run"))["status"] == "finished"


def test_resume_of_a_finished_run_says_so_and_changes_nothing(uninterrupted):
    before = {name: open(os.path.join(uninterrupted, name), "rb").read() for name in os.listdir(uninterrupted)
              if os.path.isfile(os.path.join(uninterrupted, name))}
    with pytest.raises(RunFinished, match=r"run .*/whole has finished \(best epoch \d\); nothing to resume"):
        resume_run(uninterrupted)
    assert before == {name: open(os.path.join(uninterrupted, name), "rb").read() for name in before}


def copy_run(run_dir, tmp_path, status="interrupted"):
    """A copy of the run, marked as stopped, to resume."""
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    record = json.loads((copy / "status.json").read_text())
    (copy / "status.json").write_text(json.dumps({**record, "status": status}))
    return copy


def test_resume_refuses_what_it_cannot_continue_in_one_line(uninterrupted, tmp_path):
    copy = copy_run(uninterrupted, tmp_path)
    with pytest.raises(ValueError, match=r"train.epochs=9 would change what run .*copy computes; a resumed run keeps "
                                         r"its config \(only progress, data.path may change\)"):
        resume_run(str(copy), changes={"train.epochs": 9})
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist: it is not a pyro-vae run directory"):
        resume_run(str(tmp_path / "nowhere"))
    other = train_run(run_config(train={"epochs": 1}, eval={"num_samples": None}), str(tmp_path / "other"),
                      progress=False)["run_dir"]
    shutil.copy(os.path.join(other, "state.pt"), copy / "state.pt")
    with pytest.raises(ValueError, match=r"state.pt belongs to another config than .*copy/config.yaml \(eval.num_samples: "
                                         r"None vs 7\); refusing to resume"):
        resume_run(str(copy))
    data = (copy / "state.pt").read_bytes()
    (copy / "state.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"state.pt is damaged \(\d+ bytes, .*\): it was truncated or overwritten"):
        resume_run(str(copy))
    marker = tmp_path / "code-ran"
    torch.save({"format": "pyro-vae-state/1", "x": _RunsCodeWhenUnpickled(str(marker))}, copy / "state.pt")
    with pytest.raises(ValueError, match=r"refusing to load .*state.pt: it holds pickled Python objects"):
        resume_run(str(copy))
    assert not marker.exists()
    os.unlink(copy / "state.pt")
    with pytest.raises(FileNotFoundError, match=r"copy has no state.pt, the state written at the end of each epoch"):
        resume_run(str(copy))


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_the_command_lines_changes_are_the_overrides_that_differ():
    saved = run_config()
    given = run_config(train={"epochs": 9}, data={"path": "/new"})
    overrides = ["resume=R", "train.epochs=9", "data.path=/new", "seed=3", "+prior=standard_normal"]
    assert resume_changes(given, overrides, saved) == {"data.path": "/new", "train.epochs": 9}


def test_evaluate_takes_the_data_from_where_they_are_now(tmp_path, monkeypatch):
    """A run trained on data at a relative path stores it absolute; after the data move, evaluate
    says so in one line, and with data.path=NEW gives the summary's numbers again."""
    from test_data import write_mnist

    (tmp_path / "mnist").mkdir()
    write_mnist(tmp_path / "mnist", n_train=60, n_test=20)
    monkeypatch.chdir(tmp_path)
    cfg = run_config(data={"name": "mnist", "path": "mnist"}, train={"epochs": 1, "batch_size": 30},
                     model={"hidden": [8], "latent_dim": 2})
    summary = train_run(cfg, "run", progress=False)
    assert load_checkpoint("run/checkpoint.pt")[1]["config"]["data"]["path"] == str(tmp_path / "mnist")
    os.rename(tmp_path / "mnist", tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=f"mnist: directory {tmp_path / 'mnist'} does not exist; pass data.path=DIR"):
        evaluation.evaluate_run("run", num_samples=7, progress=False)
    again = evaluation.evaluate_run("run", num_samples=7, progress=False, data={"path": "moved"})
    assert again["log_px"]["mean"] == summary["test_log_px"]["mean"] and again["test_elbo"] == summary["test_elbo"]
    with pytest.raises(ValueError, match=r"the model of run does not take digits images \(64 values each\)"):
        evaluation.load_run("run", data={"name": "digits", "path": None})
    with pytest.raises(ValueError, match=r"data.binarize cannot change at evaluation"):
        evaluation.load_run("run", data={"binarize": True})


@pytest.fixture(scope="module")
def small_digits():
    s = load_dataset("digits")
    return Splits("digits", (8, 8), s.train_x[:300], s.train_y[:300], s.val_x[:100], s.val_y[:100],
                  s.test_x[:100], s.test_y[:100])


def test_a_learning_rate_that_blows_the_loss_up_is_warned_about(tiny_vae, small_digits):
    vae = tiny_vae()
    with pytest.warns(UserWarning, match=r"the training loss grew from .* nats per point by epoch 1, step \d+: "
                                         r"training is unstable; try a lower train.lr \(now 10000\)"):
        fit(vae, check_and_binarize(small_digits, vae.likelihood), Trace_ELBO(),
            TrainConfig(epochs=2, lr=1e4, batch_size=50), progress=False, seed=0)


def test_the_progress_bar_counts_every_epoch_run(tiny_vae, small_digits, monkeypatch):
    bars = []

    class Bar:
        def __init__(self, *args, total, initial=0, **kwargs):
            self.n, self.total = initial, total
            bars.append(self)

        def update(self, k):
            self.n += k

        def set_postfix(self, *args):
            pass

        def close(self):
            pass

    monkeypatch.setattr(train, "tqdm", Bar)
    vae = tiny_vae()
    result = fit(vae, check_and_binarize(small_digits, vae.likelihood), Trace_ELBO(),
                 TrainConfig(epochs=50, lr=0.0, patience=2), seed=0)
    assert result.stopped_early and bars[0].n == result.epochs_run < bars[0].total


def test_the_log_px_against_k_bars_are_paired_standard_errors():
    """The bars of log_px_vs_k.png: the standard error of mean(log p̂_K − log p̂_Kmax) over the
    points, not the spread of log p(x) across them (the same at every K)."""
    from pyro_vae.figures import plot_log_px_vs_k
    from pyro_vae.metrics import mean_se
    from pyro_vae.weights import LogPxEstimate

    g = torch.Generator().manual_seed(0)
    spread = 10 * torch.randn(200, generator=g, dtype=torch.float64)  # images differ by ~10 nats
    by_k = {1: spread - 2 + 0.5 * torch.randn(200, generator=g, dtype=torch.float64), 10: spread - 0.5, 100: spread}
    nan = torch.full((200,), float("nan"), dtype=torch.float64)
    estimate = LogPxEstimate(spread, nan, nan, nan, nan, nan, 100, "guide", log_px_by_k=by_k)
    bars = plot_log_px_vs_k(estimate).axes[0].containers[0].lines[2][0].get_segments()
    half_widths = [(top[1] - bottom[1]) / 2 for bottom, top in bars]
    expected = [mean_se(by_k[k] - by_k[100])["se"] for k in (1, 10, 100)]
    assert half_widths == pytest.approx(expected) and expected[0] < 0.1 < mean_se(spread)["se"]


def test_a_run_resumed_with_its_data_moved_resumes_again(tmp_path, monkeypatch):
    """data.path may change at a resume; the run's config.yaml follows, so a second resume (and
    evaluate) find the data where they are now."""
    from test_data import write_mnist

    (tmp_path / "mnist").mkdir()
    write_mnist(tmp_path / "mnist", n_train=60, n_test=20)
    cfg = run_config(data={"name": "mnist", "path": str(tmp_path / "mnist")}, train={"epochs": 3, "batch_size": 30},
                     eval={"num_samples": None})
    interrupt_at(monkeypatch, 2)
    with pytest.raises(RunInterrupted):
        train_run(cfg, str(tmp_path / "run"), progress=False)
    os.rename(tmp_path / "mnist", tmp_path / "moved")
    monkeypatch.undo()
    interrupt_at(monkeypatch, 2)  # before this resume has finished an epoch: state.pt still names the old path
    with pytest.raises(RunInterrupted):
        resume_run(str(tmp_path / "run"), changes={"data.path": str(tmp_path / "moved")})
    monkeypatch.undo()
    resume_run(str(tmp_path / "run"))
    assert read_status(str(tmp_path / "run"))["status"] == "finished"
    assert load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))[1]["config"]["data"]["path"] == str(tmp_path / "moved")
