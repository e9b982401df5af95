"""One training run and one evaluation, from a plain config mapping to files in a run directory.

    train_run(cfg, run_dir)        -> metrics.jsonl, tensorboard/, figures/, checkpoint.pt, summary.json
    evaluate_run(run_dir, K)       -> evaluation.json and figures/log_px_vs_k.png, no retraining

Hydra lives in ``cli``; this module takes dictionaries, so it is usable from Python and tests.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, Mapping

import torch

from .build import build_objective, build_model
from .checkpoint import atomic_write_json, load_checkpoint
from .data import TEST_BINARIZATION_SEED, Splits, binarize_fixed, load_dataset
from .marginal import estimate_log_px
from .metrics import MetricsLog
from .train import TrainConfig, evaluate_elbo, fit


def _test_data(vae, splits: Splits) -> torch.Tensor:
    vae.likelihood.check_data(splits.test_x, f"{splits.name} test data")
    x = binarize_fixed(splits.test_x, TEST_BINARIZATION_SEED) if vae.likelihood.binarize else splits.test_x
    return x.to(next(vae.parameters()).device)


def _load_splits(cfg: Mapping[str, Any]) -> Splits:
    data = cfg["data"]
    return load_dataset(data["name"], data.get("path"), float(cfg["train"].get("val_fraction", 0.1)))


def _log_px(vae, x: torch.Tensor, cfg: Mapping[str, Any], num_samples: int, progress: bool):
    """Importance-weighted log p(x) per test point, plus log p̂_K' for K' = 1, 10, 100, ... <= K
    from prefixes of the same particles."""
    prefixes = [k for k in (1, 10, 100, 1000, 5000) if k <= num_samples] + [num_samples]
    with vae.without_param_store():  # the module owns its weights; registering them costs ~1 ms a pass
        return estimate_log_px(vae.model, vae.guide, x, num_samples=num_samples, prefix_sizes=prefixes,
                               seed=int(cfg["seed"]), progress=progress)


def mean_se(values: torch.Tensor) -> Dict[str, float]:
    """Mean of ``values`` (test points, seeds, ...) and its standard error, sd / sqrt(N)."""
    values = values.double()
    return {"mean": values.mean().item(), "se": (values.std() / math.sqrt(len(values))).item()}


def make_figures(vae, splits: Splits, history, run_dir: str, seed: int) -> None:
    from . import figures

    out = os.path.join(run_dir, "figures")
    os.makedirs(out, exist_ok=True)
    figures.elbo_curves(history, os.path.join(out, "elbo_curves.png"))
    test_x = _test_data(vae, splits)
    picks = torch.cat([torch.nonzero(splits.test_y == c)[:1, 0] for c in splits.test_y.unique()[:10]])
    originals = test_x[picks]
    torch.manual_seed(seed)
    figures.image_grid([originals.cpu().numpy(), vae.reconstruct(originals).cpu().numpy()], splits.image_shape,
                       os.path.join(out, "reconstructions.png"), ["test x", "E[x|z=mean q]"],
                       "test images and their reconstructions")
    samples = vae.sample(40).cpu().numpy()
    figures.image_grid([samples[i * 10:(i + 1) * 10] for i in range(4)], splits.image_shape,
                       os.path.join(out, "prior_samples.png"), title="E[x|z], z ~ p(z)")
    figures.latent_space(vae.encode(test_x).cpu().numpy(), splits.test_y.numpy(),
                         os.path.join(out, "latent_space.png"))


def train_run(cfg: Mapping[str, Any], run_dir: str, progress: bool = True) -> Dict[str, Any]:
    """Train the VAE that ``cfg`` describes and write the run directory; return the summary."""
    os.makedirs(run_dir, exist_ok=True)
    seed = int(cfg["seed"])
    splits = _load_splits(cfg)
    torch.manual_seed(seed)  # network initialization
    vae = build_model(cfg, splits.data_dim).to(cfg.get("device", "cpu"))
    objective = build_objective(cfg)
    train_cfg = TrainConfig(**{k: v for k, v in cfg["train"].items() if k != "val_fraction"})
    log = MetricsLog(run_dir)
    start = time.perf_counter()
    try:
        result = fit(vae, splits, objective, train_cfg, run_dir, seed=seed, log=log.log,
                     progress=progress, checkpoint_meta={"config": dict(cfg)})
    finally:
        log.close()
    train_seconds = time.perf_counter() - start
    vae.eval()
    test_x = _test_data(vae, splits)
    torch.manual_seed(seed)
    test_elbo = evaluate_elbo(vae, test_x)
    num_samples = int(cfg["eval"]["num_samples"])
    estimate = _log_px(vae, test_x, cfg, num_samples, progress)
    summary = {
        "dataset": splits.name, "num_test": len(test_x), "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run, "stopped_early": result.stopped_early,
        "best_val_elbo": result.best_val_elbo, "train_seconds": round(train_seconds, 2),
        "test_elbo": test_elbo["elbo"], "test_log_lik": test_elbo["log_lik"], "test_kl": test_elbo["kl"],
        "test_log_px": {**mean_se(estimate.log_px), "num_samples": num_samples},
    }
    make_figures(vae, splits, result.history, run_dir, seed)
    atomic_write_json(os.path.join(run_dir, "summary.json"), summary)
    return summary


def load_run(run_dir: str, device: str = "cpu"):
    """Rebuild the VAE of a run from its checkpoint: (vae, cfg)."""
    state, meta = load_checkpoint(os.path.join(run_dir, "checkpoint.pt"), map_location=device)
    cfg = meta["config"]
    splits = _load_splits(cfg)
    vae = build_model(cfg, splits.data_dim).to(device)
    vae.load_state_dict(state)
    vae.eval()
    return vae, cfg, splits


def evaluate_run(run_dir: str, num_samples: int = 5000, progress: bool = True) -> Dict[str, Any]:
    """Estimate the test log p(x) of a trained run with ``num_samples`` importance samples."""
    vae, cfg, splits = load_run(run_dir)
    test_x = _test_data(vae, splits)
    estimate = _log_px(vae, test_x, cfg, num_samples, progress)
    log_px, elbo = mean_se(estimate.log_px), mean_se(estimate.elbo)
    result = {"run_dir": os.path.abspath(run_dir), "num_samples": num_samples, "num_test": len(test_x),
              "log_px": log_px, "elbo": elbo, "gap": log_px["mean"] - elbo["mean"],
              "log_px_by_k": {str(k): mean_se(v) for k, v in estimate.log_px_by_k.items()},
              "mean_mc_stderr": estimate.stderr.mean().item(), "median_ess": estimate.ess.median().item(),
              "fraction_pareto_k_above_0.7": estimate.fraction_pareto_k_above(0.7)}
    from .figures import save_figure
    from .plots_log_px import plot_log_px_vs_k

    fig = plot_log_px_vs_k(estimate, title=f"test log p(x) vs K ({os.path.basename(os.path.abspath(run_dir))})")
    os.makedirs(os.path.join(run_dir, "figures"), exist_ok=True)
    save_figure(fig, os.path.join(run_dir, "figures", "log_px_vs_k.png"))
    atomic_write_json(os.path.join(run_dir, "evaluation.json"), result)
    return result
