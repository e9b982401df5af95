"""The SVI training loop: minibatch Adam on a Pyro objective, per-epoch evaluation, early stopping,
the parameters of the best epoch, and a state to resume from after every epoch.

One step is ``objective.differentiable_loss(vae.model, vae.guide, x, num_data=N) / N`` followed by
a torch optimizer step over ``vae.parameters()``: the same loss and gradients as
``pyro.infer.SVI(vae.model, vae.guide, Adam, objective).step`` (tests/test_train.py checks it) with
one optimizer for all parameters instead of Pyro's one per parameter. Dividing by N makes the loss
the negative mean per-point ELBO, so learning rates do not depend on the dataset size. Over several
ranks (:mod:`pyro_vae.distributed`) each takes its shard of every batch and the gradients are summed.

The trainer talks to the objective through its contract (:class:`pyro_vae.objectives.Objective`):
``on_epoch(epoch)`` before each epoch's steps (schedules such as a KL warm-up), and after them
``selection_score(vae, x)``, the number epochs are selected on (the ELBO, or the IWAE-K bound for
an IWAE objective), logged under ``val_<selection_name>`` (``val_elbo``, ``val_iwae5``).

Random numbers, from the ``seed`` of :func:`fit`: the minibatch order from a generator of its own
(alike on every rank), the steps' draws (dynamic binarization, the objective's z) from torch's
global generator seeded per rank, and each epoch's evaluation under seeds per block of points
(:meth:`pyro_vae.distributed.Ranks.map_blocks`), so they do not depend on the number of ranks.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import pyro
import torch
from tqdm.auto import tqdm

from .checks import positive_int
from .data import RunData
from .distributed import EPOCH, ORDER, RANK, SINGLE, Ranks, derive_seed
from .objectives import as_objective
from .rundir import signals_held


@dataclass
class TrainConfig:
    """The ``train:`` section of a config.

    :param epochs: the most epochs to run.
    :param batch_size: points per optimizer step (over all ranks).
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
    """What :func:`fit` returns, and the trainer's bookkeeping between epochs.

    :ivar selection_metric: the metrics key epochs are selected on: ``val_<selection_name>`` of the
        objective (``val_elbo``, ``val_iwae5``), or ``train_<selection_name>`` (on the fixed training
        subset) when there is no validation set.
    :ivar best_epoch: the epoch with the highest ``selection_metric`` (1, 2, ...; 0 before the first).
    :ivar best_score: the value of ``selection_metric`` at ``best_epoch``.
    :ivar best_state: a copy of ``vae.state_dict()`` at the end of ``best_epoch``.
    :ivar bad_epochs: epochs since ``best_epoch`` (early stopping's counter).
    :ivar history: one metrics record per epoch run.
    """

    selection_metric: str
    best_epoch: int = 0
    best_score: float = -math.inf
    best_state: Dict[str, torch.Tensor] = field(default_factory=dict)
    epochs_run: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    history: List[Dict[str, float]] = field(default_factory=list)

    def add(self, record: Dict[str, float], vae, cfg: TrainConfig) -> bool:
        """Book epoch ``record``: True if it is the new best (its parameters are then copied)."""
        self.history.append(record)
        self.epochs_run = record["epoch"]
        if record[self.selection_metric] > self.best_score:
            self.best_epoch, self.best_score, self.bad_epochs = self.epochs_run, record[self.selection_metric], 0
            self.best_state = {k: v.detach().clone() for k, v in vae.state_dict().items()}
            return True
        self.bad_epochs += 1
        self.stopped_early = cfg.early_stopping and self.bad_epochs >= cfg.patience
        return False


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite. ``result`` is the :class:`FitResult` up to the last good
    epoch (its ``best_state`` is loaded into the model)."""

    def __init__(self, message: str, result: Optional[FitResult] = None):
        super().__init__(message)
        self.result = result


@torch.no_grad()
def evaluate_elbo(vae, x: torch.Tensor, batch_size: int = 1000, seed: Optional[int] = None,
                  ranks: Ranks = SINGLE) -> Dict[str, float]:
    """Mean per-point ELBO and its two terms, E_q[log p(x|z)] and KL(q(z|x) || p(z)), in nats; the
    points in blocks under seeds derived from ``seed`` (:meth:`pyro_vae.distributed.Ranks.map_blocks`)."""
    def block_terms(block):
        log_lik, kl = zip(*(vae.elbo_terms(b) for b in block.split(batch_size)))
        return torch.cat(log_lik), torch.cat(kl)

    log_lik, kl = (torch.cat(t) for t in zip(*ranks.map_blocks(block_terms, x, seed)))
    return {"elbo": (log_lik - kl).mean().item(), "log_lik": log_lik.mean().item(), "kl": kl.mean().item()}


def make_optimizer(params, lr: float) -> torch.optim.Optimizer:
    """Adam with learning rate ``lr``, by torch's fused kernel where the device has one (the same
    update to float rounding, in one pass over each parameter instead of about ten)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device or dtype (or an older torch)
        return torch.optim.Adam(params, lr=lr)


