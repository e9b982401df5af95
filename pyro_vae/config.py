"""The check of a whole run config before any work: every key known, every value typed and in
range, each mistake a one-line ``ValueError`` that names the key, the bad value and what is valid.

A run config is a mapping of the top-level keys (:class:`RunConfig`) and the sections

- ``data`` (:class:`DataConfig`) and ``train`` (:class:`pyro_vae.train.TrainConfig`) and ``eval``
  (:class:`EvalConfig`), checked here, field by field;
- ``model``, ``prior``, ``guide``, ``likelihood`` and ``objective``, each a registry ``name`` and
  that choice's options: the registries check the names and option names, the constructors the
  values (:func:`pyro_vae.build.build_model`); here the network options every model shares
  (``model.latent_dim``, ``model.hidden``, ``model.activation``) are checked under their keys.

:func:`check_config` returns the config with its values normalized (``data.path`` absolute, so
a run can be evaluated from any directory).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import torch

from .checks import config_section, positive_int
from .data import check_data_options
from .nets import ACTIVATIONS, GATED
from .train import TrainConfig

SECTIONS = ("data", "model", "prior", "guide", "likelihood", "objective", "train", "eval")


def check_bool(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def check_device(device) -> str:
    """``device`` (``cpu``, ``cuda`` or ``cuda:N``) as a string, or a one-line error when it is
    malformed or names a GPU this machine does not have."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={device} but torch sees no CUDA GPU on this machine "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use device=cpu")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device={device} but this machine has {count} CUDA GPU(s): cuda:0 .. cuda:{count - 1}")
    return str(parsed)


@dataclass
class RunConfig:
    """The top-level keys of a run config.

    :param seed: the run's seed (>= 0): initialization, training and evaluation derive theirs from it.
    :param device: ``cpu``, ``cuda`` or ``cuda:N``.
    :param progress: show tqdm progress bars.
    """

    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):
        self.seed = positive_int(self.seed, "seed", 0)
        self.device = check_device(self.device)
        check_bool(self.progress, "progress")


@dataclass
class DataConfig:
    """The ``data:`` section.

    :param name: a dataset of :data:`pyro_vae.data.DATASETS`.
    :param path: the directory of a dataset read from files (``mnist``), made absolute; None otherwise.
    :param val_fraction: the part of each label's training points held out for validation, in [0, 1).
    """

    name: str
    path: Optional[str] = None
    val_fraction: float = 0.1

    def __post_init__(self):
        check_data_options(self.name, self.val_fraction)
        if self.path is not None:
            if not isinstance(self.path, str) or not self.path:
                raise ValueError(f"data.path must be a directory name or null, got {self.path!r}")
            self.path = os.path.abspath(os.path.expanduser(self.path))


@dataclass
class EvalConfig:
    """The ``eval:`` section.

    :param num_samples: K, the importance samples per test image of the summary's log p(x); None
        (``null``) skips it.
    """

    num_samples: Optional[int] = 1000

    def __post_init__(self):
        if self.num_samples is not None:
            self.num_samples = positive_int(self.num_samples, "eval.num_samples")


def _check_network(model: Mapping[str, Any]) -> None:
    if "latent_dim" in model:
        positive_int(model["latent_dim"], "model.latent_dim")
    hidden = model.get("hidden", [])
    if not isinstance(hidden, (list, tuple)):
        raise ValueError(f"model.hidden must be a list of layer sizes, e.g. [200, 200], got {hidden!r}")
    for size in hidden:
        positive_int(size, "model.hidden")
    choices = sorted([*ACTIVATIONS, GATED])
    if model.get("activation", "tanh") not in choices:
        raise ValueError(f"model.activation must be one of {', '.join(choices)}, got {model['activation']!r}")


def _require(cfg: Mapping[str, Any], name: str) -> None:
    if not isinstance(cfg.get(name), Mapping):
        raise ValueError(f"the config has no {name} section (got {cfg.get(name)!r}); start from pyro_vae/conf/config.yaml")


def _section(cfg: Mapping[str, Any], name: str, cls) -> Dict[str, Any]:
    _require(cfg, name)
    return dataclasses.asdict(cls(**config_section(cfg, name, [f.name for f in dataclasses.fields(cls)])))


def check_config(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """Check every key and value of a run config; return it normalized (a new dict).

    :raises ValueError: one line naming the first bad key, its value and the valid range or choices.
    """
    top = [f.name for f in dataclasses.fields(RunConfig)]
    unknown = sorted(set(cfg) - set(top) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]}; a run config takes: {', '.join(top + list(SECTIONS))}")
    out = {key: cfg[key] for key in cfg}
    out.update(dataclasses.asdict(RunConfig(**{k: cfg[k] for k in top if k in cfg})))
    for name, cls in (("data", DataConfig), ("train", TrainConfig), ("eval", EvalConfig)):
        out[name] = _section(cfg, name, cls)
    for name in ("model", "likelihood", "objective"):
        _require(cfg, name)
    _check_network(cfg["model"])
    return out
