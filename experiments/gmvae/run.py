"""The GMVAE study: does `pyro-vae train model=gmvae` cluster digits and mnist5k better than k-means,
without a worse log p(x) than the VAE of the same size?

    python experiments/gmvae/run.py train MODEL DATASET --seeds 0 1 2   # pyro-vae train, one run per seed
                                       [--set KEY=VALUE .. --tag NAME]  # a variant: more overrides
    python experiments/gmvae/run.py diagnose DATASET [--init random] [--epochs N]
    python experiments/gmvae/run.py table                             # figures/results.json from the runs

``train`` runs the command line itself (``pyro-vae train model=MODEL data=DATASET seed=S`` plus the
overrides of config.yaml), so what is measured is the defaults of ``model=gmvae``; the runs go to
runs/gmvae/<model>_<dataset>[_<tag>]/seed<S> (git-ignored) and each summary.json holds the test log p(x)
and, for the GMVAE, the clustering (accuracy, occupancy, k-means on the pixels of the same split).
``diagnose`` trains one GMVAE (seed 0) in-process and records, after every epoch, what q(c|x) does
on the validation set (``GMVAE.cluster_statistics``: entropy, KL(q(c|x) || p(c)), occupancy;
and the cluster accuracy):
figures/diagnosis_<dataset>_<init>.json and .png. ``table`` collects every finished run into
figures/results.json: per seed and the mean ± standard error over seeds.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys

import torch
import yaml

from pyro_vae.checkpoint import atomic_write_json

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RUNS = os.path.join(ROOT, "runs", "gmvae")
FIGURES = os.path.join(HERE, "figures")


def load_config():
    with open(os.path.join(HERE, "config.yaml")) as f:
        return yaml.safe_load(f)


def overrides(conf, model, dataset, seed):
    """The command line of one run: model, data, seed and the config's overrides for the dataset."""
    extra = conf["datasets"][dataset]
    return [f"model={model}", f"data={dataset}", f"seed={seed}", *conf["common"], *extra.get("all", []),
            *extra.get(model, [])]


def train(conf, model, dataset, seeds, extra=(), tag=None):
    """One ``pyro-vae train`` per seed into runs/gmvae/<model>_<dataset>[_<tag>]/seed<S>; ``extra``
    overrides (``model.warmup_epochs=0``, ...) go last, so they win."""
    for seed in seeds:
        name = f"{model}_{dataset}" + (f"_{tag}" if tag else "")
        run_dir = os.path.join(RUNS, name, f"seed{seed}")
        args = overrides(conf, model, dataset, seed) + list(extra) + [f"hydra.run.dir={run_dir}"]
        print("pyro-vae train " + " ".join(args), flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(conf.get("threads", 1))}  # one torch thread per run
        subprocess.run([sys.executable, "-m", "pyro_vae.cli", "train", *args], cwd=ROOT, env=env, check=True)


