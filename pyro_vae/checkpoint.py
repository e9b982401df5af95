"""Atomic writes and safe checkpoints.

Every file is written to a temporary name in the same directory, flushed to disk and renamed
over the target (``os.replace`` is atomic), so a crash never leaves a half-written checkpoint or
summary. Checkpoints hold only tensors and plain values and are loaded with
``torch.load(weights_only=True)``: a file that would need unpickling arbitrary objects is refused.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
from typing import Any, Dict

import torch

FORMAT = "pyro-vae-checkpoint/1"


def atomic_write_bytes(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
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


def save_checkpoint(path: str, state_dict: Dict[str, torch.Tensor], **meta: Any) -> None:
    """Write ``state_dict`` and JSON-serializable ``meta`` (epoch, config, ...) atomically."""
    payload = {"format": FORMAT, "state_dict": dict(state_dict), "meta": json.dumps(meta)}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str, map_location: str | torch.device = "cpu"):
    """Return (state_dict, meta) from a checkpoint written by ``save_checkpoint``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}; train first with `pyro-vae train`")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"refusing to load {path}: it holds pickled Python objects, not only tensors "
            f"({first}); only load checkpoints written by pyro-vae"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pyro-vae checkpoint (format {FORMAT!r} expected)")
    return payload["state_dict"], json.loads(payload["meta"])
