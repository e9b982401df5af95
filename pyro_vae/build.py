"""Config -> objects. A config is a plain mapping with sections ``model`` (latent_dim, hidden,
activation), ``prior``, ``guide``, ``likelihood`` and ``objective`` (each a ``name`` plus that
choice's own options), as in ``pyro_vae/conf/config.yaml``."""

from __future__ import annotations

from typing import Any, Mapping

from .guides import GUIDES
from .likelihoods import LIKELIHOODS
from .objectives import OBJECTIVES
from .priors import PRIORS
from .vae import VAE


def _options(section: Mapping[str, Any]) -> dict:
    return {k: v for k, v in section.items() if k != "name"}


def build_vae(cfg: Mapping[str, Any], data_dim: int) -> VAE:
    model = cfg["model"]
    context = dict(data_dim=data_dim, latent_dim=int(model["latent_dim"]),
                   hidden=[int(h) for h in model["hidden"]], activation=model["activation"])
    encoder = GUIDES.build(cfg["guide"]["name"], _options(cfg["guide"]), **context)
    # A prior may be built from the guide (the VampPrior), so the guide comes first.
    prior = PRIORS.build(cfg["prior"]["name"], _options(cfg["prior"]), encoder=encoder, **context)
    likelihood = LIKELIHOODS.build(cfg["likelihood"]["name"], _options(cfg["likelihood"]), **context)
    return VAE(prior, likelihood, encoder)


def build_objective(cfg: Mapping[str, Any]):
    return OBJECTIVES.build(cfg["objective"]["name"], _options(cfg["objective"]))
