"""Throughput of test log p(x) estimation: K importance samples per image over the mnist5k test set.

One trained reference VAE (784-200-200-50 tanh encoder and decoder, Bernoulli likelihood; test
set binarized once with seed 0, as for every test log p(x) here), evaluated side by side with the same
weights by

  estimate_log_px     pyro_vae.marginal.estimate_log_px (Pyro traces, vectorized particles)
  hand-written IWAE   plain PyTorch, same networks and batch shape (K particles × a few images): the limit
  pyro Importance     pyro.infer.Importance, one image per run, particles one after another
                      (timed on a few images, extrapolated)
  pythae get_nll      pythae's VAE.get_nll on the same weights, run in /tmp/pythae-venv when it
                      exists (never a dependency of pyro-vae), under torch.no_grad (timed on a few
                      images, extrapolated)

Each timing is repeated; the table shows the median and the throughput relative to ours.

    python experiments/benchmarks/bench_log_px.py                  # trains the VAE briefly first
    python experiments/benchmarks/bench_log_px.py --run-dir RUN    # or a run of `pyro-vae train`
    python experiments/benchmarks/bench_log_px.py --memory 10000   # peak RSS of ours on 10,000 images
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from pyro.infer import Importance, Trace_ELBO
from pyro_vae import build_model, load_dataset
from pyro_vae.data import TEST_BINARIZATION_SEED, binarize_fixed
from pyro_vae.guides import MIN_SCALE
from pyro_vae.marginal import Batching, estimate_log_px
from pyro_vae.train import train_epoch

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, "..", "results", "tmp", "bench_log_px_vae.pt")
PYTHAE_PYTHON = "/tmp/pythae-venv/bin/python"
REFERENCE = {"model": {"latent_dim": 50, "hidden": [200, 200], "activation": "tanh"},
             "prior": {"name": "standard_normal"}, "guide": {"name": "diagonal_normal"},
             "likelihood": {"name": "bernoulli"}}


def reference_vae(run_dir: str | None, epochs: int):
    """(VAE, config): the trained VAE of ``run_dir``, or the reference architecture trained
    ``epochs`` epochs (cached in experiments/results/tmp)."""
    if run_dir:
        from pyro_vae.evaluation import load_run
        vae, cfg, _ = load_run(run_dir)
        return vae, cfg
    torch.manual_seed(0)
    vae = build_model(REFERENCE, 784)
    if os.path.exists(CACHE):
        vae.load_state_dict(torch.load(CACHE))
        return vae.eval(), REFERENCE
    train_x = load_dataset("mnist5k").train_x
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    for epoch in range(1, epochs + 1):
        elbo = train_epoch(vae, Trace_ELBO(), optimizer, train_x, 100, epoch)
        print(f"train epoch {epoch}: ELBO {elbo:.2f}", flush=True)
    os.makedirs(os.path.dirname(CACHE), exist_ok=True)
    torch.save(vae.state_dict(), CACHE)
    return vae.eval(), REFERENCE


@torch.no_grad()
def hand_written_iwae(vae, x, K: int, max_batch: int) -> torch.Tensor:
    """log (1/K) Σ_k p(x, z_k)/q(z_k|x) per image, z_k ~ q, written directly against the networks."""
    encoder, decoder = vae.encoder.net, vae.likelihood.net
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    particles = min(K, max_batch)
    out = []
    for xb in x.split(max(1, max_batch // particles)):
        loc, raw_scale = encoder(xb).chunk(2, dim=-1)
        scale = F.softplus(raw_scale) + MIN_SCALE
        lse = torch.full((len(xb),), -math.inf, dtype=torch.float64)
        for start in range(0, K, particles):
            eps = torch.randn(min(particles, K - start), *loc.shape)
            z = loc + scale * eps
            log_q = (-0.5 * eps**2 - scale.log() - half_log_2pi).sum(-1)
            log_pz = (-0.5 * z**2 - half_log_2pi).sum(-1)
            logits = decoder(z)
            log_lik = -F.binary_cross_entropy_with_logits(logits, xb.expand_as(logits), reduction="none").sum(-1)
            lse = torch.logaddexp(lse, (log_lik + log_pz - log_q).double().logsumexp(0))
        out.append(lse - math.log(K))
    return torch.cat(out)


@torch.no_grad()
def pyro_importance(vae, x, K: int) -> torch.Tensor:
    """pyro.infer.Importance per image: K sequential (guide, replayed model) trace pairs."""
    return torch.stack([Importance(vae.model, vae.guide, num_samples=K).run(xi[None]).get_log_normalizer()
                        for xi in x])


PYTHAE_SCRIPT = r"""
import sys, time, json, torch, torch.nn.functional as F
from torch import nn
from pythae.models import VAE, VAEConfig
from pythae.models.nn import BaseEncoder, BaseDecoder
from pythae.models.base.base_utils import ModelOutput
torch.set_num_threads(int(sys.argv[5]))
state, x = torch.load(sys.argv[1]), torch.load(sys.argv[2])
K, batch_size, repeats = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[6])
def mlp(sizes):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)
class Encoder(BaseEncoder):
    def __init__(self):
        super().__init__(); self.net = mlp([784, 200, 200, 100])
    def forward(self, x):
        loc, raw = self.net(x.reshape(len(x), -1)).chunk(2, -1)
        return ModelOutput(embedding=loc, log_covariance=2 * (F.softplus(raw) + 1e-5).log())
