"""Name -> class registries, so a config string picks a prior, guide, likelihood or objective.

A new choice is one class with ``@REGISTRY.register("name")`` and one test; nothing else changes.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict


class Registry:
    """Maps config names to classes (or factory functions) of one kind.

    :param str kind: what the entries are (``"prior"``, ``"guide"``, ...), used in error messages.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str):
        """Class decorator that registers the class under ``name``; a name registered twice is an
        error."""

        def decorator(cls):
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = cls
            return cls

        return decorator

    def names(self):
        """The registered names, sorted."""
        return sorted(self._entries)

    def get(self, name: str):
        """The class registered as ``name``, or a ``ValueError`` that lists the registered names."""
        if name not in self._entries:
            raise ValueError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            )
        return self._entries[name]

    def build(self, name: str, options: Dict[str, Any] | None = None, **context):
        """Construct ``name`` with the user's ``options`` plus whichever of ``context``
        (data_dim, latent_dim, hidden, ...) its constructor takes.

        An option the constructor does not take is an error that lists the ones it does,
        so a typo such as ``prior.num_componets=5`` is caught instead of ignored."""
        cls = self.get(name)
        options = dict(options or {})
        params = inspect.signature(cls).parameters
        takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
        known = [n for n, p in params.items() if n not in context and p.kind is not p.VAR_KEYWORD]
        unknown = [k for k in options if k not in params and not takes_var_kw]
        if unknown:
            raise ValueError(
                f"{self.kind} {name!r} has no option {unknown[0]!r}; "
                f"its options are: {', '.join(known) or '(none)'}"
            )
        kwargs = {k: v for k, v in context.items() if k in params or takes_var_kw}
        kwargs.update(options)
        return cls(**kwargs)
