"""Data-parallel training and evaluation on ``torch.distributed``, and the seeds they draw from.

Launched by torchrun, one process (rank) per CPU share or GPU, each with a full copy of the model:

    torchrun --standalone --nproc_per_node=2 $(which pyro-vae) train ...

:func:`setup` joins the process group torchrun describes in the environment (gloo on CPU, NCCL on
CUDA, one GPU per local rank); without torchrun it returns :data:`SINGLE`, and every collective of
:class:`Ranks` is then a no-op, so one code path serves one process and many.

- Training: every rank draws the same permutation of the training set (a generator seeded alike
  on all ranks), takes its contiguous shard of each global batch of B points, and weights its
  shard's loss by its share B_r / B; the gradients are summed over ranks. The sum is the gradient
  of the global batch's loss, with the data plate scaled by the global dataset size N, exactly as
  in one process. The rest of each rank's draws (binarization, z ~ q) come from a seed of its own.
- Evaluation: points are taken in fixed blocks of :data:`POINTS_PER_SEED`, in split order; block
  b is evaluated under the seed ``derive_seed(seed, start of b)``, by rank b mod W, and the blocks
  are gathered in order. A point's estimate therefore depends on the seed and its block, never on
  the number of ranks: W ranks give one process's numbers point by point.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, List

import numpy as np
import torch
import torch.distributed as dist

POINTS_PER_SEED = 250  # evaluation block: the points that share one seed
# derive_seed keys: what a seed is for
ORDER, RANK, EPOCH, TEST = 1, 2, 3, 4


def derive_seed(seed: int, *keys: int) -> int:
    """A 64-bit seed for the stream named by ``keys`` of the run seed ``seed`` (numpy's SeedSequence
    spawn keys: streams of one seed, and of different seeds, are independent)."""
    return int(np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in keys)).generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks, and the collectives the trainer needs.

    :ivar rank: 0 .. world_size - 1; rank 0 alone writes the run directory.
    :ivar world_size: the number of processes.
    """

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of ``batch`` (sizes differ by at most one; may be empty)."""
        return batch if self.world_size == 1 else batch.tensor_split(self.world_size)[self.rank]

    def sum_gradients(self, params: List[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
        """Sum the gradients of ``params`` and the value ``loss`` over ranks, in one all-reduce;
        returns the summed loss. A parameter without gradient counts as zero."""
        if self.world_size == 1:
            return loss
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1).to(grads[0].dtype)])
        self._collective(dist.all_reduce, flat)
        for p, g in zip(params, flat[:-1].split([p.numel() for p in params])):
            p.grad = g.view_as(p)
        return flat[-1]

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers."""
        if self.world_size > 1:
            for tensor in module.state_dict().values():
                self._collective(dist.broadcast, tensor, 0)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (any picklable value), on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        self._collective(dist.broadcast_object_list, box, 0)
        return box[0]

    def gather(self, obj: Any) -> List[Any]:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        self._collective(dist.all_gather_object, out, obj)
        return out

    def map_blocks(self, fn: Callable[[torch.Tensor], Any], x: torch.Tensor, seed: int | None) -> List[Any]:
        """``[fn(block) for block in blocks of x]``, each block of :data:`POINTS_PER_SEED` rows run
        under ``torch.manual_seed(derive_seed(seed, start))`` (torch's global RNG restored after),
        the blocks shared round-robin among ranks and gathered in order on every rank. ``fn``'s
        tensors are moved to the CPU for the gather when there are several ranks. With ``seed``
        None (one process only) the blocks draw from the global RNG as it stands."""
        starts = range(0, len(x), POINTS_PER_SEED)
        if seed is None and self.world_size > 1:
            raise ValueError("an evaluation over several ranks needs a seed")
        mine = {}
        for b, start in enumerate(starts):
            if b % self.world_size == self.rank:
                mine[b] = _seeded(fn, x[start:start + POINTS_PER_SEED], None if seed is None else derive_seed(seed, start))
        if self.world_size == 1:
            return [mine[b] for b in range(len(starts))]
        merged = {b: out for part in self.gather(_to_cpu(mine)) for b, out in part.items()}
        return [merged[b] for b in range(len(starts))]

    def barrier(self) -> None:
        if self.world_size > 1:
            self._collective(dist.barrier)

    def _collective(self, op, *args):
        try:
            return op(*args)
        except RuntimeError as e:  # gloo and NCCL raise DistBackendError, a RuntimeError
            first = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip().splitlines() or [type(e).__name__])[0])
            raise RankLost(f"rank {self.rank} of {self.world_size} lost the other ranks ({first.split('. ')[0][:160]}): "
                           f"one of them stopped or was killed") from None


class RankLost(RuntimeError):
    """Another rank stopped: a collective failed."""


SINGLE = Ranks()


def setup(device: str | torch.device = "cpu"):
    """(ranks, device) of this process: without torchrun (WORLD_SIZE unset or 1) :data:`SINGLE` and
    ``device``; under torchrun, the process group joined with gloo (CPU) or NCCL (CUDA, the GPU of
    this process's LOCAL_RANK). A group that cannot form is a one-line ``ValueError``."""
    device = torch.device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return SINGLE, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=30))
        except (RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"torch.distributed could not form the group of {world_size} ranks ({first[:200]}); "
                             f"launch with `torchrun --standalone --nproc_per_node=N` or check "
                             f"--master_addr/--master_port") from None
    return Ranks(dist.get_rank(), dist.get_world_size()), device


def teardown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _seeded(fn, block, seed):
    if seed is None:
        return fn(block)
    cuda = [block.device] if block.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        return fn(block)


def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def current() -> Ranks:
    """The ranks of the process group this process has joined, or :data:`SINGLE`."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return SINGLE
