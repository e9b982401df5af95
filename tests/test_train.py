"""The trainer: determinism, early stopping, best checkpoint, and its errors."""

import json
import os

import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_vae.checkpoint import load_checkpoint
from pyro_vae.data import Splits, load_dataset
from pyro_vae.objectives import Objective
from pyro_vae.train import TrainConfig, TrainingDiverged, fit


@pytest.fixture(scope="module")
def small_digits():
    s = load_dataset("digits")
    return Splits("digits", (8, 8), s.train_x[:300], s.train_y[:300], s.val_x[:100], s.val_y[:100],
                  s.test_x[:100], s.test_y[:100])


def test_fit_is_deterministic_and_keeps_the_best_epoch(tiny_vae, small_digits, tmp_path):
    histories = []
    for run in ("a", "b"):
        torch.manual_seed(0)
        vae = tiny_vae()
        result = fit(vae, small_digits, Trace_ELBO(), TrainConfig(epochs=4, batch_size=50, lr=3e-3),
                     str(tmp_path / run), seed=7, progress=False)
        histories.append(result.history)
        state, meta = load_checkpoint(str(tmp_path / run / "checkpoint.pt"))
        assert meta["epoch"] == result.best_epoch
        assert result.best_val_elbo == max(r["val_elbo"] for r in result.history)
        for k, v in vae.state_dict().items():  # the best epoch's parameters are restored
            torch.testing.assert_close(v, state[k])
    assert histories[0] == histories[1]
    record = histories[0][-1]
    for key in ("train_objective", "train_elbo", "train_log_lik", "train_kl", "val_elbo", "val_log_lik", "val_kl"):
        assert torch.isfinite(torch.tensor(record[key]))
    assert record["val_elbo"] == pytest.approx(record["val_log_lik"] - record["val_kl"], abs=1e-4)


def test_early_stopping(tiny_vae, small_digits, tmp_path):
    # lr=0: the parameters never change, so the (noisy) validation ELBO stops improving quickly.
    result = fit(tiny_vae(), small_digits, Trace_ELBO(), TrainConfig(epochs=50, lr=0.0, patience=2),
                 str(tmp_path), progress=False)
    assert result.stopped_early and result.epochs_run < 50
    assert result.epochs_run - result.best_epoch == 2


@pytest.mark.parametrize("bad, message", [(float("nan"), "NaN or inf"), (1.5, r"lies in \[0, 1.5\]"),
                                          (-0.1, r"lies in \[-0.1, 1\]")])
def test_bad_data_is_refused_before_training(tiny_vae, small_digits, tmp_path, bad, message):
    x = small_digits.train_x.clone()
    x[3, 5] = bad
    broken = Splits("digits", (8, 8), x, small_digits.train_y, small_digits.val_x, small_digits.val_y,
                    small_digits.test_x, small_digits.test_y)
    with pytest.raises(ValueError, match=message):
        fit(tiny_vae(), broken, Trace_ELBO(), TrainConfig(epochs=1), str(tmp_path), progress=False)
    assert not os.path.exists(tmp_path / "checkpoint.pt")


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


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_checkpoint(tiny_vae, small_digits, tmp_path):
    with pytest.raises(TrainingDiverged, match="became nan at epoch 3, step 0") as info:
        fit(tiny_vae(), small_digits, _ExplodesAtEpoch3(), TrainConfig(epochs=10, batch_size=100),
            str(tmp_path), progress=False)
    assert "is intact" in str(info.value)
    state, meta = load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert meta["epoch"] in (1, 2)
    assert all(torch.isfinite(v).all() for v in state.values())


def test_metrics_log_writes_one_json_line_per_epoch(tiny_vae, small_digits, tmp_path):
    from pyro_vae.metrics import MetricsLog

    log = MetricsLog(str(tmp_path))
    fit(tiny_vae(), small_digits, Trace_ELBO(), TrainConfig(epochs=3), str(tmp_path), log=log.log, progress=False)
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard"))
