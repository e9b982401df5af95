"""The SVI training loop: minibatch Adam on a Pyro objective, per-epoch evaluation, early stopping,
and the parameters of the best epoch.

One step is ``objective.differentiable_loss(vae.model, vae.guide, x, num_data=N) / N`` followed by
a torch optimizer step over ``vae.parameters()``: the same loss and gradients as
``pyro.infer.SVI(vae.model, vae.guide, Adam, objective).step`` (tests/test_train.py checks it) with
one optimizer for all parameters instead of Pyro's one per parameter. Dividing by N makes the loss
the negative mean per-point ELBO, so learning rates do not depend on the dataset size.

The trainer talks to the objective through its contract (:class:`pyro_vae.objectives.Objective`):
``on_epoch(epoch)`` before each epoch's steps (schedules such as a KL warm-up), and after them
``selection_score(vae, x)``, the number epochs are selected on (the ELBO, or the IWAE-K bound for
an IWAE objective), logged under ``val_<selection_name>`` (``val_elbo``, ``val_iwae5``).

Random numbers (minibatch order, dynamic binarization, the objective's draws) come from torch's
global generator: the caller seeds it (``pyro_vae.experiment.train_run`` does, once, before fit).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import pyro
import torch
from tqdm.auto import tqdm

from .checks import positive_int
from .data import RunData
from .objectives import as_objective


@dataclass
class TrainConfig:
    """The ``train:`` section of a config.

    :param epochs: the most epochs to run.
    :param batch_size: points per optimizer step.
    :param lr: Adam's learning rate (>= 0).
    :param early_stopping: stop after ``patience`` epochs without a better selection score.
    :param eval_batch_size: points per pass when evaluating (bounds memory only).
    """

    epochs: int = 300
    batch_size: int = 100
    lr: float = 1e-3
    early_stopping: bool = True
    patience: int = 20
    eval_batch_size: int = 1000

    def __post_init__(self):
        for key in ("epochs", "batch_size", "patience", "eval_batch_size"):
            setattr(self, key, positive_int(getattr(self, key), f"train.{key}"))
        if isinstance(self.lr, bool) or not isinstance(self.lr, numbers.Real) or not self.lr >= 0:
            raise ValueError(f"train.lr must be a number >= 0, got {self.lr!r}")
        if not isinstance(self.early_stopping, bool):
            raise ValueError(f"train.early_stopping must be true or false, got {self.early_stopping!r}")


@dataclass
class FitResult:
    """What :func:`fit` returns.

    :ivar selection_metric: the metrics key epochs are selected on: ``val_<selection_name>`` of the
        objective (``val_elbo``, ``val_iwae5``), or ``train_<selection_name>`` (on the fixed training
        subset) when there is no validation set.
    :ivar best_epoch: the epoch with the highest ``selection_metric`` (1, 2, ...; 0 before the first).
    :ivar best_score: the value of ``selection_metric`` at ``best_epoch``.
    :ivar best_state: a copy of ``vae.state_dict()`` at the end of ``best_epoch``.
    :ivar history: one metrics record per epoch run.
    """

    selection_metric: str
    best_epoch: int = 0
    best_score: float = -math.inf
    best_state: Dict[str, torch.Tensor] = field(default_factory=dict)
    epochs_run: int = 0
    stopped_early: bool = False
    history: List[Dict[str, float]] = field(default_factory=list)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite. ``result`` is the :class:`FitResult` up to the last good
    epoch (its ``best_state`` is loaded into the model)."""

    def __init__(self, message: str, result: Optional[FitResult] = None):
        super().__init__(message)
        self.result = result


@torch.no_grad()
def evaluate_elbo(vae, x: torch.Tensor, batch_size: int = 1000) -> Dict[str, float]:
    """Mean per-point ELBO and its two terms, E_q[log p(x|z)] and KL(q(z|x) || p(z)), in nats."""
    log_lik, kl = map(torch.cat, zip(*(vae.elbo_terms(b) for b in x.split(batch_size))))
    return {"elbo": (log_lik - kl).mean().item(), "log_lik": log_lik.mean().item(), "kl": kl.mean().item()}


