"""The run directory: claimed by one run only, and its status.

    claim(path)                    -> path, or path-1, path-2, ... when path holds a run already
    write_status(run_dir, status)  status.json, atomically: running | finished | failed | interrupted
    read_status(run_dir)           -> the status dict (a "running" run whose process is gone reads
                                      as "interrupted"), or None

A directory is claimed by creating its status.json exclusively (a complete file hard-linked into
place, which fails if the name exists), so two runs started at the same moment never share one:
the second one finds the name taken and moves on to the next suffix. A directory that holds any
file of a run (:data:`RUN_FILES`) is taken, whether or not it has a status.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import threading
import time
import uuid
from typing import Any, Dict, Mapping, Optional, Sequence

from .checkpoint import atomic_write_json, atomic_write_text

STATUS_FILE = "status.json"
STATUSES = ("running", "finished", "failed", "interrupted")
RUN_FILES = (STATUS_FILE, "config.yaml", "checkpoint.pt", "state.pt", "metrics.jsonl", "summary.json")
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")  # pyro_vae.checkpoint.atomic_write_bytes's names


def claim(path: str) -> str:
    """Create and claim a new run directory at ``path``, or at ``path-1``, ``path-2``, ... if it
    holds a run; returns the absolute path claimed, whose status is ``running``."""
    base = os.path.abspath(path)
    for k in itertools.count():
        candidate = base if k == 0 else f"{base}-{k}"
        os.makedirs(candidate, exist_ok=True)
        if any(os.path.exists(os.path.join(candidate, name)) for name in RUN_FILES):
            continue
        tmp = os.path.join(candidate, f".{STATUS_FILE}.{uuid.uuid4().hex[:8]}.tmp")
        atomic_write_json(tmp, _status_record("running"))
        try:
            os.link(tmp, os.path.join(candidate, STATUS_FILE))  # exclusive: fails if another run was first
            return candidate
        except FileExistsError:
            continue
        finally:
            os.unlink(tmp)


def _status_record(status: str, previous: Optional[Mapping[str, Any]] = None, **fields) -> Dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    record = {**(previous or {"started": now}), "status": status, "updated": now, "pid": os.getpid(),
              "host": socket.gethostname(), **fields}
    return record


def write_status(run_dir: str, status: str, **fields) -> None:
    """Set the run's status (one of :data:`STATUSES`) and ``fields`` (epoch, message, ...) in
    status.json, keeping the fields written before."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    path = os.path.join(run_dir, STATUS_FILE)
    previous = _read(path) or {}
    previous.pop("message", None)  # a message belongs to the status it explains
    atomic_write_json(path, _status_record(status, previous, **fields))


def read_status(run_dir: str) -> Optional[Dict[str, Any]]:
    """The run's status.json, or None if it has none. A ``running`` status written on this host by
    a process that no longer exists (killed: ``kill -9``, power loss) reads as ``interrupted``."""
    record = _read(os.path.join(run_dir, STATUS_FILE))
    if record and record.get("status") == "running" and record.get("host") == socket.gethostname() \
            and not _alive(record.get("pid")):
        record = {**record, "status": "interrupted",
                  "message": f"its process ({record.get('pid')}) ended without saying why: it was killed"}
    return record


def _read(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # someone else's process, or no pid recorded: do not guess
    return True


def remove_if_empty(path: str) -> None:
    """Remove the directory ``path`` if it exists and is empty (a directory made for nothing)."""
    try:
        os.rmdir(path)
    except OSError:
        pass


def remove_temporaries(run_dir: str) -> None:
    """Delete the temporary files that interrupted atomic writes left in ``run_dir`` (and figures/)."""
    for directory in (run_dir, os.path.join(run_dir, "figures")):
        if os.path.isdir(directory):
            for name in os.listdir(directory):
                if _TEMPORARY.match(name):
                    os.unlink(os.path.join(directory, name))


def write_config(run_dir: str, cfg: Mapping[str, Any], overrides: Sequence[str] = ()) -> None:
    """config.yaml, the resolved config of the run, and overrides.yaml, the command line's overrides."""
    from omegaconf import OmegaConf

    atomic_write_text(os.path.join(run_dir, "config.yaml"), OmegaConf.to_yaml(OmegaConf.create(dict(cfg))))
    atomic_write_text(os.path.join(run_dir, "overrides.yaml"), OmegaConf.to_yaml(OmegaConf.create(list(overrides))))


def read_overrides(run_dir: str) -> list:
    """The command line's overrides of a run (its overrides.yaml; none if it has no such file)."""
    from omegaconf import OmegaConf

    path = os.path.join(run_dir, "overrides.yaml")
    return list(OmegaConf.to_container(OmegaConf.load(path))) if os.path.isfile(path) else []


def read_config(run_dir: str) -> Dict[str, Any]:
    """The config a run was started with (its config.yaml), or a one-line error saying what is missing."""
    from omegaconf import OmegaConf

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        what = "does not exist" if not os.path.isdir(run_dir) else "holds no config.yaml"
        raise FileNotFoundError(f"{run_dir} {what}: it is not a pyro-vae run directory")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


@contextlib.contextmanager
def signals_held(signums=(signal.SIGINT, signal.SIGTERM)):
    """Hold Ctrl-C and SIGTERM while the block runs and deliver them after it, so that the files of
    one epoch (its metrics line, the checkpoint, state.pt, status.json) are written together: a stop
    lands before them or after them, never between two of them. Outside the main thread (where
    Python cannot set handlers), and for a signal the process ignores, the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending, saved = [], {s: signal.getsignal(s) for s in signums}
    for s, handler in saved.items():
        if handler not in (signal.SIG_IGN, None):
            signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, handler in saved.items():
            if handler not in (signal.SIG_IGN, None):
                signal.signal(s, handler)
        if pending:  # the first one, as it would have arrived; the handler decides what it does
            handler = saved[pending[0]]
            handler(pending[0], None) if callable(handler) else signal.raise_signal(pending[0])
