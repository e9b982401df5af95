"""``pyro-vae report DIR``: every run under DIR in one table, mean ± standard error over seeds, and figures.

A run is a directory with a ``config.yaml`` (what ``pyro-vae train`` writes). Runs are grouped by
the config keys whose values differ between them, the seed excepted: each group is one variant,
its seeds the repeats. Per variant the table gives the mean ± standard error (sd / √n over seeds)
of the test ELBO, the test log p(x) (importance sampling in the run's summary, and as
``eval_log_px_<method>`` each estimate in its ``evaluation.json``: ``is`` from ``pyro-vae
evaluate``, ``ais`` or any other ``method`` it names), the fraction of test points with Pareto
k̂ > 0.7, the best epoch and the training time, and how many runs did not finish. The runs of a
study (:mod:`pyro_vae.study`) are rows by their variant's name. It is printed as Markdown and written as
``report.md`` and ``report.csv`` (pandas); ``report_curves.png`` draws each variant's validation
score per epoch with a band of ± one standard error over seeds, and ``report_log_px_vs_k.png``
the test log p(x) against K where runs were evaluated at several K.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Sequence

import pandas as pd

from .checkpoint import atomic_write_text
from .figures import new_figure, save_figure
from .metrics import mean_se
from .rundir import read_overrides

NOT_VARIANTS = ("seed", "progress", "data.path")  # repeats, or settings that do not change a run's meaning


def flatten(cfg, prefix: str = "") -> Dict[str, object]:
    """{"train.lr": 0.001, "model.hidden": "[200, 200]", ...}: dotted keys, lists as strings."""
    out = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        out.update(flatten(value, name + ".") if isinstance(value, dict) else
                   {name: json.dumps(value) if isinstance(value, list) else value})
    return out


def _read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def find_runs(root: str) -> List[dict]:
    """Every run directory below ``root``: its flat config, summary, evaluation, status and history."""
    import yaml  # PyYAML comes with hydra-core

    runs = []
    for directory, _, files in sorted(os.walk(root)):
        if "config.yaml" not in files or os.path.basename(directory) == ".hydra":
            continue
        with open(os.path.join(directory, "config.yaml")) as f:
            config = flatten(yaml.safe_load(f) or {})
        summary = _read_json(os.path.join(directory, "summary.json"))
        status = (_read_json(os.path.join(directory, "status.json")) or {}).get("status")
        history = []
        if os.path.isfile(os.path.join(directory, "metrics.jsonl")):
            with open(os.path.join(directory, "metrics.jsonl")) as f:
                history = [json.loads(line) for line in f if line.strip()]
        variants = [o.split("=", 1)[1] for o in read_overrides(directory) if o.startswith("study.variant=")]
        if variants:  # a study's run (pyro_vae.study): its variant's name, as a key of its config
            config["study.variant"] = variants[-1]
        runs.append({"dir": directory, "config": config, "summary": summary, "history": history,
                     "evaluation": _read_json(os.path.join(directory, "evaluation.json")),
                     "status": status or ("finished" if summary is not None else "unfinished")})
    return runs


def variant_keys(runs: Sequence[dict], by: Sequence[str] | None = None) -> List[str]:
    """The config keys that tell variants apart: those that differ between runs (``by``, if given;
    then any other differing key is a one-line ``ValueError``, rather than averaged away).

    Runs of a study (each with a ``study.variant``) are told apart by their variant's name first,
    and then by the keys that differ between runs of the same variant."""
    keys = sorted({k for r in runs for k in r["config"]} - set(NOT_VARIANTS))

    def differing(group):
        return [k for k in keys if len({json.dumps(r["config"].get(k), sort_keys=True) for r in group}) > 1]

    named = ["study.variant"] if all("study.variant" in r["config"] for r in runs) else []
    groups: Dict[str, List[dict]] = {}
    for r in runs:
        groups.setdefault(r["config"].get("study.variant") if named else "", []).append(r)
    extra = sorted({k for group in groups.values() for k in differing(group)})
    if by is None:
        return named + extra
    unknown = [k for k in by if k not in keys]
    if unknown:
        raise ValueError(f"--by {unknown[0]}: no run has that config key; keys that differ: "
                         f"{', '.join(named + extra) or 'none'}")
    hidden = [k for k in extra if k not in by]
    if hidden:
        within = " between runs of the same study variant" if named else ""
        raise ValueError(f"the runs also differ in {', '.join(hidden)}{within}, which --by does not name; add them "
                         f"to --by, or report a directory whose runs differ only in {', '.join(by)}")
    return named + [k for k in by if k not in named]


def _mean_se(values) -> tuple:
    """(mean, SE) of the values given (None and NaN left out: a run that lacks the number)."""
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan
    ms = mean_se(values)
    return ms["mean"], ms["se"]


def _metrics(run) -> Dict[str, float]:
    """The numbers a run contributes to its variant's row."""
    s, e = run["summary"] or {}, run["evaluation"] or {}
    out = {"test_elbo": s.get("test_elbo"), "test_log_px": (s.get("test_log_px") or {}).get("mean"),
           "best_epoch": s.get("best_epoch"), "train_seconds": s.get("train_seconds"),
           "frac_pareto_k_above_0.7": e.get("fraction_pareto_k_above_0.7", s.get("fraction_pareto_k_above_0.7"))}
    if isinstance(e.get("log_px"), dict):  # `pyro-vae evaluate`: importance sampling unless it names its method
        out[f"eval_log_px_{e.get('method', 'is')}"] = e["log_px"].get("mean")
    for method, result in e.items():  # e.g. {"ais": {"log_px": {"mean": ...}}} beside the IS numbers
        if isinstance(result, dict) and isinstance(result.get("log_px"), dict):
            out[f"eval_log_px_{result.get('method', method)}"] = result["log_px"].get("mean")
    return out