def train_epoch(vae, objective, optimizer, train_x: torch.Tensor, batch_size: int, epoch: int = 1) -> float:
    """One pass over ``train_x`` in random minibatches (binarized afresh when the likelihood is
    binary); returns the mean per-point objective (e.g. the ELBO) over the epoch."""
    n, binarize = len(train_x), vae.likelihood.binarize
    total = 0.0
    for step, idx in enumerate(torch.randperm(n, device=train_x.device).split(batch_size)):
        x = torch.bernoulli(train_x[idx]) if binarize else train_x[idx]
        loss = objective.differentiable_loss(vae.model, vae.guide, x, num_data=n) / n
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"the loss became {loss.item()} at epoch {epoch}, step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total -= loss.item() * len(idx)
    return total / n


def fit(vae, data: RunData, objective, cfg: TrainConfig, log: Optional[Callable[[Dict[str, float]], None]] = None,
        on_best: Optional[Callable[[FitResult], None]] = None, progress: bool = True) -> FitResult:
    """Train ``vae`` on ``data.train_x`` and return the best epoch (its parameters are loaded).

    Each epoch records ``train_objective`` (the mean objective over the steps), the ELBO and its
    terms on the fixed training subset and the validation set (``train_elbo``, ``val_kl``, ...) and
    the objective's selection score (see :class:`FitResult`). ``log(record)`` is called after each
    epoch; ``on_best(result)`` each time the selection score improves, with ``result.best_state``
    then holding that epoch's parameters: write the checkpoint there, so a diverged or interrupted
    training leaves the best epoch so far on disk.

    :param data: checked data and fixed evaluation sets (:func:`pyro_vae.data.check_and_binarize`),
        on the model's device.
    :param objective: a :class:`pyro_vae.objectives.Objective` or any Pyro ELBO.
    :raises TrainingDiverged: when the loss turns NaN or infinite; the best epoch so far is loaded.
    """
    objective = as_objective(objective)
    split, select_x = ("val", data.val_x) if len(data.val_x) else ("train", data.train_eval_x)
    result = FitResult(f"{split}_{objective.selection_name}")
    optimizer = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    bad_epochs = 0
    bar = tqdm(range(1, cfg.epochs + 1), desc="train", unit="epoch", disable=not progress)
    # The data were checked once (check_and_binarize), so per-step distribution validation is off;
    # the torch optimizer owns the parameters, so they need not go through Pyro's param store.
    with pyro.validation_enabled(False), vae.without_param_store():
        for epoch in bar:
            vae.train()
            objective.on_epoch(epoch)
            try:
                value = train_epoch(vae, objective, optimizer, data.train_x, cfg.batch_size, epoch)
            except TrainingDiverged as e:
                if result.best_state:
                    vae.load_state_dict(result.best_state)
                raise TrainingDiverged(f"{e}; training stopped, the best epoch so far ({result.best_epoch or 'none'}) "
                                       f"is loaded; try a lower train.lr", result) from None
            vae.eval()
            record = {"epoch": epoch, "train_objective": value}
            for name, x in (("train", data.train_eval_x), ("val", data.val_x)):
                if len(x):
                    record.update({f"{name}_{k}": v for k, v in evaluate_elbo(vae, x, cfg.eval_batch_size).items()})
            if result.selection_metric not in record:  # e.g. val_iwae5; val_elbo is in the record already
                record[result.selection_metric] = objective.selection_score(vae, select_x, cfg.eval_batch_size)
            result.history.append(record)
            result.epochs_run = epoch
            if log is not None:
                log(record)
            score = record[result.selection_metric]
            bar.set_postfix({"train_elbo": f"{record['train_elbo']:.2f}", result.selection_metric: f"{score:.2f}"})
            if score > result.best_score:
                result.best_epoch, result.best_score, bad_epochs = epoch, score, 0
                result.best_state = {k: v.detach().clone() for k, v in vae.state_dict().items()}
                if on_best is not None:
                    on_best(result)
            else:
                bad_epochs += 1
                if cfg.early_stopping and bad_epochs >= cfg.patience:
                    result.stopped_early = True
                    break
    if not result.best_state:
        raise TrainingDiverged(f"{result.selection_metric} was never finite in {result.epochs_run} epochs; "
                               f"try a lower train.lr", result)
    vae.load_state_dict(result.best_state)
    return result
