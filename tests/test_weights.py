"""Tests of promptseg.weights with a local HTTP server and a fake Hugging Face Hub (no network)."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import torch
from huggingface_hub.errors import LocalEntryNotFoundError

from promptseg.errors import CheckpointFormatError, ChecksumError, WeightsNotFoundError
from promptseg.weights import (
    WeightSource,
    cache_root,
    load_state_dict_file,
    resolve_file,
    save_state_dict_file,
    sha256_file,
    unwrap_state_dict,
)
from promptseg.weights import _unreachable as probe

PAYLOAD = bytes(range(256)) * 64  # 16 KiB
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


# --------------------------------------------------------------------------- fixtures


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serve a directory, honouring `Range: bytes=N-` with a 206, and record each request."""

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("Range")))
        range_header = self.headers.get("Range")
        if not range_header:
            return super().do_GET()
        data = Path(self.translate_path(self.path)).read_bytes()
        start = int(range_header.removeprefix("bytes=").removesuffix("-"))
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class FileServer:
    root: Path
    url: str
    requests: list[tuple[str, str | None]]
    stop: object = field(repr=False)


@pytest.fixture
def server(tmp_path: Path):
    root = tmp_path / "served"
    root.mkdir()
    handler = lambda *a, **kw: RangeHandler(*a, directory=str(root), **kw)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.requests = []
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()

    yield FileServer(root, f"http://127.0.0.1:{httpd.server_port}", httpd.requests, stop)
    stop()


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Online mode, no user cache, and a hub that fails loudly unless a test fakes it."""
    for var in ("HF_HUB_OFFLINE", "PROMPTSEG_OFFLINE", "PROMPTSEG_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")

    def no_hub(*args, **kwargs):
        raise AssertionError("tests must not reach the Hugging Face Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)


def url_source(server: FileServer, name: str = "w.pth", sha256: str | None = PAYLOAD_SHA):
    (server.root / name).write_bytes(PAYLOAD)
    return WeightSource(kind="url", filename=name, url=f"{server.url}/{name}", sha256=sha256)


# --------------------------------------------------------------------------- WeightSource, cache


def test_from_dict_builds_source_and_rejects_unknown_keys():
    d = {"kind": "hf", "filename": "model.safetensors", "repo": "CIDAS/clipseg-rd64-refined"}
    assert WeightSource.from_dict(d) == WeightSource("hf", "model.safetensors", repo=d["repo"])
    with pytest.raises(ValueError, match="shasum"):
        WeightSource.from_dict({**d, "shasum": "abc"})
    with pytest.raises(ValueError, match="ftp"):
        WeightSource.from_dict({"kind": "ftp", "filename": "x"})


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    assert cache_root() == tmp_path / "xdg" / "promptseg"
    monkeypatch.setenv("PROMPTSEG_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert not (tmp_path / "env").exists()


def test_resolve_honours_promptseg_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("PROMPTSEG_CACHE", str(tmp_path / "env"))
    placed = tmp_path / "env" / "clipseg" / "rd64-uni.pth"
    placed.parent.mkdir(parents=True)
    placed.write_bytes(PAYLOAD)
    source = WeightSource("manual", "rd64-uni.pth", sha256=PAYLOAD_SHA, instructions="by hand")
    assert resolve_file("clipseg", [source]) == placed


def test_sha256_file(tmp_path: Path):
    (tmp_path / "f").write_bytes(PAYLOAD)
    assert sha256_file(tmp_path / "f") == PAYLOAD_SHA


# --------------------------------------------------------------------------- URL sources


def test_url_fresh_download(server: FileServer, tmp_path: Path):
    path = resolve_file("k", [url_source(server)], cache_dir=tmp_path / "c", progress=False)
    assert path == tmp_path / "c" / "k" / "w.pth"
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / "c" / "k" / "w.pth.part").exists()
    assert server.requests == [("/w.pth", None)]


def test_url_download_resumes_partial_file(server: FileServer, tmp_path: Path):
    part = tmp_path / "c" / "k" / "w.pth.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:1000])
    path = resolve_file("k", [url_source(server)], cache_dir=tmp_path / "c", progress=False)
    assert server.requests == [("/w.pth", "bytes=1000-")]
    assert path.read_bytes() == PAYLOAD
    assert not part.exists()


def test_url_checksum_mismatch_deletes_download(server: FileServer, tmp_path: Path):
    source = url_source(server, sha256="0" * 64)
    with pytest.raises(ChecksumError) as info:
        resolve_file("k", [source], cache_dir=tmp_path / "c", progress=False)
    assert "0" * 64 in str(info.value) and PAYLOAD_SHA in str(info.value)
    assert not (tmp_path / "c" / "k").exists()  # deleted, and no empty folder left behind


def test_checksum_mismatch_falls_through_to_next_source(server: FileServer, tmp_path: Path):
    (server.root / "bad.pth").write_bytes(b"corrupt mirror")
    bad = WeightSource("url", "w.pth", url=f"{server.url}/bad.pth", sha256=PAYLOAD_SHA)
    path = resolve_file("k", [bad, url_source(server)], cache_dir=tmp_path / "c", progress=False)
    assert path.read_bytes() == PAYLOAD


def test_url_zip_archive_member(server: FileServer, tmp_path: Path):
    with zipfile.ZipFile(server.root / "bundle.zip", "w") as zf:
        zf.writestr("README", "other member")
        zf.writestr("ckpt/model.pth", PAYLOAD)
    source = WeightSource(
        kind="url",
        filename="model.pth",
        url=f"{server.url}/bundle.zip",
        archive_member="ckpt/model.pth",
        sha256=PAYLOAD_SHA,
    )
    path = resolve_file("k", [source], cache_dir=tmp_path / "c", progress=False)
    assert path == tmp_path / "c" / "k" / "model.pth"
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pth"]


def test_cache_hit_never_contacts_server(server: FileServer, tmp_path: Path):
    source = url_source(server)
    first = resolve_file("k", [source], cache_dir=tmp_path / "c", progress=False)
    server.stop()
    assert resolve_file("k", [source], cache_dir=tmp_path / "c", progress=False) == first
    assert len(server.requests) == 1


def test_mismatching_cached_file_is_kept_and_reported(server: FileServer, tmp_path: Path):
    cached = tmp_path / "c" / "k" / "w.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"user's own file")
    with pytest.raises(ChecksumError, match=str(cached)):
        resolve_file("k", [url_source(server)], cache_dir=tmp_path / "c", progress=False)
    assert cached.read_bytes() == b"user's own file"
    assert server.requests == []


# --------------------------------------------------------------------------- hub and manual sources


def test_hf_source_returns_hub_cache_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    hub_file = tmp_path / "hub" / "model.safetensors"
    hub_file.parent.mkdir()
    hub_file.write_bytes(PAYLOAD)
    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return str(hub_file)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    source = WeightSource("hf", "model.safetensors", repo="org/repo", sha256=PAYLOAD_SHA)
    assert resolve_file("k", [source], cache_dir=tmp_path / "c", progress=False) == hub_file
    assert calls == [
        ("org/repo", "model.safetensors", {"revision": None, "local_files_only": False})
    ]
    assert not (tmp_path / "c").exists()


def test_hf_failure_falls_back_to_url(
    monkeypatch: pytest.MonkeyPatch, server: FileServer, tmp_path: Path
):
    def unreachable(*args, **kwargs):
        raise LocalEntryNotFoundError("connection error and not in cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    sources = [WeightSource("hf", "w.pth", repo="org/repo"), url_source(server)]
    path = resolve_file("k", sources, cache_dir=tmp_path / "c", progress=False)
    assert path.read_bytes() == PAYLOAD


def test_offline_skips_url_and_message_lists_everything(
    monkeypatch: pytest.MonkeyPatch, server: FileServer, tmp_path: Path
):
    seen = []

    def offline_hub(repo_id, filename, **kwargs):
        seen.append(kwargs["local_files_only"])
        raise LocalEntryNotFoundError("not in cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline_hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = WeightSource("hf", "w.pth", repo="org/repo", revision="v1", sha256=PAYLOAD_SHA, size=16384)
    url = url_source(server)
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_file("clipseg/rd64", [hf, url], cache_dir=tmp_path / "c", progress=False)
    message = str(info.value)
    assert seen == [True]
    assert server.requests == []
    for text in ("org/repo", "w.pth", "v1", url.url, PAYLOAD_SHA, "16384", "HF_HUB_OFFLINE=1"):
        assert text in message
    assert str(tmp_path / "c" / "clipseg" / "rd64" / "w.pth") in message
    assert "checkpoint_path=" in message and "--checkpoint" in message


def test_manual_source_message(tmp_path: Path):
    source = WeightSource(
        "manual", "sine.pth", instructions="Google Drive id 1AbC, download by hand"
    )
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_file("sine", [source], cache_dir=tmp_path / "c")
    assert "Google Drive id 1AbC, download by hand" in str(info.value)
    assert str(tmp_path / "c" / "sine" / "sine.pth") in str(info.value)
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------- reading and writing


def tiny_state_dict() -> dict[str, torch.Tensor]:
    return {"weight": torch.arange(6.0).reshape(2, 3), "bias": torch.ones(2)}


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}},
        lambda sd: {"student": {"other": torch.zeros(1)}, "teacher": sd},
    ],
    ids=["plain", "state_dict", "module-prefixed", "teacher"],
)
def test_load_torch_checkpoint(tmp_path: Path, wrap):
    torch.save(wrap(tiny_state_dict()), tmp_path / "ckpt.pth")
    assert_same(load_state_dict_file(tmp_path / "ckpt.pth"), tiny_state_dict())


def test_unwrap_state_dict_leaves_partial_prefix_and_ambiguous_wrappers():
    partial = {"module.a": torch.zeros(1), "b": torch.zeros(1)}
    assert unwrap_state_dict(partial) is partial
    ambiguous = {"model": {"a": torch.zeros(1)}, "state_dict": {"b": torch.zeros(1)}}
    assert unwrap_state_dict(ambiguous) is ambiguous


def test_load_safetensors_and_save_roundtrip(tmp_path: Path):
    state = {**tiny_state_dict(), "transposed": torch.arange(6.0).reshape(2, 3).t()}
    save_state_dict_file(state, tmp_path / "out" / "w.safetensors")
    assert os.listdir(tmp_path / "out") == ["w.safetensors"]
    assert_same(load_state_dict_file(tmp_path / "out" / "w.safetensors"), state)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_load_torchscript_archive(tmp_path: Path):
    module = torch.nn.Linear(3, 2)
    torch.jit.save(torch.jit.script(module), tmp_path / "ViT-B-16.pt")
    assert_same(load_state_dict_file(tmp_path / "ViT-B-16.pt"), module.state_dict())


def test_load_save_pretrained_directory(tmp_path: Path):
    safetensors.torch.save_file(tiny_state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    assert_same(load_state_dict_file(tmp_path), tiny_state_dict())


def test_load_sharded_directory(tmp_path: Path):
    state = tiny_state_dict()
    weight_map = {}
    for i, (name, tensor) in enumerate(state.items(), 1):
        shard = f"model-0000{i}-of-00002.safetensors"
        safetensors.torch.save_file({name: tensor}, tmp_path / shard)
        weight_map[name] = shard
    index = {"metadata": {}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_same(load_state_dict_file(tmp_path), state)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_raises_checkpoint_format_error(tmp_path: Path, suffix: str):
    good = tmp_path / f"good{suffix}"
    if suffix == ".pth":
        torch.save(tiny_state_dict(), good)
    else:
        safetensors.torch.save_file(tiny_state_dict(), good)
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointFormatError, match="bad") as info:
        load_state_dict_file(bad)
    assert info.value.__cause__ is not None


def test_non_tensor_entries_raise_checkpoint_format_error(tmp_path: Path):
    torch.save({"weight": torch.zeros(1), "step": 7}, tmp_path / "ckpt.pth")
    with pytest.raises(CheckpointFormatError, match="'step': int"):
        load_state_dict_file(tmp_path / "ckpt.pth")


def test_directory_without_weights_raises(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointFormatError, match="config.json"):
        load_state_dict_file(tmp_path)


def test_an_unreachable_network_fails_fast_and_leaves_no_empty_folder(
    monkeypatch: pytest.MonkeyPatch, server: FileServer, tmp_path: Path
):
    """One quick connection attempt per host (no retries); the Hub is then only asked for its
    cache; no empty cache folder is left behind."""
    import time

    from promptseg import weights

    monkeypatch.setattr(weights, "_unreachable", probe)
    monkeypatch.setattr(weights, "_REACHABILITY", {})
    assert probe(server.url) is None  # the local test server answers
    seen = []

    def hub(repo_id, filename, **kwargs):
        seen.append(kwargs["local_files_only"])
        raise LocalEntryNotFoundError("not in cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.example.invalid")
    hf = WeightSource("hf", "w.pth", repo="org/repo")
    url = WeightSource("url", "w.pth", url="https://files.example.invalid/w.pth")
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_file("k", [hf, url], cache_dir=tmp_path / "c", progress=False)
    assert time.perf_counter() - start < 2 * weights.PROBE_SECONDS
    assert seen == [True]
    assert str(info.value).count("no network: cannot reach") == 2
    assert not (tmp_path / "c" / "k").exists()
    assert set(weights._REACHABILITY) >= {"hub.example.invalid", "files.example.invalid"}
