"""Evaluating a model: the test ELBO and log p(x) per image, in a run and again from its checkpoint.

    evaluate(vae, test_x, K, seed)   -> (ELBO terms, LogPxEstimate): the evaluation phase of a run
    evaluate_run(run_dir, K)         -> evaluation.json and figures/log_px_vs_k.png, no retraining
    evaluate_ais_run(run_dir, "ais" | "bdmc", T, M)
                                     -> an AIS or BDMC entry of evaluation.json, figures/log_px_vs_steps.png
    gaps_run(run_dir, N)             -> gaps.json and figures/gaps.png: the inference gap (pyro_vae.gaps)

evaluation.json keeps the importance-sampling figures at its top level and a list of entries under
"ais" and "bdmc", one per setting (T, M, leapfrog steps, points); each command rewrites only its
own part, atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from typing import Any, Dict, Mapping, Optional

import torch
from tqdm.auto import tqdm

from . import distributed, figures
from .checkpoint import atomic_write_json
from .bdmc import bdmc
from .checks import positive_int
from .build import build_model
from .checkpoint import load_checkpoint
from .config import DataConfig, check_device
from .data import check_and_binarize, load_splits
from .distributed import TEST, Ranks, derive_seed
from .gaps import inference_gaps
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
    previous = read_evaluation(run_dir)
    atomic_write_json(os.path.join(run_dir, "evaluation.json"),
                      {**result, **{k: previous[k] for k in ("ais", "bdmc") if k in previous}})
    return result


def read_evaluation(run_dir: str) -> dict:
    """The run's evaluation.json ({} when there is none yet)."""
    return _read_json(os.path.join(run_dir, "evaluation.json"))


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is damaged ({e}); delete it and evaluate again") from None


def evaluate_ais_run(run_dir: str, method: str = "ais", num_steps: int = 1000, num_chains: int = 16,
                     num_points: Optional[int] = None, num_samples: int = 5000, num_leapfrog: int = 10,
                     start: str = "guide", progress: bool = True, data: Optional[Mapping[str, Any]] = None,
                     device: Optional[str] = None) -> Dict[str, Any]:
    """AIS of the test log p(x), or BDMC bounds on simulated data, for a trained run: one entry,
    added to (or replacing the same setting's in) evaluation.json's ``method`` list, and the figure
    figures/log_px_vs_steps.png of every entry so far (:func:`pyro_vae.figures.plot_log_px_vs_steps`).

    ``"ais"``: :func:`pyro_vae.estimate_log_px` with ``method="ais"`` on the first ``num_points``
    test images (default all), beside importance sampling with ``num_samples`` draws on the same
    images (its means at K = 10, 100, … are the figure's lines). ``"bdmc"``: :func:`pyro_vae.bdmc`
    on ``num_points`` images simulated from the model (default 100). ``num_steps`` T ≥ 1,
    ``num_chains`` M, ``num_leapfrog`` and ``start`` (``"guide"`` or ``"prior"``: a flow guide
    inverts itself at every leapfrog step) as there; ``data``, ``device``: see :func:`load_run`.
    """
    if method not in ("ais", "bdmc"):
        raise ValueError(f"method must be 'is', 'ais' or 'bdmc', got {method!r}")
    T, M = positive_int(num_steps, "ais.num_steps"), positive_int(num_chains, "ais.num_chains")
    L, K = positive_int(num_leapfrog, "ais.num_leapfrog"), positive_int(num_samples, "num_samples")
    vae, cfg, splits = load_run(run_dir, device, data)
    test_x = check_and_binarize(splits, vae.likelihood).test_x
    n = positive_int(num_points, "num_points") if num_points is not None else len(test_x) if method == "ais" else 100
    x, seed, t0 = test_x[:n], int(cfg["seed"]), time.perf_counter()
    entry = {"num_steps": T, "num_chains": M, "num_leapfrog": L, "num_points": len(x), "start": start}
    with vae.without_param_store():
        if method == "ais":
            r = estimate_log_px(vae.model, vae.guide, x, M, method="ais", num_steps=T, num_leapfrog=L, start=start,
                                seed=seed, progress=progress, warn=False)
            prefixes = [k for k in (1, 10, 100, 1000, 5000) if k <= K] + [K]
            base = estimate_log_px(vae.model, vae.guide, x, K, prefix_sizes=prefixes, seed=seed, progress=False,
                                   warn=False)
            entry.update(log_px=mean_se(r.log_px), accept_rate=r.accept_rate.mean().item(),
                         step_size_median=r.step_size.median().item(), is_num_samples=K,
                         is_log_px_by_k={str(k): mean_se(v) for k, v in base.log_px_by_k.items()},
                         ais_minus_is=mean_se(r.log_px - base.log_px))
        else:
            b = bdmc(vae.model, vae.guide, x, M, T, num_leapfrog=L, start=start, seed=seed, progress=progress)
            entry.update(lower=mean_se(b.lower), upper=mean_se(b.upper), gap=mean_se(b.gap))
    entry["seconds"] = time.perf_counter() - t0
    evaluation = read_evaluation(run_dir)
    same = lambda e: all(e.get(k, "guide") == entry[k] for k in ("num_steps", "num_chains", "num_leapfrog",  # noqa: E731
                                                                  "num_points", "start"))
    evaluation[method] = sorted([e for e in evaluation.get(method, []) if not same(e)] + [entry],
                                key=lambda e: (e["num_points"], e["num_chains"], e["num_steps"]))
    atomic_write_json(os.path.join(run_dir, "evaluation.json"), evaluation)
    fig = figures.plot_log_px_vs_steps(evaluation, title=os.path.basename(os.path.abspath(run_dir)))
    figures.save_figure(fig, os.path.join(run_dir, "figures", "log_px_vs_steps.png"))
    return entry


