"""Find, download, verify, cache and read checkpoint files.

A weight file is looked up first in the promptseg cache (``<root>/<key>/<filename>``), then in each
source recorded in zoo.yaml (Hugging Face Hub, a direct URL, or a manual download). Every failure
ends in one error message saying what was tried, why it failed and where to put the file by hand.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import pickle
import re
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import huggingface_hub
import huggingface_hub.constants
import huggingface_hub.utils
import safetensors.torch
import torch
from torch.torch_version import TorchVersion
from tqdm.auto import tqdm

from .errors import CheckpointFormatError, ChecksumError, WeightsNotFoundError
from .registry import lookup

__all__ = [
    "WeightSource",
    "cache_root",
    "load_state_dict_file",
    "read_checkpoint",
    "files_sha256",
    "TrainingMetadata",
    "TRAINING_METADATA_NAMESPACES",
    "resolve_file",
    "load_pretrained",
    "pretrained_state",
    "convert_checkpoint",
    "fetch_native",
    "native_checkpoint_path",
    "load_native_state_dict",
    "save_state_dict_file",
    "sha256_file",
    "weights_sha256",
    "unwrap_state_dict",
    "where_to_get",
    "blame_file",
    "checkpoint_hint",
]

SOURCE_KINDS = ("hf", "url", "manual")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightSource:
    """One place a weight file can come from, as recorded in zoo.yaml."""

    kind: str  # "hf" | "url" | "manual"
    filename: str  # name in the cache (and in the hub repo for "hf")
    repo: str | None = None  # hf: "CIDAS/clipseg-rd64-refined"
    revision: str | None = None  # hf: branch or commit; None = main
    url: str | None = None  # url: direct download address
    archive_member: str | None = None  # url: the file is this member of a .zip at `url`
    sha256: str | None = None  # of the final file (the member, for archives); None = unchecked
    size: int | None = None  # bytes, shown in error messages
    instructions: str | None = None  # manual: how to get the file by hand

    def __post_init__(self) -> None:
        """Reject entries that could never be fetched, so zoo.yaml mistakes surface at load time."""
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"weight source kind {self.kind!r} is not one of {SOURCE_KINDS}")
        if self.kind == "hf" and not self.repo:
            raise ValueError(f"hf weight source for {self.filename!r} needs `repo`")
        if self.kind == "url" and not self.url:
            raise ValueError(f"url weight source for {self.filename!r} needs `url`")
        if self.archive_member and self.kind != "url":
            raise ValueError(f"`archive_member` only applies to url sources, not {self.kind!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WeightSource:
        """Build a source from a zoo.yaml mapping, refusing keys it would silently drop."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown weight source keys {unknown} in {dict(d)}")
        return cls(**d)

    def describe(self) -> str:
        """Say where this source's file can be obtained, for error messages."""
        if self.kind == "hf":
            return (
                f"Hugging Face Hub: repo {self.repo}, file {self.filename}, "
                f"revision {self.revision or 'main'} (https://huggingface.co/{self.repo})"
            )
        if self.kind == "url":
            member = f" (zip archive; the file is its member {self.archive_member})"
            return f"URL {self.url}" + (member if self.archive_member else "")
        return f"manual download: {self.instructions or 'no instructions recorded'}"


class _SourceFailed(Exception):
    """A source could not provide the file; the message is the reason shown to the user."""


