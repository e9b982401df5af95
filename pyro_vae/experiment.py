"""One training run, from a plain config mapping to files in a run directory.

    train_run(cfg, run_dir)   -> config.yaml, status.json, metrics.jsonl, tensorboard/, checkpoint.pt,
                                 state.pt, figures/, summary.json in run_dir (or run_dir-1, ... if taken)
    resume_run(run_dir)       -> the same run continued from its state.pt, as if it had never stopped

A run flows one way: config (checked whole, :func:`pyro_vae.config.check_config`) -> data (loaded,
checked, evaluation sets binarized) -> model -> training -> evaluation -> figures and summary.
Everything up to the model is checked and built before the run directory is claimed
(:func:`pyro_vae.rundir.claim`), so a mistake leaves no directory behind. The random numbers of
each phase derive from the run's ``seed``, so each phase is reproducible on its own:

- initialization: ``torch.manual_seed(seed)``, then the networks' initial weights;
- training: ``fit(seed=seed)`` (:mod:`pyro_vae.train`): the minibatch order, each rank's draws,
  each epoch's evaluation;
- evaluation: :func:`pyro_vae.evaluation.evaluate` with ``seed``: per block of test images, the
  test ELBO's z draws and after them the importance samples of log p(x). ``evaluate_run`` repeats
  this phase from the checkpoint, so with the same K it gives the summary's numbers;
- figures: ``torch.manual_seed(seed)``, then the prior samples drawn.

After every epoch the run writes state.pt (:class:`pyro_vae.resume.TrainState`), and status.json
says whether it is running, finished, failed (with the error) or interrupted (Ctrl-C, SIGTERM).
Under torchrun, every rank trains and evaluates its shard and rank 0 alone writes.

Hydra lives in ``cli``; this module takes dictionaries, so it is usable from Python and tests.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence

import torch

from . import distributed, figures, rundir
from .build import build_model, build_objective
from .checkpoint import atomic_write_json, save_checkpoint
from .config import check_config
from .data import RunData, check_and_binarize, load_splits
from .evaluation import evaluate
from .metrics import MetricsLog, mean_se
from .resume import TrainState, config_difference
from .train import TrainConfig, TrainingDiverged, fit

RESUMABLE_CHANGES = ("progress", "data.path")  # what a resumed run may change: not what it computes


class RunInterrupted(Exception):
    """The run was stopped by Ctrl-C or a signal; the message says where it stands and how to resume."""


class RunFinished(Exception):
    """``resume_run`` of a run that has finished: nothing to do."""


@dataclass
class Prepared:
    """A run's checked config and everything built from it, before any file is written."""

    cfg: Dict[str, Any]
    train_cfg: TrainConfig
    ranks: distributed.Ranks
    vae: Any
    objective: Any
    data: RunData


def prepare(cfg: Mapping[str, Any]) -> Prepared:
    """Check ``cfg`` whole, join the ranks (under torchrun), load and check the data, build the model
    (seeded: initialization) and the objective; raises a one-line ``ValueError`` for any mistake."""
    cfg = check_config(cfg)
    train_cfg = TrainConfig(**cfg["train"])
    ranks, device = distributed.setup(cfg["device"])
    splits = load_splits(cfg)
    torch.manual_seed(cfg["seed"])  # initialization
    vae = build_model(cfg, splits.data_dim).to(device)
    objective = build_objective(cfg)
    data = check_and_binarize(splits, vae.likelihood, device)
    if ranks.world_size > min(train_cfg.batch_size, len(data.train_x)):
        raise ValueError(f"{ranks.world_size} ranks but train.batch_size={train_cfg.batch_size} and "
                         f"{len(data.train_x)} training points: each rank needs a point of every batch; use fewer "
                         f"processes (torchrun --nproc_per_node) or a larger train.batch_size")
    return Prepared(cfg, train_cfg, ranks, vae, objective, data)


