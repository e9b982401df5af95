"""The trainer and the run: determinism, early stopping, selection on the objective's own score,
the best state and its checkpoint, seeding by phase, skipping log p(x), and their errors."""

import json
import math
import os

import pytest
import torch
from pyro.infer import Trace_ELBO

from helpers import run_config
from pyro_vae import evaluation, experiment
from pyro_vae.build import build_model
from pyro_vae.checkpoint import load_checkpoint, save_checkpoint
from pyro_vae.config import check_config
from pyro_vae.data import Splits, check_and_binarize, load_dataset
from pyro_vae.objectives import IWAE, Objective, TraceELBO
from pyro_vae.rundir import read_status
from pyro_vae.train import TrainConfig, TrainingDiverged, fit, train_epoch


@pytest.fixture(scope="module")
def small_digits():
    s = load_dataset("digits")
    return Splits("digits", (8, 8), s.train_x[:300], s.train_y[:300], s.val_x[:100], s.val_y[:100],
                  s.test_x[:100], s.test_y[:100])


def prepared(vae, splits):
    return check_and_binarize(splits, vae.likelihood)


def test_fit_is_deterministic_and_returns_the_best_epoch(tiny_vae, small_digits):
    histories = []
    for _ in range(2):
        torch.manual_seed(0)
        vae = tiny_vae()
        result = fit(vae, prepared(vae, small_digits), Trace_ELBO(), TrainConfig(epochs=4, batch_size=50, lr=3e-3),
                     progress=False)
        histories.append(result.history)
        assert result.selection_metric == "val_elbo"
        assert result.best_score == max(r["val_elbo"] for r in result.history)
        assert result.history[result.best_epoch - 1]["val_elbo"] == result.best_score
        for k, v in vae.state_dict().items():  # the best epoch's parameters are loaded
            torch.testing.assert_close(v, result.best_state[k])
    assert histories[0] == histories[1]
    record = histories[0][-1]
    for key in ("train_objective", "train_elbo", "train_log_lik", "train_kl", "val_elbo", "val_log_lik", "val_kl"):
        assert torch.isfinite(torch.tensor(record[key]))
    assert record["val_elbo"] == pytest.approx(record["val_log_lik"] - record["val_kl"], abs=1e-4)


def test_early_stopping(tiny_vae, small_digits):
    # lr=0: the parameters never change, so the (noisy) validation ELBO stops improving quickly.
    vae = tiny_vae()
    result = fit(vae, prepared(vae, small_digits), Trace_ELBO(), TrainConfig(epochs=50, lr=0.0, patience=2),
                 progress=False)
    assert result.stopped_early and result.epochs_run < 50
    assert result.epochs_run - result.best_epoch == 2


class _ScoredBy(TraceELBO):
    """The ELBO objective, but epochs are selected on a given sequence of scores named ``stub``."""

    selection_name = "stub"

    def __init__(self, scores):
        super().__init__()
        self.scores, self.calls = list(scores), []

    def on_epoch(self, epoch):
        super().on_epoch(epoch)
        self.calls.append(epoch)

    def selection_score(self, vae, x, batch_size=1000):
        return self.scores[len(self.calls) - 1]


def test_epochs_are_selected_on_the_objectives_score_under_its_own_name(tiny_vae, small_digits):
    vae = tiny_vae()
    objective = _ScoredBy([1.0, 3.0, 2.0, 0.0])
    states, best = [], []  # the parameters at the end of each epoch; the epochs passed to on_best
    result = fit(vae, prepared(vae, small_digits), objective, TrainConfig(epochs=4), progress=False,
                 log=lambda r: states.append({k: v.clone() for k, v in vae.state_dict().items()}),
                 on_best=lambda r: best.append(r.best_epoch))
    assert objective.calls == [1, 2, 3, 4]  # told each epoch before it starts
    assert result.selection_metric == "val_stub" and [r["val_stub"] for r in result.history] == [1, 3, 2, 0]
    assert result.best_epoch == 2 and result.best_score == 3.0 and best == [1, 2]
    assert all("val_elbo" in r for r in result.history)  # val_elbo stays the ELBO, logged as well
    for k, v in vae.state_dict().items():  # epoch 2's parameters, not the last epoch's
        torch.testing.assert_close(v, states[1][k])
        torch.testing.assert_close(result.best_state[k], states[1][k])
    assert not all(torch.equal(v, states[3][k]) for k, v in vae.state_dict().items())


def test_iwae_is_selected_on_its_bound_and_the_elbo_keeps_its_name(tiny_vae, small_digits):
    vae = tiny_vae()
    result = fit(vae, prepared(vae, small_digits), IWAE(num_particles=3), TrainConfig(epochs=2), progress=False)
    assert result.selection_metric == "val_iwae3"
    assert result.best_score == max(r["val_iwae3"] for r in result.history)
    for r in result.history:
        assert r["val_elbo"] == pytest.approx(r["val_log_lik"] - r["val_kl"], abs=1e-4)
        assert r["val_iwae3"] != r["val_elbo"]


