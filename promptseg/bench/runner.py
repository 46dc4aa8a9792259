"""What every evaluation run shares: where results go, resumable progress, the result JSON.

A run writes `runs/<benchmark>/<dataset>/<fold>/<shots>/<model>/result.json` (schema 1).
While it runs, `progress.json` holds the metric accumulators and the indices already scored,
saved atomically every few items, so `--resume` continues where a run stopped with exactly the
numbers an uninterrupted run gives (integer accumulators, order-free).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from ..jsonable import to_jsonable
from .distributed import Shard, SharedCount

__all__ = [
    "SCHEMA_VERSION",
    "Progress",
    "encode_prompts",
    "environment",
    "model_record",
    "prefetch",
    "prepare_run_dir",
    "run_dir",
    "write_json",
    "write_result",
]

SCHEMA_VERSION = 1
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
"""torch dtype -> the name the CLI (--dtype) and the result JSON (env.dtype) use."""

T = TypeVar("T")
R = TypeVar("R")


def run_dir(
    out: str | os.PathLike, benchmark: str, dataset: str, fold: Any, shots: Any, model: str
) -> Path:
    """`<out>/<benchmark>/<dataset>/<fold>/<shots>/<model>` (fold/shots '-' when not applicable)."""
    parts = [
        benchmark,
        dataset,
        str(fold if fold is not None else "-"),
        str(shots if shots is not None else "-"),
        model,
    ]
    return Path(out).joinpath(*parts)


def prepare_run_dir(directory: Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Create a run's folder; refuse to run again over a finished run's result.json unless
    `overwrite` (replace it) or `resume` (continue an interrupted run there)."""
    result = directory / "result.json"
    if result.is_file() and not (overwrite or resume):
        raise FileExistsError(
            f"{result} already exists; pass --overwrite to replace it or --resume to continue "
            "an interrupted run (or choose another --out)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Atomic JSON write (a crash never leaves half a result file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(to_jsonable(payload), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


class Progress:
    """Resumable iteration: yields the items not yet done, checkpointing the accumulator state.

    In a sharded run (`Shard.current()` of several ranks) each rank keeps its own file,
    `progress.rank<R>.json`, iterates only the items it owns and saves once more when its shard
    is done; only rank 0 shows a bar, of the items every rank has done (`SharedCount`), and
    closes it when every rank has finished its shard.
    """

    def __init__(
        self,
        directory: Path,
        *,
        resume: bool,
        key: str,
        every: int = 25,
        shard: Shard | None = None,
    ) -> None:
        self.shard = shard or Shard.current()
        world = self.shard.world_size
        name = "progress.json" if world == 1 else f"progress.rank{self.shard.rank}.json"
        self.path = directory / name
        self.key = key  # identifies the run (e.g. the episode digest): a mismatch never resumes
        self.every = every
        self.done: set[int] = set()
        self.state: dict[str, Any] | None = None
        self.elapsed = 0.0
        if resume:
            _check_world(directory, world)
        if resume and self.path.is_file():
            saved = json.loads(self.path.read_text(encoding="utf-8"))
            if saved.get("key") != key:
                raise ValueError(
                    f"{self.path} belongs to another run (different episodes or settings); "
                    "delete it or run without --resume"
                )
            self.done = set(saved["done"])
            self.state = saved["state"]
            self.elapsed = float(saved.get("elapsed", 0.0))
        elif self.path.is_file():
            self.path.unlink()
        if not resume and self.shard.main:
            _drop_other_worlds(directory, world)

    def owns(self, index: int) -> bool:
        """Whether this rank scores item `index` (always, in a single-process run)."""
        return self.shard.owns(index)

    def iterate(
        self, items: Iterable[Any], total: int, state_fn, *, desc: str, index=lambda i, x: i
    ) -> Iterator[Any]:
        """Yield this rank's (not yet done) items; every `every` items save `state_fn()` and the
        done set."""
        start = time.perf_counter() - self.elapsed
        since_save = 0
        shared = self.shard.shared_count()  # None in one process
        bar = tqdm(
            total=total,
            initial=shared.add(len(self.done)) if shared else len(self.done),
            desc=desc,
            disable=None if self.shard.main else True,
            leave=False,
        )
        for i, item in enumerate(items):
            idx = index(i, item)
            if idx in self.done or not self.shard.owns(idx):
                continue
            yield item
            self.done.add(idx)
            bar.update(shared.add() - bar.n if shared else 1)
            since_save += 1
            if since_save >= self.every:
                self.elapsed = time.perf_counter() - start
                self.save(state_fn())
                since_save = 0
        self.elapsed = time.perf_counter() - start
        if self.shard.distributed and since_save:
            self.save(state_fn())  # a rank waiting for the others keeps its finished shard
        if shared:
            shared.finish()
            if self.shard.main:
                _follow_other_ranks(bar, shared, self.shard.world_size)
        bar.close()

    def save(self, state: Mapping[str, Any]) -> None:
        write_json(
            self.path,
            {
                "key": self.key,
                "done": sorted(self.done),
                "state": state,
                "elapsed": self.elapsed,
                "world_size": self.shard.world_size,
            },
        )

    def finish(self) -> None:
        """The run completed: the result JSON now holds everything progress.json did."""
        self.path.unlink(missing_ok=True)


COLLECTIVE_TIMEOUT_S = 1800.0  # torch.distributed's default process-group timeout


def _follow_other_ranks(bar: tqdm, shared: SharedCount, world: int) -> None:
    """Rank 0, its shard done: advance the bar with the other ranks' items until every rank has
    finished, or until nothing moved for as long as a collective waits (a rank that died without
    its launcher stopping the job: the merge's collective then reports it)."""
    stalled_since = time.monotonic()
    while shared.finished() < world:
        done = shared.flush()
        if done != bar.n:
            bar.update(done - bar.n)
            stalled_since = time.monotonic()
        elif time.monotonic() - stalled_since > COLLECTIVE_TIMEOUT_S:
            return
        time.sleep(0.02)
    bar.update(shared.flush() - bar.n)


def _saved_world(path: Path) -> int | None:
    """The number of processes of the run that wrote a progress file (None: unreadable)."""
    try:
        return int(json.loads(path.read_text(encoding="utf-8")).get("world_size", 1))
    except (OSError, ValueError):
        return None


def _drop_other_worlds(directory: Path, world: int) -> None:
    """A fresh run: forget the progress files of earlier runs with another number of processes."""
    for path in directory.glob("progress*.json"):
        if _saved_world(path) not in (world, None):
            path.unlink(missing_ok=True)


def _check_world(directory: Path, world: int) -> None:
    """Refuse to resume progress files written by a run with another number of processes."""
    saved = [_saved_world(p) for p in directory.glob("progress*.json")]
    other = sorted({w for w in saved if w is not None and w != world})
    if other:
        raise ValueError(
            f"{directory} holds the progress of a run with {other[0]} process(es), this one has "
            f"{world}; resume with --nproc_per_node {other[0]} (torchrun) or run without --resume"
        )


def environment(model: torch.nn.Module) -> dict[str, Any]:
    """torch / CUDA / device / dtype / TF32 facts recorded with every result."""
    param = next(model.parameters(), None)
    buf = param if param is not None else next(model.buffers(), torch.zeros(0))
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(buf.device),
        "dtype": DTYPE_NAMES.get(buf.dtype, str(buf.dtype).replace("torch.", "")),
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "python": platform.python_version(),
    }


