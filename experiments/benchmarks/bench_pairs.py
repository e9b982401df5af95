"""Memory and time of one training step for every prior × guide pair.

One subprocess per pair (so each peak is its own): build the VAE on mnist5k's shape (784 pixels)
with the reference widths (784-200-200-50, VampPrior and mixture at their config defaults), run
one Adam step of the objective on a batch of binarized images, and report the peak resident
memory of the process (``ru_maxrss``) and the step's time, beside a process that only builds the
model (the baseline a step adds to). The table shows the step's extra memory per pair.

    python experiments/benchmarks/bench_pairs.py                      # ELBO, batch 100
    python experiments/benchmarks/bench_pairs.py --objective iwae --particles 5 --estimator dreg
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

PRIORS = ["standard_normal", "mixture", "vamp", "flow"]
GUIDES = ["diagonal_normal", "full_normal", "iaf"]


def config(prior, guide, objective, particles, estimator, data_dim):
    obj = {"name": objective, "num_particles": particles}
    if objective == "iwae":
        obj["estimator"] = estimator
    return {"model": {"name": "vae", "latent_dim": 50, "hidden": [200, 200], "activation": "tanh"},
            "prior": {"name": prior}, "guide": {"name": guide}, "likelihood": {"name": "bernoulli"},
            "objective": obj}


def worker(args) -> None:
    import torch
    import pyro
    from pyro_vae import build_model, build_objective

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = config(args.prior, args.guide, args.objective, args.particles, args.estimator, args.data_dim)
    vae, objective = build_model(cfg, args.data_dim), build_objective(cfg)
    x = torch.bernoulli(torch.full((args.batch, args.data_dim), 0.2))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = None
    if not args.build_only:
        optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
        with pyro.validation_enabled(False), vae.without_param_store():
            for step in range(args.steps):
                start = time.perf_counter()
                loss = objective.differentiable_loss(vae.model, vae.guide, x, num_data=60000) / 60000
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                seconds = time.perf_counter() - start  # the last step: the first also builds caches
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"base_mb": base / 1024, "peak_mb": peak / 1024, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", default="elbo", choices=["elbo", "iwae"])
    parser.add_argument("--particles", type=int, default=1)
    parser.add_argument("--estimator", default="standard")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--data-dim", type=int, default=784)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prior", default="standard_normal", help=argparse.SUPPRESS)
    parser.add_argument("--guide", default="diagonal_normal", help=argparse.SUPPRESS)
    parser.add_argument("--limit-gb", type=float, default=8.0, help="address-space limit of each worker")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    common = [sys.executable, __file__, "--worker", "--objective", args.objective, "--particles",
              str(args.particles), "--estimator", args.estimator, "--batch", str(args.batch), "--data-dim",
              str(args.data_dim), "--steps", str(args.steps), "--threads", str(args.threads)]
    limit = int(args.limit_gb * 2**30)

    def run(extra):
        out = subprocess.run(common + extra, capture_output=True, text=True,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
        return json.loads(out.stdout) if out.returncode == 0 else None
    print(f"one {args.objective} step (K={args.particles}, {args.estimator}), batch {args.batch}, "
          f"D={args.data_dim}, latent 50, {args.threads} thread(s); memory = peak RSS - RSS after building")
    print("| prior | guide | step memory (MB) | step time (s) |")
    print("|---|---|---|---|")
    for prior in PRIORS:
        for guide in GUIDES:
            r = run(["--prior", prior, "--guide", guide])
            if r is None:
                print(f"| {prior} | {guide} | > {args.limit_gb:.0f} GB (killed) | - |", flush=True)
            else:
                print(f"| {prior} | {guide} | {r['peak_mb'] - r['base_mb']:.0f} | {r['seconds']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
