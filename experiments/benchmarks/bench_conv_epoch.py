"""Time of one training epoch of the convolutional VAE (``model.net=conv``): pyro-vae's trainer
(``train_epoch`` with ``objective=elbo`` and :func:`pyro_vae.train.make_optimizer`, as a run uses)
against a hand-written PyTorch loop of the same conv net (its own ``nn.Sequential`` layers, given
the library model's weights; the same single-sample ELBO, batches and Adam), and plain
``pyro.infer.SVI`` for reference. As in bench_train_epoch.py the hand-written loop runs with
torch's default Adam (the reference of the ratio) and with the fused Adam the trainer uses.
mnist5k training split (1 x 28 x 28), batch 100; and digits (1 x 8 x 8).

    python experiments/benchmarks/bench_conv_epoch.py [--repeats 5] [--threads 1]

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
from torch import nn

from pyro_vae import build_model, check_and_binarize, load_dataset
from pyro_vae.objectives import TraceELBO
from pyro_vae.train import make_optimizer, train_epoch

LATENT, HIDDEN, CHANNELS = 50, [200, 200], [32, 64]


def config():
    return {"model": {"latent_dim": LATENT, "hidden": HIDDEN, "activation": "tanh", "net": "conv",
                      "channels": CHANNELS},
            "prior": {"name": "standard_normal"}, "guide": {"name": "diagonal_normal"},
            "likelihood": {"name": "bernoulli"}}


def handwritten_nets(side):
    """The conv encoder and transposed-conv decoder, written out for 1 x side x side images."""
    s1, s2 = (side + 1) // 2, ((side + 1) // 2 + 1) // 2
    c1, c2 = CHANNELS
    enc = nn.Sequential(nn.Unflatten(1, (1, side, side)),
                        nn.Conv2d(1, c1, 3, 2, 1), nn.Tanh(), nn.Conv2d(c1, c2, 3, 2, 1), nn.Tanh(), nn.Flatten(),
                        nn.Linear(c2 * s2 * s2, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(), nn.Linear(200, 2 * LATENT))
    dec = nn.Sequential(nn.Linear(LATENT, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(),
                        nn.Linear(200, c2 * s2 * s2), nn.Tanh(), nn.Unflatten(1, (c2, s2, s2)),
                        nn.ConvTranspose2d(c2, c1, 3, 2, 1, output_padding=s1 - 2 * s2 + 1), nn.Tanh(),
                        nn.ConvTranspose2d(c1, 1, 3, 2, 1, output_padding=side - 2 * s1 + 1), nn.Flatten())
    return enc, dec


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


def copy_weights(source: nn.Module, target: nn.Module):
    pairs = list(zip(source.parameters(), target.parameters()))
    assert len(pairs) == len(list(target.parameters())) and all(a.shape == b.shape for a, b in pairs)
    with torch.no_grad():
        for a, b in pairs:
            b.copy_(a)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for dataset in ("mnist5k", "digits"):
        splits = load_dataset(dataset)
        side = splits.image_shape[0]
        torch.manual_seed(0)
        vae = build_model(config(), splits.data_dim)
        train_x = check_and_binarize(splits, vae.likelihood).train_x  # as pyro_vae.experiment.train_run
        lib_opt, objective = make_optimizer(vae.parameters(), 1e-3), TraceELBO()
        hand = [handwritten_nets(side) for _ in range(2)]
        for enc, dec in hand:
            copy_weights(vae.encoder.net, enc), copy_weights(vae.likelihood.net, dec)
        x0 = torch.bernoulli(train_x[:5])  # the hand-written nets compute what the library's do
        torch.testing.assert_close(hand[0][0](x0), vae.encoder.net(x0))
        torch.testing.assert_close(hand[0][1](vae.encoder.net(x0)[:, :LATENT]), vae.likelihood.net(vae.encoder.net(x0)[:, :LATENT]))
        (enc, dec), (enc_f, dec_f) = hand
        ref_opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
        fused_opt = torch.optim.Adam([*enc_f.parameters(), *dec_f.parameters()], lr=1e-3, fused=True)
        svi_vae = build_model(config(), splits.data_dim)
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
        base, fused = (statistics.median(times[k]) for k in ("hand-written PyTorch", "hand-written, fused Adam"))
        arch = f"{dataset} 1x{side}x{side}, {len(train_x)} images"
        for name, ts in times.items():
            t = statistics.median(ts)
            rows.append((arch, name, t, min(ts), max(ts), t / base, t / fused))
    print(f"\nconv VAE (conv {CHANNELS}, fc {HIDDEN}, z {LATENT}, tanh), batch {args.batch_size}, "
          f"{args.threads} thread(s), median of {args.repeats} interleaved epochs after one warm-up\n")
    print(f"| {'data':<30} | {'method':<24} | epoch (s) | min-max (s)   | ratio | ratio to fused hand-written |")
    print(f"|{'-' * 32}|{'-' * 26}|-----------|---------------|-------|-----------------------------|")
    for arch, name, t, lo, hi, ratio, ratio_f in rows:
        print(f"| {arch:<30} | {name:<24} | {t:9.3f} | {lo:5.2f}-{hi:<7.2f} | {ratio:5.2f} | {ratio_f:27.2f} |")


if __name__ == "__main__":
    main()