def test_without_a_validation_set_the_training_subset_selects(tiny_vae, small_digits):
    vae = tiny_vae()
    splits = Splits("digits", (8, 8), small_digits.train_x, small_digits.train_y, small_digits.val_x[:0],
                    small_digits.val_y[:0], small_digits.test_x, small_digits.test_y)
    result = fit(vae, prepared(vae, splits), Trace_ELBO(), TrainConfig(epochs=2), progress=False)
    assert result.selection_metric == "train_elbo" and "val_elbo" not in result.history[0]


def test_a_step_has_svis_gradients_divided_by_num_data(tiny_vae, small_digits):
    """The trainer backpropagates Trace_ELBO's loss divided by N; pyro.infer.SVI.step backpropagates
    the loss itself (``loss_and_grads``): the same gradients up to the factor N."""
    vae, n = tiny_vae(), len(small_digits.train_x)
    x = torch.bernoulli(small_digits.train_x[:50])
    grads = []
    for trainer in (True, False):
        vae.zero_grad()
        torch.manual_seed(3)
        if trainer:
            with vae.without_param_store():
                (Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, num_data=n) / n).backward()
        else:
            Trace_ELBO().loss_and_grads(vae.model, vae.guide, x, num_data=n)
        grads.append(torch.cat([p.grad.flatten() for p in vae.parameters()]))
    torch.testing.assert_close(grads[0] * n, grads[1], rtol=1e-5, atol=1e-5)


def test_train_config_refuses_bad_values_in_one_line():
    with pytest.raises(ValueError, match=r"train.epochs must be an integer >= 1, got 0"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match=r"train.batch_size must be an integer >= 1, got 2.5"):
        TrainConfig(batch_size=2.5)
    with pytest.raises(ValueError, match=r"train.lr must be a number >= 0, got -0.1"):
        TrainConfig(lr=-0.1)


# --- the run: config -> data -> model -> fit -> evaluation -> files ------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("run"))
    cfg = run_config()
    return cfg, run_dir, experiment.train_run(cfg, run_dir, progress=False)


def test_the_run_writes_the_best_epoch_with_its_config_once(trained):
    cfg, run_dir, summary = trained
    state, meta = load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))
    assert meta["config"] == check_config(cfg) and meta["epoch"] == summary["best_epoch"]
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert meta["metrics"] == lines[summary["best_epoch"] - 1]
    assert summary["selection_metric"] == "val_elbo" and summary["best_val_elbo"] == meta["metrics"]["val_elbo"]
    vae, loaded_cfg, splits = evaluation.load_run(run_dir)
    assert loaded_cfg == check_config(cfg) and len(splits.val_x) == len(load_dataset("digits").val_x)
    for k, v in vae.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_each_phase_is_seeded_with_the_run_seed(trained):
    """Initialization starts from torch.manual_seed(seed) and training from fit(seed=seed): rebuilding
    the phases by hand gives the run's metrics exactly; the evaluation phase, repeated by evaluate_run
    from the checkpoint, gives the summary's test ELBO and log p(x) exactly."""
    cfg, run_dir, summary = trained
    torch.manual_seed(cfg["seed"])
    vae = build_model(cfg, 64)
    data = check_and_binarize(load_dataset("digits"), vae.likelihood)
    torch.manual_seed(12345)  # fit draws from its seed, not from the global generator as it stands
    result = fit(vae, data, experiment.build_objective(cfg), TrainConfig(**cfg["train"]), progress=False,
                 seed=cfg["seed"])
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [{k: r[k] for k in ("train_objective", "val_elbo")} for r in result.history] == \
        [{k: r[k] for k in ("train_objective", "val_elbo")} for r in lines]
    again = evaluation.evaluate_run(run_dir, num_samples=7, progress=False)
    assert again["log_px"]["mean"] == summary["test_log_px"]["mean"]
    assert again["test_elbo"] == summary["test_elbo"]
    assert again["num_samples"] == summary["test_log_px"]["num_samples"] == 7


def test_num_samples_null_skips_the_test_log_px(tmp_path):
    summary = experiment.train_run(run_config(train={"epochs": 1}, eval={"num_samples": None}), str(tmp_path),
                                   progress=False)
    assert "test_log_px" not in summary and math.isfinite(summary["test_elbo"])
    assert summary.pop("run_dir") == str(tmp_path)
    assert json.load(open(tmp_path / "summary.json")) == summary


