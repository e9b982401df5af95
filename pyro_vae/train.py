"""The SVI training loop: minibatch Adam on a Pyro objective, per-epoch evaluation, early stopping
on the validation ELBO, and an atomic checkpoint of the best epoch.

One step is ``objective.differentiable_loss(vae.model, vae.guide, x, num_data=N) / N`` followed by
a torch optimizer step over ``vae.parameters()``: the same loss and gradients as
``pyro.infer.SVI(vae.model, vae.guide, Adam, objective).step`` (tests/test_train.py checks it) with
one optimizer for all parameters instead of Pyro's one per parameter. Dividing by N makes the loss
the negative mean per-point ELBO, so learning rates do not depend on the dataset size.
An objective with an ``on_epoch(epoch)`` method is told each epoch (1, 2, ...) before it starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import pyro
import torch
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .objectives import as_objective
from .data import TRAIN_EVAL_BINARIZATION_SEED, VAL_BINARIZATION_SEED, Splits, binarize_fixed


@dataclass
class TrainConfig:
    epochs: int = 300
    batch_size: int = 100
    lr: float = 1e-3
    early_stopping: bool = True
    patience: int = 20  # epochs without a better validation ELBO before stopping
    eval_batch_size: int = 1000


@dataclass
class FitResult:
    best_epoch: int
    best_val_elbo: float
    epochs_run: int
    stopped_early: bool
    history: List[Dict[str, float]] = field(default_factory=list)


class TrainingDiverged(RuntimeError):
    pass


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


def fit(vae, splits: Splits, objective, cfg: TrainConfig, run_dir: str, seed: int = 0,
        log: Optional[Callable[[Dict[str, float]], None]] = None, progress: bool = True,
        checkpoint_meta: Optional[dict] = None) -> FitResult:
    """Train ``vae`` on ``splits.train_x``; keep the parameters of the best validation epoch."""
    torch.manual_seed(seed)
    objective = as_objective(objective)
    lik, device = vae.likelihood, next(vae.parameters()).device
    for what, data in (("train", splits.train_x), ("validation", splits.val_x)):
        lik.check_data(data, f"{splits.name} {what} data")
    fixed = (lambda x, s: binarize_fixed(x, s)) if lik.binarize else (lambda x, s: x)  # noqa: E731
    train_x = splits.train_x.to(device)
    n = len(train_x)
    val_x = fixed(splits.val_x, VAL_BINARIZATION_SEED).to(device)
    # A fixed random subset: the training split may be sorted by label (mnist5k), so its head is not a sample.
    subset = torch.randperm(n, generator=torch.Generator().manual_seed(TRAIN_EVAL_BINARIZATION_SEED))
    train_eval_x = fixed(splits.train_x[subset[: max(len(val_x), 500)]], TRAIN_EVAL_BINARIZATION_SEED).to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    result = FitResult(0, -math.inf, 0, False)
    bad_epochs = 0
    bar = tqdm(range(1, cfg.epochs + 1), desc="train", unit="epoch", disable=not progress)
    # The data were checked once above, so per-step distribution validation is switched off; the
    # torch optimizer owns the parameters, so they need not go through Pyro's param store.
    with pyro.validation_enabled(False), vae.without_param_store():
        for epoch in bar:
            vae.train()
            objective.on_epoch(epoch)  # schedules such as a KL warm-up
            try:
                objective_value = train_epoch(vae, objective, optimizer, train_x, cfg.batch_size, epoch)
            except TrainingDiverged as e:
                raise TrainingDiverged(f"{e}; training stopped and {checkpoint} (epoch {result.best_epoch}) "
                                       f"is intact; try a lower train.lr") from None
            vae.eval()
            record = {"epoch": epoch, "train_objective": objective_value}
            record.update({f"train_{k}": v for k, v in evaluate_elbo(vae, train_eval_x, cfg.eval_batch_size).items()})
            if len(val_x):
                record.update({f"val_{k}": v for k, v in evaluate_elbo(vae, val_x, cfg.eval_batch_size).items()})
                if objective.selection_name != "elbo":  # select on the bound trained (IWAE), not the ELBO
                    record["val_objective"] = objective.selection_score(vae, val_x, cfg.eval_batch_size)
            result.history.append(record)
            result.epochs_run = epoch
            if log is not None:
                log(record)
            score = record.get("val_objective", record.get("val_elbo", record["train_elbo"]))  # no val set: train
            bar.set_postfix(train_elbo=f"{record['train_elbo']:.2f}", val_elbo=f"{score:.2f}")
            if score > result.best_val_elbo:
                result.best_epoch, result.best_val_elbo, bad_epochs = epoch, score, 0
                save_checkpoint(checkpoint, vae.state_dict(), epoch=epoch, val_elbo=score,
                                **(checkpoint_meta or {}))
            else:
                bad_epochs += 1
                if cfg.early_stopping and bad_epochs >= cfg.patience:
                    result.stopped_early = True
                    break
    vae.load_state_dict(load_checkpoint(checkpoint, map_location=device)[0])
    return result
