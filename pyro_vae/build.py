"""Config -> objects. A config is a plain mapping of sections, each a ``name`` plus that choice's
own options, as ``pyro_vae/conf/config.yaml`` composes them:

- ``model``: which model (``vae``, the default when ``name`` is absent, ``two_layer`` or ``gmvae``)
  and its options: ``latent_dim``, ``hidden``, ``activation``, for the VAE and the two-layer VAE
  the network ``net`` (``mlp`` or ``conv``, :data:`pyro_vae.nets.NETS`) with its options
  ``image_shape`` and ``channels``, and those of the two-layer VAE and of the GMVAE;
- ``likelihood`` p(x|z), for every model;
- ``prior`` p(z) and ``guide`` q(z|x), for the VAE (for the two-layer VAE, p(z2) and q(z1|x)):
  the GMVAE has its own, p(c) p(z|c) and q(c|x) q(z|x,c), and refuses the sections;
- ``objective``, the training loss.

A new model is one function ``@MODELS.register("name")`` below, taking ``cfg``, ``data_dim`` and
its options, and one ``conf/model/<name>.yaml``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .gmvae import GMVAE
from .guides import GUIDES, DiagonalNormalGuide
from .hierarchical import HierarchicalVAE
from .likelihoods import LIKELIHOODS
from .nets import NETS
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


def _network(data_dim, latent_dim, hidden, activation, net=None, image_shape=None, channels=None) -> dict:
    """The context every guide, prior and likelihood is built with; ``net`` (a name in
    :data:`pyro_vae.nets.NETS`, None: none given) becomes the factory of their networks, with
    those of ``image_shape`` and ``channels`` that are given as its options."""
    context = dict(data_dim=data_dim, latent_dim=int(latent_dim), hidden=[int(h) for h in hidden],
                   activation=activation)
    if net is not None:
        options = {k: v for k, v in (("image_shape", image_shape), ("channels", channels)) if v is not None}
        context["net"] = NETS.build(net, options, **context)
    return context


@MODELS.register("vae")
def vae(cfg: Mapping[str, Any], data_dim: int, latent_dim: int = 10, hidden: Sequence[int] = (200, 200),
        activation: str = "tanh", net: str = "mlp", image_shape: Sequence[int] | None = None,
        channels: Sequence[int] | None = None) -> VAE:
    """A :class:`pyro_vae.vae.VAE` of the ``prior``, ``likelihood`` and ``guide`` sections, their
    networks of kind ``net`` (``image_shape`` and ``channels``: :class:`pyro_vae.nets.Conv`)."""
    context = _network(data_dim, latent_dim, hidden, activation, net, image_shape, channels)
    encoder = _build(GUIDES, cfg, "guide", "vae", **context)
    # A prior may be built from the guide (the VampPrior), so the guide comes first.
    prior = _build(PRIORS, cfg, "prior", "vae", encoder=encoder, **context)
    return VAE(prior, _build(LIKELIHOODS, cfg, "likelihood", "vae", **context), encoder)


@MODELS.register("two_layer")
def two_layer(cfg: Mapping[str, Any], data_dim: int, latent_dim: int = 100, hidden: Sequence[int] = (200, 200),
              activation: str = "tanh", latent_dim2: int = 50, hidden2: Sequence[int] = (100, 100),
              net: str = "mlp", image_shape: Sequence[int] | None = None,
              channels: Sequence[int] | None = None) -> HierarchicalVAE:
    """A :class:`pyro_vae.hierarchical.HierarchicalVAE`: q(z1|x) of the ``guide`` section and p(x|z1)
    of the ``likelihood`` section, their networks ``hidden`` (of kind ``net``) around z1 of size
    ``latent_dim``; p(z2) of the ``prior`` section over z2 of size ``latent_dim2``; q(z2|z1) and
    p(z1|z2) diagonal Gaussians with MLPs ``hidden2`` and reversed ``hidden2``."""
    if (cfg.get("prior") or {}).get("name") == "vamp":
        raise ValueError("model 'two_layer' cannot take prior=vamp (its pseudo-inputs would live in z1's space); "
                         "choose prior=standard_normal, mixture or flow")
    if not isinstance(hidden2, (list, tuple)):
        raise ValueError(f"model.hidden2 must be a list of layer sizes, e.g. [100, 100], got {hidden2!r}")
    context = _network(data_dim, latent_dim, hidden, activation, net, image_shape, channels)
    top = _network(context["latent_dim"], latent_dim2, hidden2, activation)
    encoder = _build(GUIDES, cfg, "guide", "two_layer", **context)
    likelihood = _build(LIKELIHOODS, cfg, "likelihood", "two_layer", **context)
    prior = _build(PRIORS, cfg, "prior", "two_layer", **{**top, "data_dim": top["latent_dim"]})
    top_encoder = DiagonalNormalGuide(**top)
    top_decoder = DiagonalNormalGuide(top["latent_dim"], context["latent_dim"], list(reversed(top["hidden"])),
                                      activation)
    return HierarchicalVAE(prior, top_decoder, likelihood, encoder, top_encoder)


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
    """The model that ``cfg`` describes, for data of dimension ``data_dim``: a ``VAE``,
    ``HierarchicalVAE`` or ``GMVAE``."""
    model = dict(cfg["model"])
    return MODELS.build(model.pop("name", "vae"), model, cfg=cfg, data_dim=data_dim)


def build_objective(cfg: Mapping[str, Any]):
    return OBJECTIVES.build(cfg["objective"]["name"], _options(cfg["objective"]))
