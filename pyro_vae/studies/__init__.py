"""Studies of the exact models: numbers a closed form can check, each written to a results file.

    pyro-vae exact linear_gaussian [KEY=VALUE ...] [--out DIR]
    pyro-vae exact gaussian_mixture [KEY=VALUE ...] [--out DIR]

A study of this kind is a config ``pyro_vae/conf/exact/<name>.yaml`` and a module
``pyro_vae/studies/<name>.py`` with two functions: ``check_config(cfg)`` raises a one-line
``ValueError`` for a bad value before any work starts, and ``run(cfg, out, progress)`` computes
everything from ``cfg`` (a plain dict: the config with the command line's ``KEY=VALUE`` overrides
merged in), draws its figures into ``out`` (:func:`pyro_vae.figures.save_figure`) and returns
``(results, body)``: every number, and the Markdown of its tables (made by pandas) and their
reading. :func:`run_exact_study` writes them as ``out/results.json`` and ``out/results.md``
(atomically), headed by the command that made them. The same config gives the same numbers.

The training studies (a grid of VAE variants × seeds) are configs of the ``study`` group instead,
run by ``pyro-vae train -m +study=NAME`` (:mod:`pyro_vae.study`).
"""

from __future__ import annotations

import importlib
import math
import os
from typing import Any, Dict, List, Sequence

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "exact")


def exact_study_names() -> List[str]:
    return sorted(f[:-5] for f in os.listdir(CONF_DIR) if f.endswith(".yaml"))


def load_config(name: str, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """The config of study ``name`` with ``overrides`` (``key.sub=value``, YAML values) merged in.

    :raises ValueError: one line, for an unknown study (the choices listed; a training study named
        with the command that runs it), an override that is not ``key=value``, or a key the config
        does not have (its section's keys listed).
    """
    import yaml

    if name not in exact_study_names():
        from ..study import study_names

        if name in study_names():
            raise ValueError(f"{name} is a training study: run it with pyro-vae train -m +study={name} seed=0,1,2")
        raise ValueError(f"unknown study {name!r}; choose one of: {', '.join(exact_study_names())} "
                         f"(training studies, run by pyro-vae train -m +study=NAME: {', '.join(study_names())})")
    with open(os.path.join(CONF_DIR, f"{name}.yaml")) as f:
        cfg = yaml.safe_load(f)
    for arg in overrides:
        key, eq, text = arg.partition("=")
        if not eq or not key:
            raise ValueError(f"bad argument {arg!r}: give overrides as KEY=VALUE, e.g. seed=1")
        node, parts = cfg, key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                section = ".".join(parts[:i])
                keys = ", ".join(node) if isinstance(node, dict) else "nothing (it is a value)"
                raise ValueError(f"study {name} has no key {key!r}; "
                                 f"{'section ' + section if section else 'its config'} takes: {keys}")
            if i == len(parts) - 1:
                node[part] = yaml.safe_load(text)
            node = node[part]
    return cfg


def _finite_or_null(obj):
    """``obj`` with every NaN or infinite float made None, so results.json is strict JSON (null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def run_exact_study(name: str, overrides: Sequence[str] = (), out: str | None = None,
                    progress: bool = True) -> Dict[str, Any]:
    """Run study ``name`` with ``overrides`` and write its files into ``out`` (default
    ``runs/<name>``); returns its results. Bad input raises a one-line ``ValueError`` before any
    work starts."""
    import time

    from ..checkpoint import atomic_write_json, atomic_write_text

    cfg = load_config(name, overrides)
    module = importlib.import_module(f"{__name__}.{name}")
    module.check_config(cfg)
    out = out or os.path.join("runs", name)
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    results, body = module.run(cfg, out, progress=progress)
    seconds = time.perf_counter() - start
    command = " ".join(["pyro-vae exact", name, *overrides])
    title = module.__doc__.strip().splitlines()[0].rstrip(".")
    atomic_write_json(os.path.join(out, "results.json"),
                      {"study": name, "overrides": list(overrides), "config": cfg, "seconds": round(seconds, 1),
                       "results": _finite_or_null(results)})
    atomic_write_text(os.path.join(out, "results.md"),
                      f"# {title}\n\nWritten by `{command}` ({seconds:.0f} s, one process); every number "
                      f"below is in results.json beside this file.\n\n{body.strip()}\n")
    return results