class LossWatch:
    """Warns, once, when a step's loss (nats per point) rises above the lowest loss so far by more
    than ``factor`` times that loss's magnitude (at least 1 nat): a learning rate too high for the
    model, which otherwise trains on to a huge loss without a word."""

    def __init__(self, lr: float, factor: float = 100.0):
        self.lr, self.factor, self.lowest, self.warned = lr, factor, math.inf, False

    def __call__(self, loss: float, epoch: int, step: int) -> None:
        self.lowest = min(self.lowest, loss)
        if not self.warned and loss - self.lowest > self.factor * max(abs(self.lowest), 1.0):
            self.warned = True
            warnings.warn(f"the training loss grew from {self.lowest:.4g} to {loss:.4g} nats per point by epoch {epoch}, "
                          f"step {step}: training is unstable; try a lower train.lr (now {self.lr:g})", stacklevel=2)


def train_epoch(vae, objective, optimizer, train_x: torch.Tensor, batch_size: int, epoch: int = 1,
                order: Optional[torch.Generator] = None, ranks: Ranks = SINGLE,
                watch: Optional[LossWatch] = None) -> float:
    """One pass over ``train_x`` in random minibatches (binarized afresh when the likelihood is
    binary); returns the mean per-point objective (e.g. the ELBO) over the epoch.

    Each rank takes its shard of each batch of B points and weights the shard's loss by its size
    B_r / B, so the gradients summed over ranks are those of the whole batch's loss. Each step's
    loss comes to the host (one number): a NaN or infinite loss stops at its step, and ``watch``
    sees every step's loss.
    """
    n, binarize, device = len(train_x), vae.likelihood.binarize, train_x.device
    params = [p for p in vae.parameters() if p.requires_grad]
    total = 0.0
    for step, batch in enumerate(torch.randperm(n, generator=order, device=device).split(batch_size)):
        idx = ranks.shard(batch)
        optimizer.zero_grad(set_to_none=True)
        if len(idx):
            x = torch.bernoulli(train_x[idx]) if binarize else train_x[idx]
            loss = objective.differentiable_loss(vae.model, vae.guide, x, num_data=n) / n
            if len(idx) < len(batch):  # a shard: its share of the batch
                loss = loss * (len(idx) / len(batch))
            loss.backward()
        else:
            loss = torch.zeros((), device=device)
        value = ranks.sum_gradients(params, loss).item()
        if not math.isfinite(value):
            raise TrainingDiverged(f"the loss became {value} at epoch {epoch}, step {step}")
        if watch is not None:
            watch(value, epoch, step)
        optimizer.step()
        total -= value * len(batch)
    return total / n


def epoch_record(vae, data: RunData, objective, result: FitResult, cfg: TrainConfig, seed: Optional[int],
                 ranks: Ranks = SINGLE) -> Dict[str, float]:
    """The ELBO and its terms on the fixed training subset and the validation set (``train_elbo``,
    ``val_kl``, ...) and the selection score, each set under a seed of (``seed``, epoch, set)."""
    epoch, record = result.epochs_run + 1, {}
    sets = [("train", data.train_eval_x), ("val", data.val_x)]
    for k, (name, x) in enumerate(sets):
        if len(x):
            s = None if seed is None else derive_seed(seed, EPOCH, epoch, k)
            record.update({f"{name}_{key}": v for key, v in evaluate_elbo(vae, x, cfg.eval_batch_size, s, ranks).items()})
    if result.selection_metric not in record:  # e.g. val_iwae5; val_elbo is in the record already
        x = data.val_x if len(data.val_x) else data.train_eval_x
        s = None if seed is None else derive_seed(seed, EPOCH, epoch, len(sets))
        scores = ranks.map_blocks(lambda b: objective.selection_score(vae, b, cfg.eval_batch_size) * len(b), x, s)
        record[result.selection_metric] = sum(scores) / len(x)
    return record