def model_record(model: torch.nn.Module) -> dict[str, Any]:
    """Model name, tag, weights sha256 (of the file loaded, `card.weights_sha256`), version and
    git commit."""
    from .. import __version__

    card = model.card
    return {
        "name": card.name,
        "arch": card.arch,
        "tag": card.tag,
        "weights_sha256": model.card.weights_sha256,
        "promptseg_version": __version__,
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def prefetch(fn: Callable[[T], R], items: Iterable[T], workers: int, ahead: int) -> Iterator[R]:
    """`fn(item)` for every item, in order; `workers` threads compute up to `ahead` in advance."""
    if workers < 0 or ahead < 1:
        raise ValueError(f"workers must be >= 0 and ahead >= 1, got {workers} and {ahead}")
    if workers == 0:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="promptseg-load")
    window: deque[Future[R]] = deque()
    try:
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) > ahead:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def encode_prompts(
    model: Any, prompts: Sequence[Any], level: str | None = None
) -> list[tuple[list[Any], Any]]:
    """(normalised prompts, their embeddings for `level`) per user prompt, in ONE encoder call.

    Every family returns prompt embeddings indexed by prompt along the first axis (a list or a
    tensor); that is how the batch is split back.
    """
    lists = [model.prepare_prompts(p) for p in prompts]
    flat = [p for group in lists for p in group]
    with torch.inference_mode():
        embeddings = model.encode_prompt(flat, model.check_level(level))
    if len(lists) == 1:
        return [(lists[0], embeddings)]
    if not isinstance(embeddings, list | tuple | torch.Tensor) or len(embeddings) != len(flat):
        raise ValueError(
            f"{model.card.name}.encode_prompt does not return one embedding per prompt, so "
            "prompts of several items cannot be encoded together; use --batch-size 1"
        )
    out, start = [], 0
    for group in lists:
        out.append((group, embeddings[start : start + len(group)]))
        start += len(group)
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_result(
    directory: Path, payload: dict[str, Any], seconds: float, n_items: int, unit: str
) -> dict[str, Any]:
    """Add timing (total and per `unit`) and the creation time; write result.json."""
    payload["timing"] = {"total_s": seconds, f"per_{unit}_ms": 1000 * seconds / max(n_items, 1)}
    payload["created"] = now_iso()
    write_json(directory / "result.json", payload)
    return payload