class Decoder(BaseDecoder):
    def __init__(self):
        super().__init__(); self.net = mlp([50, 200, 200, 784])
    def forward(self, z):
        return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))
enc, dec = Encoder(), Decoder()
enc.net.load_state_dict({k[len("encoder.net."):]: v for k, v in state.items() if k.startswith("encoder.net.")})
dec.net.load_state_dict({k[len("likelihood.net."):]: v for k, v in state.items() if k.startswith("likelihood.net.")})
model = VAE(VAEConfig(input_dim=(784,), latent_dim=50, reconstruction_loss="bce"), encoder=enc, decoder=dec).eval()
times, value = [], None
for _ in range(repeats):
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.no_grad():
        value = model.get_nll(x, n_samples=K, batch_size=batch_size)
    times.append(time.perf_counter() - start)
print(json.dumps({"times": times, "mean_log_px": float(value)}))
"""


def pythae_get_nll(vae, x, K: int, batch_size: int, threads: int, repeats: int):
    """(seconds per repeat, mean log p(x)) from pythae in its own venv, or None when it is absent."""
    if not os.path.exists(PYTHAE_PYTHON):
        print(f"pythae: skipped ({PYTHAE_PYTHON} not found; python -m venv /tmp/pythae-venv && "
              f"/tmp/pythae-venv/bin/pip install torch==2.13.0 pythae)")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        state_path, x_path, script = (os.path.join(tmp, n) for n in ("state.pt", "x.pt", "run.py"))
        torch.save(vae.state_dict(), state_path)
        torch.save(x, x_path)
        with open(script, "w") as f:
            f.write(PYTHAE_SCRIPT)
        out = subprocess.run([PYTHAE_PYTHON, script, state_path, x_path, str(K), str(batch_size), str(threads),
                              str(repeats)], capture_output=True, text=True)
    if out.returncode != 0:
        print("pythae: failed:", out.stderr.strip().splitlines()[-1:])
        return None
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["times"], result["mean_log_px"]


def timed(fn, repeats: int):
    times, value = [], None
    for _ in range(repeats):
        torch.manual_seed(0)
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return times, value


def peak_memory(vae, cfg, x, K: int, images: int, max_batch: int, threads: int) -> None:
    """Peak resident memory of estimate_log_px on ``images`` images (the test set tiled), measured in
    a fresh process that holds only torch, pyro, the VAE and x, so the peak is the estimator's."""
    x = x.repeat(math.ceil(images / len(x)), 1)[:images]
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"cfg": dict(cfg), "state": vae.state_dict(), "x": x}, os.path.join(tmp, "inputs.pt"))
        subprocess.run([sys.executable, __file__, "--memory-worker", tmp, "--num-samples", str(K),
                        "--max-batch", str(max_batch), "--threads", str(threads)], check=True)


