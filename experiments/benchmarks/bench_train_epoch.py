"""Time of one SVI training epoch: pyro-vae's trainer (``train_epoch`` with the objective and the
optimizer a run uses: ``objective=elbo``, :func:`pyro_vae.train.make_optimizer`) against a
hand-written PyTorch loop of the same math (same networks, same single-sample ELBO, same batches,
Adam), and plain ``pyro.infer.SVI`` for reference. The hand-written loop runs twice: with torch's
default Adam, as one writes it, and with the fused Adam the trainer uses, so the ratio to the
latter is what the Pyro path itself costs. mnist5k training split, batch 100, 2 threads.

    python experiments/benchmarks/bench_train_epoch.py [--repeats 7] [--threads 2]

Prints the median epoch time of each method over the repeats (interleaved, so drifts in machine
load hit all alike) and its ratio to the hand-written loop.
"""

import argparse
import statistics
import time

import pyro
import pyro.optim
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO

from pyro_vae import build_model, check_and_binarize, load_dataset
from pyro_vae.objectives import TraceELBO
from pyro_vae.train import make_optimizer, train_epoch

ARCHITECTURES = {"784-200-200-50 (reference)": [200, 200], "784-400-50": [400]}


def config(hidden):
    return {"model": {"latent_dim": 50, "hidden": hidden, "activation": "tanh"},
            "prior": {"name": "standard_normal"}, "guide": {"name": "diagonal_normal"},
            "likelihood": {"name": "bernoulli"}}


def handwritten_epoch(enc, dec, optimizer, train_x, batch_size):
    """The same ELBO, written out: z = mu + sigma * eps; log p(x|z) + log p(z) - log q(z|x)."""
    n = len(train_x)
    for idx in torch.randperm(n).split(batch_size):
        x = torch.bernoulli(train_x[idx])
        loc, raw_scale = enc(x).chunk(2, dim=-1)
        scale = F.softplus(raw_scale) + 1e-5
        z = loc + scale * torch.randn_like(loc)
        log_lik = -F.binary_cross_entropy_with_logits(dec(z), x, reduction="none").sum(-1)
        log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_q = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
        loss = -(log_lik + log_prior - log_q).sum() * (n / len(idx)) / n
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    splits = load_dataset("mnist5k")
    rows = []
    for arch, hidden in ARCHITECTURES.items():
        torch.manual_seed(0)
        vae = build_model(config(hidden), 784)
        train_x = check_and_binarize(splits, vae.likelihood).train_x  # as pyro_vae.experiment.train_run
        lib_opt, objective = make_optimizer(vae.parameters(), 1e-3), TraceELBO()
        # The hand-written loops get their own copies of the same networks.
        refs = [build_model(config(hidden), 784) for _ in range(2)]
        for ref in refs:
            ref.load_state_dict(vae.state_dict())
        (enc, dec), (enc_f, dec_f) = ((ref.encoder.net, ref.likelihood.net) for ref in refs)
        ref_opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
        fused_opt = torch.optim.Adam([*enc_f.parameters(), *dec_f.parameters()], lr=1e-3, fused=True)
        svi_vae = build_model(config(hidden), 784)
        svi_vae.load_state_dict(vae.state_dict())
        svi = SVI(svi_vae.model, svi_vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())

        def library():
            with pyro.validation_enabled(False), vae.without_param_store():  # as in pyro_vae.train.fit
                train_epoch(vae, objective, lib_opt, train_x, args.batch_size)

        def plain_svi():
            n = len(train_x)
            for idx in torch.randperm(n).split(args.batch_size):
                svi.step(torch.bernoulli(train_x[idx]), num_data=n)

        methods = {"hand-written PyTorch": lambda: handwritten_epoch(enc, dec, ref_opt, train_x, args.batch_size),
                   "hand-written, fused Adam": lambda: handwritten_epoch(enc_f, dec_f, fused_opt, train_x,
                                                                          args.batch_size),
                   "pyro-vae trainer": library, "pyro SVI + Trace_ELBO": plain_svi}
        times = {name: [] for name in methods}
        for name, fn in methods.items():  # warm-up epoch
            fn()
        for _ in range(args.repeats):
            for name, fn in methods.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["hand-written PyTorch"])
        for name, ts in times.items():
            rows.append((arch, name, statistics.median(ts), statistics.median(ts) / base))
    print(f"\nmnist5k train split ({len(train_x)} images), batch {args.batch_size}, {args.threads} threads, "
          f"median of {args.repeats} epochs\n")
    print(f"| {'architecture':<28} | {'method':<24} | epoch (s) | ratio |")
    print(f"|{'-' * 30}|{'-' * 26}|-----------|-------|")
    for arch, name, t, ratio in rows:
        print(f"| {arch:<28} | {name:<24} | {t:9.3f} | {ratio:5.2f} |")


if __name__ == "__main__":
    main()
