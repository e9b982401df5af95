"""Evaluating a model: the test ELBO and log p(x) per image, in a run and again from its checkpoint.

    evaluate(vae, test_x, K, seed)   -> (ELBO terms, LogPxEstimate): the evaluation phase of a run
    evaluate_run(run_dir, K)         -> evaluation.json and figures/log_px_vs_k.png, no retraining
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Dict, Mapping, Optional

import torch
from tqdm.auto import tqdm

from . import distributed, figures
from .checkpoint import atomic_write_json
from .checks import positive_int
from .build import build_model
from .checkpoint import load_checkpoint
from .config import DataConfig, check_device
from .data import check_and_binarize, load_splits
from .distributed import TEST, Ranks, derive_seed
from .marginal import LogPxEstimate, estimate_log_px
from .metrics import mean_se
from .rundir import read_status


def evaluate(vae, test_x: torch.Tensor, num_samples: Optional[int], seed: int, progress: bool = True,
             ranks: Optional[Ranks] = None):
    """The evaluation phase: per image, the test ELBO and its two terms (one z ~ q(z|x)) and, unless
    ``num_samples`` is None, log p(x) by importance sampling with K = ``num_samples``, with log p̂_K'
    for K' = 1, 10, 100, 1000, 5000 <= K from prefixes of the same particles.

    The images go in blocks of :data:`pyro_vae.distributed.POINTS_PER_SEED`, in split order, the
    block starting at image i drawn under ``torch.manual_seed(derive_seed(seed, TEST, i))``; the
    blocks are shared among the ranks of a process group (``ranks``; by default the group this
    process is in, if any) and gathered, so each image's estimate is the same whatever the number
    of ranks. Returns (ELBO terms dict, ``LogPxEstimate`` or None), on every rank."""
    ranks = distributed.current() if ranks is None else ranks
    test_x = test_x.to(next(vae.parameters()).device)
    bar = tqdm(total=len(test_x), desc="evaluate", unit="image", disable=not progress or not ranks.is_main)

    def block(x):
        log_lik, kl = vae.elbo_terms(x)
        estimate = None
        if num_samples is not None:
            prefixes = [k for k in (1, 10, 100, 1000, 5000) if k <= num_samples] + [num_samples]
            with vae.without_param_store():  # the module owns its weights; registering them costs ~1 ms a pass
                estimate = estimate_log_px(vae.model, vae.guide, x, num_samples=num_samples, prefix_sizes=prefixes,
                                           progress=False, warn=False)
        bar.update(len(x) * ranks.world_size)
        return log_lik, kl, estimate

    log_lik, kl, estimates = zip(*ranks.map_blocks(block, test_x, derive_seed(seed, TEST)))
    bar.close()
    log_lik, kl = torch.cat(log_lik), torch.cat(kl)
    elbo = {"elbo": (log_lik - kl).mean().item(), "log_lik": log_lik.mean().item(), "kl": kl.mean().item()}
    estimate = None if num_samples is None else concat_estimates(estimates)
    if estimate is not None and ranks.is_main and (estimate.pareto_k > 0.7).any():
        bad = estimate.pareto_k > 0.7
        warnings.warn(f"pareto_k > 0.7 for {int(bad.sum())} of {len(bad)} test images (max {estimate.pareto_k.max():.2f}): "
                      f"their importance weights are heavy-tailed and their log p(x) unreliable", stacklevel=2)
    return elbo, estimate


def concat_estimates(estimates) -> LogPxEstimate:
    """One :class:`pyro_vae.weights.LogPxEstimate` of the points of several, in order."""
    first, out = estimates[0], {}
    for f in dataclasses.fields(first):
        values = [getattr(e, f.name) for e in estimates]
        if torch.is_tensor(values[0]):
            out[f.name] = torch.cat(values)
        elif isinstance(values[0], dict):
            out[f.name] = {k: torch.cat([v[k] for v in values]) for k in values[0]}
        else:
            out[f.name] = values[0]
    return LogPxEstimate(**out)


def _finite_mean(values: torch.Tensor) -> Optional[float]:
    finite = values[torch.isfinite(values)]
    return finite.mean().item() if len(finite) else None


def load_run(run_dir: str, device: Optional[str] = None, data: Optional[Mapping[str, Any]] = None):
    """Rebuild the model of a trained run from its checkpoint: returns (vae, cfg, splits), the model
    in eval mode with the best epoch's parameters, the run's config and its data splits.

    :param device: where the model goes (default: the run's ``device``). Under torchrun, the
        process joins its group (:func:`pyro_vae.distributed.setup`), so :func:`evaluate` shards.
    :param data: ``data`` keys to change, which leave the model as it is: ``path`` (a dataset moved
        since training), ``name`` (another dataset of the same image size), ``val_fraction``.
    :raises ValueError: one line, for a damaged checkpoint or data that do not fit the model.
    """
    path = os.path.join(run_dir, "checkpoint.pt")
    status = read_status(run_dir)
    if status and not os.path.isfile(path):
        raise FileNotFoundError(f"run {run_dir} has no checkpoint: it is {status['status']} "
                                f"({status.get('message') or 'before the end of its first epoch'})")
    state, meta = load_checkpoint(path)
    cfg = meta["config"]
    if "val_fraction" in cfg.get("train", {}):  # written before val_fraction moved from train: to data:
        cfg = {**cfg, "train": dict(cfg["train"]), "data": dict(cfg["data"])}
        cfg["data"]["val_fraction"] = cfg["train"].pop("val_fraction")
    if data:
        unknown = sorted(set(data) - {"name", "path", "val_fraction"})
        if unknown:
            raise ValueError(f"data.{unknown[0]} cannot change at evaluation; data.name, data.path and "
                             f"data.val_fraction can")
        cfg = {**cfg, "data": dataclasses.asdict(DataConfig(**{**cfg["data"], **data}))}
    if status and status["status"] != "finished":
        warnings.warn(f"run {run_dir} is {status['status']} ({status.get('message') or 'see its status.json'}): "
                      f"evaluating its best epoch so far, {meta['epoch']}", stacklevel=2)
    _, device = distributed.setup(check_device(cfg.get("device", "cpu") if device is None else device))
    splits = load_splits(cfg)
    vae = build_model(cfg, splits.data_dim).to(device)
    try:
        vae.load_state_dict(state)
    except RuntimeError:
        raise ValueError(f"the model of {run_dir} does not take {splits.name} images ({splits.data_dim} values "
                         f"each): its checkpoint's parameters have other shapes") from None
    vae.eval()
    return vae, cfg, splits


def evaluate_run(run_dir: str, num_samples: int = 5000, progress: bool = True,
                 data: Optional[Mapping[str, Any]] = None, device: Optional[str] = None) -> Dict[str, Any]:
    """Estimate the test log p(x) of a trained run with ``num_samples`` importance samples (the
    evaluation phase of :func:`train_run`, from the checkpoint); writes evaluation.json and
    figures/log_px_vs_k.png and returns the evaluation. ``data`` and ``device``: see :func:`load_run`."""
    num_samples = positive_int(num_samples, "num_samples")
    vae, cfg, splits = load_run(run_dir, device, data)
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
