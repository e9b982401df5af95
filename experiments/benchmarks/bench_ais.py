"""Throughput of AIS: ``estimate_log_px(method="ais")`` against a hand-written batched torch AIS of
the same math, on the mnist5k reference VAE (784-200-200-50 tanh, Bernoulli).

Both run M chains × n images as one (M, n, 50) tensor with the same sigmoidal schedule (T + 2
inverse temperatures), the same HMC (L leapfrog steps by the velocity Verlet integrator, gradients
by autograd, L + 1 gradient evaluations a transition, a Metropolis test per chain), the same
per-image step size adapted toward acceptance 0.65, and the same guide start. Throughput is
images × chains × steps per second; each pair is timed in alternation, several repeats, medians.

    python experiments/benchmarks/bench_ais.py --run-dir runs/inference_gap/vae/seed=0   # a trained run
    python experiments/benchmarks/bench_ais.py                                           # fresh He-initialized weights
Options: --images 100 --chains 16 --steps 100 --leapfrog 10 --repeats 3 --threads 1.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from pyro_vae import build_model, check_and_binarize, estimate_log_px, load_dataset
from pyro_vae.ais import AIS
from pyro_vae.guides import MIN_SCALE

REFERENCE = {"model": {"latent_dim": 50, "hidden": [200, 200], "activation": "tanh"},
             "prior": {"name": "standard_normal"}, "guide": {"name": "diagonal_normal"},
             "likelihood": {"name": "bernoulli"}}
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def hand_written_ais(vae, x, M: int, T: int, L: int, step_size=0.05, target=0.65, rate=0.02):
    """log (1/M) Σ_m w_m per image, AIS from q(z|x) to p(z|x) written directly against the networks."""
    encoder, decoder = vae.encoder.net, vae.likelihood.net
    betas = AIS(num_steps=T).betas().tolist()
    loc, raw = encoder(x).chunk(2, -1)
    scale = F.softplus(raw) + MIN_SCALE
    loc, scale = loc.detach(), scale.detach()
    n, d = loc.shape

    def parts(z):  # log p(x, z), log q(z|x): (M, n)
        log_q = (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - HALF_LOG_2PI).sum(-1)
        logits = decoder(z)
        log_lik = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        return log_lik + (-0.5 * z**2 - HALF_LOG_2PI).sum(-1), log_q

    def log_f_and_grad(z, beta):
        with torch.enable_grad():
            z = z.detach().requires_grad_()
            log_p, log_q = parts(z)
            log_f = beta * log_p + (1 - beta) * log_q
            (grad,) = torch.autograd.grad(log_f.sum(), z)
        return log_f.detach(), grad, log_p.detach(), log_q.detach()

    z = loc + scale * torch.randn(M, n, d)
    log_p, log_q = parts(z)
    log_w = torch.zeros(M, n, dtype=torch.float64)
    step = torch.full((n,), step_size)
    for t in range(1, T + 2):
        log_w += (betas[t] - betas[t - 1]) * (log_p - log_q).double()
        if t == T + 1:
            break
        beta, eps = betas[t], step[None, :, None]
        r0 = torch.randn_like(z)
        f0, grad, p0, q0 = log_f_and_grad(z, beta)
        z1, r = z, r0 + 0.5 * eps * grad
        for i in range(L):
            z1 = z1 + eps * r
            f1, grad, p1, q1 = log_f_and_grad(z1, beta)
            r = r + (eps if i < L - 1 else 0.5 * eps) * grad
        h0, h1 = -f0 + 0.5 * r0.pow(2).sum(-1), -f1 + 0.5 * r.pow(2).sum(-1)
        accept = (torch.rand_like(h0).log() < h0 - h1) & torch.isfinite(h1)
        z = torch.where(accept[..., None], z1, z)
        log_p, log_q = torch.where(accept, p1, p0), torch.where(accept, q1, q0)
        acc = accept.double().mean(0)
        step = step * torch.where(acc > target, 1 + rate, 1 - rate).to(step)
    return log_w.logsumexp(0) - math.log(M)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--chains", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--leapfrog", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.run_dir:
        from pyro_vae.evaluation import load_run
        vae, _, splits = load_run(args.run_dir)
        which = f"trained: {args.run_dir}"
    else:
        torch.manual_seed(0)
        splits = load_dataset("mnist5k")
        vae = build_model(REFERENCE, 784).eval()
        which = "freshly He-initialized (seed 0)"
    x = check_and_binarize(splits, vae.likelihood).test_x[:args.images]
    vae.requires_grad_(False)
    work = args.images * args.chains * args.steps
    times, means = {"estimate_log_px": [], "hand-written": []}, {"estimate_log_px": [], "hand-written": []}
    for r in range(args.repeats):
        for name in times:
            torch.manual_seed(r)
            start = time.perf_counter()
            if name == "estimate_log_px":
                with vae.without_param_store():
                    lp = estimate_log_px(vae.model, vae.guide, x, args.chains, method="ais", num_steps=args.steps,
                                         num_leapfrog=args.leapfrog, progress=False, warn=False).log_px
            else:
                with torch.no_grad():
                    lp = hand_written_ais(vae, x, args.chains, args.steps, args.leapfrog)
            times[name].append(time.perf_counter() - start)
            means[name].append(lp.mean().item())
            print(f"repeat {r}: {name:16s} {times[name][-1]:7.2f} s  mean log p(x) {means[name][-1]:.3f}", flush=True)
    print(f"\nmodel {which}; {args.images} images × {args.chains} chains × {args.steps} steps, "
          f"{args.leapfrog} leapfrog steps, {args.threads} thread(s)\n")
    print("| code | median s (min-max) | images×chains×steps / s | ours / hand-written | mean log p(x) (per repeat) |")
    print("|---|---|---|---|---|")
    ours = statistics.median(times["estimate_log_px"])
    for name, t in times.items():
        med = statistics.median(t)
        print(f"| {name} | {med:.2f} ({min(t):.2f}-{max(t):.2f}) | {work / med:.0f} | {med / ours:.3f}"
              f" | {' '.join(f'{m:.2f}' for m in means[name])} |" if name != "estimate_log_px" else
              f"| {name} | {med:.2f} ({min(t):.2f}-{max(t):.2f}) | {work / med:.0f} | 1.000 |"
              f" {' '.join(f'{m:.2f}' for m in means[name])} |")
    ratios = [h / o for o, h in zip(times["estimate_log_px"], times["hand-written"])]
    print(f"\nthroughput ours / hand-written, per repeat: {' '.join(f'{q:.3f}' for q in ratios)}; "
          f"median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
