"""Argument checks shared by every part of the library: one wording for one mistake."""

from __future__ import annotations

import numbers
from typing import Any, Dict, Mapping


def positive_int(value, key: str, minimum: int = 1) -> int:
    """``value`` as an int, or a one-line ``ValueError`` naming ``key``, the bad value and the range.

    :param value: what the user gave (a bool, a float with a fraction or a string is refused).
    :param key: the config key or argument name, e.g. ``"objective.num_particles"``.
    :param minimum: the smallest value allowed (1 unless said).
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer()
    if not ok or int(value) < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def positive_number(value, key: str) -> float:
    """``value`` as a float, or a one-line ``ValueError`` naming ``key`` and the bad value.

    :param value: what the user gave (a bool or a string is refused; so are 0, negatives and NaN).
    :param key: the config key or argument name, e.g. ``"fit.lr"``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{key} must be a number > 0, got {value!r}")
    return float(value)


def config_section(cfg: Mapping[str, Any], name: str, keys) -> Dict[str, Any]:
    """The config section ``name`` as a dict; a key it does not take is a one-line ValueError."""
    section = dict(cfg[name])
    unknown = sorted(set(section) - set(keys))
    if unknown:
        raise ValueError(f"unknown key {name}.{unknown[0]}; the {name} section takes: {', '.join(keys)}")
    return section