def diagnose(conf, dataset, init, epochs):
    """One GMVAE run with q(c|x)'s statistics on the validation set after every epoch."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pyro_vae import build_model, build_objective, check_and_binarize
    from pyro_vae.clustering import cluster_accuracy
    from pyro_vae.data import load_splits
    from pyro_vae.train import TrainConfig, fit

    args = overrides(conf, "gmvae", dataset, 0) + [f"model.init={init}", "eval.num_samples=null"]
    if epochs:
        args.append(f"train.epochs={epochs}")
    import pyro_vae

    with initialize_config_dir(os.path.join(os.path.dirname(pyro_vae.__file__), "conf"), version_base=None):
        cfg = OmegaConf.to_container(compose("config", overrides=args), resolve=True)
    splits = load_splits(cfg)
    torch.manual_seed(cfg["seed"])
    g = build_model(cfg, splits.data_dim)
    data = check_and_binarize(splits, g.likelihood)
    g.initialize(data)

    def statistics():
        accuracy = cluster_accuracy(splits.val_y, g.predict_cluster(data.val_x))
        return {"val_accuracy": accuracy, **g.cluster_statistics(data.val_x)}

    history = [{"epoch": 0, **statistics()}]

    def log(record):
        history.append({**{k: record[k] for k in ("epoch", "val_elbo", "val_kl")}, **statistics()})
        print({k: v for k, v in history[-1].items() if k != "occupancy"}, flush=True)

    torch.manual_seed(cfg["seed"])
    fit(g, data, build_objective(cfg), TrainConfig(**cfg["train"]),
        log=log, progress=False)
    key = f"diagnosis_{dataset}_{init}"
    result = {"command": f"python experiments/gmvae/run.py diagnose {dataset} --init {init}"
                         + (f" --epochs {epochs}" if epochs else ""),
              "overrides": args, "init": g.init_history, "epochs": history}
    atomic_write_json(os.path.join(FIGURES, key + ".json"), result)
    plot_diagnosis(history, g.num_clusters, os.path.join(FIGURES, key + ".png"), f"{dataset}, init={init}")


def plot_diagnosis(history, num_clusters, path, title):
    import math

    from pyro_vae import figures

    epochs = [r["epoch"] for r in history]
    fig = figures.new_figure(figsize=(17, 3.4))
    ax = fig.subplots(1, 4)
    ax[0].plot(epochs, [r["entropy"] for r in history], label="E H[q(c|x)]")
    ax[0].plot(epochs, [r["kl_c"] for r in history], label="E KL(q(c|x) || p(c))")
    ax[0].axhline(math.log(num_clusters), color="k", ls=":", lw=1, label="log C")
    ax[0].set(xlabel="epoch", ylabel="nats", title="cluster posterior (validation)")
    ax[0].legend(fontsize=7)
    ax[1].imshow([r["occupancy"] for r in history], aspect="auto", origin="lower", cmap="viridis",
                 extent=(-0.5, num_clusters - 0.5, epochs[0] - 0.5, epochs[-1] + 0.5), vmin=0, vmax=1)
    ax[1].set(xlabel="cluster c", ylabel="epoch", title="occupancy: share of argmax q(c|x) = c")
    ax[2].plot(epochs, [max(r["occupancy"]) for r in history], label="largest")
    ax[2].plot(epochs, [r["smallest_share"] for r in history], label="smallest")
    ax[2].axhline(1 / num_clusters, color="k", ls=":", lw=1, label="1/C")
    ax[2].set(xlabel="epoch", title="cluster shares")
    ax[2].legend(fontsize=7)
    ax[3].plot(epochs, [r["val_accuracy"] for r in history])
    ax[3].set(xlabel="epoch", title="cluster accuracy (validation)", ylim=(0, 1))
    fig.suptitle(title + " (epoch 0: after the start)", y=1.05)
    figures.save_figure(fig, path)


def table():
    """figures/results.json: per (model, dataset), each seed's numbers and mean ± SE over seeds."""
    from pyro_vae.metrics import mean_se

    keys = ("test_elbo", "cluster_accuracy", "cluster_accuracy_grey", "kmeans_accuracy")
    results = {}
    for run_dir in sorted(glob.glob(os.path.join(RUNS, "*", "seed*"))):
        path = os.path.join(run_dir, "summary.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            s = json.load(f)
        name, seed = os.path.basename(os.path.dirname(run_dir)), int(os.path.basename(run_dir)[4:])
        with open(os.path.join(run_dir, "config.yaml")) as f:
            written = yaml.safe_load(f)
        row = {"seed": seed, "model": written["model"], "train": written["train"], "best_epoch": s["best_epoch"], "epochs_run": s["epochs_run"],
               "train_seconds": s["train_seconds"], **{k: s[k] for k in keys if k in s}}
        if "test_log_px" in s:  # absent with eval.num_samples=null
            row.update(test_log_px=s["test_log_px"]["mean"], test_log_px_se=s["test_log_px"]["se"])
        if "init" in s:
            row["init_seconds"] = s["init"]["seconds"]
        if "cluster" in s:
            row.update(occupancy=s["cluster"]["occupancy"], smallest_share=s["cluster"]["smallest_share"],
                       clusters_used=s["cluster"]["clusters_used"], entropy=s["cluster"]["entropy"],
                       kl_c=s["cluster"]["kl_c"])
        results.setdefault(name, {"seeds": []})["seeds"].append(row)
    for entry in results.values():
        seeds = entry["seeds"]
        entry["mean_se"] = {k: mean_se([r[k] for r in seeds]) for k in
                            ("test_log_px", "smallest_share", *keys) if k in seeds[0]}
    atomic_write_json(os.path.join(FIGURES, "results.json"), results)
    for name, entry in results.items():
        print(name, {k: f"{v['mean']:.3f} ± {v['se']:.3f}" for k, v in entry["mean_se"].items()})


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("model", choices=["gmvae", "vae"])
    t.add_argument("dataset", choices=["digits", "mnist5k"])
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    t.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="more overrides, e.g. model.warmup_epochs=0")
    t.add_argument("--tag", default=None, help="name the runs <model>_<dataset>_<tag> (needed with --set)")
    d = sub.add_parser("diagnose")
    d.add_argument("dataset", choices=["digits", "mnist5k"])
    d.add_argument("--init", default="vade")
    d.add_argument("--epochs", type=int, default=None)
    sub.add_parser("table")
    args = p.parse_args()
    conf = load_config()
    torch.set_num_threads(conf.get("threads", 1))
    os.makedirs(FIGURES, exist_ok=True)
    if args.command == "train":
        if args.set and not args.tag:
            p.error("--set needs --tag, so the runs do not overwrite those of the defaults")
        train(conf, args.model, args.dataset, args.seeds, args.set, args.tag)
    elif args.command == "diagnose":
        diagnose(conf, args.dataset, args.init, args.epochs)
    else:
        table()


if __name__ == "__main__":
    main()
