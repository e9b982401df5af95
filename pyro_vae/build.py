"""Config -> objects. A config is a plain mapping of sections, each a ``name`` plus that choice's
own options, as ``pyro_vae/conf/config.yaml`` composes them:

- ``model``: which model (``vae``, the default when ``name`` is absent, or ``gmvae``) and its
  options: ``latent_dim``, ``hidden``, ``activation`` and, for the GMVAE, those of
  :class:`pyro_vae.gmvae.GMVAE`;
- ``likelihood`` p(x|z), for every model;
- ``prior`` p(z) and ``guide`` q(z|x), for the VAE only: the GMVAE has its own, p(c) p(z|c) and
  q(c|x) q(z|x,c), and refuses the sections;
- ``objective``, the training loss.

A new model is one function ``@MODELS.register("name")`` below, taking ``cfg``, ``data_dim`` and
its options, and one ``conf/model/<name>.yaml``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .gmvae import GMVAE
from .guides import GUIDES
from .likelihoods import LIKELIHOODS
from .objectives import OBJECTIVES
from .priors import PRIORS
from .registry import Registry
from .vae import VAE

MODELS = Registry("model")


def _options(section: Mapping[str, Any]) -> dict:
    return {k: v for k, v in section.items() if k != "name"}


def _build(registry: Registry, cfg: Mapping[str, Any], key: str, model: str, **context):
    if cfg.get(key) is None:
        raise ValueError(f"model {model!r} needs a {key!r} section: a name ({', '.join(registry.names())}) "
                         f"and its options")
    return registry.build(cfg[key]["name"], _options(cfg[key]), **context)


def _network(data_dim, latent_dim, hidden, activation) -> dict:
    return dict(data_dim=data_dim, latent_dim=int(latent_dim), hidden=[int(h) for h in hidden],
                activation=activation)


@MODELS.register("vae")
def vae(cfg: Mapping[str, Any], data_dim: int, latent_dim: int = 10, hidden: Sequence[int] = (200, 200),
        activation: str = "tanh") -> VAE:
    """A :class:`pyro_vae.vae.VAE` of the ``prior``, ``likelihood`` and ``guide`` sections."""
    context = _network(data_dim, latent_dim, hidden, activation)
    encoder = _build(GUIDES, cfg, "guide", "vae", **context)
    # A prior may be built from the guide (the VampPrior), so the guide comes first.
    prior = _build(PRIORS, cfg, "prior", "vae", encoder=encoder, **context)
    return VAE(prior, _build(LIKELIHOODS, cfg, "likelihood", "vae", **context), encoder)


@MODELS.register("gmvae")
def gmvae(cfg: Mapping[str, Any], data_dim: int, latent_dim: int = 10, hidden: Sequence[int] = (200, 200),
          activation: str = "tanh", num_clusters: int = 10, prior_spread: float = 0.0,
          embedding_std: float = 1.0, learn_weights: bool = False, init: str = "vade", pretrain_epochs: int = 100,
          warmup_epochs: int = 20, gmm_restarts: int = 5) -> GMVAE:
    """A :class:`pyro_vae.gmvae.GMVAE` of the ``likelihood`` section; ``init`` chooses its start
    from the data, and the last three options are those of ``init=vade``
    (:class:`pyro_vae.gmvae_init.VaDEInit`)."""
    for key in ("prior", "guide"):
        if cfg.get(key) is not None:
            raise ValueError(f"model 'gmvae' has its own prior p(c) p(z|c) and guide q(c|x) q(z|x,c); "
                             f"remove the {key} section ({key}={cfg[key].get('name')!r})")
    context = _network(data_dim, latent_dim, hidden, activation)
    likelihood = _build(LIKELIHOODS, cfg, "likelihood", "gmvae", **context)
    return GMVAE(likelihood, num_clusters, context["hidden"], activation, prior_spread, embedding_std,
                 learn_weights, init, dict(pretrain_epochs=pretrain_epochs, warmup_epochs=warmup_epochs,
                                           gmm_restarts=gmm_restarts))


def build_model(cfg: Mapping[str, Any], data_dim: int):
    """The model that ``cfg`` describes, for data of dimension ``data_dim``: a ``VAE`` or ``GMVAE``."""
    model = dict(cfg["model"])
    return MODELS.build(model.pop("name", "vae"), model, cfg=cfg, data_dim=data_dim)


def build_objective(cfg: Mapping[str, Any]):
    return OBJECTIVES.build(cfg["objective"]["name"], _options(cfg["objective"]))
