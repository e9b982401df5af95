"""The numbers a run reports: per-epoch metrics (:class:`MetricsLog`: a JSON-lines file, rewritten
atomically each epoch so it is never half-written, and TensorBoard scalars under the same names)
and the mean ± standard error of a set of values (:func:`mean_se`)."""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List

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
    def __init__(self, run_dir: str, tensorboard: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.records: List[Dict[str, float]] = []
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def log(self, record: Dict[str, float]) -> None:
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.records.append(record)
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        if self.writer is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace("_", "/", 1), value, record["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
