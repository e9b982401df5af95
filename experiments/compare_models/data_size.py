"""The VampPrior against the standard prior as the training set grows (mnist5k subsets).

Trains a compare_models variant on a random subset of n of mnist5k's 3,600 training images
(same validation and test images for every n) with the table's settings, except that the epoch
budget is 100 * 3600 / n: every n gets the table's 3,600 optimizer steps. Early stopping (patience
10 epochs) on the validation ELBO, as in the table. Records the best validation ELBO and the test
ELBO of the selected epoch (one z per image, the fixed test binarization).

    python experiments/compare_models/data_size.py train vamp_prior --sizes 900 1800 3600 --seeds 0 1 2
    python experiments/compare_models/data_size.py table

Runs go to runs/compare_models_data_size/<variant>/n<n>/seed<k>/ (checkpoint, result.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import run  # noqa: E402
from pyro_vae import build_objective, build_model, load_dataset  # noqa: E402
from pyro_vae.checkpoint import atomic_write_json, save_checkpoint  # noqa: E402
from pyro_vae.data import check_and_binarize  # noqa: E402
from pyro_vae.metrics import mean_se  # noqa: E402
from pyro_vae.train import TrainConfig, evaluate_elbo, fit  # noqa: E402

ROOT = os.path.join(os.path.dirname(run.RUNS), "compare_models_data_size")


def train(variant, sizes, seeds):
    conf = run.load_config()
    full = load_dataset(**conf["base"]["data"])
    num_full, budget = len(full.train_x), conf["base"]["train"]["epochs"]
    if not all(1 <= n <= num_full for n in sizes):
        raise SystemExit(f"--sizes must lie in 1..{num_full}, got {sizes}")
    for n in sizes:
        for seed in seeds:
            cfg = run.variant_config(conf, variant, seed, epochs=round(budget * num_full / n))
            pick = torch.randperm(num_full, generator=torch.Generator().manual_seed(seed))[:n]
            splits = dataclasses.replace(full, train_x=full.train_x[pick], train_y=full.train_y[pick])
            run_dir = os.path.join(ROOT, variant, f"n{n}", f"seed{seed}")
            os.makedirs(run_dir, exist_ok=True)
            torch.manual_seed(seed)
            vae, objective = build_model(cfg, splits.data_dim), build_objective(cfg)
            data = check_and_binarize(splits, vae.likelihood)
            train_cfg = TrainConfig(**cfg["train"])
            start = time.perf_counter()
            torch.manual_seed(seed)
            result = fit(vae, data, objective, train_cfg, progress=True, on_best=lambda r: save_checkpoint(
                os.path.join(run_dir, "checkpoint.pt"), r.best_state, config=cfg, train_size=n, epoch=r.best_epoch))
            vae.eval()
            torch.manual_seed(seed)
            test = evaluate_elbo(vae, data.test_x)
            best = result.history[result.best_epoch - 1]
            out = {"variant": variant, "train_size": n, "seed": seed, "epochs_budget": train_cfg.epochs,
                   "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
                   "best_val_elbo": best["val_elbo"], "train_elbo_at_best": best["train_elbo"],
                   "val_kl_at_best": best["val_kl"], "train_kl_at_best": best["train_kl"],
                   "test_elbo": test["elbo"], "test_kl": test["kl"],
                   "train_seconds": round(time.perf_counter() - start, 1)}
            atomic_write_json(os.path.join(run_dir, "result.json"), out)
            print(json.dumps(out))


def table():
    rows = {}
    for dirpath, _, files in os.walk(ROOT):
        if "result.json" in files:
            with open(os.path.join(dirpath, "result.json")) as f:
                r = json.load(f)
            rows.setdefault((r["variant"], r["train_size"]), []).append(r)

    def fmt(values):
        m = mean_se(torch.tensor(values))
        return f"{m['mean']:.2f} ± {m['se']:.2f}"

    plot(rows)
    print("| variant | n train | seeds | best epoch | train ELBO | val ELBO | test ELBO | val KL | train KL |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (variant, n), rs in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"| {variant} | {n} | {len(rs)} | {'/'.join(str(r['best_epoch']) for r in rs)} | "
              f"{fmt([r['train_elbo_at_best'] for r in rs])} | {fmt([r['best_val_elbo'] for r in rs])} | "
              f"{fmt([r['test_elbo'] for r in rs])} | {fmt([r['val_kl_at_best'] for r in rs])} | "
              f"{fmt([r['train_kl_at_best'] for r in rs])} |")


def plot(rows):
    """Test ELBO against the number of training images, mean ± SE over seeds: data_size.png here."""
    from pyro_vae.figures import new_figure, save_figure

    fig = new_figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for variant in sorted({v for v, _ in rows}):
        sizes = sorted(n for v, n in rows if v == variant)
        stats = [mean_se(torch.tensor([r["test_elbo"] for r in rows[(variant, n)]])) for n in sizes]
        ax.errorbar(sizes, [m["mean"] for m in stats], yerr=[m["se"] for m in stats], marker="o", capsize=3,
                    label=variant)
    ax.set_xscale("log")
    ax.set_xlabel("training images (mnist5k subset; 3,600 optimizer steps each)")
    ax.set_ylabel("test ELBO (nats)")
    ax.set_title("VampPrior vs standard prior by training-set size")
    ax.legend()
    save_figure(fig, os.path.join(HERE, "data_size.png"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("variant")
    t.add_argument("--sizes", type=int, nargs="+", default=[900, 1800, 3600])
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    t.add_argument("--threads", type=int, default=1)
    sub.add_parser("table")
    args = parser.parse_args()
    if args.command == "train":
        torch.set_num_threads(args.threads)
        train(args.variant, args.sizes, args.seeds)
    else:
        table()


if __name__ == "__main__":
    main()
