"""GMVAE on digits and mnist5k: test ELBO, test log p(x), clustering accuracy vs k-means, samples.

    python experiments/gmvae/run.py [--config config.yaml] [--datasets digits mnist5k]
                                    [--epochs N] [--num-samples K] [--out DIR]

Per dataset it builds a GMVAE (``pyro_vae.build.build_model`` with ``model.name: gmvae``) and trains
it with ``TraceEnum_ELBO(max_plate_nesting=1)`` via ``pyro_vae.train.fit`` (best validation epoch
kept), then on the protocol test set (binarized once, seed 0):
    test ELBO (analytic KLs), test log p(x) = estimate_log_px(model, guide, K) (c drawn),
    a cross-check of that estimate against log_px_enumerated on a subset,
    clustering accuracy (Hungarian matching) of argmax_c q(c|x) and of k-means on the grey pixels.
Writes DIR/results.json (merged across invocations; key = dataset, or dataset_<N>epochs
with --epochs N), DIR/samples_<key>.png (one row per
cluster: decoder means for z ~ p(z|c)) and DIR/history_<key>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import matplotlib
import numpy as np
import torch
import yaml
from pyro.infer import TraceEnum_ELBO

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pyro_vae import build_model, estimate_log_px  # noqa: E402
from pyro_vae.data import binarize_fixed, check_and_binarize  # noqa: E402
from pyro_vae.gmvae import cluster_accuracy  # noqa: E402
from pyro_vae.train import TrainConfig, evaluate_elbo, fit  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def kmeans_accuracy(splits, num_clusters, n_init, seed):
    from sklearn.cluster import KMeans

    km = KMeans(num_clusters, n_init=n_init, random_state=seed).fit(splits.train_x.numpy())
    return {"train": cluster_accuracy(splits.train_y, km.labels_),
            "test": cluster_accuracy(splits.test_y, km.predict(splits.test_x.numpy()))}


def samples_figure(g, splits, train_clusters, path, per_cluster=10):
    """One row per cluster c: decoder means for z ~ p(z|c); the row is labelled with the majority
    training label of the points q assigns to c and how many there are."""
    torch.manual_seed(0)
    images = g.sample_per_cluster(per_cluster).numpy().reshape(g.num_clusters, per_cluster, *splits.image_shape)
    fig, axes = plt.subplots(g.num_clusters, per_cluster, figsize=(per_cluster * 0.8, g.num_clusters * 0.85))
    for c in range(g.num_clusters):
        members = splits.train_y[train_clusters == c]
        label = f"c={c}: n={len(members)}" + (f", mostly {int(members.mode().values)}" if len(members) else "")
        for j in range(per_cluster):
            ax = axes[c, j]
            ax.imshow(images[c, j], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
        axes[c, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(f"GMVAE samples per cluster ({splits.name}): E[x|z], z ~ p(z|c)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_dataset(name, key, cfg, args):
    dcfg = cfg["datasets"][name]
    seed = cfg["seed"]
    torch.manual_seed(seed)
    splits = load_dataset(name)
    model = {"name": "gmvae", "num_clusters": cfg["num_clusters"], **dcfg["model"]}
    g = build_model({"model": model, "likelihood": cfg["likelihood"]}, splits.data_dim)
    data = check_and_binarize(splits, g.likelihood)
    tcfg = TrainConfig(**{**dcfg["train"], **({"epochs": args.epochs} if args.epochs else {})})
    t0 = time.time()
    saved = os.path.join(args.checkpoint_dir, f"gmvae_{key}.pt") if args.checkpoint_dir else None
    if args.eval_only:  # reuse the model trained by an earlier invocation with --checkpoint-dir
        state = torch.load(saved)
        g.load_state_dict(state["model"])
        result, train_s = state["fit"], state["train_seconds"]  # plain dicts and floats
    else:
        torch.manual_seed(seed)
        result = fit(g, data, TraceEnum_ELBO(max_plate_nesting=1), tcfg, progress=False,
                     log=lambda r: print(name, {k: round(v, 2) for k, v in r.items()}, flush=True))
        train_s = time.time() - t0
        result = {k: v for k, v in dataclasses.asdict(result).items() if k != "best_state"}
        if saved:
            os.makedirs(args.checkpoint_dir, exist_ok=True)
            torch.save({"model": g.state_dict(), "fit": result, "train_seconds": train_s}, saved)
    g.eval()
    test_x = data.test_x
    torch.manual_seed(seed)
    test = evaluate_elbo(g, test_x)
    K = args.num_samples or cfg["eval_num_samples"]
    t0 = time.time()
    est = estimate_log_px(g.model, g.guide, test_x, num_samples=K, seed=seed, progress=False)
    eval_s = time.time() - t0
    cc = cfg["crosscheck"]
    sub = test_x[: cc["num_points"]]
    torch.manual_seed(seed)
    enum_sub = g.log_px_enumerated(sub, cc["num_samples"])
    samp_sub = estimate_log_px(g.model, g.guide, sub, num_samples=cc["num_samples"] * g.num_clusters,
                               seed=seed + 1, progress=False, warn=False).log_px
    train_clusters = g.predict_cluster(binarize_fixed(data.train_x, seed=0))  # all training images, binarized once
    test_clusters = g.predict_cluster(test_x)
    km = kmeans_accuracy(splits, cfg["num_clusters"], cfg["kmeans"]["n_init"], seed)
    samples_figure(g, splits, train_clusters, os.path.join(args.out, f"samples_{key}.png"))
    with open(os.path.join(args.out, f"history_{key}.json"), "w") as f:
        json.dump(result["history"], f)
    return {
        "epochs_run": result["epochs_run"], "best_epoch": result["best_epoch"],
        "stopped_early": result["stopped_early"], "train_seconds": round(train_s, 1),
        "best_val_elbo": result["history"][result["best_epoch"] - 1]["val_elbo"],
        "test_elbo": test["elbo"], "test_log_lik": test["log_lik"], "test_kl": test["kl"],
        "test_log_px": est.log_px.mean().item(), "test_log_px_sem": est.summary()["log_px_sem"],
        "log_px_num_samples": K, "log_px_seconds": round(eval_s, 1),
        "log_px_stderr_median": est.stderr.median().item(), "pareto_k_max": est.pareto_k.max().item(),
        "frac_pareto_k_above_0.7": est.fraction_pareto_k_above(0.7),
        "log_px_by_k": est.mean_log_px_by_k(),
        "crosscheck": {"num_points": len(sub), "enumerated_K_per_cluster": cc["num_samples"],
                       "enumerated_log_px": enum_sub.mean().item(),
                       "sampled_K": cc["num_samples"] * g.num_clusters, "sampled_log_px": samp_sub.mean().item(),
                       "mean_abs_diff_per_point": (enum_sub - samp_sub).abs().mean().item()},
        "cluster_accuracy": {"gmvae_train": cluster_accuracy(splits.train_y, train_clusters),
                             "gmvae_test": cluster_accuracy(splits.test_y, test_clusters),
                             "kmeans_train": km["train"], "kmeans_test": km["test"]},
        "clusters_used_test": int(test_clusters.unique().numel()),
        "cluster_sizes_test": torch.bincount(test_clusters, minlength=g.num_clusters).tolist(),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(HERE, "config.yaml"))
    p.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"])
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    p.add_argument("--num-samples", type=int, default=None, help="override eval_num_samples (K)")
    p.add_argument("--checkpoint-dir", default=None, help="save the trained model here (gmvae_<dataset>.pt)")
    p.add_argument("--eval-only", action="store_true", help="load the model from --checkpoint-dir, skip training")
    p.add_argument("--out", default=os.path.join(HERE, "figures"))
    args = p.parse_args()
    with open(args.config) as f:
        cfg = yaml.safe_load(f)
    torch.set_num_threads(cfg.get("threads", 1))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    for name in args.datasets:
        key = name + (f"_{args.epochs}epochs" if args.epochs else "")  # overrides get their own entry
        entry = {"command": "python experiments/gmvae/run.py " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
            if v not in (None, False) and k not in ("config", "out", "datasets")) + f" --datasets {name}",
            **run_dataset(name, key, cfg, args)}
        print(json.dumps({key: entry}, indent=1), flush=True)
        results = json.load(open(path)) if os.path.exists(path) else {}  # re-read: runs may go in parallel
        results[key] = entry
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
