import pyro
import pytest
import torch

from pyro_vae import build_model

# The test models are tiny: a second intra-op thread only adds synchronization on a 2-core box.
torch.set_num_threads(1)

TINY = {
    "model": {"latent_dim": 3, "hidden": [16], "activation": "tanh"},
    "prior": {"name": "standard_normal"},
    "guide": {"name": "diagonal_normal"},
    "likelihood": {"name": "bernoulli"},
    "objective": {"name": "elbo", "num_particles": 1},
}


@pytest.fixture(autouse=True)
def _fresh_state():
    torch.manual_seed(0)
    pyro.clear_param_store()
    yield


@pytest.fixture
def tiny_vae():
    def make(data_dim=64, **model):
        cfg = {**TINY, "model": {**TINY["model"], **model}}
        return build_model(cfg, data_dim)

    return make
