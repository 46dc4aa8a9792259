"""Split-list table, parsing, sha256/pickle rules, offline errors and download (local server)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import pickle
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from promptseg.data import splits as splits_mod
from promptseg.data.episodes import episode_digest, episodes
from promptseg.data.splits import (
    SPLIT_FILES,
    SplitChecksumWarning,
    file_sha256,
    load_coco_split,
    read_fss_split,
    read_pascal_split,
    split_file,
    split_mismatches,
    splits_dir,
)
from promptseg.errors import ChecksumError, WeightsNotFoundError

SHARED_SPLITS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fss-splits"
COCO0_1SHOT = "d571c773d6c3f2041c097be22f6d4fd4ce7ddf6324a41f9c4064840d5c3cfb79"


@pytest.fixture(scope="module")
def shared() -> Path:
    if not SHARED_SPLITS.is_dir():
        pytest.skip(f"reference split lists not found at {SHARED_SPLITS} (../shared/data)")
    return SHARED_SPLITS


@pytest.fixture
def user_copy(shared: Path, tmp_path: Path) -> Path:
    """A writable copy of hsnet's data/splits (val/test parts) that tests may tamper with."""
    dest = tmp_path / "splits"
    shutil.copytree(shared, dest)
    for path in dest.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return dest


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PROMPTSEG_OFFLINE", "HF_HUB_OFFLINE", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PROMPTSEG_OFFLINE", "1")
    monkeypatch.setenv("PROMPTSEG_CACHE", str(cache))
    return cache


# --------------------------------------------------------------------------- table and parsing


def test_table_matches_reference_files(shared: Path) -> None:
    assert [(e.dataset, e.fold) for e in SPLIT_FILES] == [
        *[("pascal5i", f) for f in range(4)],
        *[("coco20i", f) for f in range(4)],
        ("fss1000", "test"),
    ]
    for entry in SPLIT_FILES:
        path = shared / entry.relpath
        assert file_sha256(path) == entry.sha256, entry.relpath
        assert path.stat().st_size == entry.size
        assert entry.url == (
            "https://raw.githubusercontent.com/juhongm999/hsnet/main/data/splits/" + entry.relpath
        )
        assert entry.is_pickle == entry.relpath.endswith(".pkl")


def test_pascal_split_contents(shared: Path) -> None:
    sizes = {0: (346, 345), 1: (451, 433), 2: (725, 587), 3: (346, 326)}
    for fold, (lines, images) in sizes.items():
        meta = read_pascal_split(shared / f"pascal/val/fold{fold}.txt")
        assert (len(meta), len({name for name, _ in meta})) == (lines, images)
        assert {c for _, c in meta} == set(range(5 * fold, 5 * fold + 5))
    meta = read_pascal_split(shared / "pascal/val/fold0.txt")
    assert meta[0] == ("2007_000033", 0)
    assert [sum(c == k for _, c in meta) for k in range(5)] == [80, 57, 86, 58, 65]


def test_fss_split_contents(shared: Path) -> None:
    names = read_fss_split(shared / "fss/test.txt")
    assert len(names) == 240 and names[0] == "bus"
    assert not any("\r" in n or not n for n in names)
    assert sorted(names)[0] == "abe's_flyingfish"


def test_coco_split_contents(shared: Path) -> None:
    sizes = {0: (35783, 26052), 1: (17912, 15305), 2: (14563, 13138), 3: (14315, 12640)}
    for entry in SPLIT_FILES[4:8]:
        lists = load_coco_split(shared / entry.relpath, sha256=entry.sha256)
        assert list(lists) == list(range(80))
        assert type(next(iter(lists))) is int
        assert all(type(v) is list for v in lists.values())
        f = entry.fold
        assert [c for c, v in lists.items() if v] == [f + 4 * v for v in range(20)]
        items = [p for v in lists.values() for p in v]
        assert (len(items), len(set(items))) == sizes[f]
        assert all(p.startswith("val2014/COCO_val2014_") and p.endswith(".jpg") for p in items)
    fold0 = load_coco_split(shared / "coco/val/fold0.pkl", sha256=SPLIT_FILES[4].sha256)
    assert fold0[0][0] == "val2014/COCO_val2014_000000429717.jpg"  # order kept
    fold2 = load_coco_split(shared / "coco/val/fold2.pkl", sha256=SPLIT_FILES[6].sha256)
    assert (len(fold2[78]), len(fold2[70])) == (37, 38)


# --------------------------------------------------------------------------- user splits_dir


def test_user_splits_dir_verified(user_copy: Path) -> None:
    assert splits_dir(user_copy) == user_copy
    assert split_file("coco20i", 1, user_copy) == user_copy / "coco/val/fold1.pkl"
    assert episode_digest(episodes("coco20i", 0, 1, splits_dir=user_copy)) == COCO0_1SHOT
    (user_copy / "fss/test.txt").unlink()
    assert splits_dir(user_copy, datasets=["pascal5i", "coco20i"]) == user_copy
    with pytest.raises(FileNotFoundError, match=r"fss/test\.txt"):
        splits_dir(user_copy)
    with pytest.raises(FileNotFoundError, match="hsnet's data/splits"):
        split_file("fss1000", "test", user_copy)
    with pytest.raises(ValueError, match="valid folds"):
        split_file("coco20i", 4, user_copy)