def fit(vae, data: RunData, objective, cfg: TrainConfig, log: Optional[Callable[[Dict[str, float]], None]] = None,
        on_best: Optional[Callable[[FitResult], None]] = None, progress: bool = True, *, seed: Optional[int] = None,
        resume=None, on_epoch_end: Optional[Callable] = None, ranks: Ranks = SINGLE) -> FitResult:
    """Train ``vae`` on ``data.train_x`` and return the best epoch (its parameters are loaded).

    Each epoch records ``train_objective`` (the mean objective over the steps) and
    :func:`epoch_record`. ``log(record)`` is called after each epoch; ``on_best(result)`` each time
    the selection score improves, with ``result.best_state`` then holding that epoch's parameters
    (write the checkpoint there); ``on_epoch_end(state)`` last, with the
    :class:`pyro_vae.resume.TrainState` to continue from (on every rank: making it is collective).

    :param data: checked data and fixed evaluation sets (:func:`pyro_vae.data.check_and_binarize`),
        on the model's device.
    :param objective: a :class:`pyro_vae.objectives.Objective` or any Pyro ELBO.
    :param seed: the seed every draw derives from (see the module); None draws one from torch's
        global generator, so ``torch.manual_seed(s)`` before ``fit`` makes it reproducible too.
    :param resume: a :class:`pyro_vae.resume.TrainState`: continue from it (model, optimizer,
        random generators and bookkeeping), as if never stopped.
    :param ranks: this process's place among data-parallel ranks (:mod:`pyro_vae.distributed`).
    :raises TrainingDiverged: when the loss turns NaN or infinite; the best epoch so far is loaded.
    """
    from .resume import TrainState

    objective = as_objective(objective)
    split = "val" if len(data.val_x) else "train"
    optimizer = make_optimizer(vae.parameters(), cfg.lr)
    seed = int(torch.randint(2**62, ())) if seed is None and resume is None else seed
    order = torch.Generator(data.train_x.device)
    if resume is None:
        result = FitResult(f"{split}_{objective.selection_name}")
        order.manual_seed(derive_seed(seed, ORDER))
        torch.manual_seed(derive_seed(seed, RANK, ranks.rank))
        ranks.broadcast_parameters(vae)
    else:
        seed, result = resume.seed, resume.restore(vae, optimizer, order, ranks)
    done, watch = result.stopped_early or result.epochs_run >= cfg.epochs, LossWatch(cfg.lr)
    bar = tqdm(total=cfg.epochs, initial=result.epochs_run, desc="train", unit="epoch", disable=not progress or done)
    # The data were checked once (check_and_binarize), so per-step distribution validation is off;
    # the torch optimizer owns the parameters, so they need not go through Pyro's param store.
    with pyro.validation_enabled(False), vae.without_param_store():
        while not done:
            epoch = result.epochs_run + 1
            vae.train()
            objective.on_epoch(epoch)
            try:
                value = train_epoch(vae, objective, optimizer, data.train_x, cfg.batch_size, epoch, order, ranks, watch)
            except TrainingDiverged as e:
                if result.best_state:
                    vae.load_state_dict(result.best_state)
                raise TrainingDiverged(f"{e}; training stopped, the best epoch so far ({result.best_epoch or 'none'}) "
                                       f"is loaded; try a lower train.lr", result) from None
            vae.eval()
            record = {"epoch": epoch, "train_objective": value, **epoch_record(vae, data, objective, result, cfg, seed,
                                                                               ranks)}
            improved = result.add(record, vae, cfg)
            bar.update(1)
            bar.set_postfix({"train_elbo": f"{record['train_elbo']:.2f}",
                             result.selection_metric: f"{record[result.selection_metric]:.2f}"})
            done = result.stopped_early or epoch >= cfg.epochs
            with signals_held():  # the epoch's files are written together, or not at all
                if log is not None:
                    log(record)
                if improved and on_best is not None:
                    on_best(result)
                if on_epoch_end is not None:
                    on_epoch_end(TrainState.capture(vae, optimizer, order, result, seed, ranks))
    bar.close()
    if not result.best_state:
        raise TrainingDiverged(f"{result.selection_metric} was never finite in {result.epochs_run} epochs; "
                               f"try a lower train.lr", result)
    vae.load_state_dict(result.best_state)
    return result

