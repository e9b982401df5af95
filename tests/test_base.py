"""The base the VAE and the GMVAE share (pyro_vae.base.LatentVariableModel): instance names in
Pyro's param store, the param-store switch, the data plate (subsampling with explicit indices)
and the checks of x, each for both models."""

import pyro
import pytest
import torch
from pyro import poutine

from pyro_vae import build_model
from pyro_vae.base import LatentVariableModel

D = 6
MODELS = {
    "vae": {"model": {"name": "vae", "latent_dim": 2, "hidden": [8], "activation": "tanh"},
            "prior": {"name": "standard_normal"}, "guide": {"name": "diagonal_normal"},
            "likelihood": {"name": "bernoulli"}},
    "gmvae": {"model": {"name": "gmvae", "latent_dim": 2, "hidden": [8], "num_clusters": 3},
              "likelihood": {"name": "bernoulli"}},
}


@pytest.fixture(params=sorted(MODELS))
def make(request):
    return lambda: build_model(MODELS[request.param], D)


def data(n=10):
    return torch.bernoulli(torch.full((n, D), 0.4), generator=torch.Generator().manual_seed(0))


def test_names_count_per_kind_and_can_be_given():
    a, b = build_model(MODELS["vae"], D), build_model(MODELS["vae"], D)
    g, h = build_model(MODELS["gmvae"], D), build_model(MODELS["gmvae"], D)
    assert isinstance(a, LatentVariableModel) and isinstance(g, LatentVariableModel)
    k, j = int(a.name[3:]), int(g.name[5:])
    assert (a.name, b.name, g.name, h.name) == (f"vae{k}", f"vae{k + 1}", f"gmvae{j}", f"gmvae{j + 1}")
    named = type(a)(a.prior, a.likelihood, a.encoder, name="mine")
    poutine.trace(named.guide).get_trace(data())
    assert {n.split("$$$")[0] for n in pyro.get_param_store().keys()} == {"mine"}


def test_model_and_guide_register_every_parameter_under_the_name(make):
    m, x = make(), data()
    poutine.trace(m.model).get_trace(x)
    poutine.trace(m.guide).get_trace(x)
    store = pyro.get_param_store()
    assert sorted(store.keys()) == sorted(f"{m.name}$$${n}" for n, _ in m.named_parameters())


def test_without_param_store_registers_nothing_and_restores_the_switch(make):
    m, x = make(), data()
    with m.without_param_store():
        with pytest.raises(RuntimeError, match="inside"):
            with m.without_param_store():  # nested, left by an exception
                raise RuntimeError("inside")
        tr = poutine.trace(m.guide).get_trace(x)
        poutine.trace(m.model).get_trace(x)
    assert len(pyro.get_param_store()) == 0
    assert not any(site["type"] == "param" for site in tr.nodes.values())
    poutine.trace(m.guide).get_trace(x)  # switched back on
    assert len(pyro.get_param_store()) > 0


def test_subsampled_plate_scales_by_num_data_over_batch_with_the_batch_indices(make):
    m, x = make(), data(10)
    full = poutine.trace(m.model).get_trace(x)
    rng = torch.get_rng_state()
    with poutine.trace() as tr, m.data_plate(x, num_data=50):
        pass
    assert torch.equal(torch.get_rng_state(), rng)  # indices given: Pyro draws no subsample of its own
    torch.testing.assert_close(tr.trace.nodes["data"]["value"], torch.arange(10))
    scaled = poutine.trace(m.model).get_trace(x, num_data=50)
    assert scaled.nodes["x"]["scale"] == 5.0 and full.nodes["x"]["scale"] == 1.0
    assert poutine.trace(m.model).get_trace(x, num_data=10).nodes["x"]["scale"] == 1.0


@pytest.mark.parametrize("num_data, message", [
    (5, r"num_data=5 is smaller than the batch \(10 rows\)"),
    (0, "num_data must be an integer >= 1, got 0"),
    (12.5, "num_data must be an integer >= 1, got 12.5"),
])
def test_bad_num_data_is_one_line(make, num_data, message):
    with pytest.raises(ValueError, match=message) as e:
        make().model(data(10), num_data=num_data)
    assert "\n" not in str(e.value)


def test_shape_and_finite_checks(make):
    m = make()
    for fn in (m.model, m.guide):
        with pytest.raises(ValueError, match=r"expected x of shape \(N, 6\), got \(2, 2, 3\); flatten images"):
            fn(torch.zeros(2, 2, 3))
    x = data(4)
    x[2, 0] = float("inf")
    for fn in (m.model, m.guide):
        with pytest.raises(ValueError, match=r"x has NaN or inf in 1 row\(s\) \(first: \[2\]\)") as e:
            fn(x)
        assert "\n" not in str(e.value)
    # With validation off (the trainer, after checking its data once) only the shape is checked.
    with pyro.validation_enabled(False):
        with pytest.raises(ValueError, match="expected x of shape"):
            m.guide(torch.zeros(4, 5))
        poutine.trace(m.guide).get_trace(x)


def test_reconstruct_decodes_the_encoding(make):
    m, x = make(), data(4)
    torch.testing.assert_close(m.reconstruct(x), m.likelihood.mean(m.encode(x)))