def gaps_run(run_dir: str, num_points: int = 100, num_steps: int = 1000, num_chains: int = 16,
             flexible: bool = False, progress: bool = True, data: Optional[Mapping[str, Any]] = None,
             device: Optional[str] = None, **options) -> Dict[str, Any]:
    """The inference gap of a trained VAE on its first ``num_points`` test images
    (:func:`pyro_vae.gaps.inference_gaps`, AIS with ``num_steps`` and ``num_chains``; its other
    ``options`` as keywords): writes gaps.json (the summary, and the per-image values) and
    figures/gaps.png, and returns the summary. The AIS log p(x) of an earlier gaps.json with the same
    AIS settings and images is reused (it does not depend on the guide optimization)."""
    N, T = positive_int(num_points, "num_points"), positive_int(num_steps, "ais.num_steps")
    M = positive_int(num_chains, "ais.num_chains")
    vae, cfg, splits = load_run(run_dir, device, data)
    from .guides import Guide

    if getattr(type(getattr(vae, "encoder", None)), "distribution", Guide.distribution) is Guide.distribution:
        raise ValueError(f"the model of {run_dir} has no guide whose distribution can be built from parameters "
                         f"(Guide.distribution, pyro_vae.guides); the inference gap is measured for VAEs")
    x = check_and_binarize(splits, vae.likelihood).test_x[:N]
    vae.requires_grad_(False)  # only the per-image parameters train
    start = time.perf_counter()
    ais = {"num_steps": T, "num_chains": M, "num_points": len(x), "start": options.get("start", "guide")}
    previous = _read_json(os.path.join(run_dir, "gaps.json"))
    if all(previous.get(k, "guide") == v for k, v in ais.items()) and "log_px" in previous.get("per_image", {}):
        nan = [float("nan")] * len(x)  # the AIS of an earlier gaps run with these settings
        options["log_px"] = tuple(torch.tensor(previous["per_image"].get(k, nan), dtype=torch.float64)
                                  for k in ("log_px", "log_px_se"))
    with vae.without_param_store():
        r = inference_gaps(vae.model, vae.encoder, x, num_chains=M, num_steps=T, flexible=flexible,
                           seed=int(cfg["seed"]), progress=progress, **options)
    summary = {"run_dir": os.path.abspath(run_dir), **ais, "flexible": flexible, "log_px_reused": "log_px" in options,
               **{k: v for k, v in options.items() if k != "log_px"}, **r.summary(), "seconds": time.perf_counter() - start}
    per_image = {k: getattr(r, k).tolist() for k in ("log_px", "log_px_se", "elbo_amortized", "elbo_optimized",
                                                     "elbo_flexible") if getattr(r, k) is not None}
    atomic_write_json(os.path.join(run_dir, "gaps.json"), {**summary, "per_image": per_image})
    fig = figures.plot_gaps(r, title=f"inference gap ({os.path.basename(os.path.abspath(run_dir))}, {len(x)} test images)")
    figures.save_figure(fig, os.path.join(run_dir, "figures", "gaps.png"))
    return summary
