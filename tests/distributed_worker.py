"""Run by tests/test_distributed.py under torchrun (2 gloo ranks): one global batch's gradient and
the sharded evaluation, written by rank 0 to OUT for the test to compare with one process.

    torchrun --standalone --nproc_per_node=2 tests/distributed_worker.py OUT
"""

import sys

import torch
from pyro.infer import Trace_ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyro_vae import build_model, distributed
from pyro_vae.data import check_and_binarize, load_dataset
from pyro_vae.evaluation import evaluate
from pyro_vae.train import train_epoch

CFG = {"model": {"latent_dim": 3, "hidden": [16]}, "prior": {"name": "standard_normal"},
       "guide": {"name": "diagonal_normal"}, "likelihood": {"name": "bernoulli"}}
NUM_POINTS = 59  # one global batch, shards of 30 and 29


class AtTheMean(Messenger):
    """Every latent takes its distribution's mean instead of a random draw: fixed draws, so the
    ELBO of a batch is a deterministic function of the parameters (its gradient still flows
    through the mean, as a reparameterized draw's does)."""

    def _pyro_sample(self, msg):
        if not msg["is_observed"] and not msg["done"] and not site_is_subsample(msg):  # not a replayed latent
            msg["value"], msg["done"] = msg["fn"].mean, True


class FixedDrawsELBO(Trace_ELBO):
    def differentiable_loss(self, model, guide, *args, **kwargs):
        with AtTheMean():
            return super().differentiable_loss(model, guide, *args, **kwargs)


def model_and_data():
    torch.manual_seed(0)
    vae = build_model(CFG, 64)
    data = check_and_binarize(load_dataset("digits"), vae.likelihood)
    return vae, data


def batch_gradient(ranks):
    """The gradient of one global batch of binary points under fixed draws (lr 0: nothing moves)."""
    vae, data = model_and_data()
    optimizer = torch.optim.SGD(vae.parameters(), lr=0.0)
    order = torch.Generator().manual_seed(1)
    with vae.without_param_store():
        train_epoch(vae, FixedDrawsELBO(), optimizer, data.test_x[:NUM_POINTS], NUM_POINTS, order=order, ranks=ranks)
    return {name: p.grad.clone() for name, p in vae.named_parameters()}


def sharded_evaluation(ranks):
    vae, data = model_and_data()
    vae.eval()
    elbo, estimate = evaluate(vae, data.test_x, 20, seed=5, progress=False, ranks=ranks)
    return {"elbo": elbo, "log_px": estimate.log_px, "log_px_by_k": estimate.log_px_by_k, "ess": estimate.ess}


if __name__ == "__main__":
    ranks, _ = distributed.setup("cpu")
    out = {"world_size": ranks.world_size, "gradient": batch_gradient(ranks), "evaluation": sharded_evaluation(ranks)}
    if ranks.is_main:
        torch.save(out, sys.argv[1])
    distributed.teardown()