def table(runs: Sequence[dict], keys: Sequence[str]) -> pd.DataFrame:
    """One row per variant: its keys' values, the number of finished seeds and of the others, and
    the mean and standard error over seeds of each metric."""
    groups: Dict[tuple, List[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(json.dumps(run["config"].get(k), sort_keys=True) for k in keys), []).append(run)
    rows = []
    for values, group in sorted(groups.items()):
        done = [r for r in group if r["status"] == "finished"]
        row = {k: json.loads(v) for k, v in zip(keys, values)}
        row.update({"seeds": len(done), "not_finished": len(group) - len(done)})
        metrics = [_metrics(r) for r in done]
        for name in sorted({m for ms in metrics for m in ms}):
            row[f"{name}_mean"], row[f"{name}_se"] = _mean_se([ms.get(name) for ms in metrics])
        rows.append(row)
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame, keys: Sequence[str]) -> str:
    """The table with each metric as "mean ± se" (3 significant decimals), for reading."""
    shown = df[list(keys) + ["seeds", "not_finished"]].copy()
    for name in [c[:-5] for c in df.columns if c.endswith("_mean")]:
        mean, se = df[f"{name}_mean"], df[f"{name}_se"]
        shown[name] = [("" if math.isnan(m) else f"{m:.2f}" + ("" if math.isnan(s) else f" ± {s:.2f}"))
                       for m, s in zip(mean, se)]
    return shown.to_markdown(index=False)


def _label(run, keys) -> str:
    return ", ".join(f"{k}={run['config'].get(k)}" for k in keys) or "all runs"


