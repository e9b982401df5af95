"""Every prior x guide x likelihood trains a few steps on digits and ends finite; every config file
builds; a user's own prior, guide class, or plain Pyro guide function plugs in unedited."""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_vae import build_objective, build_model, load_dataset
from pyro_vae.guides import GUIDES, Guide
from pyro_vae.likelihoods import LIKELIHOODS
from pyro_vae.nets import mlp
from pyro_vae.objectives import IWAE
from pyro_vae.priors import PRIORS, Prior
from pyro_vae.train import evaluate_elbo

TINY_OPTIONS = {  # small enough that 48 combinations train in seconds
    "mixture": {"num_components": 3}, "vamp": {"num_components": 3}, "flow": {"num_flows": 1, "flow_hidden": [8]},
    "iaf": {"num_flows": 1, "context_dim": 4, "flow_hidden": [8]},
}


@pytest.fixture(scope="module")
def digits():
    splits = load_dataset("digits", None, 0.1)
    return splits.train_x[:64], splits.data_dim


def config(prior, guide, likelihood, objective=None):
    return {"model": {"latent_dim": 2, "hidden": [8], "activation": "tanh"},
            "prior": {"name": prior, **TINY_OPTIONS.get(prior, {})},
            "guide": {"name": guide, **TINY_OPTIONS.get(guide, {})},
            "likelihood": {"name": likelihood},
            "objective": objective or {"name": "elbo", "num_particles": 1}}


def train_briefly(vae, objective, x, steps=3):
    vae.likelihood.check_data(x)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
    for step in range(steps):
        batch = x[step * 16:(step + 1) * 16]
        batch = torch.bernoulli(batch) if vae.likelihood.binarize else batch
        loss = objective.differentiable_loss(vae.model, vae.guide, batch, num_data=len(x)) / len(x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss


@pytest.mark.heavy
@pytest.mark.parametrize("prior,guide,likelihood", list(itertools.product(
    PRIORS.names(), GUIDES.names(), LIKELIHOODS.names())))
def test_every_combination_trains_and_ends_finite(digits, prior, guide, likelihood):
    x, data_dim = digits
    cfg = config(prior, guide, likelihood)
    vae = build_model(cfg, data_dim)
    loss = train_briefly(vae, build_objective(cfg), x)
    assert torch.isfinite(loss)
    x_eval = torch.bernoulli(x[:32]) if vae.likelihood.binarize else x[:32]
    assert all(math.isfinite(v) for v in evaluate_elbo(vae, x_eval).values())
    assert torch.isfinite(vae.sample(2)).all() and torch.isfinite(vae.reconstruct(x[:2])).all()


@pytest.mark.heavy
@pytest.mark.parametrize("prior,guide", list(itertools.product(PRIORS.names(), GUIDES.names())))
@pytest.mark.parametrize("objective", [{"name": "mean_field"}, {"name": "iwae", "num_particles": 3, "estimator": "dreg"}])
def test_every_prior_and_guide_trains_with_each_objective(digits, prior, guide, objective):
    x, data_dim = digits
    cfg = config(prior, guide, "bernoulli", objective)
    assert torch.isfinite(train_briefly(build_model(cfg, data_dim), build_objective(cfg), x))


def test_every_config_file_builds_and_the_issue_example_composes():
    from hydra import compose, initialize_config_dir

    from pyro_vae.cli import CONF_DIR, group_choices
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for group in ("prior", "guide", "likelihood", "objective"):
            for choice in group_choices(group):
                cfg = compose("config", overrides=[f"{group}={choice}", "model.latent_dim=2", "model.hidden=[8]"])
                build_model(cfg, 64)
                build_objective(cfg)
        cfg = compose("config", overrides=["prior=vamp", "guide=iaf", "likelihood=bernoulli", "objective=iwae",
                                           "objective.num_particles=5"])
    vae, objective = build_model(cfg, 64), build_objective(cfg)
    assert type(vae.prior).__name__ == "VampPrior" and vae.prior.encoder is vae.encoder
    assert type(vae.encoder).__name__ == "IAFGuide"
    assert isinstance(objective, IWAE) and objective.num_particles == 5


# --- plugging in the user's own choices, without editing the library -----------------------------

@PRIORS.register("test_laplace")
class LaplacePrior(Prior):
    """p(z) = prod_i Laplace(z_i; 0, b), b learned."""

    def __init__(self, latent_dim, scale=1.0):
        super().__init__(latent_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    def forward(self):
        return dist.Laplace(torch.zeros(self.latent_dim), self.log_scale.exp()).to_event(1)


@GUIDES.register("test_student_t")
class StudentTGuide(Guide):
    """q(z|x) = prod_i StudentT(z_i; nu, mu_i(x), sigma_i(x)): heavier tails than the Gaussian."""

    def __init__(self, data_dim, latent_dim, hidden=(200, 200), activation="tanh", df=4.0):
        super().__init__(data_dim, latent_dim)
        self.df = df
        self.net = mlp([data_dim, *hidden, 2 * latent_dim], activation)

    def forward(self, x):
        loc, raw_scale = self.net(x).chunk(2, -1)
        return dist.StudentT(self.df, loc, nn.functional.softplus(raw_scale) + 1e-4).to_event(1)


def test_a_users_prior_and_guide_classes_plug_in_by_name(digits):
    x, data_dim = digits
    cfg = config("test_laplace", "test_student_t", "bernoulli", {"name": "iwae", "num_particles": 4, "estimator": "dreg"})
    cfg["guide"]["df"] = 5.0
    vae = build_model(cfg, data_dim)
    assert isinstance(vae.prior, LaplacePrior) and vae.encoder.df == 5.0
    assert torch.isfinite(train_briefly(vae, build_objective(cfg), x))


def test_a_plain_pyro_guide_function_plugs_in(digits):
    """Any Pyro guide with the model's signature, sampling "z" in the "data" plate, trains the VAE."""
    x, data_dim = digits
    vae = build_model(config("standard_normal", "diagonal_normal", "bernoulli"), data_dim)
    encoder = mlp([data_dim, 8, 2], "tanh")
    encoder_before = encoder[0].weight.detach().clone()

    def my_guide(x, num_data=None):
        pyro.module("my_encoder", encoder)
        scale = pyro.param("my_scale", torch.ones(2), constraint=dist.constraints.positive)
        with pyro.plate("data", num_data or len(x), subsample=torch.arange(len(x))):
            pyro.sample("z", dist.Normal(encoder(x), scale).to_event(1))

    svi = pyro.infer.SVI(vae.model, my_guide, pyro.optim.Adam({"lr": 1e-2}), IWAE(4, "dreg"))
    losses = [svi.step(torch.bernoulli(x), num_data=len(x)) for _ in range(5)]
    assert all(math.isfinite(v) for v in losses)
    assert not torch.allclose(encoder[0].weight, encoder_before)  # the user's network trained too
    assert not torch.allclose(pyro.param("my_scale"), torch.ones(2))
