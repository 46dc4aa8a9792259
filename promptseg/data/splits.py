"""Few-shot split lists (hsnet's ``data/splits``): fetched on first use, sha256-checked, parsed.

The files are obtained from a user folder laid out like hsnet's ``data/splits`` or downloaded into
the promptseg cache; pickles are only unpickled after their sha256 matches (or on opt-in).
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import pickle
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from promptseg.errors import ChecksumError, WeightsNotFoundError

__all__ = [
    "HSNET_RAW_URL",
    "SPLIT_DATASETS",
    "SPLIT_FILES",
    "SPLITS_CACHE_KEY",
    "SplitChecksumWarning",
    "SplitFile",
    "SplitPickleError",
    "file_sha256",
    "find_split",
    "load_coco_split",
    "load_lvis_split",
    "read_fss_split",
    "read_pascal_split",
    "split_file",
    "split_mismatches",
    "splits_dir",
]

HSNET_RAW_URL = "https://raw.githubusercontent.com/juhongm999/hsnet/main/data/splits/"
"""Upstream folder (GitHub raw files of juhongm999/hsnet, branch main) of the split lists."""

SPLITS_CACHE_KEY = "hsnet-splits"
"""Cache key: downloads land in ``<cache root>/hsnet-splits/<relpath>`` (hsnet's layout)."""

SPLIT_DATASETS = ("pascal5i", "coco20i", "fss1000")
"""Datasets whose split lists are public (LVIS-92i's pickle comes with the user's data)."""


@dataclass(frozen=True)
class SplitFile:
    """One upstream split-list file: where it lives in hsnet's ``data/splits`` and its sha256."""

    dataset: str
    fold: int | str
    relpath: str
    url: str
    sha256: str
    size: int

    @property
    def is_pickle(self) -> bool:
        """Pickles are never unpickled unless their sha256 matches (or the user opts in)."""
        return self.relpath.endswith(".pkl")


def _hsnet(dataset: str, fold: int | str, relpath: str, sha256: str, size: int) -> SplitFile:
    return SplitFile(dataset, fold, relpath, HSNET_RAW_URL + relpath, sha256, size)


# sha256 values of hsnet's files at commit 6b1bc12.
SPLIT_FILES: tuple[SplitFile, ...] = (
    _hsnet(
        "pascal5i",
        0,
        "pascal/val/fold0.txt",
        "748e2f4732ac502cb3aa1f3768936b394bd7ba4e611ac5bf959291a268e249df",
        5536,
    ),
    _hsnet(
        "pascal5i",
        1,
        "pascal/val/fold1.txt",
        "afce1929e4dacbc13c07f9a26d4ce7738d415e1b18443fe173e58303836f5c14",
        7216,
    ),
    _hsnet(
        "pascal5i",
        2,
        "pascal/val/fold2.txt",
        "50b1f5218e8f882ca65d85da5be230b978a70067e9b3e0e9fca1528f546bd7fb",
        11600,
    ),
    _hsnet(
        "pascal5i",
        3,
        "pascal/val/fold3.txt",
        "c3825d7c52d1608d4c62c5b85d6ef3f74cf5898032bc068a94c971df17bdf71a",
        5536,
    ),
    _hsnet(
        "coco20i",
        0,
        "coco/val/fold0.pkl",
        "96002389be83b4730d13b814398f54eb2baf5c3283598ec2288d60624d6ef9c3",
        1272708,
    ),
    _hsnet(
        "coco20i",
        1,
        "coco/val/fold1.pkl",
        "a34deecdf2858fc436f5ea4d5a2d46b6674ce09f7ebce41c34b694116381fa56",
        732057,
    ),
    _hsnet(
        "coco20i",
        2,
        "coco/val/fold2.pkl",
        "0f275c5e9bf538f6ef8a95054f6daf2519b53785c4ab7fd07e633dda57dac1e5",
        624406,
    ),
    _hsnet(
        "coco20i",
        3,
        "coco/val/fold3.pkl",
        "927597bd78036a460abdab243330667af6ceffdb483bc3331ae55d148f00c449",
        602257,
    ),
    _hsnet(
        "fss1000",
        "test",
        "fss/test.txt",
        "26f1b9e9dd0c4a58c01db306aeb5bccb5de361d544ec1b15f219efc4b74c0bf1",
        2785,
    ),
)


class SplitChecksumWarning(UserWarning):
    """A user-supplied split list differs from upstream: episodes will not be the reference ones."""


_MISMATCHES: dict[str, str] = {}


def split_mismatches() -> dict[str, str]:
    """Split files seen with an unexpected sha256 in this process (path -> actual sha256)."""
    return dict(_MISMATCHES)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def find_split(dataset: str, fold: int | str) -> SplitFile:
    """Table entry of ``dataset``'s split list for ``fold`` (ValueError naming valid choices)."""
    for entry in SPLIT_FILES:
        if entry.dataset == dataset and str(entry.fold) == str(fold):
            return entry
    known = sorted({e.dataset for e in SPLIT_FILES})
    if dataset not in known:
        raise ValueError(f"no split files for dataset {dataset!r}; known: {', '.join(known)}")
    folds = ", ".join(repr(e.fold) for e in SPLIT_FILES if e.dataset == dataset)
    raise ValueError(f"{dataset} has no fold {fold!r}; valid folds: {folds}")


def _entries(datasets: Iterable[str]) -> list[SplitFile]:
    wanted = [datasets] if isinstance(datasets, str) else list(datasets)
    known = {e.dataset for e in SPLIT_FILES}
    unknown = [d for d in wanted if d not in known]
    if unknown:
        raise ValueError(f"no split files for {unknown}; known datasets: {sorted(known)}")
    return [e for e in SPLIT_FILES if e.dataset in wanted]


def _check(path: Path, entry: SplitFile, trust_pickle: bool) -> None:
    """Compare a user copy with upstream's sha256: warn for text, refuse pickles unless trusted."""
    actual = file_sha256(path)
    if actual == entry.sha256:
        return
    _MISMATCHES[str(path)] = actual
    what = f"{path} has sha256 {actual}, upstream {entry.relpath} has {entry.sha256}"
    if entry.is_pickle and not trust_pickle:
        raise ChecksumError(
            f"{what}. Refusing to unpickle a file of unknown content (pickles can run code). "
            f"Replace it with the upstream copy ({entry.url}), or pass trust_pickle=True "
            "(CLI: --trust-pickle) if you trust it; the episodes will differ from the reference."
        )
    warnings.warn(
        f"{path} differs from upstream {entry.relpath} (sha256 {actual[:12]}…, upstream "
        f"{entry.sha256[:12]}…): episodes drawn from it are NOT the reference episodes "
        "(see benchmarks/README.md#split-lists)",
        SplitChecksumWarning,
        stacklevel=3,
    )


def _download(
    entries: Sequence[SplitFile], cache_dir: str | os.PathLike[str] | None, progress: bool
) -> list[Path]:
    """Resolve every entry through the weights cache; one error listing all files that failed."""
    from promptseg.weights import WeightSource, cache_root, resolve_file

    paths: list[Path] = []
    failures: list[tuple[SplitFile, str]] = []
    for entry in entries:
        folder, filename = entry.relpath.rsplit("/", 1)
        source = WeightSource(
            kind="url", filename=filename, url=entry.url, sha256=entry.sha256, size=entry.size
        )
        key = f"{SPLITS_CACHE_KEY}/{folder}"
        try:
            paths.append(resolve_file(key, [source], cache_dir=cache_dir, progress=progress))
        except WeightsNotFoundError as exc:
            reasons = [ln.strip() for ln in str(exc).splitlines() if "failed:" in ln]
            failures.append((entry, reasons[0] if reasons else "not available"))
    if failures:
        root = cache_root(cache_dir) / SPLITS_CACHE_KEY
        lines = [f"{len(failures)} few-shot split list(s) are neither cached nor downloadable:"]
        for entry, reason in failures:
            lines += [
                f"  - {entry.relpath} ({entry.size} bytes, sha256 {entry.sha256})",
                f"      from {entry.url}",
                f"      {reason}",
                f"      put it at {root / entry.relpath}",
            ]
        lines.append(
            "Or pass splits_dir=DIR (command line: --splits-dir DIR) where DIR is a copy of "
            "hsnet's data/splits holding "
            + ", ".join(f"DIR/{e.relpath}" for e, _ in failures)
            + "."
        )
        raise WeightsNotFoundError("\n".join(lines))
    return paths


def split_file(
    dataset: str,
    fold: int | str,
    splits_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    trust_pickle: bool = False,
    progress: bool = False,
) -> Path:
    """Path of one split list: from ``splits_dir`` (hsnet layout, sha256-checked) or the cache."""
    entry = find_split(dataset, fold)
    if splits_dir is not None:
        path = Path(splits_dir) / entry.relpath
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: splits_dir must be laid out like hsnet's data/splits "
                f"(upstream file: {entry.url})."
            )
        _check(path, entry, trust_pickle)
        return path
    return _download([entry], cache_dir, progress)[0]


