"""One training run and one evaluation, from a plain config mapping to files in a run directory.

    train_run(cfg, run_dir)        -> metrics.jsonl, tensorboard/, figures/, checkpoint.pt, summary.json
    evaluate_run(run_dir, K)       -> evaluation.json and figures/log_px_vs_k.png, no retraining

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
from .checks import positive_int
from .data import RunData, Splits, check_and_binarize, load_dataset
from .marginal import estimate_log_px
from .metrics import MetricsLog, mean_se
from .train import TrainConfig, TrainingDiverged, evaluate_elbo, fit


def _section(cfg: Mapping[str, Any], name: str, keys) -> Dict[str, Any]:
    """The config section ``name`` as a dict; a key it does not take is a one-line ValueError."""
    section = dict(cfg[name])
    unknown = sorted(set(section) - set(keys))
    if unknown:
        raise ValueError(f"unknown key {name}.{unknown[0]}; the {name} section takes: {', '.join(keys)}")
    return section


def _load_splits(cfg: Mapping[str, Any]) -> Splits:
    return load_dataset(**_section(cfg, "data", ("name", "path", "val_fraction")))


def _num_samples(cfg: Mapping[str, Any]) -> Optional[int]:
    """``eval.num_samples``: K for the test log p(x), or None (``null``) to skip it."""
    k = cfg["eval"]["num_samples"]
    return None if k is None else positive_int(k, "eval.num_samples")


def evaluate(vae, test_x: torch.Tensor, num_samples: Optional[int], seed: int, progress: bool = True):
    """The evaluation phase: under ``torch.manual_seed(seed)``, the test ELBO and its two terms (one
    z ~ q(z|x) per image), then, unless ``num_samples`` is None, log p(x) per image by importance
    sampling with K = ``num_samples``, with log p̂_K' for K' = 1, 10, 100, 1000, 5000 <= K from
    prefixes of the same particles. Returns (ELBO terms dict, ``LogPxEstimate`` or None)."""
    torch.manual_seed(seed)
    elbo = evaluate_elbo(vae, test_x)
    if num_samples is None:
        return elbo, None
    prefixes = [k for k in (1, 10, 100, 1000, 5000) if k <= num_samples] + [num_samples]
    with vae.without_param_store():  # the module owns its weights; registering them costs ~1 ms a pass
        estimate = estimate_log_px(vae.model, vae.guide, test_x, num_samples=num_samples, prefix_sizes=prefixes,
                                   progress=progress)
    return elbo, estimate


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


def train_run(cfg: Mapping[str, Any], run_dir: str, progress: bool = True) -> Dict[str, Any]:
    """Train the model that ``cfg`` describes and write the run directory; return the summary.

    checkpoint.pt holds the best epoch's parameters with ``config`` (``cfg``), ``epoch`` and that
    epoch's ``metrics`` record; it is rewritten each time the selection score improves."""
    seed, device = int(cfg["seed"]), cfg.get("device", "cpu")
    train_cfg = TrainConfig(**_section(cfg, "train", [f.name for f in dataclasses.fields(TrainConfig)]))
    num_samples = _num_samples(cfg)
    splits = _load_splits(cfg)
    torch.manual_seed(seed)  # initialization
    vae = build_model(cfg, splits.data_dim).to(device)
    objective = build_objective(cfg)
    data = check_and_binarize(splits, vae.likelihood, device)
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
    torch.manual_seed(seed)  # figures
    make_figures(vae, data, result.history, run_dir)
    atomic_write_json(os.path.join(run_dir, "summary.json"), summary)
    return summary


def _finite_mean(values: torch.Tensor) -> Optional[float]:
    finite = values[torch.isfinite(values)]
    return finite.mean().item() if len(finite) else None


def load_run(run_dir: str, device: str = "cpu"):
    """Rebuild the model of a trained run from its checkpoint: returns (vae, cfg, splits), the model
    in eval mode with the best epoch's parameters, the run's config and its data splits."""
    state, meta = load_checkpoint(os.path.join(run_dir, "checkpoint.pt"), map_location=device)
    cfg = meta["config"]
    if "val_fraction" in cfg.get("train", {}):  # written before val_fraction moved from train: to data:
        cfg = {**cfg, "train": dict(cfg["train"]), "data": dict(cfg["data"])}
        cfg["data"]["val_fraction"] = cfg["train"].pop("val_fraction")
    splits = _load_splits(cfg)
    vae = build_model(cfg, splits.data_dim).to(device)
    vae.load_state_dict(state)
    vae.eval()
    return vae, cfg, splits


def evaluate_run(run_dir: str, num_samples: int = 5000, progress: bool = True) -> Dict[str, Any]:
    """Estimate the test log p(x) of a trained run with ``num_samples`` importance samples (the
    evaluation phase of :func:`train_run`, from the checkpoint); writes evaluation.json and
    figures/log_px_vs_k.png and returns the evaluation."""
    num_samples = positive_int(num_samples, "num_samples")
    vae, cfg, splits = load_run(run_dir)
    test_x = check_and_binarize(splits, vae.likelihood).test_x
    elbo, estimate = evaluate(vae, test_x, num_samples, int(cfg["seed"]), progress)
    log_px, elbo_k = mean_se(estimate.log_px), mean_se(estimate.elbo)
    result = {"run_dir": os.path.abspath(run_dir), "num_samples": num_samples, "num_test": len(test_x),
              "log_px": log_px, "elbo": elbo_k, "gap": log_px["mean"] - elbo_k["mean"],
              "test_elbo": elbo["elbo"], "test_log_lik": elbo["log_lik"], "test_kl": elbo["kl"],
              "log_px_by_k": {str(k): mean_se(v) for k, v in estimate.log_px_by_k.items()},
              # the Monte Carlo stderr exists only where k̂ <= 0.7 (pyro_vae.weights): its mean over those points
              "mean_mc_stderr": _finite_mean(estimate.stderr), "median_ess": estimate.ess.median().item(),
              "fraction_pareto_k_above_0.7": estimate.fraction_pareto_k_above(0.7)}
    fig = figures.plot_log_px_vs_k(estimate, title=f"test log p(x) vs K ({os.path.basename(os.path.abspath(run_dir))})")
    figures.save_figure(fig, os.path.join(run_dir, "figures", "log_px_vs_k.png"))
    atomic_write_json(os.path.join(run_dir, "evaluation.json"), result)
    return result
