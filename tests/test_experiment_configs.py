"""Every variant of experiments/compare_models/config.yaml builds: a typo in a variant would
otherwise surface only after hours of training the variants listed before it."""

import importlib.util
import os

import pytest
import torch

from pyro_vae import build_objective, build_model
from pyro_vae.train import TrainConfig

RUN_PY = os.path.join(os.path.dirname(__file__), "..", "experiments", "compare_models", "run.py")


def _run_module():
    spec = importlib.util.spec_from_file_location("compare_models_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


RUN = _run_module()
CONF = RUN.load_config()


@pytest.mark.parametrize("variant", sorted(CONF["variants"]))
def test_compare_models_variant_builds(variant):
    """Each variant builds and its objective gives a finite loss on a batch of binary images."""
    cfg = RUN.variant_config(CONF, variant, seed=0)
    torch.manual_seed(0)
    vae, objective = build_model(cfg, 784), build_objective(cfg)
    x = torch.bernoulli(torch.full((3, 784), 0.3))
    with vae.without_param_store():
        assert torch.isfinite(objective.differentiable_loss(vae.model, vae.guide, x, num_data=3))
    TrainConfig(**cfg["train"])


def test_variant_overrides_only_the_keys_it_names():
    conf = {"base": {"train": {"epochs": 100, "lr": 1e-3}, "prior": {"name": "standard_normal"}},
            "variants": {"long": {"train": {"epochs": 300}}}}
    cfg = RUN.variant_config(conf, "long", seed=3)
    assert cfg["train"] == {"epochs": 300, "lr": 1e-3}
    assert cfg["prior"] == {"name": "standard_normal"} and cfg["seed"] == 3
    assert conf["base"]["train"]["epochs"] == 100  # the base is not modified
