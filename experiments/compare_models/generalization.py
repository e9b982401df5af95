"""Training-set against test-set numbers of trained runs: does a prior lose on test because it fits
the training images worse, or because what it learned does not carry over to new images?

For every finished run of the given variants, on n training images (a fixed random subset, as the
training split of mnist5k is sorted by label, in one fixed binarization; the model saw them,
binarized afresh each epoch) and on n test images (a fixed random subset, the protocol's fixed
binarization):

    ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z)),  its two terms,  and  log p(x) (K importance samples).

A prior with learned parameters (mixture, VampPrior) can fit the training images' posteriors
better than it fits new ones; N(0, I) cannot. The test-minus-train change of the KL term measures
that, per prior; the change of log p(x) measures the model's whole generalization gap.

    python experiments/compare_models/generalization.py run vae_warmup100 vamp_prior_warmup100 mixture_prior_warmup100
    python experiments/compare_models/generalization.py table vamp_prior_warmup100 mixture_prior_warmup100

`run` writes generalization.json into each run directory (atomically; skips runs that have one);
`table` prints mean +- standard error over seeds, and the difference between the first two variants.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from run import RUNS  # noqa: E402  (compare_models/run.py)
from pyro_vae.checkpoint import atomic_write_json  # noqa: E402
from pyro_vae.data import TRAIN_EVAL_BINARIZATION_SEED, binarize_fixed, check_and_binarize  # noqa: E402
from pyro_vae.evaluation import load_run  # noqa: E402
from pyro_vae.metrics import mean_se  # noqa: E402
from pyro_vae.marginal import estimate_log_px  # noqa: E402
from pyro_vae.train import evaluate_elbo  # noqa: E402

QUANTITIES = ("elbo", "log_lik", "kl", "log_px")


def run_dirs(variant):
    root = os.path.join(RUNS, variant)
    seeds = sorted(d for d in os.listdir(root) if os.path.exists(os.path.join(root, d, "summary.json"))) \
        if os.path.isdir(root) else []
    if not seeds:
        raise SystemExit(f"no finished runs under {root}; run `run.py train {variant}` first")
    return [os.path.join(root, d) for d in seeds]


def subset(x, n):
    """A fixed random subset of n rows (mnist5k's training split is sorted by label)."""
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]]


def measure(run_dir, n, num_samples):
    vae, cfg, splits = load_run(run_dir)
    data = check_and_binarize(splits, vae.likelihood)
    # n training images in one binarization of the whole training split (not the trainer's
    # 500-image subset: n is up to 1000 here), with the seed of the trainer's training subset.
    sets = {"train": subset(binarize_fixed(data.train_x, TRAIN_EVAL_BINARIZATION_SEED), n),
            "test": subset(data.test_x, n)}
    result = {"n": n, "num_samples": num_samples}
    for name, x in sets.items():
        torch.manual_seed(int(cfg["seed"]))
        with torch.no_grad():
            terms = evaluate_elbo(vae, x)
        with vae.without_param_store():
            estimate = estimate_log_px(vae.model, vae.guide, x, num_samples=num_samples, seed=int(cfg["seed"]),
                                       progress=False)
        result[name] = {**terms, "log_px": mean_se(estimate.log_px)["mean"]}
    return result


def run(variants, n, num_samples):
    for variant in variants:
        for run_dir in run_dirs(variant):
            path = os.path.join(run_dir, "generalization.json")
            if os.path.exists(path):
                continue
            result = measure(run_dir, n, num_samples)
            atomic_write_json(path, result)
            print(f"{run_dir}: " + "; ".join(
                f"{q} train {result['train'][q]:.2f} test {result['test'][q]:.2f}" for q in QUANTITIES), flush=True)


def per_seed(variant):
    out = []
    for run_dir in run_dirs(variant):
        with open(os.path.join(run_dir, "generalization.json")) as f:
            out.append(json.load(f))
    return out


def table(variants):
    def cell(values):
        s = mean_se(torch.tensor(values))
        return f"{s['mean']:.2f} ± {s['se']:.2f}"

    results = {v: per_seed(v) for v in variants}
    first = results[variants[0]][0]
    print(f"n = {first['n']} images per set, log p(x) with K = {first['num_samples']}; mean ± SE over seeds\n")
    print("| variant | seeds | " + " | ".join(f"{q} train | {q} test | {q} test − train" for q in QUANTITIES) + " |")
    print("|---|---|" + "---|---|---|" * len(QUANTITIES))
    for v, runs in results.items():
        cells = []
        for q in QUANTITIES:
            tr, te = [r["train"][q] for r in runs], [r["test"][q] for r in runs]
            cells += [cell(tr), cell(te), cell([b - a for a, b in zip(tr, te)])]
        print(f"| {v} | {len(runs)} | " + " | ".join(cells) + " |")
    if len(variants) >= 2:
        a, b = results[variants[0]], results[variants[1]]
        print(f"\n{variants[0]} − {variants[1]} (independent runs: SE = sqrt(SE_a² + SE_b²); "
              f"for kl, negative favours {variants[0]}):")
        for split in ("train", "test"):
            for q in QUANTITIES:
                sa, sb = (mean_se(torch.tensor([r[split][q] for r in runs])) for runs in (a, b))
                print(f"  {split:5s} {q:8s} {sa['mean'] - sb['mean']:+7.2f} ± {math.hypot(sa['se'], sb['se']):.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["run", "table"])
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--n", type=int, default=1000, help="images per set (default 1000, all of the test set)")
    parser.add_argument("--num-samples", type=int, default=1000, help="K for log p(x) (default 1000)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.command == "run":
        run(args.variants, args.n, args.num_samples)
    else:
        table(args.variants)


if __name__ == "__main__":
    main()
