"""The resumable state of a training: what :func:`pyro_vae.train.fit` needs to continue after the
end of an epoch exactly as if it had never stopped, and its file (state.pt).

It holds the model's and the optimizer's state, the trainer's bookkeeping (epochs run, best
epoch, its score and parameters, early stopping's counter, the metrics of every epoch) and every
random generator the training draws from: the minibatch-order generator and, per rank, torch's
global CPU generator and the CUDA generator of the rank's GPU. The file is written atomically and
loaded with ``torch.load(weights_only=True)`` (:mod:`pyro_vae.checkpoint`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Mapping

import torch

from .checkpoint import load_tensors, save_tensors
from .distributed import SINGLE, Ranks
from .train import FitResult

FORMAT = "pyro-vae-state/1"


def _rng_of_this_rank(device: torch.device) -> Dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


@dataclass
class TrainState:
    """The state of a training at the end of epoch ``result.epochs_run``.

    :ivar result: the trainer's bookkeeping (:class:`pyro_vae.train.FitResult`), best parameters included.
    :ivar model: ``vae.state_dict()``.
    :ivar optimizer: ``optimizer.state_dict()``.
    :ivar order_rng: the state of the minibatch-order generator.
    :ivar rank_rngs: per rank, {"cpu": torch's global generator, "cuda": its GPU's generator}.
    :ivar seed: the seed of the training (each epoch's evaluation seeds derive from it).
    """

    result: FitResult
    model: Dict[str, torch.Tensor]
    optimizer: Dict[str, Any]
    order_rng: torch.Tensor
    rank_rngs: List[Dict[str, torch.Tensor]]
    seed: int

    @property
    def world_size(self) -> int:
        return len(self.rank_rngs)

    @classmethod
    def capture(cls, vae, optimizer, order: torch.Generator, result: FitResult, seed: int,
                ranks: Ranks = SINGLE) -> "TrainState":
        """The state now (copies); on every rank, since the ranks' generators are gathered."""
        device = next(vae.parameters()).device
        rank_rngs = ranks.gather({k: v.cpu() for k, v in _rng_of_this_rank(device).items()})
        return cls(copy.deepcopy(result), {k: v.detach().clone() for k, v in vae.state_dict().items()},
                   copy.deepcopy(optimizer.state_dict()), order.get_state(), rank_rngs, seed)

    def check(self, vae, ranks: Ranks = SINGLE) -> None:
        """A one-line ``ValueError`` unless the state fits ``vae`` (names and shapes of its
        parameters) and as many ranks as ``ranks`` has."""
        if self.world_size != ranks.world_size:
            how = f"torchrun --nproc_per_node={self.world_size}" if self.world_size > 1 else "one process, without torchrun"
            raise ValueError(f"the state was written by a training on {self.world_size} rank(s), this one has "
                             f"{ranks.world_size}; resume it with {how}")
        found = {k: tuple(v.shape) for k, v in self.model.items()}
        expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
        for key in sorted(set(found) | set(expected)):
            if found.get(key) != expected.get(key):
                raise ValueError(f"the state does not fit this model ({key}: {found.get(key)} in the state, "
                                 f"{expected.get(key)} in the model); it belongs to another config")

    def restore(self, vae, optimizer, order: torch.Generator, ranks: Ranks = SINGLE) -> FitResult:
        """Load the state into ``vae``, ``optimizer``, ``order`` and this rank's generators; returns
        a copy of the bookkeeping to continue with."""
        self.check(vae, ranks)
        device = next(vae.parameters()).device
        vae.load_state_dict(self.model)
        try:
            optimizer.load_state_dict(self.optimizer)
        except (RuntimeError, ValueError, KeyError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"the state's optimizer does not fit this model's ({first[:200]}); it belongs to "
                             f"another config") from None
        order.set_state(self.order_rng)
        rng = self.rank_rngs[ranks.rank]
        torch.set_rng_state(rng["cpu"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
        return copy.deepcopy(self.result)

    def save(self, path: str, **meta) -> None:
        """Write state.pt atomically; ``meta`` (e.g. the run's config) is kept beside it."""
        result = {f.name: getattr(self.result, f.name) for f in fields(FitResult) if f.name != "best_state"}
        save_tensors(path, FORMAT, {"model": self.model, "optimizer": self.optimizer, "best_state": self.result.best_state,
                                    "order_rng": self.order_rng, "rank_rngs": self.rank_rngs},
                     {"result": result, "seed": self.seed, **meta})

    @classmethod
    def load(cls, path: str):
        """(state, meta) from a file written by :meth:`save`, on the CPU (``restore`` moves what it
        loads to the model's device); a damaged, foreign or unsafe file is a one-line ``ValueError``."""
        payload, meta = load_tensors(path, FORMAT, "cpu", "training state")
        result = FitResult(**meta.pop("result"), best_state=payload["best_state"])
        return cls(result, payload["model"], payload["optimizer"], payload["order_rng"], payload["rank_rngs"],
                   meta.pop("seed")), meta


def config_difference(saved: Mapping[str, Any], given: Mapping[str, Any], ignore=(), prefix: str = "") -> str | None:
    """The first key (dotted) whose value differs between two configs, as "key: saved vs given",
    or None; keys in ``ignore`` (dotted) are not compared."""
    for key in sorted(set(saved) | set(given)):
        a, b, name = saved.get(key), given.get(key), f"{prefix}{key}"
        if name in ignore:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found = config_difference(a, b, ignore, f"{name}.")
            if found:
                return found
        elif a != b:
            return f"{name}: {a!r} vs {b!r}"
    return None
