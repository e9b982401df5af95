"""Train and evaluate the variants of config.yaml; write results.csv and results.md.

    python experiments/compare_models/run.py time                   # seconds per epoch of each variant
    python experiments/compare_models/run.py train VARIANT [SEED..] # one variant (runs/compare_models/...)
    python experiments/compare_models/run.py table                  # collect finished runs into the table

Overrides: --epochs N, --num-samples K, --seeds 0 1 2, --threads T. Runs go under
runs/compare_models/<variant>/seed<k> (git-ignored); the table lists exactly what was run.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import os
import sys
import time

import torch
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "runs", "compare_models")
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # pyro_vae, also without `pip install -e .`


def load_config():
    with open(os.path.join(HERE, "config.yaml")) as f:
        return yaml.safe_load(f)


def variant_config(conf, variant, seed, epochs=None):
    cfg = copy.deepcopy(conf["base"])
    for section, values in conf["variants"][variant].items():
        cfg[section] = {**cfg.get(section, {}), **values}  # a variant overrides only the keys it names
    cfg["seed"] = seed
    if epochs is not None:
        cfg["train"]["epochs"] = epochs
    return cfg


def time_variants(conf, steps=5):
    """Seconds per training epoch: `steps` minibatch steps, scaled to one epoch."""
    from pyro_vae import build_objective, build_model, load_dataset

    splits = load_dataset(**conf["base"]["data"])
    n, batch = len(splits.train_x), conf["base"]["train"]["batch_size"]
    for variant in conf["variants"]:
        cfg = variant_config(conf, variant, 0)
        torch.manual_seed(0)
        vae, objective = build_model(cfg, splits.data_dim), build_objective(cfg)
        opt = torch.optim.Adam(vae.parameters(), 1e-3)
        x = torch.bernoulli(splits.train_x[:batch])
        for i in range(steps + 1):
            if i == 1:
                start = time.perf_counter()
            loss = objective.differentiable_loss(vae.model, vae.guide, x, num_data=n) / n
            opt.zero_grad()
            loss.backward()
            opt.step()
        per_step = (time.perf_counter() - start) / steps
        print(f"{variant:15s} {per_step * 1000:7.1f} ms/step  {per_step * math.ceil(n / batch):6.1f} s/epoch", flush=True)


def train(conf, variant, seeds, epochs, num_samples):
    from pyro_vae.evaluation import evaluate_run
    from pyro_vae.experiment import train_run

    for seed in seeds:
        run_dir = os.path.join(RUNS, variant, f"seed{seed}")
        if os.path.exists(os.path.join(run_dir, "evaluation.json")):
            print(f"{run_dir}: done already", flush=True)
            continue
        cfg = variant_config(conf, variant, seed, epochs)
        start = time.perf_counter()
        summary = train_run(cfg, run_dir, progress=False)
        trained = time.perf_counter()
        result = evaluate_run(summary["run_dir"], num_samples, progress=False)  # run_dir-1 if run_dir held a run
        print(f"{variant} seed {seed}: best epoch {summary['best_epoch']}/{summary['epochs_run']}, test ELBO "
              f"{summary['test_elbo']:.2f}, log p(x) {result['log_px']['mean']:.2f} (K={num_samples}); "
              f"train {trained - start:.0f} s, eval {time.perf_counter() - trained:.0f} s", flush=True)


def table(conf, root=RUNS, out="results"):
    from pyro_vae.checkpoint import atomic_write_text
    from pyro_vae.metrics import mean_se

    rows = []
    for variant in conf["variants"]:
        runs = []
        for seed_dir in sorted(os.listdir(os.path.join(root, variant))) if os.path.isdir(os.path.join(root, variant)) else []:
            path = os.path.join(root, variant, seed_dir)
            if os.path.exists(os.path.join(path, "evaluation.json")):
                with open(os.path.join(path, "summary.json")) as f:
                    summary = json.load(f)
                with open(os.path.join(path, "evaluation.json")) as f:
                    evaluation = json.load(f)
                runs.append((seed_dir, summary, evaluation))
        if not runs:
            continue
        elbo = torch.tensor([s["test_elbo"] for _, s, _ in runs], dtype=torch.float64)
        log_px = torch.tensor([e["log_px"]["mean"] for _, _, e in runs], dtype=torch.float64)
        se = (lambda v: mean_se(v)["se"])  # noqa: E731  (NaN for one seed)
        rows.append({
            "variant": variant, "seeds": len(runs),
            "test_elbo": round(elbo.mean().item(), 2), "test_elbo_se": round(se(elbo), 2),
            "test_log_px": round(log_px.mean().item(), 2), "test_log_px_se": round(se(log_px), 2),
            "num_samples": runs[0][2]["num_samples"],
            "frac_pareto_k_above_0.7": round(sum(e["fraction_pareto_k_above_0.7"] for _, _, e in runs) / len(runs), 2),
            "median_ess": round(sum(e["median_ess"] for _, _, e in runs) / len(runs), 1),
            "best_epochs": " ".join(str(s["best_epoch"]) for _, s, _ in runs),
            "epochs_run": " ".join(str(s["epochs_run"]) for _, s, _ in runs),
            "train_minutes": round(sum(s["train_seconds"] for _, s, _ in runs) / 60 / len(runs), 1),
        })
    if not rows:
        raise SystemExit(f"no evaluated runs under {root}; run `run.py train VARIANT` first")
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(os.path.join(HERE, out + ".csv"), buffer.getvalue())
    lines = ["| variant | seeds | test ELBO | test log p(x) | K | k̂ > 0.7 | median ESS | best epoch (per seed) | "
             "epochs run | train min/run |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seeds']} | {r['test_elbo']:.2f} ± {r['test_elbo_se']:.2f} | "
                     f"{r['test_log_px']:.2f} ± {r['test_log_px_se']:.2f} | {r['num_samples']} | "
                     f"{r['frac_pareto_k_above_0.7']:.2f} | {r['median_ess']:.1f} | {r['best_epochs']} | "
                     f"{r['epochs_run']} | {r['train_minutes']} |")
    print("\n".join(lines))
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["time", "train", "table"])
    parser.add_argument("variant", nargs="?")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--num-samples", type=int)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs-dir", default=RUNS, help="table: where the runs are")
    parser.add_argument("--out", default="results", help="table: basename of the CSV written here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    conf = load_config()
    if args.command == "time":
        time_variants(conf)
    elif args.command == "train":
        if args.variant not in conf["variants"]:
            parser.error(f"unknown variant {args.variant!r}; choose one of: {', '.join(conf['variants'])}")
        train(conf, args.variant, args.seeds or conf["seeds"], args.epochs,
              args.num_samples or conf["eval_num_samples"])
    else:
        table(conf, args.runs_dir, args.out)


if __name__ == "__main__":
    main()