# --------------------------------------------------------------------------- cache and hashing


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the cache directory: argument > $PROMPTSEG_CACHE > XDG cache (not created)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("PROMPTSEG_CACHE"):
        return Path(os.environ["PROMPTSEG_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "promptseg"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex sha256 of a file, read in chunks so large checkpoints fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: Path, expected: str | None, *, what_to_do: str) -> None:
    """Raise ChecksumError if the sha256 is known and differs, so bad files are never used."""
    if expected is None:
        return
    actual = sha256_file(path)
    if actual.lower() != expected.lower():
        raise ChecksumError(
            f"{path} has sha256 {actual}, expected {expected} (zoo.yaml). {what_to_do}"
        )


def _offline_reason() -> str | None:
    """Name the environment variable that forbids network access, or None when online."""
    for var in ("PROMPTSEG_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").upper() in {"1", "ON", "YES", "TRUE"}:
            return f"{var}={os.environ[var]}"
    return None


PROBE_SECONDS = 5.0  # one connection attempt per host before a download (no retries)
_REACHABILITY: dict[str, str | None] = {}  # host -> why it cannot be reached (None: it can)
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")


def _unreachable(url: str) -> str | None:
    """Why the host of `url` cannot be reached, or None: one quick TCP connection per host and
    process, so an offline machine fails in seconds instead of after the Hub's five retries per
    file. Behind a proxy (the *_PROXY variables) nothing is probed."""
    parsed = urlparse(url)
    host = parsed.hostname
    if not host or any(os.environ.get(v) for v in _PROXY_VARIABLES):
        return None
    if host not in _REACHABILITY:
        port = parsed.port or (80 if parsed.scheme == "http" else 443)
        try:
            socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
            _REACHABILITY[host] = None
        except OSError as exc:
            _REACHABILITY[host] = f"no network: cannot reach {host} ({_first_line(exc)})"
    return _REACHABILITY[host]


# --------------------------------------------------------------------------- resolving


def resolve_file(
    key: str,
    sources: Sequence[WeightSource],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Path:
    """Return a verified local path of a weight file: cached, else from the first working source."""
    folder = cache_root(cache_dir) / key
    for source in sources:
        cached = folder / source.filename
        if cached.is_file() or (source.kind == "manual" and cached.is_dir()):
            _verify(
                cached,
                source.sha256,
                what_to_do="It was not overwritten: delete it or replace it with a good copy from "
                f"{source.describe()}, or pass `checkpoint_path=` to use a file you trust.",
            )
            return cached

    offline = _offline_reason()
    failures: list[str] = []
    mismatch = False
    for source in sources:
        try:
            return _fetch(source, folder, offline=offline, progress=progress)
        except _SourceFailed as exc:
            failures.append(f"{source.describe()}\n     failed: {exc}")
        except ChecksumError as exc:
            mismatch = True
            failures.append(f"{source.describe()}\n     failed: checksum mismatch: {exc}")
    with contextlib.suppress(OSError):
        folder.rmdir()  # only if the failed attempts left it empty (a partial .part file stays)
    message = _not_found_message(key, sources, folder, failures, offline=offline)
    if mismatch:
        raise ChecksumError(message)
    raise WeightsNotFoundError(message)


def _fetch(source: WeightSource, folder: Path, *, offline: str | None, progress: bool) -> Path:
    """Get the file from one source, or raise _SourceFailed / ChecksumError saying why not."""
    if source.kind == "manual":
        raise _SourceFailed("needs a manual download (instructions above)")
    if source.kind == "hf":
        return _fetch_hf(source, offline=offline, progress=progress)
    if offline:
        raise _SourceFailed(f"skipped, offline mode is on ({offline})")
    unreachable = _unreachable(source.url)
    if unreachable:
        raise _SourceFailed(unreachable)
    folder.mkdir(parents=True, exist_ok=True)
    if source.archive_member:
        return _fetch_archive_member(source, folder, progress=progress)
    return _fetch_url(source, folder, progress=progress)


def _fetch_hf(source: WeightSource, *, offline: str | None, progress: bool) -> Path:
    """Return the file's path inside the Hugging Face cache, downloading it unless offline (or
    the Hub cannot be reached: then only the cache is looked at)."""
    unreachable = None if offline else _unreachable(huggingface_hub.constants.ENDPOINT)
    try:
        with _hub_progress_bars(progress):
            path = huggingface_hub.hf_hub_download(
                source.repo,
                source.filename,
                revision=source.revision,
                local_files_only=bool(offline or unreachable),
            )
    except Exception as exc:  # any hub failure (HTTP, offline, bad id) moves on to the next source
        if offline or unreachable:
            why = f"offline mode is on ({offline})" if offline else unreachable
            raise _SourceFailed(
                f"{why}, and the file is not in the Hugging Face cache "
                f"({huggingface_hub.constants.HF_HUB_CACHE})"
            ) from exc
        raise _SourceFailed(f"{type(exc).__name__}: {_first_line(exc)}") from exc
    _verify(
        Path(path),
        source.sha256,
        what_to_do="The Hub file differs from the one zoo.yaml expects; "
        "pin `revision` to the expected commit.",
    )
    return Path(path)


@contextlib.contextmanager
def _hub_progress_bars(enabled: bool) -> Iterator[None]:
    """Silence huggingface_hub's own progress bars while downloading with progress=False."""
    if enabled or huggingface_hub.utils.are_progress_bars_disabled():
        yield
        return
    huggingface_hub.utils.disable_progress_bars()
    try:
        yield
    finally:
        huggingface_hub.utils.enable_progress_bars()


def _fetch_url(source: WeightSource, folder: Path, *, progress: bool) -> Path:
    """Download a direct URL into the cache, verify it, then move it into place atomically."""
    dest = folder / source.filename
    part = _part_path(dest)
    _download(source.url, part, progress=progress)
    _verify_fresh(part, source)
    os.replace(part, dest)
    return dest


def _fetch_archive_member(source: WeightSource, folder: Path, *, progress: bool) -> Path:
    """Download a zip archive, extract the one member needed, verify it, and drop the archive."""
    archive = folder / (PurePosixPath(urlparse(source.url).path).name or "archive.zip")
    if not archive.is_file():
        archive_part = _part_path(archive)
        _download(source.url, archive_part, progress=progress)
        os.replace(archive_part, archive)
    dest = folder / source.filename
    part = _part_path(dest)
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(_member(zf, source.archive_member)) as src:
            with open(part, "wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)
    except (zipfile.BadZipFile, zlib.error, KeyError) as exc:
        archive.unlink()
        part.unlink(missing_ok=True)
        raise _SourceFailed(f"bad archive {archive.name} (deleted): {_first_line(exc)}") from exc
    try:
        _verify_fresh(part, source)
    finally:
        archive.unlink()
    os.replace(part, dest)
    return dest


def _member(zf: zipfile.ZipFile, name: str) -> str:
    """The archive member called `name`, at the top or in any folder (`unzip -j` semantics)."""
    names = zf.namelist()
    if name in names:
        return name
    matches = [n for n in names if PurePosixPath(n).name == name]
    if len(matches) != 1:
        raise KeyError(f"{name} is not in the archive (members: {', '.join(names[:8])})")
    return matches[0]


def _verify_fresh(path: Path, source: WeightSource) -> None:
    """Check a file just downloaded; on mismatch delete it so it is never mistaken for good."""
    try:
        _verify(
            path,
            source.sha256,
            what_to_do="The download was deleted. Retry; if it keeps failing the upstream file "
            "changed: get it from another source or fix sha256 in zoo.yaml.",
        )
    except ChecksumError:
        path.unlink()
        raise


def _part_path(path: Path) -> Path:
    """Return where a file is written while incomplete."""
    return path.with_name(path.name + ".part")


def _download(url: str, part: Path, *, progress: bool) -> None:
    """Download `url` into `part`, resuming from whatever `part` already holds (HTTP Range)."""
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": "promptseg"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the partial file does not fit the remote one: restart
            part.unlink()
            return _download(url, part, progress=progress)
        raise _SourceFailed(f"HTTP error {exc.code} {exc.reason}") from exc
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise _SourceFailed(f"network error: {_first_line(exc)}") from exc

    with response:
        if response.status != 206:  # the server ignored Range: start over
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length else None
        bar = tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.name.removesuffix(".part"),
            disable=not progress,
        )
        try:
            with bar, open(part, "ab" if offset else "wb") as out:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as exc:
            raise _SourceFailed(
                f"network error after {part.stat().st_size} bytes (kept {part}, the next attempt "
                f"resumes): {_first_line(exc)}"
            ) from exc
    if total is not None and part.stat().st_size != total:
        raise _SourceFailed(f"download stopped at {part.stat().st_size} of {total} bytes")


def _first_line(exc: BaseException) -> str:
    """Return the first line of an exception message, since library messages can be pages long."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _not_found_message(
    key: str,
    sources: Sequence[WeightSource],
    folder: Path,
    failures: list[str],
    *,
    offline: str | None,
) -> str:
    """Compose the single message telling a user what was tried and where to put the file."""
    filenames = list(dict.fromkeys(s.filename for s in sources))
    lines = [f"Could not obtain the weights {key!r}."]
    for filename in filenames:
        same = [s for s in sources if s.filename == filename]
        sha256 = next((s.sha256 for s in same if s.sha256), None)
        size = next((s.size for s in same if s.size), None)
        details = [f"sha256 {sha256}"] if sha256 else []
        details += [f"{size} bytes ({size / 2**20:.1f} MiB)"] if size else []
        lines.append(f"File: {filename}" + (f" ({', '.join(details)})" if details else ""))
    lines.append("Sources tried:" if failures else "No sources are recorded for it.")
    lines += [f"  {i}. {failure}" for i, failure in enumerate(failures, 1)]
    if offline:
        lines.append(f"Offline mode is on ({offline}); unset it to allow downloads.")
    lines.append("Get the file yourself and put it at:")
    lines += [f"  {folder / filename}" for filename in filenames]
    lines.append(
        "or pass `checkpoint_path=<file>` (Python) / `--checkpoint <file>` (command line)."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- reading and writing

_WRAPPER_KEYS = ("state_dict", "model", "module", "teacher")
PIPELINE_COMPONENTS = ("unet", "vae")  # diffusers pipeline subfolders read as `<name>.*` keys
EMBEDDING_FILE = "empty_prompt_embedding.safetensors"
_PRETRAINED_NAMES = (
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "pytorch_model.bin",
    "diffusion_pytorch_model.bin",
)


def unwrap_state_dict(obj: Any) -> Any:
    """Peel training-checkpoint wrappers and a DataParallel "module." prefix off a state dict."""
    while isinstance(obj, Mapping) and not _all_tensors(obj):
        inner = [obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if len(inner) != 1:
            break
        obj = inner[0]
    prefix = "module."
    if isinstance(obj, Mapping) and obj and all(str(k).startswith(prefix) for k in obj):
        obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def _all_tensors(obj: Mapping[Any, Any]) -> bool:
    """Tell whether a mapping is already a flat {name: tensor} state dict."""
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat {name: tensor} dict, whatever the container.

    Pickled checkpoints are read with `weights_only=True`; objects of training frameworks
    (`TRAINING_METADATA_NAMESPACES`, e.g. a Lightning callback's state in Stable Diffusion's
    `.ckpt`) are replaced by inert stubs and dropped with the wrapper around the weights; any
    other object is refused, so nothing in a file can run code.
    """
    path = Path(path)
    if path.is_dir() and _is_pipeline(path):
        return _load_pipeline(path)
    if path.is_dir():
        files = _pretrained_files(path)
        if len(files) == 1:
            return load_state_dict_file(files[0])
        return _load_sharded(files[0], files[1:])
    if not path.is_file():
        raise WeightsNotFoundError(
            f"Checkpoint {path} does not exist (or is not a regular file); "
            "give the path of a weights file or of a save_pretrained folder."
        )
    try:
        obj = _read_checkpoint(path)
    except CheckpointFormatError:
        raise
    except pickle.UnpicklingError as exc:  # torch's weights_only text is a page: one line instead
        raise CheckpointFormatError(_unreadable_pickle(path, exc)) from None
    except Exception as exc:  # torch / safetensors / zipfile raise many types for a bad file
        content = _not_a_checkpoint(path)
        if content is not None:
            raise CheckpointFormatError(
                f"{path} is not a checkpoint: {content}. Give a PyTorch (.pt, .pth, .bin, "
                ".ckpt), TorchScript or .safetensors weights file."
            ) from None
        raise CheckpointFormatError(
            f"Cannot read checkpoint {path} ({path.stat().st_size} bytes): "
            f"{type(exc).__name__}: {_first_line(exc)}. The file may be truncated or corrupted "
            "(delete it and download it again) or is not a PyTorch/safetensors checkpoint."
        ) from exc
    return _checked_state_dict(unwrap_state_dict(obj), path)


def weights_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 that identifies the weights `load_state_dict_file(path)` reads.

    For a file, the file's sha256. For a save_pretrained folder, the sha256 of the text
    ``sha256sum`` prints for the files read (the weights file, or the shard index and its
    shards, in that order): ``cd FOLDER && sha256sum model.safetensors | sha256sum``. For a
    pipeline folder, the same over every component file read, named relative to the folder.
    """
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    if _is_pipeline(path):
        return files_sha256(path, [f for _, f in _pipeline_files(path)])
    return files_sha256(path, _pretrained_files(path))


def files_sha256(folder: str | os.PathLike[str], files: Sequence[str | os.PathLike[str]]) -> str:
    """The sha256 of the text ``sha256sum`` prints for `files` (in this order), each named
    relative to `folder`: what identifies weights read from several files of one folder."""
    folder = Path(folder)
    names = [Path(f).relative_to(folder).as_posix() for f in files]
    listing = "".join(f"{sha256_file(f)}  {n}\n" for f, n in zip(files, names, strict=True))
    return hashlib.sha256(listing.encode()).hexdigest()


def read_checkpoint(card: Any, path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], str]:
    """What `checkpoint_path=` and `promptseg convert` read -> (state dict in a layout the card's
    converter reads, sha256 of what was read).

    A folder goes to the converter's `read_folder(folder, config)` hook when it has one (a family
    released as several files, e.g. ODISE: its .pth, sd-v1-3.ckpt and OpenAI's CLIP), which
    returns (state dict, the files it read), or None to read the folder the common way; the
    hook's `layout` attribute says what such a folder holds (for error messages). The files a
    user points at are read as they are: zoo.yaml's sha256 apply to downloads only.
    """
    path = Path(path)
    reader = _folder_reader(card) if path.is_dir() else None
    found = reader(path, card.config) if reader is not None else None
    if found is None:
        return load_state_dict_file(path), weights_sha256(path)
    state, files = found
    return state, files_sha256(path, files)


def _folder_reader(card: Any) -> Any:
    """The card's converter's `read_folder` hook, or None."""
    if card.converter is None:
        return None
    return getattr(lookup("converter", card.converter), "read_folder", None)


TRAINING_METADATA_NAMESPACES = (
    "pytorch_lightning.",
    "lightning.",
    "lightning_fabric.",
    "numpy.",
)
"""Modules whose pickled objects a checkpoint may hold beside its tensors (training metadata:
Lightning callbacks, numpy scalars of logged scores). They are read as inert stubs and dropped;
the weights never depend on them. An object from anywhere else is refused."""


class TrainingMetadata:
    """Inert stand-in for a training framework's pickled object (e.g. the state of a Lightning
    `ModelCheckpoint` callback): it takes any arguments and state and keeps none of them."""

    pickled_name = "training metadata"

    def __new__(cls, *args: Any, **kwargs: Any) -> TrainingMetadata:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<unread {self.pickled_name}>"


def _stub(name: str) -> type[TrainingMetadata]:
    """A TrainingMetadata subclass named after the pickled global it stands for."""
    return type(f"unread {name}", (TrainingMetadata,), {"pickled_name": name})


def _read_checkpoint(path: Path) -> Any:
    """Read one file with the reader its container needs, never unpickling arbitrary objects."""
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(path, device="cpu")
    if not zipfile.is_zipfile(path):  # the legacy torch.save format: a bare pickle stream
        return _load_pickle(path, known=[], mmap=False)
    if _is_torchscript(path):
        return torch.jit.load(path, map_location="cpu").state_dict()
    lister = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    unsafe = list(lister(str(path))) if lister is not None else []  # else found while loading
    refused = [name for name in unsafe if not name.startswith(TRAINING_METADATA_NAMESPACES)]
    if refused:
        raise CheckpointFormatError(_refused_objects(path, refused))
    return _load_pickle(path, known=unsafe, mmap=True)


def _load_pickle(path: Path, known: Sequence[str], mmap: bool) -> Any:
    """torch.load with weights_only=True, training-metadata globals (`known`, and any the load
    names) read as stubs; any other global is refused before it is unpickled."""
    stubs = {name: _stub(name) for name in known}
    while True:
        if stubs and TorchVersion(torch.__version__) < "2.6":  # no (stand-in, name) allowlist
            raise CheckpointFormatError(
                f"Cannot read checkpoint {path}: it pickles training objects ({', '.join(stubs)})"
                f" that torch {torch.__version__} cannot skip safely; torch >= 2.6 reads it."
            )
        try:
            if not stubs:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            with torch.serialization.safe_globals([(cls, name) for name, cls in stubs.items()]):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as exc:
            name = _refused_global(exc)
            if name is None or name in stubs or not name.startswith(TRAINING_METADATA_NAMESPACES):
                raise
            stubs[name] = _stub(name)  # a legacy file, or a torch that cannot list them first


def _refused_global(exc: pickle.UnpicklingError) -> str | None:
    """The global a weights_only load refused, from torch's message (None: another failure)."""
    found = re.search(r"GLOBAL (\S+) was not an allowed global|Unsupported class (\S+)", str(exc))
    return (found.group(1) or found.group(2)) if found else None


def _refused_objects(path: Path, names: Sequence[str]) -> str:
    """One line: the file pickles objects promptseg will not unpickle."""
    return (
        f"Cannot read checkpoint {path}: it pickles Python objects other than tensors and "
        f"training metadata ({', '.join(names[:5])}), whose unpickling could run code; "
        "promptseg refuses them. Save the weights alone with torch.save(model.state_dict(), "
        "FILE) or as .safetensors, or download the file again."
    )


def _is_torchscript(path: Path) -> bool:
    """Tell a TorchScript archive (e.g. OpenAI CLIP's .pt) from a torch.save zip file.

    A zip's CRC-32s are checked on the way (torch does not check them), so a corrupted byte in
    the tensor data is an error rather than a silently different weight.
    """
    with zipfile.ZipFile(path) as zf:
        corrupted = zf.testzip()
        if corrupted is not None:
            raise CheckpointFormatError(
                f"Cannot read checkpoint {path}: its zip member {corrupted} fails its CRC-32 "
                "check. The file is corrupted: delete it and download it again."
            )
        return any(PurePosixPath(name).name == "constants.pkl" for name in zf.namelist())


def _unreadable_pickle(path: Path, exc: pickle.UnpicklingError) -> str:
    """One line saying why a pickle did not load under weights_only (torch's text is a page)."""
    name = _refused_global(exc)
    if name is not None:
        return _refused_objects(path, [name])
    content = _not_a_checkpoint(path)
    if content is not None:
        return (
            f"{path} is not a checkpoint: {content}. Give a PyTorch (.pt, .pth, .bin, .ckpt), "
            "TorchScript or .safetensors weights file."
        )
    return (
        f"Cannot read checkpoint {path} ({path.stat().st_size} bytes): it is corrupted, or holds "
        "Python objects whose unpickling could run code, and promptseg reads tensors only. Save "
        "the weights alone with torch.save(model.state_dict(), FILE) or as .safetensors, or "
        "download the file again."
    )


def _not_a_checkpoint(path: Path) -> str | None:
    """What a file that cannot be a checkpoint is instead (from its first bytes), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    text = head.lstrip()
    if not head:
        return "it is empty (an interrupted download?)"
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the file it points to (run `git lfs pull`)"
    if text[:1] == b"<" or text[:9].lower() == b"<!doctype":
        return "it is an HTML page (a login or error page saved instead of the file?)"
    for magic, kind in _FILE_MAGIC:
        if head.startswith(magic):
            return f"it is {kind}"
    if head.startswith(b"PK"):
        with contextlib.suppress(Exception):  # zipfile raises many types for a damaged archive
            with zipfile.ZipFile(path) as zf:
                if not any(n.endswith("data.pkl") for n in zf.namelist()):
                    return "it is a zip archive without data.pkl (not written by torch.save)"
        return None
    if head[:1] != b"\x80" and _is_text(head):
        return "it is a text file"
    return None


_FILE_MAGIC = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive (unpack it first)"),
    (b"BZh", "a bzip2 archive (unpack it first)"),
    (b"\xfd7zXZ", "an xz archive (unpack it first)"),
    (b"7z\xbc\xaf", "a 7-zip archive (unpack it first)"),
    (b"\x89HDF", "an HDF5 file (Keras / TensorFlow weights?)"),
)


def _is_text(head: bytes) -> bool:
    """Whether bytes read as UTF-8 text of printable characters and whitespace."""
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the end of the sample
            return False
        decoded = head[: exc.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\r\n" for c in decoded)


def _checked_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Return obj as a state dict, or raise CheckpointFormatError describing what it holds."""
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(
            f"Checkpoint {path} holds a {type(obj).__name__}, not a {{name: tensor}} mapping."
        )
    bad = [f"{k!r}: {type(v).__name__}" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    bad += [f"{k!r} (key is not a string)" for k in obj if not isinstance(k, str)]
    if bad:
        raise CheckpointFormatError(
            f"Checkpoint {path} is not a flat {{name: tensor}} state dict; "
            f"it has {len(bad)} other entries, e.g. {', '.join(bad[:5])}. "
            f"Known wrapper keys {list(_WRAPPER_KEYS)} are unwrapped when exactly one is present."
        )
    return dict(obj)


def _is_pipeline(folder: Path) -> bool:
    """A diffusers pipeline folder: components (`unet/`, `vae/`) in subfolders."""
    return any((folder / name).is_dir() for name in PIPELINE_COMPONENTS)


def _component_folder(folder: Path, name: str) -> Path | None:
    """Where a pipeline component's weights are: `name/`, or a nested `name/name/` (diffusers
    reads both); None when the pipeline has no such component."""
    for candidate in (folder / name, folder / name / name):
        if candidate.is_dir() and any((candidate / n).is_file() for n in _PRETRAINED_NAMES):
            return candidate
        if candidate.is_dir() and any(candidate.glob("*.index.json")):
            return candidate
    return None


def _pipeline_files(folder: Path) -> list[tuple[str, Path]]:
    """(state-dict prefix, file) of everything a pipeline folder's weights are read from."""
    files = []
    for name in PIPELINE_COMPONENTS:
        component = _component_folder(folder, name)
        if component is not None:
            files += [(f"{name}.", f) for f in _pretrained_files(component)]
    if (folder / EMBEDDING_FILE).is_file():
        files.append(("", folder / EMBEDDING_FILE))
    return files


def read_empty_prompt_embedding(folder: Path) -> torch.Tensor | None:
    """The `embedding` [1, L, C] of `empty_prompt_embedding.safetensors` in `folder` (the text
    conditioning of a diffusion backbone, computed once elsewhere), or None without that file."""
    path = folder / EMBEDDING_FILE
    if not path.is_file():
        return None
    tensors = load_state_dict_file(path)
    embedding = tensors.get("embedding")
    if embedding is None or embedding.ndim != 3 or set(tensors) - {"embedding", "padded"}:
        raise CheckpointFormatError(
            f"{path} must hold a tensor named `embedding` [1, L, C] (and optionally `padded`, "
            f"the training context), found "
            + ", ".join(f"{k} {list(v.shape)}" for k, v in sorted(tensors.items()))
        )
    return embedding


def _load_pipeline(folder: Path) -> dict[str, torch.Tensor]:
    """`unet.*`, `vae.*` from a pipeline's component folders, and `empty_prompt_embedding` from
    `empty_prompt_embedding.safetensors` (key `embedding`; `padded` is for training) beside them."""
    state: dict[str, torch.Tensor] = {}
    for name in PIPELINE_COMPONENTS:
        component = _component_folder(folder, name)
        if component is not None:
            state.update({f"{name}.{k}": v for k, v in load_state_dict_file(component).items()})
    embedding = read_empty_prompt_embedding(folder)
    if embedding is not None:
        state["empty_prompt_embedding"] = embedding
    if not state:
        raise CheckpointFormatError(
            f"pipeline folder {folder} has no component weights (looked in "
            f"{', '.join(PIPELINE_COMPONENTS)}/ and their nested folders)"
        )
    return state


def _pretrained_files(folder: Path) -> list[Path]:
    """The files a `save_pretrained` folder's weights are read from: [file] or [index, *shards]."""
    for name in _PRETRAINED_NAMES:
        if (folder / name).is_file():
            return [folder / name]
        if (folder / f"{name}.index.json").is_file():
            index = folder / f"{name}.index.json"
            return [index, *(folder / shard for shard in _shard_names(index))]
    found = sorted(p.name for p in folder.iterdir())
    raise CheckpointFormatError(
        f"Directory {folder} has no save_pretrained weights (looked for "
        f"{', '.join(_PRETRAINED_NAMES)} and their .index.json); it contains {found[:10]}."
    )


def _shard_names(index: Path) -> list[str]:
    """The shard file names a `*.index.json` lists: plain names of existing files beside it."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointFormatError(f"Shard index {index} is unreadable: {exc!r}") from exc
    plain = [s for s in shards if isinstance(s, str) and s not in ("", ".", "..")]
    bad = [s for s in shards if s not in plain or PurePosixPath(s).name != s]
    bad += [s for s in shards if s not in bad and not (index.parent / s).is_file()]
    if bad:
        raise CheckpointFormatError(
            f"Shard index {index} names shards that are not files beside it: {bad[:5]}; "
            "each weight_map value must be the file name of a shard in the same folder."
        )
    return shards


def _load_sharded(index: Path, shards: Sequence[Path]) -> dict[str, torch.Tensor]:
    """Merge the shards listed in a `*.index.json` weight map into one state dict."""
    weight_map = json.loads(index.read_text())["weight_map"]
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        merged.update(load_state_dict_file(shard))
    missing = sorted(set(weight_map) - set(merged))
    if missing:
        raise CheckpointFormatError(
            f"Shard index {index} lists {len(missing)} tensors absent from its shards, "
            f"e.g. {missing[:5]}."
        )
    return merged


ARCHITECTURE_KEY = "promptseg.architecture"
"""safetensors metadata key: the config entries (JSON) a converted file's architecture needs."""


def save_state_dict_file(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    architecture: Mapping[str, Any] | None = None,
) -> None:
    """Write a state dict as safetensors atomically, so a crash never leaves a half-written file.

    `architecture` (config entries that differ from the zoo's, e.g. the UNet of a checkpoint of
    another size) is stored in the file's metadata, so loading the file rebuilds that model.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().contiguous() for name, tensor in state_dict.items()}
    metadata = {"format": "pt"}
    if architecture:
        metadata[ARCHITECTURE_KEY] = json.dumps(dict(architecture), sort_keys=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def recorded_architecture(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The architecture entries a converted safetensors file records (None: it records none)."""
    path = Path(path)
    if not (path.is_file() and path.suffix == ".safetensors"):
        return None
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(ARCHITECTURE_KEY)
    except (OSError, safetensors.SafetensorError):
        return None  # not readable as safetensors: loading it reports the problem
    if text is None:
        return None
    try:
        recorded = json.loads(text)
    except ValueError as exc:
        raise CheckpointFormatError(
            f"{path}: its {ARCHITECTURE_KEY} metadata is not JSON; convert the checkpoint again"
        ) from exc
    if not isinstance(recorded, dict):
        raise CheckpointFormatError(f"{path}: its {ARCHITECTURE_KEY} metadata is not a JSON object")
    return recorded


def checkpoint_architecture(card: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Config entries a checkpoint states that differ from the card's: recorded in a converted
    file's metadata, or read by the family converter's `config_from` (diffusers config.json)."""
    path = Path(path)
    found = dict(recorded_architecture(path) or {})
    reader = getattr(lookup("converter", card.converter), "config_from", None)
    if reader is not None:
        stated = reader(path, card.config)
        found.update({k: v for k, v in stated.items() if card.config.get(k) != v})
    return found


# --------------------------------------------------------------------------- models


def native_checkpoint_path(card: Any, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where a model's converted (native layout, safetensors) weights are cached."""
    return cache_root(cache_dir) / card.name / "promptseg.safetensors"


def _converter(name: str | None, card: Any) -> Any:
    """The registered converter `name`, or an error when the model has none."""
    if name is None:
        raise CheckpointFormatError(
            f"{card.name} has no checkpoint converter: it has no weights to load "
            "(build it with pretrained=False)"
        )
    return lookup("converter", name)


def _requirer(card: Any, cache_dir: str | os.PathLike[str] | None, progress: bool) -> Any:
    """`require(component) -> state dict`: a converter's way to get a shared component's weights."""

    def require(name: str) -> dict[str, torch.Tensor]:
        if name not in card.components:
            raise WeightsNotFoundError(f"{card.name} names no shared component {name!r}")
        return load_state_dict_file(
            resolve_file(name, card.components[name], cache_dir=cache_dir, progress=progress)
        )

    return require


def convert_checkpoint(
    card: Any,
    state_dict: Mapping[str, torch.Tensor],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Any layout the family's converter knows -> native state dict (fetching components)."""
    return _converter(card.converter, card)(dict(state_dict), _requirer(card, cache_dir, progress))


def fetch_native(
    card: Any, *, cache_dir: str | os.PathLike[str] | None = None, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Obtain a model's released weights (first route that works), convert and cache them.

    Routes whose file is already in the cache (e.g. placed there by hand) are tried before any
    route that would download, so a file put in place is never ignored for a download.
    """
    if not card.weights:
        raise WeightsNotFoundError(
            f"{card.name} has no released weights; build it with pretrained=False "
            "or pass checkpoint_path= to load your own"
        )
    folder = cache_root(cache_dir) / card.name
    routes = sorted(
        card.weights, key=lambda r: not any((folder / s.filename).is_file() for s in r.files)
    )
    failures = []
    for route in routes:
        try:
            path = resolve_file(card.name, route.files, cache_dir=cache_dir, progress=progress)
            with blame_file(path, where_to_get(card, cache_dir)):
                state = _converter(route.converter, card)(
                    load_state_dict_file(path), _requirer(card, cache_dir, progress)
                )
        except WeightsNotFoundError as exc:
            failures.append(str(exc) + _component_note(route, card, cache_dir))
            continue
        save_state_dict_file(
            state,
            native_checkpoint_path(card, cache_dir),
            architecture=checkpoint_architecture(card, path),
        )
        return state
    tried = "\n\n".join(f"Option {i + 1}: {f}" for i, f in enumerate(failures))
    layout = getattr(_folder_reader(card), "layout", None)  # what the converter's folders hold
    folder_note = (
        f" A folder holding {layout} also works: checkpoint_path=FOLDER, or "
        f"`promptseg convert {card.name} FOLDER` once."
        if layout
        else ""
    )
    raise WeightsNotFoundError(
        f"no weights for {card.name} could be found or downloaded. Any one option below is enough; "
        f"or convert a file you have with `promptseg convert {card.name} FILE`.{folder_note}"
        f"\n\n{tried}"
    )


def _component_note(route: Any, card: Any, cache_dir: str | os.PathLike[str] | None) -> str:
    """Tell up front which shared components a route also needs, whether each is already there,
    and where a missing one goes (with its sha256 when zoo.yaml records it)."""
    lines = []
    for name in route.requires:
        sources = card.components[name]
        found = _cached_component(name, sources, cache_dir)
        if found is not None:
            lines.append(f"\nThis option also needs the component {name}: present at {found}.")
            continue
        paths = list(dict.fromkeys(str(cache_root(cache_dir) / name / s.filename) for s in sources))
        sha = [f"{s.filename} sha256 {s.sha256}" for s in sources if s.sha256]
        lines.append(
            f"\nThis option also needs the component {name} (missing): put it at "
            + " or ".join(paths)
            + (f" ({'; '.join(sha)})" if sha else "")
            + f"; sources: {'; '.join(s.describe() for s in sources)}."
        )
    return "".join(lines)


def _cached_component(
    name: str, sources: Sequence[WeightSource], cache_dir: str | os.PathLike[str] | None
) -> Path | None:
    """Where a component's file already is (the promptseg cache, or the Hugging Face cache for
    a hub source), without downloading or verifying anything; None when nowhere."""
    for source in sources:
        cached = cache_root(cache_dir) / name / source.filename
        if cached.is_file() or (source.kind == "manual" and cached.is_dir()):
            return cached
        if source.kind == "hf":
            with contextlib.suppress(Exception):  # a malformed repo id: treat as absent
                hub = huggingface_hub.try_to_load_from_cache(
                    source.repo, source.filename, revision=source.revision
                )
                if isinstance(hub, str):
                    return Path(hub)
    return None


def where_to_get(card: Any, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Every source of a model's weights and the cache path each file belongs at."""
    folder = cache_root(cache_dir) / card.name
    sources = [s for route in card.weights for s in route.files]
    lines = [f"  - {s.describe()} -> {folder / s.filename}" for s in sources]
    if not lines:
        return f"{card.name} has no released weights; pass a checkpoint of your own."
    return "Good copies come from (and belong at):\n" + "\n".join(lines)


@contextlib.contextmanager
def blame_file(path: str | os.PathLike[str], hint: str) -> Iterator[None]:
    """Make a layout or corruption error raised inside name the file and say what to do."""
    try:
        yield
    except CheckpointFormatError as exc:
        named = str(path) in str(exc)  # the reader's own message already says which file
        raise CheckpointFormatError(f"{'' if named else f'{path}: '}{exc}\n{hint}") from exc


def checkpoint_hint(card: Any, cache_dir: str | os.PathLike[str] | None) -> str:
    """What a `checkpoint_path` / `promptseg convert` file must be, and where to get one."""
    layout = getattr(_folder_reader(card), "layout", None)
    folder = f", or a folder holding {layout}" if layout else ""
    return (
        f"It must be a {card.family} checkpoint in a layout promptseg converts{folder} "
        f"(`promptseg info {card.name}` lists the sources). {where_to_get(card, cache_dir)}"
    )


def load_native_state_dict(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    origin: str,
    skip: Sequence[str] = (),
):
    """Strict load naming missing, unexpected and wrongly shaped keys (not a torch error).

    Keys under the parts in `skip` (e.g. a replaced backbone) are left out on both sides: the
    checkpoint's are reported as skipped, the model keeps the part's own weights.
    """

    def kept(key: str) -> bool:
        return not any(key.startswith(f"{part}.") for part in skip)

    expected = {k: v for k, v in model.state_dict().items() if kept(k)}
    skipped = sorted(k for k in state if not kept(k))
    state = {k: v for k, v in state.items() if kept(k)}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    kind = sorted(
        f"{k} {state[k].dtype} (expected {v.dtype})"
        for k, v in expected.items()
        if k in state and not _same_kind(state[k].dtype, v.dtype)
    )
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape", wrong),
            ("dtype", kind),
        )
        if keys
    ]
    if problems:
        raise CheckpointFormatError(
            f"{origin} does not fit {type(model).__name__}: "
            + "; ".join(problems)
            + ". Is it a checkpoint of another variant (e.g. a different reduce_dim / head)?"
        )
    _check_finite(state, origin)
    if skipped:
        warnings.warn(
            f"{origin}: skipped {len(skipped)} key(s) of the replaced {', '.join(skip)} "
            f"({skipped[0]}, ...); the replaced part keeps its own (or random) weights",
            stacklevel=3,
        )
    incompatible = model.load_state_dict(state, strict=False)
    left = [k for k in incompatible.missing_keys if kept(k)] + list(incompatible.unexpected_keys)
    if left:  # cannot happen after the checks above; never load half a model silently
        raise CheckpointFormatError(f"{origin}: keys did not load: {left[:8]}")


def _same_kind(given: torch.dtype, expected: torch.dtype) -> bool:
    """Whether a checkpoint tensor can be copied into a parameter without losing its meaning."""
    if expected.is_floating_point:
        return given.is_floating_point
    return given == expected


def _check_finite(state: Mapping[str, torch.Tensor], origin: str) -> None:
    """Raise naming the tensors that hold NaN or ±inf: such weights give NaN or empty outputs."""
    bad = []
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            nan = int(torch.isnan(tensor).sum())
            inf = int(torch.isinf(tensor).sum())
            bad.append(f"{key} ({nan} NaN, {inf} inf of {tensor.numel()})")
    if bad:
        shown = ", ".join(bad[:4]) + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else "")
        raise CheckpointFormatError(
            f"{origin} has non-finite weights (NaN or ±inf) in {len(bad)} tensor(s): {shown}. "
            "They would give NaN scores or empty masks; the file is corrupted or comes from a "
            "diverged training run: use an earlier or freshly downloaded checkpoint."
        )


def pretrained_state(
    card: Any,
    *,
    checkpoint_path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], str, str]:
    """A model's weights in the native layout: checkpoint_path > converted cache > hub > URL
    -> (state dict, where they came from, sha256 of what was read).

    The sha256 is of `checkpoint_path`, else of the converted cache file (also when it was just
    written from a download or conversion). Shared components a converter adds (e.g. CLIP for a
    decoder-only file) are checked against zoo.yaml. Nothing is built: call it before the model.
    """
    if checkpoint_path is not None:
        origin = str(checkpoint_path)
        with blame_file(origin, checkpoint_hint(card, cache_dir)):
            read, digest = read_checkpoint(card, checkpoint_path)
            state = convert_checkpoint(card, read, cache_dir=cache_dir, progress=progress)
        return state, origin, digest
    native = native_checkpoint_path(card, cache_dir)
    if native.is_file():  # through the converter too: it updates older native layouts
        hint = "Delete it; the next load converts the weights again."
        with blame_file(str(native), f"{hint} {where_to_get(card, cache_dir)}"):
            state = convert_checkpoint(
                card, load_state_dict_file(native), cache_dir=cache_dir, progress=progress
            )
    else:
        state = fetch_native(card, cache_dir=cache_dir, progress=progress)
    return state, str(native), sha256_file(native)


def load_pretrained(
    model: torch.nn.Module,
    card: Any,
    *,
    checkpoint_path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> str:
    """Load `pretrained_state` into `model` (strict, see load_native_state_dict); its sha256."""
    state, origin, digest = pretrained_state(
        card, checkpoint_path=checkpoint_path, cache_dir=cache_dir, progress=progress
    )
    load_native_state_dict(model, state, origin, skip=card.replaced)
    return digest