def make_figures(vae, data: RunData, history, run_dir: str) -> None:
    """figures/: ELBO curves, test images and their reconstructions, prior samples, latent space."""
    out, splits = os.path.join(run_dir, "figures"), data.splits
    figures.elbo_curves(history, os.path.join(out, "elbo_curves.png"))
    picks = torch.cat([torch.nonzero(splits.test_y == c)[:1, 0] for c in splits.test_y.unique()[:10]])
    originals = data.test_x[picks.to(data.test_x.device)]
    figures.image_grid([originals.cpu().numpy(), vae.reconstruct(originals).cpu().numpy()], splits.image_shape,
                       os.path.join(out, "reconstructions.png"), ["test x", "E[x|z=mean q]"],
                       "test images and their reconstructions")
    samples = vae.sample(40).cpu().numpy()
    figures.image_grid([samples[i * 10:(i + 1) * 10] for i in range(4)], splits.image_shape,
                       os.path.join(out, "prior_samples.png"), title="E[x|z], z ~ p(z)")
    figures.latent_space(vae.encode(data.test_x).cpu().numpy(), splits.test_y.numpy(),
                         os.path.join(out, "latent_space.png"))
    vae.extra_figures(data, out)  # a model's own figures (e.g. the GMVAE's samples per cluster)


