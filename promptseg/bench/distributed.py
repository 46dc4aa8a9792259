"""Sharded evaluation: `torchrun --nproc_per_node N -m promptseg eval ...`.

Every rank builds the protocol's full item list (episodes, images, videos: identical whatever N
is) and scores the items whose index `i % world_size == rank`; rank 0 merges the accumulators
(all sums) with torch.distributed collectives and alone writes result.json. The process group is
created only when `WORLD_SIZE > 1` (env://, as torchrun sets it): gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Shard",
    "SharedCount",
    "eval_device",
    "finish_group",
    "init_from_env",
    "interleave",
    "ordered",
]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def eval_device(device: str | None) -> str | None:
    """The device of this rank: `cuda:LOCAL_RANK` when `device` is cuda (or unset and CUDA is
    available) in a multi-process run, else `device` unchanged (None: the CLI default, CPU)."""
    if _env_int("WORLD_SIZE", 1) <= 1:
        return device
    local = _env_int("LOCAL_RANK", 0)
    if device == "cuda" or (device is None and torch.cuda.is_available()):
        return f"cuda:{local}"
    return device


def init_from_env(device: str | None) -> bool:
    """Join the process group of a torchrun launch (env://) when WORLD_SIZE > 1; whether a group
    was created here (False: a single process, or a group that already exists).

    The backend is NCCL when this rank runs on CUDA, gloo on CPU."""
    import torch.distributed as dist

    if _env_int("WORLD_SIZE", 1) <= 1 or dist.is_initialized():
        return False
    cuda = device is not None and device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://")
    return True


def finish_group(wait: bool = True) -> None:
    """Leave the process group `init_from_env` created (after a last barrier with `wait`)."""
    import torch.distributed as dist

    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


@dataclass(frozen=True)
class Shard:
    """This process's share of an evaluation: rank `rank` of `world_size` processes."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Shard:
        """The shard of the initialised default process group, else the whole job (1 of 1)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that merges, shows progress and writes result files."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether this rank scores the item of position `index` (round-robin by index)."""
        return index % self.world_size == self.rank

    def indices(self, n: int) -> list[int]:
        """The positions among `n` items this rank scores."""
        return list(range(self.rank, n, self.world_size))

    # -------------------------------------------------------------- collectives (no-ops alone)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` (by rank) on rank 0; None on the other ranks."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def merged(self, evaluator: Any) -> Any | None:
        """On rank 0, `evaluator` with every rank's accumulators merged into it (integer sums:
        exactly the single-process ones); None on the other ranks. All ranks call it."""
        states = self.gather(evaluator.state_dict())
        if states is None:
            return None
        for state in states[1:]:
            evaluator.merge(type(evaluator).from_state_dict(state))
        return evaluator

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def max(self, value: float) -> float:
        """The largest `value` over ranks, on every rank (wall time of a sharded run)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return max(values)

    def shared_count(self) -> SharedCount | None:
        """A new job-wide count of done items (None alone: the bar counts by itself). Every
        rank calls it once per iteration, in the same order (the counts are numbered)."""
        if not self.distributed:
            return None
        import torch.distributed as dist

        return SharedCount(dist.distributed_c10d._get_default_store(), next(_count_numbers))

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def gather_files(self, root: Path, relpaths: Iterable[str]) -> None:
        """Make the files each rank wrote under `root` exist on rank 0 as that rank wrote them.

        Only files rank 0 lacks (or holds with other bytes) are sent, so a shared `--out` (one
        file system, the usual case) transfers nothing."""
        if not self.distributed:
            return
        mine = {rel: _sha256(root / rel) for rel in relpaths}
        manifests = self.gather(mine)
        wanted: list[list[str]] | None = None
        if manifests is not None:
            wanted = [
                [rel for rel, sha in m.items() if sha != _sha256(root / rel)] for m in manifests
            ]
        wanted = self.broadcast(wanted)
        payload = {rel: (root / rel).read_bytes() for rel in wanted[self.rank]}
        received = self.gather(payload)
        if received is not None:
            for files in received:
                for rel, data in files.items():
                    path = root / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)


_count_numbers = itertools.count()


class SharedCount:
    """The items done by all ranks together, for rank 0's one progress bar: each rank adds to a
    counter in the process group's key-value store (torchrun's rendezvous store) as it scores
    items, rank 0 reads it. No collective: no rank ever waits for another to count. A rank's
    items reach the store at most every `interval` seconds (one round trip each time)."""

    def __init__(self, store: Any, number: int, interval: float = 0.25) -> None:
        self.store, self.interval = store, interval
        self.done_key = f"promptseg/progress/{number}/done"
        self.finished_key = f"promptseg/progress/{number}/finished"
        self.pending, self.total, self.sent_at = 0, 0, float("-inf")

    def add(self, n: int = 1) -> int:
        """Count `n` more done items; returns the job's total as last read from the store."""
        self.pending += n
        if time.monotonic() - self.sent_at >= self.interval:
            self.flush()
        return self.total

    def flush(self) -> int:
        """Send this rank's uncounted items now and read the job's total."""
        self.total = int(self.store.add(self.done_key, self.pending))
        self.pending, self.sent_at = 0, time.monotonic()
        return self.total

    def finish(self) -> None:
        """This rank has no item left (its last items are sent first)."""
        self.flush()
        self.store.add(self.finished_key, 1)

    def finished(self) -> int:
        """How many ranks have no item left."""
        return int(self.store.add(self.finished_key, 0))


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def interleave(parts: Sequence[Sequence[Any]], sizes: Sequence[int] | None = None) -> list[Any]:
    """The single-process order of items sharded round-robin: `parts[r]` holds, in order, what
    rank r produced for positions r, r + N, ...; `sizes[i]` (default 1) how many entries the
    item at position i produced. Returns the entries of positions 0, 1, 2, ... in order."""
    world = len(parts)
    n_items = len(sizes) if sizes is not None else sum(len(p) for p in parts)
    cursor = [0] * world
    out: list[Any] = []
    for i in range(n_items):
        rank, k = i % world, sizes[i] if sizes is not None else 1
        out.extend(parts[rank][cursor[rank] : cursor[rank] + k])
        cursor[rank] += k
    if [len(p) for p in parts] != cursor:
        raise ValueError("shard results do not match the item list (ranks saw other data?)")
    return out


def ordered(parts: Iterable[Sequence[Any]], position: Any) -> list[Any]:
    """The entries of every rank in single-process order: a stable sort by `position(entry)`
    (the item's index), so the entries of one item keep the order its rank produced them in."""
    return sorted((e for part in parts for e in part), key=position)
