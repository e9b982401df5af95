"""Is the full-covariance guide a worse family, or does its VAE only train slower? Fit guides on a
frozen decoder.

The table's full-covariance VAE ends below the diagonal one. Jointly trained, the guide family
changes the decoder's training too, so the comparison mixes two things. Here the decoder (and the
N(0, I) prior) of a trained diagonal-guide run is frozen and only the encoder is trained further,
for the same number of epochs, as

  diagonal_normal  the run's own encoder, trained on;
  full_normal      the same encoder with a Cholesky head added: it starts as exactly the same q
                   (off-diagonal outputs zero), so it can only match or beat the diagonal one.

With p(x, z) fixed, log p(x) is the same number for both; the test ELBO = log p(x) − KL(q || p(z|x))
measures the guide alone (per point, analytic KL, one z), and the K-sample estimates of log p(x)
should agree (a better proposal only tightens them).

    python experiments/compare_models/frozen_decoder.py [--run runs/compare_models/vae/seed0] [--epochs 30]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import pyro
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from pyro_vae import build_objective, build_model, estimate_log_px  # noqa: E402
from pyro_vae.data import check_and_binarize  # noqa: E402
from pyro_vae.evaluation import load_run  # noqa: E402
from pyro_vae.train import train_epoch  # noqa: E402


def full_from_diagonal(vae, cfg, data_dim, off_diagonal_scale):
    """A full_normal VAE with the same decoder and an encoder whose q equals ``vae``'s at the start."""
    cfg = copy.deepcopy(dict(cfg))
    cfg["guide"] = {"name": "full_normal", "off_diagonal_scale": off_diagonal_scale}
    full = build_model(cfg, data_dim)
    full.likelihood.load_state_dict(vae.likelihood.state_dict())
    src, dst = vae.encoder.net, full.encoder.net
    with torch.no_grad():
        for a, b in zip(src, dst):
            if a is src[-1]:  # [loc, raw scale] rows first in both heads; the off-diagonal rows stay 0
                b.weight[:a.out_features].copy_(a.weight)
                b.bias[:a.out_features].copy_(a.bias)
            elif isinstance(a, torch.nn.Linear):
                b.load_state_dict(a.state_dict())
    return full


@torch.no_grad()
def test_elbo(vae, x, seed=0):
    """Mean over x of log p(x|z) − KL(q(z|x) || p(z)), one z per point drawn under a fixed seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        log_lik, kl = vae.elbo_terms(x)
    return (log_lik - kl).mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default=os.path.join("runs", "compare_models", "vae", "seed0"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--num-samples", type=int, default=1000, help="K for the log p(x) check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, help="Adam learning rate (default: the run's)")
    parser.add_argument("--objective", default="elbo", choices=["elbo", "mean_field"],
                        help="mean_field: the analytic KL(q || p(z)) instead of its one-sample estimate")
    parser.add_argument("--particles", type=int, default=1, help="z samples per point per step")
    parser.add_argument("--off-diagonal-scale", type=float, default=1.0,
                        help="the full_normal guide's off_diagonal_scale (its Cholesky head's output scale)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    diagonal, cfg, splits = load_run(args.run)
    full = full_from_diagonal(diagonal, cfg, splits.data_dim, args.off_diagonal_scale)
    data = check_and_binarize(splits, diagonal.likelihood)
    test_x, val_x = data.test_x, data.val_x
    torch.manual_seed(args.seed)
    start = {"diagonal": test_elbo(diagonal, test_x), "full": test_elbo(full, test_x)}
    print(f"start: test ELBO diagonal {start['diagonal']:.3f}, full {start['full']:.3f} (equal by construction)")
    lr = args.lr or float(cfg["train"]["lr"])
    objective = build_objective({"objective": {"name": args.objective, "num_particles": args.particles}})
    results = {"run": args.run, "epochs": args.epochs, "lr": lr, "objective": args.objective,
               "particles": args.particles, "off_diagonal_scale": args.off_diagonal_scale, "start_test_elbo": start}
    for name, vae in (("diagonal", diagonal), ("full", full)):
        vae.likelihood.requires_grad_(False)
        vae.likelihood.train(False)
        optimizer = torch.optim.Adam(vae.encoder.parameters(), lr=lr)
        torch.manual_seed(args.seed)
        curve = []
        with pyro.validation_enabled(False), vae.without_param_store():
            for epoch in range(1, args.epochs + 1):
                train_epoch(vae, objective, optimizer, data.train_x, int(cfg["train"]["batch_size"]), epoch)
                curve.append(test_elbo(vae, val_x))
            est = estimate_log_px(vae.model, vae.guide, test_x, args.num_samples, seed=args.seed,
                                  progress=False, warn=False)
        summary = est.summary()
        results[name] = {"val_elbo_by_epoch": curve, "test_elbo": test_elbo(vae, test_x),
                         "test_log_px": summary["log_px"], "test_log_px_sem": summary["log_px_sem"],
                         "median_ess": summary["ess_median"], "frac_pareto_k_above_0.7": summary["frac_pareto_k_above_0.7"]}
        r = results[name]
        print(f"{name:8s}: test ELBO {r['test_elbo']:.3f}, test log p(x) {r['test_log_px']:.3f} ± "
              f"{r['test_log_px_sem']:.3f} (K={args.num_samples}), median ESS {r['median_ess']:.1f}, "
              f"k̂ > 0.7: {r['frac_pareto_k_above_0.7']:.2f}", flush=True)
    tag = f"{os.path.basename(os.path.normpath(args.run))}_{args.objective}_p{args.particles}_lr{lr:g}_off{args.off_diagonal_scale:g}"
    out = os.path.join(HERE, "frozen_decoder", f"{tag}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
