"""Every prior × guide pair costs about what its parts cost: the tensors one ELBO step saves for
its backward pass (a deterministic measure of the step's memory, in bytes) stay within 3× the
sum of the prior's with the diagonal guide and the guide's with the standard-normal prior."""

import pyro
import pytest
import torch

from pyro_vae import build_model, build_objective

PRIORS = ["standard_normal", "mixture", "vamp", "flow"]
GUIDES = ["diagonal_normal", "full_normal", "iaf"]


def saved_bytes(prior, guide, objective="elbo"):
    cfg = {"model": {"name": "vae", "latent_dim": 10, "hidden": [50], "activation": "tanh"},
           "prior": {"name": prior, **({"num_components": 50} if prior in ("vamp", "mixture") else {})},
           "guide": {"name": guide}, "likelihood": {"name": "bernoulli"},
           "objective": {"name": objective, **({"num_particles": 5, "estimator": "dreg"} if objective == "iwae" else {})}}
    torch.manual_seed(0)
    vae, loss_fn = build_model(cfg, 64), build_objective(cfg)
    x = torch.bernoulli(torch.full((100, 64), 0.3))
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with pyro.validation_enabled(False), vae.without_param_store(), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn.differentiable_loss(vae.model, vae.guide, x, num_data=1000)
    loss.backward()
    return total


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_every_prior_guide_pair_costs_about_its_parts(objective):
    cost = {(p, g): saved_bytes(p, g, objective) for p in PRIORS for g in GUIDES}
    for (prior, guide), value in cost.items():
        parts = cost[prior, "diagonal_normal"] + cost["standard_normal", guide]
        assert value <= 3 * parts, (prior, guide, value, parts)