def memory_worker(folder: str, K: int, max_batch: int) -> None:
    inputs = torch.load(os.path.join(folder, "inputs.pt"), weights_only=True)  # tensors and plain config
    vae, x = build_model(inputs["cfg"], inputs["x"].shape[1]), inputs["x"]
    vae.load_state_dict(inputs["state"])
    vae.eval()
    with open("/proc/self/status") as f:
        before = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    start = time.perf_counter()
    result = estimate_log_px(vae.model, vae.guide, x, K, batching=Batching(max_batch), seed=0, progress=False, warn=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"estimate_log_px K={K} on {len(x)} images, max_batch={max_batch}: {time.perf_counter() - start:.0f} s, "
          f"mean log p(x) {result.log_px.mean():.2f}; peak RSS {peak:.0f} MiB, of which {before:.0f} MiB "
          f"before the call (python, torch, pyro, the VAE and x): the estimator added {peak - before:.0f} MiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", help="a pyro-vae training run to evaluate (default: train briefly)")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs without --run-dir")
    parser.add_argument("--num-samples", type=int, default=5000, help="K, importance samples per image")
    parser.add_argument("--images", type=int, default=1000, help="test images for ours and hand-written")
    parser.add_argument("--subset", type=int, default=4, help="images for Importance and pythae (extrapolated)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=8192, help="particles × images per pass")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", type=int, default=0, help="only measure peak memory on this many images")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        return memory_worker(args.memory_worker, args.num_samples, args.max_batch)

    vae, cfg = reference_vae(args.run_dir, args.epochs)
    x = binarize_fixed(load_dataset("mnist5k").test_x, TEST_BINARIZATION_SEED)
    K, n = args.num_samples, min(args.images, len(x))
    if args.memory:
        return peak_memory(vae, cfg, x, K, args.memory, args.max_batch, args.threads)
    x, subset = x[:n], x[:args.subset]
    print(f"K={K}, {n} mnist5k test images, torch threads {torch.get_num_threads()}, repeats {args.repeats}",
          flush=True)

    rows = []  # (name, images timed, seconds per repeat, mean log p(x) on the timed images)
    ours_t, hand_t = [], []
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
        with vae.without_param_store():  # as `pyro-vae evaluate` (pyro_vae.experiment) calls it
            t, ours = timed(lambda: estimate_log_px(vae.model, vae.guide, x, K, batching=Batching(args.max_batch),
                                                    progress=False, warn=False), 1)
        ours_t += t
        t, hand = timed(lambda: hand_written_iwae(vae, x, K, args.max_batch), 1)
        hand_t += t
        print(f"  estimate_log_px {ours_t[-1]:.1f} s, hand-written {hand_t[-1]:.1f} s", flush=True)
    rows.append(("estimate_log_px (ours)", n, ours_t, ours.log_px.mean().item()))
    rows.append(("hand-written IWAE", n, hand_t, hand.mean().item()))
    t, imp = timed(lambda: pyro_importance(vae, subset, K), args.repeats)
    print(f"  pyro.infer.Importance on {len(subset)} images: {[round(v, 1) for v in t]} s", flush=True)
    rows.append(("pyro.infer.Importance", len(subset), t, imp.mean().item()))
    for batch_size in (100, K):  # pythae's default, and all K samples of an image in one batch
        out = pythae_get_nll(vae, subset, K, batch_size, args.threads, args.repeats)
        if out:
            print(f"  pythae batch_size={batch_size} on {len(subset)} images: {[round(v, 1) for v in out[0]]} s",
                  flush=True)
            rows.append((f"pythae get_nll (batch_size={batch_size})", len(subset), *out))

    ours_rate = n / statistics.median(ours_t)
    print("\n| method | images timed | median s (min-max) | images/s | ours / method | mean log p(x), timed images |")
    print("|---|---|---|---|---|---|")
    for name, images, times, value in rows:
        rate = images / statistics.median(times)
        print(f"| {name} | {images} | {statistics.median(times):.2f} ({min(times):.2f}-{max(times):.2f}) | "
              f"{rate:.2f} | {ours_rate / rate:.2f}x | {value:.2f} |")
    print(f"\nours, first {len(subset)} images: mean log p(x) {ours.log_px[:len(subset)].mean():.2f} "
          f"(compare Importance and pythae); ours vs hand-written throughput: "
          f"{statistics.median(hand_t) / statistics.median(ours_t):.3f}")


if __name__ == "__main__":
    main()