class _Boom:
    """Unpickling this creates a marker file: proof that code would have run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_tampered_pickle_is_never_unpickled(user_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    target = user_copy / "coco/val/fold0.pkl"
    target.write_bytes(pickle.dumps({0: ["x.jpg"], 4: [_Boom(marker)]}))
    with pytest.raises(ChecksumError) as info:
        episodes("coco20i", 0, 1, splits_dir=user_copy)
    msg = str(info.value)
    assert str(target) in msg and "Refusing to unpickle" in msg and "trust_pickle=True" in msg
    assert SPLIT_FILES[4].sha256 in msg and "--trust-pickle" in msg
    with pytest.raises(ChecksumError):
        splits_dir(user_copy, datasets=["coco20i"])
    with pytest.raises(ChecksumError, match="Refusing"):
        load_coco_split(target, sha256=SPLIT_FILES[4].sha256)
    with pytest.raises(ChecksumError, match="no known sha256"):
        load_coco_split(target)
    # Opting in still goes through the restricted unpickler: no globals, no code.
    with (
        pytest.warns(SplitChecksumWarning),
        pytest.raises(pickle.UnpicklingError, match="refusing to load"),
    ):
        episodes("coco20i", 0, 1, splits_dir=user_copy, trust_pickle=True)
    assert not marker.exists()


def test_trusted_modified_pickle_is_used(user_copy: Path) -> None:
    lists = {c: ([f"val2014/COCO_val2014_{c:012d}_{j}.jpg" for j in range(3)]) for c in range(80)}
    target = user_copy / "coco/val/fold1.pkl"
    target.write_bytes(pickle.dumps(lists))
    with pytest.warns(SplitChecksumWarning, match="NOT the reference"):
        eps = episodes("coco20i", 1, 1, splits_dir=user_copy, trust_pickle=True, n=20)
    assert all(e.query in lists[e.class_id] for e in eps)
    assert split_mismatches()[str(target)] == hashlib.sha256(target.read_bytes()).hexdigest()


def test_tampered_text_warns_and_is_recorded(user_copy: Path) -> None:
    target = user_copy / "pascal/val/fold0.txt"
    lines = target.read_text().splitlines(keepends=True)
    target.write_text("".join(lines[1:]))  # drop the first line: every episode moves
    with pytest.warns(SplitChecksumWarning, match=r"pascal/val/fold0\.txt"):
        eps = episodes("pascal5i", 0, 1, splits_dir=user_copy, n=3)
    assert eps[0].query == "2007_000061"
    assert split_mismatches()[str(target)] == file_sha256(target)


# ----------------------------------------------------------------- cache: offline, download


def test_offline_error_names_every_file_and_place(offline: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as info:
        splits_dir()
    msg = str(info.value)
    for entry in SPLIT_FILES:
        assert str(offline / "hsnet-splits" / entry.relpath) in msg
        assert entry.url in msg and entry.sha256 in msg and f"DIR/{entry.relpath}" in msg
    assert "PROMPTSEG_OFFLINE=1" in msg
    assert "splits_dir=DIR" in msg and "--splits-dir DIR" in msg
    with pytest.raises(WeightsNotFoundError, match=r"coco/val/fold2\.pkl"):
        episodes("coco20i", 2, 1)


def test_files_placed_where_the_error_says_work_offline(offline: Path, shared: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as info:
        split_file("fss1000", "test")
    place = next(
        line.split("put it at ", 1)[1]
        for line in str(info.value).splitlines()
        if "put it at" in line
    )
    Path(place).parent.mkdir(parents=True)
    shutil.copyfile(shared / "fss/test.txt", place)
    assert split_file("fss1000", "test") == Path(place)
    eps = episodes("fss1000", "test", 1)
    assert episode_digest(eps) == "b99395086bb0abe00b9ebcdc7c56da09e5317cf0541acaad3f1b90d7eecc9357"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def served(shared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Serve a copy of the split folder on 127.0.0.1 and point the table's URLs at it."""
    root = tmp_path / "served"
    shutil.copytree(shared, root)
    handler = functools.partial(_Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    table = tuple(dataclasses.replace(e, url=base + e.relpath) for e in SPLIT_FILES)
    monkeypatch.setattr(splits_mod, "SPLIT_FILES", table)
    try:
        yield root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.usefixtures("online")
def test_download_into_cache(served: Path, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    root = splits_dir(cache_dir=cache)
    assert root == cache / "hsnet-splits"
    for entry in SPLIT_FILES:
        assert file_sha256(root / entry.relpath) == entry.sha256
    assert not list(root.rglob("*.part"))
    assert episode_digest(episodes("coco20i", 0, 1, cache_dir=cache)) == COCO0_1SHOT
    # Later calls are served from the cache, even offline and with the server gone.
    shutil.rmtree(served)
    monkeypatch.setenv("PROMPTSEG_OFFLINE", "1")
    assert split_file("pascal5i", 3, cache_dir=cache) == root / "pascal/val/fold3.txt"


@pytest.mark.usefixtures("online")
def test_download_with_wrong_content_is_rejected(served: Path, tmp_path: Path) -> None:
    (served / "coco/val/fold3.pkl").write_bytes(pickle.dumps({0: []}))
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError, match="927597bd"):
        split_file("coco20i", 3, cache_dir=cache)
    assert not (cache / "hsnet-splits/coco/val/fold3.pkl").exists()
    assert split_file("coco20i", 2, cache_dir=cache).is_file()