def splits_dir(
    splits_dir: str | os.PathLike[str] | None = None,
    *,
    datasets: Iterable[str] = SPLIT_DATASETS,
    cache_dir: str | os.PathLike[str] | None = None,
    trust_pickle: bool = False,
    progress: bool = False,
) -> Path:
    """A folder laid out like hsnet's ``data/splits`` holding every split list of ``datasets``."""
    entries = _entries(datasets)
    if splits_dir is not None:
        root = Path(splits_dir)
        missing = [e for e in entries if not (root / e.relpath).is_file()]
        if missing:
            raise FileNotFoundError(
                f"splits_dir {root} lacks "
                + ", ".join(f"{e.relpath} ({e.url})" for e in missing)
                + " (expected hsnet's data/splits layout)."
            )
        for entry in entries:
            _check(root / entry.relpath, entry, trust_pickle)
        return root
    paths = _download(entries, cache_dir, progress)
    if not paths:
        raise ValueError("no datasets requested")
    depth = len(Path(entries[0].relpath).parts)
    return paths[0].parents[depth - 1]


def _lines(path: Path) -> list[str]:
    """Lines of a split list, CRLF or LF, without the empty element after the final newline."""
    if not path.is_file():
        raise FileNotFoundError(f"split list {path} not found (or not a file)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: a split list must be UTF-8 text ({exc})") from None
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def read_pascal_split(path: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """``(image stem, 0-based class)`` pairs of a PASCAL-5i ``<name>__<cc>`` list, in file order."""
    out = []
    for line in _lines(Path(path)):
        name, sep, cc = line.rpartition("__")
        if not (sep and name and cc.isascii() and cc.isdigit() and int(cc) >= 1):
            raise ValueError(
                f"{path}: malformed line {line!r} (expected '<name>__<cc>', cc the 1-based class)"
            )
        out.append((name, int(cc) - 1))
    return out


def read_fss_split(path: str | os.PathLike[str]) -> list[str]:
    """FSS-1000 class names of a split list (CRLF stripped), in file order."""
    return [line for line in _lines(Path(path)) if line]


class SplitPickleError(pickle.UnpicklingError, ValueError):
    """A split pickle is truncated, foreign, or refers to objects the loader refuses to build."""


class _ListsUnpickler(pickle.Unpickler):
    """Unpickler that can only build dicts, lists, strings and ints (defence in depth)."""

    _ALLOWED = frozenset({"dict", "list", "str", "int"})

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in self._ALLOWED:
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"split pickle refers to {module}.{name}; refusing to load it")