def test_val_fraction_is_part_of_the_data_section(tmp_path):
    cfg = run_config(data={"val_fraction": 0.25}, train={"epochs": 1}, eval={"num_samples": None})
    experiment.train_run(cfg, str(tmp_path), progress=False)
    _, _, splits = evaluation.load_run(str(tmp_path))
    assert len(splits.val_x) == len(load_dataset("digits", val_fraction=0.25).val_x) > 300
    with pytest.raises(ValueError, match=r"unknown key train.val_fraction; the train section takes: epochs,"):
        experiment.train_run(run_config(train={"val_fraction": 0.1}), str(tmp_path / "x"), progress=False)
    with pytest.raises(ValueError, match=r"data.val_fraction must lie in \[0, 1\), got 1.5"):
        experiment.train_run(run_config(data={"val_fraction": 1.5}), str(tmp_path / "x"), progress=False)


def test_a_checkpoint_from_before_val_fraction_moved_still_loads(trained, tmp_path):
    cfg, run_dir, _ = trained
    state, meta = load_checkpoint(os.path.join(run_dir, "checkpoint.pt"))
    old = {**cfg, "data": {"name": "digits", "path": None}, "train": {**cfg["train"], "val_fraction": 0.25}}
    save_checkpoint(str(tmp_path / "checkpoint.pt"), state, **{**meta, "config": old})
    _, loaded, splits = evaluation.load_run(str(tmp_path))
    assert loaded["data"]["val_fraction"] == 0.25 and "val_fraction" not in loaded["train"]
    assert len(splits.val_x) == len(load_dataset("digits", val_fraction=0.25).val_x)


def test_eval_num_samples_is_checked_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"eval.num_samples must be an integer >= 1, got 0"):
        experiment.train_run(run_config(eval={"num_samples": 0}), str(tmp_path / "run"), progress=False)
    assert not os.path.exists(tmp_path / "run")  # no run directory for a run that never started


@pytest.mark.parametrize("split", ["train_x", "val_x", "test_x"])
@pytest.mark.parametrize("bad, message", [(float("nan"), "NaN or inf"), (1.5, r"lies in \[0, 1.5\]"),
                                          (-0.1, r"lies in \[-0.1, 1\]")])
def test_bad_data_is_refused_before_training(small_digits, tmp_path, monkeypatch, split, bad, message):
    x = getattr(small_digits, split).clone()
    x[3, 5] = bad
    broken = Splits(**{**small_digits.__dict__, split: x})
    monkeypatch.setattr(experiment, "load_splits", lambda cfg: broken)
    what = {"train_x": "train", "val_x": "validation", "test_x": "test"}[split]
    with pytest.raises(ValueError, match=f"digits {what} data .*{message}"):
        experiment.train_run(run_config(), str(tmp_path / "run"), progress=False)
    assert not os.path.exists(tmp_path / "run")


class _ExplodesAtEpoch3(Objective):
    """Trace_ELBO until epoch 3, then a NaN loss."""

    def __init__(self):
        super().__init__()
        self.epoch, self.elbo = 0, Trace_ELBO()

    def on_epoch(self, epoch):
        self.epoch = epoch

    def _loss(self, model, guide, prepared, *args, **kwargs):
        loss = self.elbo.differentiable_loss(model, guide, *args, **kwargs)
        return loss * float("nan") if self.epoch == 3 else loss


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "build_objective", lambda cfg: _ExplodesAtEpoch3())
    cfg = run_config(train={"epochs": 10, "early_stopping": False})
    with pytest.raises(TrainingDiverged, match="became nan at epoch 3, step 0") as info:
        experiment.train_run(cfg, str(tmp_path), progress=False)
    assert "is intact" in str(info.value) and "\n" not in str(info.value)
    state, meta = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert meta["epoch"] == info.value.result.best_epoch and meta["epoch"] in (1, 2)
    assert meta["config"] == check_config(cfg)
    status = read_status(str(tmp_path))
    assert status["status"] == "failed" and "became nan at epoch 3" in status["message"]
    assert all(torch.isfinite(v).all() for v in state.values())
    for k, v in info.value.result.best_state.items():
        torch.testing.assert_close(v, state[k])


def test_metrics_log_writes_one_json_line_per_epoch(tiny_vae, small_digits, tmp_path):
    from pyro_vae.metrics import MetricsLog

    log = MetricsLog(str(tmp_path))
    vae = tiny_vae()
    fit(vae, prepared(vae, small_digits), Trace_ELBO(), TrainConfig(epochs=3), log=log.log, progress=False)
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard"))


def test_train_epoch_takes_any_pyro_elbo(tiny_vae, small_digits):
    vae = tiny_vae()
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    with vae.without_param_store():
        assert math.isfinite(train_epoch(vae, Trace_ELBO(), optimizer, small_digits.train_x, 100))
