"""Atomic writes and safe tensor files (checkpoints and resumable training states).

Every file is written to a temporary name in the same directory, flushed to disk and renamed
over the target (``os.replace`` is atomic), so a crash never leaves a half-written checkpoint or
summary. The temporary file is created with mode 0666 less the umask, as ``open`` would, so the
file ends with the permissions any other file of the user gets.

Tensor files hold a format tag, tensors and plain values, and JSON metadata; they are loaded with
``torch.load(weights_only=True)``: a file that would need unpickling arbitrary objects is refused,
and nothing in it is executed.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import uuid
import zipfile
from typing import Any, Dict, Tuple

import torch

FORMAT = "pyro-vae-checkpoint/1"


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, fsync, rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0666 & ~umask, as open() gives
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_tensors(path: str, fmt: str, tensors: Dict[str, Any], meta: Dict[str, Any]) -> None:
    """Write ``tensors`` (tensors, and dicts/lists of them and of plain values) and JSON-serializable
    ``meta`` atomically, tagged with the format ``fmt``."""
    buffer = io.BytesIO()
    torch.save({"format": fmt, **tensors, "meta": json.dumps(meta)}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_tensors(path: str, fmt: str, map_location: str | torch.device = "cpu",
                 what: str = "file") -> Tuple[Dict[str, Any], Dict]:
    """Return (payload, meta) of a file written by :func:`save_tensors` with format ``fmt``, or a
    one-line ``ValueError`` for a damaged, foreign or unsafe file (``what`` it should be, in the message)."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise ValueError(f"refusing to load {path}: it holds pickled Python objects, not only tensors "
                             f"({_unsafe_global(e)}); only load files written by pyro-vae") from None
        raise _damaged(path, e) from None
    except (RuntimeError, EOFError, KeyError, zipfile.BadZipFile, OSError) as e:
        raise _damaged(path, e) from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ValueError(f"{path} is not a pyro-vae {what} (format {fmt!r} expected)")
    return payload, json.loads(payload["meta"])


def _damaged(path: str, error: Exception) -> ValueError:
    return ValueError(f"{path} is damaged ({os.path.getsize(path)} bytes, {_what_failed(error)}): it was "
                      f"truncated or overwritten; use another copy or train again")


def _unsafe_global(error: Exception) -> str:
    """The line of torch's refusal that names what the file wanted to run, without its advice to
    load the file unsafely."""
    lines = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "global" in line]
    return lines[0].split(". ")[0].rstrip(".") if lines else "an unsupported object"


def _what_failed(error: Exception) -> str:
    if isinstance(error, EOFError):
        return "it ends early"
    if isinstance(error, (KeyError, pickle.UnpicklingError)) or not str(error).strip():
        return "not a torch archive"
    return str(error).strip().splitlines()[0].split(". ")[0]


def save_checkpoint(path: str, state_dict: Dict[str, torch.Tensor], **meta: Any) -> None:
    """Write ``state_dict`` and JSON-serializable ``meta`` (epoch, config, ...) atomically."""
    save_tensors(path, FORMAT, {"state_dict": dict(state_dict)}, meta)


def load_checkpoint(path: str, map_location: str | torch.device = "cpu"):
    """Return (state_dict, meta) from a checkpoint written by ``save_checkpoint``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}; train first with `pyro-vae train`")
    payload, meta = load_tensors(path, FORMAT, map_location, "checkpoint")
    return payload["state_dict"], meta
