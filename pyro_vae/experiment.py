"""One training run and one evaluation, from a plain config mapping to files in a run directory.

    train_run(cfg, run_dir)        -> metrics.jsonl, tensorboard/, figures/, checkpoint.pt, summary.json
    load_run(run_dir)              -> (model, cfg, splits) of a trained run

(``pyro_vae.evaluation.evaluate_run`` evaluates a trained run again, without retraining.)

A run flows one way: config -> data (loaded, checked, evaluation sets binarized) -> model ->
training -> evaluation -> figures and summary. Each phase draws its random numbers from torch's
global generator, seeded once at the phase's start with the run's ``seed``, so each phase is
reproducible on its own:

- initialization: ``torch.manual_seed(seed)``, then the networks' initial weights;
- training: ``torch.manual_seed(seed)``, then minibatch order, dynamic binarization and the
  objective's draws;
- evaluation: ``torch.manual_seed(seed)``, then the test ELBO's z draws and after them the
  importance samples of log p(x). :func:`evaluate_run` repeats this phase from the checkpoint, so
  with the same K it gives the summary's numbers;
- figures: ``torch.manual_seed(seed)``, then the prior samples drawn.

Hydra lives in ``cli``; this module takes dictionaries, so it is usable from Python and tests.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Dict, Mapping, Optional

import torch

from . import figures
from .build import build_objective, build_model
from .checkpoint import atomic_write_json, load_checkpoint, save_checkpoint
from .checks import config_section, positive_int
from .data import RunData, check_and_binarize, load_splits
from .evaluation import evaluate
from .metrics import MetricsLog, mean_se
from .train import TrainConfig, TrainingDiverged, evaluate_elbo, fit


def _num_samples(cfg: Mapping[str, Any]) -> Optional[int]:
    """``eval.num_samples``: K for the test log p(x), or None (``null``) to skip it."""
    k = cfg["eval"]["num_samples"]
    return None if k is None else positive_int(k, "eval.num_samples")


def make_figures(vae, data: RunData, history, run_dir: str) -> None:
    """figures/: ELBO curves, test images and their reconstructions, prior samples, latent space."""
    out, splits = os.path.join(run_dir, "figures"), data.splits
    figures.elbo_curves(history, os.path.join(out, "elbo_curves.png"))
    picks = torch.cat([torch.nonzero(splits.test_y == c)[:1, 0] for c in splits.test_y.unique()[:10]])
    originals = data.test_x[picks]
    figures.image_grid([originals.cpu().numpy(), vae.reconstruct(originals).cpu().numpy()], splits.image_shape,
                       os.path.join(out, "reconstructions.png"), ["test x", "E[x|z=mean q]"],
                       "test images and their reconstructions")
    samples = vae.sample(40).cpu().numpy()
    figures.image_grid([samples[i * 10:(i + 1) * 10] for i in range(4)], splits.image_shape,
                       os.path.join(out, "prior_samples.png"), title="E[x|z], z ~ p(z)")
    figures.latent_space(vae.encode(data.test_x).cpu().numpy(), splits.test_y.numpy(),
                         os.path.join(out, "latent_space.png"))
    vae.extra_figures(data, out)  # a model's own figures (e.g. the GMVAE's samples per cluster)


def train_run(cfg: Mapping[str, Any], run_dir: str, progress: bool = True) -> Dict[str, Any]:
    """Train the model that ``cfg`` describes and write the run directory; return the summary.

    checkpoint.pt holds the best epoch's parameters with ``config`` (``cfg``), ``epoch`` and that
    epoch's ``metrics`` record; it is rewritten each time the selection score improves."""
    seed, device = int(cfg["seed"]), cfg.get("device", "cpu")
    train_cfg = TrainConfig(**config_section(cfg, "train", [f.name for f in dataclasses.fields(TrainConfig)]))
    num_samples = _num_samples(cfg)
    splits = load_splits(cfg)
    torch.manual_seed(seed)  # initialization
    vae = build_model(cfg, splits.data_dim).to(device)
    objective = build_objective(cfg)
    data = check_and_binarize(splits, vae.likelihood, device)
    vae.initialize(data)  # a model's start from the training data (e.g. the GMVAE's pretraining), in this phase
    os.makedirs(run_dir, exist_ok=True)
    checkpoint = os.path.join(run_dir, "checkpoint.pt")

    def save_best(result):
        save_checkpoint(checkpoint, result.best_state, config=dict(cfg), epoch=result.best_epoch,
                        metrics=result.history[-1])

    log = MetricsLog(run_dir)
    start = time.perf_counter()
    torch.manual_seed(seed)  # training
    try:
        result = fit(vae, data, objective, train_cfg, log=log.log, on_best=save_best, progress=progress)
    except TrainingDiverged as e:
        kept = f"; {checkpoint} (epoch {e.result.best_epoch}) is intact" if e.result and e.result.best_epoch else ""
        raise TrainingDiverged(f"{e}{kept}", e.result) from None
    finally:
        log.close()
    train_seconds = time.perf_counter() - start
    vae.eval()
    elbo, estimate = evaluate(vae, data.test_x, num_samples, seed, progress)
    summary = {
        "dataset": splits.name, "num_test": len(data.test_x), "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run, "stopped_early": result.stopped_early,
        "selection_metric": result.selection_metric, f"best_{result.selection_metric}": result.best_score,
        "train_seconds": round(train_seconds, 2),
        "test_elbo": elbo["elbo"], "test_log_lik": elbo["log_lik"], "test_kl": elbo["kl"],
    }
    if estimate is not None:
        summary["test_log_px"] = {**mean_se(estimate.log_px), "num_samples": num_samples}
    summary.update(vae.extra_summary(data))  # a model's own numbers (e.g. the GMVAE's cluster accuracy)
    torch.manual_seed(seed)  # figures
    make_figures(vae, data, result.history, run_dir)
    atomic_write_json(os.path.join(run_dir, "summary.json"), summary)
    return summary
