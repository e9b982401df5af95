"""Swap the prior of a trained standard-prior VAE for an aggregate posterior, encoder and decoder fixed.

For a fixed guide q(z|x) the prior that maximizes the training ELBO is the aggregate posterior
(1/N) sum_n q(z | x_n) over the N training images; the VampPrior approximates it with K learned
pseudo-inputs. So with the encoder and decoder of a trained VAE held fixed, the held-out KL

    KL(q(z|x) || p_n),   p_n(z) = (1/n) sum_{i<=n} q(z | x_i),   x_i the first n training images,

against the KL to N(0, I) says how much a VampPrior-style prior can gain on held-out images at
this data size, before any co-adaptation of the encoder. The reconstruction term is unchanged,
so the ELBO changes by minus the KL's change. KL(q || mixture) has no closed form: it is
estimated with S draws z ~ q(z|x) per image (standard error over images x draws).

    python experiments/compare_models/prior_swap.py runs/compare_models/vae_warmup/seed0

Prints a table and writes prior_swap.json next to the run's checkpoint (atomically).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from pyro.distributions import Normal

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from pyro_vae.checkpoint import atomic_write_json  # noqa: E402
from pyro_vae.data import binarize_fixed, check_and_binarize  # noqa: E402
from pyro_vae.evaluation import load_run  # noqa: E402
from pyro_vae.metrics import mean_se  # noqa: E402
from pyro_vae.priors import DiagonalNormalMixture  # noqa: E402


def mc_kl(q, prior, num_draws):
    """Per-image mean over num_draws of log q(z|x) - log p(z), z ~ q(z|x): shape (N,)."""
    z = q.rsample((num_draws,))
    return (q.log_prob(z) - prior.log_prob(z)).mean(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 500, 1000, 2000, 3600])
    parser.add_argument("--num-draws", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    vae, cfg, splits = load_run(args.run_dir)
    if cfg["prior"]["name"] != "standard_normal" or cfg["guide"]["name"] != "diagonal_normal":
        raise SystemExit("prior_swap needs a run with the standard normal prior and the diagonal guide")
    torch.manual_seed(args.seed)
    data = check_and_binarize(splits, vae.likelihood)
    val_x = data.val_x
    train_x = binarize_fixed(data.train_x, args.seed + 1)  # all training images, one binarization of its own
    # A random order of the training images, so the first n cover every label.
    train_x = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(args.seed))]
    rows = []
    with torch.no_grad():
        q_val, q_train = vae.encoder(val_x), vae.encoder(train_x).base_dist
        rows.append({"prior": "N(0, I)", "n": 0, "val_kl": mean_se(mc_kl(q_val, vae.prior(), args.num_draws)),
                     "train_kl_members": mean_se(mc_kl(q_train.to_event(1), vae.prior(), args.num_draws))})
        for n in args.sizes:
            if n > len(train_x):
                continue
            loc, scale = q_train.loc[:n], q_train.scale[:n]
            prior = DiagonalNormalMixture(train_x.new_zeros(n), loc, scale)
            q_members = Normal(loc, scale).to_event(1)
            rows.append({"prior": f"aggregate posterior of {n} training images", "n": n,
                         "val_kl": mean_se(mc_kl(q_val, prior, args.num_draws)),
                         "train_kl_members": mean_se(mc_kl(q_members, prior, args.num_draws))})
    print(f"{args.run_dir}: encoder and decoder fixed, KL(q(z|x) || p) in nats, mean ± SE over images")
    print("| prior p(z) | validation KL | KL on the n member images |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['prior']} | {r['val_kl']['mean']:.2f} ± {r['val_kl']['se']:.2f} | "
              f"{r['train_kl_members']['mean']:.2f} ± {r['train_kl_members']['se']:.2f} |")
    atomic_write_json(os.path.join(args.run_dir, "prior_swap.json"),
                      {"num_draws": args.num_draws, "seed": args.seed, "rows": rows})


if __name__ == "__main__":
    main()
