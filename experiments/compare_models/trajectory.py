"""Validation trajectory of one compare_models variant: per epoch, the validation ELBO, its KL term
and the spread of the encoder means across validation images (mean over latent dimensions of the
standard deviation of mu(x) over x: 0 when q(z|x) ignores x, the VampPrior's collapsed state).

No early stopping and no test evaluation: this is the diagnostic behind results.md's sections on
the initialization and on the VampPrior's slower training, not a table row.

    python experiments/compare_models/trajectory.py vamp_prior --epochs 300
    python experiments/compare_models/trajectory.py vamp_prior --epochs 20 --torch-default-init
    python experiments/compare_models/trajectory.py vamp_prior --set prior.num_components=50

Writes experiments/compare_models/trajectories/<variant>[_<tag>]_seed<k>.json (atomically).
"""

from __future__ import annotations

import argparse
import os
import sys

import pyro
import torch
import yaml
from tqdm.auto import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import run  # noqa: E402
from pyro_vae import build_objective, build_model, load_dataset  # noqa: E402
from pyro_vae.data import check_and_binarize  # noqa: E402
from pyro_vae.checkpoint import atomic_write_json  # noqa: E402
from pyro_vae.train import train_epoch  # noqa: E402


def torch_default_init(module):
    """Re-draw every nn.Linear with torch's own default, U(+-1/sqrt(fan_in)) weights and biases
    (what pyro_vae.nets.mlp used before it switched to He initialization)."""
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            m.reset_parameters()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-default-init", action="store_true")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                        help="config overrides, values parsed as YAML (e.g. prior.num_components=50)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = run.variant_config(run.load_config(), args.variant, args.seed, args.epochs)
    for item in args.set:
        key, value = item.split("=", 1)
        section, option = key.split(".", 1)
        cfg[section][option] = yaml.safe_load(value)
    splits = load_dataset(**cfg["data"])
    torch.manual_seed(args.seed)
    vae, objective = build_model(cfg, splits.data_dim), build_objective(cfg)
    if args.torch_default_init:
        torch_default_init(vae)
    optimizer = torch.optim.Adam(vae.parameters(), lr=cfg["train"]["lr"])
    data = check_and_binarize(splits, vae.likelihood)
    val_x = data.val_x
    history = []
    with pyro.validation_enabled(False), vae.without_param_store():
        for epoch in tqdm(range(1, args.epochs + 1), desc=args.variant, unit="epoch"):
            objective.on_epoch(epoch)
            train_epoch(vae, objective, optimizer, data.train_x, cfg["train"]["batch_size"], epoch)
            with torch.no_grad():
                log_lik, kl = vae.elbo_terms(val_x)
                spread = vae.encode(val_x).std(0).mean().item()
            history.append({"epoch": epoch, "kl_weight": objective.kl_weight, "val_elbo": (log_lik - kl).mean().item(),
                            "val_kl": kl.mean().item(), "mu_spread": spread})
    tag = "".join(f"_{item.replace('=', '')}" for item in args.set) + ("_torchinit" if args.torch_default_init else "")
    out = os.path.join(HERE, "trajectories", f"{args.variant}{tag}_seed{args.seed}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    atomic_write_json(out, {"config": cfg, "torch_default_init": args.torch_default_init, "history": history})
    best = max(history, key=lambda r: r["val_elbo"])
    print(f"{out}: best val ELBO {best['val_elbo']:.2f} at epoch {best['epoch']}; last {history[-1]}")


if __name__ == "__main__":
    main()