def train_run(cfg: Mapping[str, Any], run_dir: str, progress: bool = True,
              overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Train the model that ``cfg`` describes in a new run directory; return the summary.

    The directory is ``run_dir``, or ``run_dir-1``, ``run_dir-2``, ... if ``run_dir`` holds a run
    already; the summary's ``run_dir`` says which (summary.json itself holds no path).
    checkpoint.pt holds the best epoch's parameters with ``config``, ``epoch`` and that epoch's
    ``metrics`` record; it is rewritten each time the selection score improves.

    :param overrides: the command line's overrides (``prior=vamp``, ...), kept in overrides.yaml."""
    run = prepare(cfg)
    run.vae.initialize(run.data)  # a model's own start (the GMVAE's pretraining), continuing the initialization phase
    claimed = run.ranks.broadcast(rundir.claim(run_dir) if run.ranks.is_main else None)
    if run.ranks.is_main:
        rundir.write_config(claimed, run.cfg, overrides)
    return _train(run, claimed, progress, None, {})


def resume_run(run_dir: str, progress: Optional[bool] = None, changes: Optional[Mapping[str, Any]] = None
               ) -> Dict[str, Any]:
    """Continue the run in ``run_dir`` from its state.pt with its own config; the summary and
    metrics are those the run would have had uninterrupted (same machine).

    :param progress: show progress bars (default: the run's ``progress``).
    :param changes: {dotted key: value} of :data:`RESUMABLE_CHANGES` to apply (e.g. a data.path
        moved); any other key is a one-line ``ValueError``.
    :raises RunFinished: when the run has finished (nothing is changed).
    """
    run_dir = os.path.abspath(run_dir)
    cfg = rundir.read_config(run_dir)
    status = rundir.read_status(run_dir) or {}
    if status.get("status") == "finished":
        raise RunFinished(f"run {run_dir} has finished (best epoch {status.get('best_epoch')}); nothing to resume")
    if status.get("status") == "running" and status.get("host") == socket.gethostname():
        raise ValueError(f"run {run_dir} is running (process {status.get('pid')}); stop it before resuming it")
    path = os.path.join(run_dir, "state.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"run {run_dir} has no state.pt, the state written at the end of each epoch: it "
                                f"stopped before its first epoch ended (or predates resuming); train it anew")
    state, meta = TrainState.load(path)
    diff = config_difference(meta["config"], cfg, ignore=RESUMABLE_CHANGES)
    if diff:
        raise ValueError(f"{path} belongs to another config than {run_dir}/config.yaml ({diff}); refusing to resume")
    for key, value in (changes or {}).items():
        if key not in RESUMABLE_CHANGES:
            shown = value.get("name", value) if isinstance(value, Mapping) else value  # a group: its choice
            raise ValueError(f"{key}={shown!r} would change what run {run_dir} computes; a resumed run keeps its "
                             f"config (only {', '.join(RESUMABLE_CHANGES)} may change): start a new run instead")
        section, _, name = key.rpartition(".")
        (cfg[section] if section else cfg)[name] = value
    run = prepare(cfg)
    state.check(run.vae, run.ranks)
    if run.ranks.is_main:
        rundir.remove_temporaries(run_dir)
        if changes:  # the run's config follows it: the next resume compares against this one
            rundir.write_config(run_dir, run.cfg, rundir.read_overrides(run_dir))
    return _train(run, run_dir, run.cfg["progress"] if progress is None else progress, state, meta)


def _train(run: Prepared, run_dir: str, progress: bool, state: Optional[TrainState], meta: Dict) -> Dict[str, Any]:
    ranks, main, seed = run.ranks, run.ranks.is_main, run.cfg["seed"]
    checkpoint, state_path = os.path.join(run_dir, "checkpoint.pt"), os.path.join(run_dir, "state.pt")
    log = MetricsLog(run_dir, records=state.result.history if state else (), walltimes=meta.get("walltimes")) \
        if main else None
    spent, start = meta.get("train_seconds", 0.0), time.perf_counter()
    where = {"epochs": state.result.epochs_run if state else 0, "best": state.result.best_epoch if state else 0}

    def save_best(result):
        save_checkpoint(checkpoint, result.best_state, config=run.cfg, epoch=result.best_epoch,
                        metrics=result.history[-1])

    def save_state(st: TrainState):
        where.update(epochs=st.result.epochs_run, best=st.result.best_epoch)
        if main:
            st.save(state_path, config=run.cfg, walltimes=log.walltimes,
                    train_seconds=spent + time.perf_counter() - start)
            rundir.write_status(run_dir, "running", epoch=st.result.epochs_run, best_epoch=st.result.best_epoch)

    def mark(status, message):
        if main:
            rundir.write_status(run_dir, status, message=message, epoch=where["epochs"], best_epoch=where["best"])

    if main:
        rundir.write_status(run_dir, "running", world_size=ranks.world_size, epoch=where["epochs"],
                            best_epoch=where["best"])
    try:
        result = fit(run.vae, run.data, run.objective, run.train_cfg, log=log.log if main else None,
                     on_best=save_best if main else None, progress=progress and main, seed=seed, resume=state,
                     on_epoch_end=save_state, ranks=ranks)
        summary = _evaluate(run, result, run_dir, spent + time.perf_counter() - start, progress)
    except (KeyboardInterrupt, distributed.RankLost) as e:
        kept = f"epochs 1-{where['epochs']} (best epoch {where['best']} in checkpoint.pt)" if where["epochs"] else \
            "no finished epoch"
        how = f"stopped by {str(e) or 'Ctrl-C'}" if isinstance(e, KeyboardInterrupt) else str(e)
        mark("interrupted", f"{how}; {run_dir} keeps {kept}")
        launch = "pyro-vae" if ranks.world_size == 1 else f"torchrun --nproc_per_node={ranks.world_size} $(which pyro-vae)"
        stopped = RunInterrupted if isinstance(e, KeyboardInterrupt) else distributed.RankLost
        raise stopped(f"{how}; {run_dir} keeps {kept}; continue with `{launch} train resume={run_dir}`") from None
    except TrainingDiverged as e:
        kept = f"; {checkpoint} (epoch {e.result.best_epoch}) is intact" if e.result and e.result.best_epoch else ""
        mark("failed", f"{e}{kept}")
        raise TrainingDiverged(f"{e}{kept}", e.result) from None
    except BaseException as e:
        mark("failed", f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
        raise
    finally:
        if log is not None:
            log.close()
    if main:
        rundir.write_status(run_dir, "finished", epoch=result.epochs_run, best_epoch=result.best_epoch)
    return {**summary, "run_dir": run_dir}


def _evaluate(run: Prepared, result, run_dir: str, train_seconds: float, progress: bool) -> Dict[str, Any]:
    """The evaluation phase, the figures and summary.json."""
    vae, data, seed, num_samples = run.vae, run.data, run.cfg["seed"], run.cfg["eval"]["num_samples"]
    vae.eval()
    elbo, estimate = evaluate(vae, data.test_x, num_samples, seed, progress and run.ranks.is_main, run.ranks)
    summary = {
        "dataset": data.splits.name, "num_test": len(data.test_x), "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run, "stopped_early": result.stopped_early,
        "selection_metric": result.selection_metric, f"best_{result.selection_metric}": result.best_score,
        "train_seconds": round(train_seconds, 2), "world_size": run.ranks.world_size, "device": run.cfg["device"],
        "test_elbo": elbo["elbo"], "test_log_lik": elbo["log_lik"], "test_kl": elbo["kl"],
    }
    if estimate is not None:
        summary["test_log_px"] = {**mean_se(estimate.log_px), "num_samples": num_samples}
        summary["test_log_px_by_k"] = {str(k): mean_se(v) for k, v in estimate.log_px_by_k.items()}
        summary["fraction_pareto_k_above_0.7"] = estimate.fraction_pareto_k_above(0.7)
    summary.update(vae.extra_summary(data))  # a model's own numbers (e.g. the GMVAE's cluster accuracy)
    if run.ranks.is_main:
        torch.manual_seed(seed)  # figures
        make_figures(vae, data, result.history, run_dir)
        atomic_write_json(os.path.join(run_dir, "summary.json"), summary)
    run.ranks.barrier()
    return summary