def load_coco_split(
    path: str | os.PathLike[str],
    *,
    sha256: str | None = None,
    trust_pickle: bool = False,
) -> dict[int, list[str]]:
    """COCO-20i split pickle as ``{class index: [relative image path, ...]}``, list order kept.

    The bytes are unpickled only if their sha256 equals ``sha256`` or ``trust_pickle`` is set.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO-20i split pickle {path} not found (or not a file)")
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if not trust_pickle and (sha256 is None or actual != sha256):
        expected = f"expected {sha256}" if sha256 else "no known sha256"
        raise ChecksumError(
            f"{path} has sha256 {actual} ({expected}). Refusing to unpickle it; pass "
            "trust_pickle=True (CLI: --trust-pickle) only if you trust this file."
        )
    try:
        raw = _ListsUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # noqa: BLE001 - truncated / foreign bytes fail in many ways
        raise SplitPickleError(f"{path} is not a readable split pickle: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(
            f"{path}: expected a dict of class -> image list, got {type(raw).__name__}"
        )
    out: dict[int, list[str]] = {}
    for key, items in raw.items():
        if not isinstance(key, int) or not isinstance(items, list):
            raise ValueError(f"{path}: entry {key!r} is not int -> list")
        if not all(isinstance(item, str) for item in items):
            raise ValueError(f"{path}: class {key} lists a non-string image path")
        out[int(key)] = [str(item) for item in items]
    return out


TRUSTED_PICKLES = "trusted-pickles.json"


def _trusted(cache_dir: str | os.PathLike[str] | None) -> tuple[Path, dict[str, str]]:
    """The trust record (file, {absolute pickle path: sha256 the user opted in for})."""
    from promptseg.weights import cache_root

    record = cache_root(cache_dir) / TRUSTED_PICKLES
    try:
        return record, json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return record, {}


def load_lvis_split(
    data_root: str | os.PathLike[str],
    *,
    split: str = "val",
    trust_pickle: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[dict[Any, dict[str, Any]], str]:
    """LVIS-92i pickle ``<data_root>/LVIS/lvis_<split>.pkl`` and its sha256 (no public hash exists).

    Unpickling runs code and the file has no published sha256: the user opts in once
    (``trust_pickle=True``), its hash is recorded in the cache, later runs load it without the
    flag, and a file whose hash changed since is refused until trusted again (with a warning).
    """
    path = Path(data_root) / "LVIS" / f"lvis_{split}.pkl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: LVIS-92i needs lvis_{split}.pkl from Matcher's lvis.zip under "
            "<data_root>/LVIS/ (see benchmarks/README.md#datasets)."
        )
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    record, trusted = _trusted(cache_dir)
    known = trusted.get(str(path.resolve()))
    if trust_pickle:
        if known not in (None, actual):
            warnings.warn(
                f"{path} changed since you trusted it (sha256 {known} -> {actual}); "
                "trusting the new file",
                SplitChecksumWarning,
                stacklevel=2,
            )
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({**trusted, str(path.resolve()): actual}, indent=1))
    elif known != actual:
        changed = f" It CHANGED since you trusted it (was sha256 {known})." if known else ""
        raise ChecksumError(
            f"{path} (sha256 {actual}) has no published checksum, and unpickling runs code."
            f"{changed} Pass trust_pickle=True (CLI: --trust-pickle) once if you trust it; its "
            f"sha256 is then recorded in {record} and later runs need no flag."
        )
    try:
        raw = pickle.loads(data)  # noqa: S301 - explicit user opt-in
    except Exception as exc:  # noqa: BLE001 - truncated / foreign bytes fail in many ways
        raise SplitPickleError(f"{path} is not a readable LVIS pickle: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict category -> images, got {type(raw).__name__}")
    return raw, actual
