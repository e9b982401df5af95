"""Evaluating a model: the test ELBO and log p(x) per image, in a run and again from its checkpoint.

    evaluate(vae, test_x, K, seed)   -> (ELBO terms, LogPxEstimate): the evaluation phase of a run
    evaluate_run(run_dir, K)         -> evaluation.json and figures/log_px_vs_k.png, no retraining
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch

from . import figures
from .checkpoint import atomic_write_json
from .checks import positive_int
from .build import build_model
from .checkpoint import load_checkpoint
from .data import check_and_binarize, load_splits
from .marginal import estimate_log_px
from .metrics import mean_se
from .train import evaluate_elbo


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
    splits = load_splits(cfg)
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
