"""The numbers a run reports: per-epoch metrics (:class:`MetricsLog`: a JSON-lines file, rewritten
atomically each epoch so it is never half-written, and TensorBoard scalars under the same names)
and the mean ± standard error of a set of values (:func:`mean_se`)."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Dict, List, Optional, Sequence

import torch

from .checkpoint import atomic_write_text


def mean_se(values) -> Dict[str, float]:
    """Mean of ``values`` (test points, seeds, ...) and its standard error sd / sqrt(N), with the
    sample standard deviation (N - 1 in the denominator); the SE is NaN for fewer than 2 values.

    :param values: a tensor or a sequence of numbers, N >= 1 of them.
    """
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = len(values)
    se = (values.std() / math.sqrt(n)).item() if n > 1 else math.nan
    return {"mean": values.mean().item(), "se": se}


class MetricsLog:
    """metrics.jsonl and tensorboard/ of a run directory, one record per epoch.

    :param run_dir: the run directory.
    :param records: the records of the epochs already run, when a run resumes: metrics.jsonl is
        rewritten with exactly these (the epochs after them, which will be run again, are dropped)
        and the TensorBoard events are written afresh from them, at ``walltimes``, in a new events
        file that replaces the old ones, so no epoch appears twice in either.
    :param walltimes: the time each of ``records`` was first logged (seconds since the epoch).
    """

    def __init__(self, run_dir: str, tensorboard: bool = True, records: Sequence[Dict[str, float]] = (),
                 walltimes: Optional[Sequence[float]] = None):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.records: List[Dict[str, float]] = []
        self.walltimes: List[float] = []
        self.writer, old = None, []
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            directory = os.path.join(run_dir, "tensorboard")
            old = [os.path.join(directory, f) for f in os.listdir(directory)] if os.path.isdir(directory) else []
            self.writer = SummaryWriter(directory)
        for record, walltime in zip(records, walltimes or [None] * len(records)):
            self._add(record, walltime)
        self._write()
        if self.writer is not None:
            self.writer.flush()
        for path in old:  # superseded by the events just written
            if os.path.basename(path).startswith("events.out.tfevents"):
                os.unlink(path)

    def log(self, record: Dict[str, float]) -> None:
        self._add(record)
        self._write()
        if self.writer is not None:
            self.writer.flush()

    def _add(self, record: Dict[str, float], walltime: Optional[float] = None) -> None:
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        walltime = time.time() if walltime is None else walltime
        self.records.append(record)
        self.walltimes.append(walltime)
        if self.writer is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace("_", "/", 1), value, record["epoch"], walltime=walltime)

    def _write(self) -> None:
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