def _style(i: int) -> Dict[str, str]:
    """The i-th variant's colour and line style: ten colours, then the next line style."""
    return {"color": f"C{i % 10}", "linestyle": ("-", "--", ":", "-.")[i // 10 % 4]}


def _legend(ax) -> None:
    """The legend beside the axes, where it hides no curve (save_figure's tight box keeps it)."""
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def curves_figure(runs, keys, path) -> bool:
    """Each variant's validation selection score per epoch: the mean over seeds, ± one SE band."""
    fig = new_figure(figsize=(7, 4.2))
    ax = fig.subplots()
    drawn = False
    for i, label in enumerate(sorted({_label(r, keys) for r in runs})):
        group = [r for r in runs if _label(r, keys) == label and r["history"]]
        if not group:
            continue
        histories = [r["history"] for r in group]
        metric = (group[0]["summary"] or {}).get("selection_metric") or "val_elbo"
        epochs = sorted({rec["epoch"] for h in histories for rec in h})
        stats = [_mean_se([next((rec.get(metric) for rec in h if rec["epoch"] == e), None) for h in histories])
                 for e in epochs]
        mean = [m for m, _ in stats]
        se = [0.0 if math.isnan(s) else s for _, s in stats]
        line, = ax.plot(epochs, mean, label=f"{label} ({metric})", **_style(i))
        ax.fill_between(epochs, [m - s for m, s in zip(mean, se)], [m + s for m, s in zip(mean, se)],
                        color=line.get_color(), alpha=0.2)
        drawn = True
    ax.set(xlabel="epoch", ylabel="validation selection score (nats per image)",
           title="training curves: mean over seeds, ± 1 standard error")
    if drawn:
        _legend(ax)
        save_figure(fig, path)
    return drawn


def _log_px_by_k(run):
    """{K: {"mean", "se"}}: from evaluation.json (`pyro-vae evaluate`), else the run's own summary."""
    return (run["evaluation"] or {}).get("log_px_by_k") or (run["summary"] or {}).get("test_log_px_by_k")


def log_px_vs_k_figure(runs, keys, path) -> bool:
    """Test log p(x) against K per variant (:func:`_log_px_by_k`; mean over seeds ± SE over seeds)."""
    fig = new_figure(figsize=(6, 4))
    ax = fig.subplots()
    drawn = False
    for i, label in enumerate(sorted({_label(r, keys) for r in runs})):
        by_k = [_log_px_by_k(r) for r in runs if _label(r, keys) == label and _log_px_by_k(r)]
        if not by_k:
            continue
        ks = sorted({int(k) for b in by_k for k in b})
        stats = [_mean_se([b[str(k)]["mean"] for b in by_k if str(k) in b]) for k in ks]
        ax.errorbar(ks, [m for m, _ in stats], yerr=[0.0 if math.isnan(s) else s for _, s in stats], marker="o",
                    capsize=3, label=label, **_style(i))
        drawn = True
    ax.set_xscale("log")
    ax.set(xlabel="number of samples K", ylabel="mean test log p̂_K(x) (nats)",
           title="log p(x) against K: mean over seeds, ± 1 SE over seeds")
    if drawn:
        _legend(ax)
        save_figure(fig, path)
    return drawn


def report(root: str, by: Sequence[str] | None = None, out: str | None = None):
    """Gather the runs under ``root``, write report.md, report.csv and the figures into ``out``
    (default ``root``); returns (the table, the keys that tell its rows apart)."""
    if not os.path.isdir(root):
        raise ValueError(f"{root} is not a directory; pass a directory of pyro-vae runs")
    runs = find_runs(root)
    if not runs:
        raise ValueError(f"no runs under {root} (a run is a directory with a config.yaml); train some first "
                         f"with `pyro-vae train hydra.run.dir={root}/<name>` or a -m sweep")
    keys = variant_keys(runs, by)
    df = table(runs, keys)
    out = out or root
    atomic_write_text(os.path.join(out, "report.md"), markdown(df, keys) + "\n")
    atomic_write_text(os.path.join(out, "report.csv"), df.to_csv(index=False))
    curves_figure(runs, keys, os.path.join(out, "report_curves.png"))
    log_px_vs_k_figure(runs, keys, os.path.join(out, "report_log_px_vs_k.png"))
    return df, keys
