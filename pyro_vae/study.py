"""Studies: a grid of variants × seeds trained by one command, each run in a directory of its own.

    pyro-vae train -m +study=compare_models seed=0,1,2                      every variant, 3 seeds
    pyro-vae train -m +study=compare_models study.variant=vae,iwae_k5 seed=0

A study is a config of the ``study`` group (``pyro_vae/conf/study/NAME.yaml``, package
``_global_``): the settings its runs share, as ordinary config values, and under ``study.variants``
each variant as a list of command-line overrides::

    study:
      name: compare_models
      dir: runs/compare_models
      variant: null
      variants:
        vae: []
        iwae_k5: [objective=iwae, objective.num_particles=5]

``study.variant`` is an ordinary key, so Hydra's basic sweeper sweeps it like ``seed``. Each job
composes the config again with its variant's overrides before the command line's
(:func:`variant_overrides`): the study's values, then the variant's, then the command line's,
the later winning. The run's directory is ``<study.dir>/<variant>/<overrides>``
(:func:`run_name`: ``seed=0``, or ``seed=0,train.epochs=2`` with more overrides), so it is the same
every time the command is repeated. Repeating it resumes (:func:`run_in`): a finished run is
skipped, an interrupted one continues from its state.pt (:func:`pyro_vae.experiment.resume_run`,
the numbers of an uninterrupted run), one that failed is skipped with its message. A run holds an
exclusive lock on its directory (``.lock``, released when its process ends, however it ends), so
the same command started in several shells shares the work out: each skips the runs another
process holds. Hydra's own sweep record (multirun.yaml) goes to ``<study.dir>/.sweeps/<time>/``,
one per command, so nothing the runs share is written by two of them.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from typing import Any, Dict, List, Mapping, Sequence

from . import rundir
from .config import check_config
from .experiment import RESUMABLE_CHANGES, RunFinished, resume_run, train_run
from .resume import config_difference

STUDY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf", "study")
NOT_IN_NAME = ("study", "study.variant", "study.dir", "progress", "data.path")  # keys left out of a run's name


def study_names() -> List[str]:
    return sorted(f[:-5] for f in os.listdir(STUDY_DIR) if f.endswith(".yaml"))


def load_study(name: str) -> Dict[str, Any]:
    """The ``study:`` section of ``conf/study/<name>.yaml``; a one-line ``ValueError`` for an unknown name."""
    from omegaconf import OmegaConf

    if name not in study_names():
        from .studies import exact_study_names

        if name in exact_study_names():
            raise ValueError(f"{name} is a study of an exact model, not of training runs: run it with "
                             f"pyro-vae exact {name}")
        raise ValueError(f"unknown study {name!r}; choose one of: {', '.join(study_names())}")
    return OmegaConf.to_container(OmegaConf.load(os.path.join(STUDY_DIR, f"{name}.yaml")))["study"]


def _override_key(arg: str) -> str:
    return re.split(r"[=@]", arg.lstrip("+~"), maxsplit=1)[0]


def expand_argv(argv: Sequence[str]) -> List[str]:
    """The command line of ``pyro-vae train`` with its study checked: the study and each variant
    named exist, and a sweep (``-m``) that names no ``study.variant`` sweeps them all. Unchanged
    without ``+study=``."""
    argv = list(argv)
    names = [a.split("=", 1)[1] for a in argv if _override_key(a) == "study" and "=" in a]
    if not names:
        return argv
    study = load_study(names[-1])
    chosen = [a.split("=", 1)[1] for a in argv if _override_key(a) == "study.variant"]
    if not chosen:
        if not {"-m", "--multirun"} & set(argv):
            raise ValueError(f"study {study['name']}: name a variant (study.variant=NAME), or sweep them all "
                             f"with -m; variants: {', '.join(study['variants'])}")
        argv.append(f"study.variant={','.join(study['variants'])}")
        chosen = [argv[-1].split("=", 1)[1]]
    for variant in chosen[-1].split(","):
        if variant not in study["variants"]:
            raise ValueError(f"study {study['name']} has no variant {variant!r}; choose one of: "
                             f"{', '.join(study['variants'])}")
    return argv


def variant_overrides(study: Mapping[str, Any], task_overrides: Sequence[str]) -> List[str]:
    """The overrides that compose a study job's config: its variant's, then the command line's."""
    variant = study.get("variant")
    if variant not in study["variants"]:
        raise ValueError(f"study {study['name']} has no variant {variant!r}; choose one of: "
                         f"{', '.join(study['variants'])}")
    return [*study["variants"][variant], *task_overrides]


def run_name(cfg: Mapping[str, Any], task_overrides: Sequence[str]) -> str:
    """``seed=S`` and the command line's other overrides, each ``key=value`` with the value as the
    config holds it (``train.early_stopping=false``, ``model.hidden=[16]``; a group's choice as
    named), sorted and joined by commas, those of :data:`NOT_IN_NAME` left out: the same name for
    the same command."""
    import json

    def value(key, text):
        node = cfg
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is None and text not in ("null", "None"):
            return text
        return text if isinstance(node, Mapping) else node if isinstance(node, str) else \
            json.dumps(node, separators=(",", ":"))

    keys = {_override_key(a): a.split("=", 1)[1] for a in task_overrides if "=" in a}
    keys = {k: v for k, v in keys.items() if k not in NOT_IN_NAME and not k.startswith("hydra.")}
    keys["seed"] = str(cfg["seed"])
    return ",".join(f"{k}={value(k, keys[k])}" for k in sorted(keys)).replace("/", "_")


class RunSkipped(Exception):
    """A study run with nothing to do here: finished, failed earlier, or held by another process."""


def run_in(cfg: Mapping[str, Any], run_dir: str, overrides: Sequence[str] = (), progress: bool = True):
    """Train the run ``cfg`` in exactly ``run_dir``, or resume it there; returns the summary.

    :raises RunSkipped: the run has finished, failed earlier (the message says why), or another
        process holds it.
    :raises ValueError: ``run_dir`` holds a run of another config (which key differs).
    """
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when this process ends
        except BlockingIOError:
            raise RunSkipped(f"run {run_dir} is held by another process; skipped") from None
        status = rundir.read_status(run_dir)
        if status is None:
            if any(os.path.exists(os.path.join(run_dir, f)) for f in rundir.RUN_FILES):
                raise ValueError(f"{run_dir} holds files of a run but no status.json; move it away to train it anew")
            return train_run(cfg, run_dir, progress=progress, overrides=overrides)
        diff = config_difference(rundir.read_config(run_dir), check_config(cfg), ignore=RESUMABLE_CHANGES)
        if diff:
            raise ValueError(f"{run_dir} holds a run of another config ({diff}, saved vs now): the study changed; "
                             f"move that run away, or give this one another study.dir")
        if status["status"] == "failed":
            raise RunSkipped(f"run {run_dir} failed earlier ({status.get('message')}); skipped: move it away to "
                             f"train it again")
        if status["status"] == "running":
            raise RunSkipped(f"run {run_dir} is running (process {status.get('pid')} on {status.get('host')}); skipped")
        if status["status"] == "finished":
            raise RunFinished(f"run {run_dir} has finished (best epoch {status.get('best_epoch')}); skipped")
        if os.path.isfile(os.path.join(run_dir, "state.pt")):
            return resume_run(run_dir, progress=progress)
        for name in os.listdir(run_dir):  # interrupted before its first epoch ended: nothing to keep
            if name != ".lock":
                path = os.path.join(run_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        return train_run(cfg, run_dir, progress=progress, overrides=overrides)
