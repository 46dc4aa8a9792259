"""Generated checkpoints through every loading route: no crash, no code run, no silent wrong load.

Routes: `load_state_dict_file`, `create_model(..., checkpoint_path=FILE or FOLDER)`, the cache file
(`$PROMPTSEG_CACHE/<model>/promptseg.safetensors`) and `promptseg convert`. Files: truncated,
random bytes, empty, folders, zips that are not torch files, safetensors with corrupt headers,
pickles whose unpickling would write a marker file, and the tiny models' state dicts with keys
missing, extra, mis-shaped, non-finite, of another dtype or not tensors at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import promptseg
from promptseg import cli
from promptseg.errors import CheckpointFormatError
from promptseg.weights import (
    load_state_dict_file,
    native_checkpoint_path,
    save_state_dict_file,
    weights_sha256,
)
from promptseg.zoo import build_model, model_info
from tests.robustness import run_case

WORK = Path(tempfile.mkdtemp(prefix="promptseg-robust-weights-"))
MARKER = WORK / "unpickled-code-ran"
TINY = ("sine_test_tiny", "clipseg_test_tiny")


class _Payload:
    """Unpickling this would create MARKER: a stand-in for code a hostile checkpoint runs."""

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(MARKER), "w")


def _state(name: str) -> dict[str, torch.Tensor]:
    """The real tiny model's state dict (random weights, seeded)."""
    torch.manual_seed(0)
    return dict(build_model(model_info(name)).state_dict())


STATES = {name: _state(name) for name in TINY}
SMALL = {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fresh(suffix: str) -> Path:
    """A new path under WORK for one generated case."""
    fd, name = tempfile.mkstemp(dir=WORK, suffix=suffix)
    os.close(fd)
    return Path(name)


def _torch_bytes(obj: Any, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    path = _fresh(".safetensors")
    save_state_dict_file(tensors, path)
    return path.read_bytes()


VALID = {
    ".pth": _torch_bytes(SMALL),
    ".bin": _torch_bytes(SMALL, legacy=True),
    ".safetensors": _safetensors_bytes(SMALL),
}


# -- corrupt files ------------------------------------------------------------------------------
@st.composite
def corrupt_files(draw: st.DrawFn) -> tuple[bytes, str, bool]:
    """(content, suffix, intact): intact files must load to SMALL, the others must not load."""
    kind = draw(
        st.sampled_from(["truncated", "random", "empty", "zip", "header", "pickle", "flipped"])
    )
    suffix = draw(st.sampled_from(sorted(VALID)))
    if kind == "truncated":
        data = VALID[suffix]
        cut = draw(st.integers(0, len(data)))
        return data[:cut], suffix, cut == len(data)
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=300)), suffix, False
    if kind == "empty":
        return b"", suffix, False
    if kind == "zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for member in draw(st.lists(st.sampled_from(
                ["a.txt", "archive/data.pkl", "archive/constants.pkl", "x/version", "data/0"]
            ), min_size=1, max_size=3, unique=True)):  # fmt: skip
                zf.writestr(member, draw(st.binary(max_size=40)))
        return buf.getvalue(), suffix, False
    if kind == "header":  # a safetensors header length and JSON that do not fit the file
        header = draw(
            st.one_of(
                st.binary(max_size=60),
                st.builds(
                    lambda d: json.dumps(d).encode(),
                    st.dictionaries(
                        st.text(max_size=5),
                        st.one_of(st.integers(), st.text(max_size=5), st.just({"dtype": "F32"})),
                        max_size=3,
                    ),
                ),
            )
        )
        length = draw(st.one_of(st.just(len(header)), st.integers(0, 2**64 - 1)))
        tail = draw(st.binary(max_size=32))
        return struct.pack("<Q", length) + header + tail, ".safetensors", False
    if kind == "pickle":
        obj = draw(st.sampled_from([
            {"w": torch.zeros(2), "evil": _Payload()}, _Payload(), [_Payload()],
            {"state_dict": {"x": _Payload()}},
        ]))  # fmt: skip
        if draw(st.booleans()):
            return _torch_bytes(obj, legacy=draw(st.booleans())), suffix, False
        return pickle.dumps(obj, protocol=draw(st.integers(0, 5))), suffix, False
    data = bytearray(VALID[suffix])  # "flipped": one byte changed
    at = draw(st.integers(0, len(data) - 1))
    data[at] ^= draw(st.integers(1, 255))
    return bytes(data), suffix, False


def _loads_small(state: Any) -> None:
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    assert set(state) == set(SMALL), sorted(state)
    for key, value in SMALL.items():
        assert torch.equal(state[key], value), key


@settings(max_examples=1200)
@given(corrupt_files())
def test_corrupt_files_never_load_or_run_code(case: tuple[bytes, str, bool]) -> None:
    data, suffix, intact = case
    path = _fresh(suffix)
    path.write_bytes(data)

    def check(state: Any) -> None:
        """Whatever loads is SMALL: an intact file, or a zip with a changed byte in padding.

        safetensors and the legacy torch format carry no checksum: a changed byte in their
        tensor data loads as another value, traceable only by `weights_sha256`.
        """
        if intact or suffix == ".pth":
            _loads_small(state)
        else:
            assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())

    run_case(
        "weights: corrupt file -> load_state_dict_file", lambda: load_state_dict_file(path), check
    )
    assert not MARKER.exists(), "a checkpoint's pickle ran code"


@settings(max_examples=25)
@given(corrupt_files(), st.sampled_from(TINY), st.sampled_from(["file", "cache", "folder"]))
def test_corrupt_files_through_create_model(
    case: tuple[bytes, str, bool], name: str, route: str
) -> None:
    data, suffix, _ = case
    path = _fresh(suffix)
    path.write_bytes(data)
    call, _digest = _route(name, path, route)
    run_case(f"weights: corrupt file -> create_model ({route})", call, lambda m: None)
    assert not MARKER.exists(), "a checkpoint's pickle ran code"


def test_folders_and_shard_indexes_are_clear_errors() -> None:
    """An empty folder, junk files and bad shard indexes name the folder, never recurse."""
    bad_maps = [{"weight_map": {"a": ""}}, {"weight_map": {"a": "."}}, {"weight_map": {"a": 3}},
                {"weight_map": {"a": "../x"}}, {"weight_map": {"a": "none.bin"}}, {"wm": 1},
                {"weight_map": [1]}, {"weight_map": {"a": [1]}}]  # fmt: skip
    folders = [WORK / "empty-folder", WORK / "junk-folder"]
    folders[0].mkdir()
    folders[1].mkdir()
    (folders[1] / "notes.txt").write_text("hi")
    for i, weight_map in enumerate(bad_maps):
        folder = WORK / f"sharded-{i}"
        folder.mkdir()
        (folder / "model.safetensors.index.json").write_text(json.dumps(weight_map))
        folders.append(folder)
    for folder in folders:
        for call in (
            lambda f=folder: load_state_dict_file(f),
            lambda f=folder: promptseg.create_model("sine_test_tiny", checkpoint_path=f),
        ):
            assert run_case("weights: bad folder", call, lambda r: None) == "clear_error"


# -- state dicts of the real tiny models, altered ----------------------------------------------
@st.composite
def altered_states(draw: st.DrawFn, name: str) -> tuple[dict[str, Any], dict[str, Any], set[str]]:
    """(what is saved, the flat state dict in it, alterations): the tiny model's own state dict
    with zero or more things changed, maybe wrapped as a training checkpoint."""
    state: dict[str, Any] = dict(STATES[name])
    keys = sorted(state)
    done: set[str] = set()
    touched: set[str] = set()
    for change in draw(st.lists(st.sampled_from(
        ["missing", "extra", "shape", "nonfinite", "dtype", "half", "nontensor", "wrap", "prefix"]
    ), max_size=2, unique=True)):  # fmt: skip
        key = draw(st.sampled_from(keys))
        if key in touched:  # a second change to one key would undo the first
            continue
        touched.add(key)
        value = state.get(key)
        if change == "missing":
            state.pop(key, None)
        elif change == "extra":
            state[key.rsplit(".", 1)[0] + ".extra_" + draw(st.sampled_from("xyz"))] = torch.ones(2)
        elif change == "shape" and isinstance(value, torch.Tensor):
            shape = draw(st.lists(st.integers(0, 4), max_size=3))
            if tuple(shape) == tuple(value.shape):
                continue
            state[key] = torch.zeros(shape)
        elif change == "nonfinite" and isinstance(value, torch.Tensor) and value.numel():
            value = value.clone()
            value.view(-1)[draw(st.integers(0, value.numel() - 1))] = draw(
                st.sampled_from([float("nan"), float("inf"), float("-inf")])
            )
            state[key] = value
        elif change == "dtype" and isinstance(value, torch.Tensor):
            state[key] = value.to(draw(st.sampled_from([torch.int64, torch.bool, torch.complex64])))
        elif change == "half" and isinstance(value, torch.Tensor):
            state[key] = value.to(
                draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64]))
            )
        elif change == "nontensor":
            state[key] = draw(st.sampled_from([3, "w", [1.0], None, np.zeros(2)]))
        elif change in ("wrap", "prefix"):
            pass  # applied to the final state below
        else:
            continue
        done.add(change)
    saved = {f"module.{k}": v for k, v in state.items()} if "prefix" in done else state
    if "wrap" in done:
        saved = {draw(st.sampled_from(["state_dict", "model"])): saved, "epoch": 3}
    return saved, state, done


def _save(state: dict[str, Any], safetensors: bool) -> Path:
    """Write a state dict as safetensors when asked and it can be, else with torch.save."""
    if safetensors and all(
        isinstance(v, torch.Tensor) and not v.is_complex() for v in state.values()
    ):
        path = _fresh(".safetensors")
        save_state_dict_file(state, path)
    else:
        path = _fresh(".pth")
        path.write_bytes(_torch_bytes(state))
    return path


def _route(name: str, path: Path, route: str) -> tuple[Any, str | None]:
    """(create_model call, expected weights_sha256) for a weights file used through `route`."""
    if route == "file":
        return lambda: promptseg.create_model(name, checkpoint_path=path), None
    if route == "folder":
        folder = Path(tempfile.mkdtemp(dir=WORK))
        inner = folder / (
            "model.safetensors" if path.suffix == ".safetensors" else "pytorch_model.bin"
        )
        path.replace(inner)
        listing = f"{_sha(inner)}  {inner.name}\n"
        return (
            lambda: promptseg.create_model(name, checkpoint_path=folder),
            hashlib.sha256(listing.encode()).hexdigest(),
        )
    cache = Path(tempfile.mkdtemp(dir=WORK))
    native = native_checkpoint_path(model_info(name), cache)
    native.parent.mkdir(parents=True)
    path.replace(native)
    return lambda: promptseg.create_model(name, cache_dir=cache), _sha(native)


def _expect_weights(model: Any, state: dict[str, torch.Tensor], digest: str) -> None:
    """The model holds exactly the file's tensors, and its card and results name the file."""
    own = model.state_dict()
    assert set(own) == set(state)
    for key, value in state.items():
        assert torch.equal(own[key], value.to(own[key].dtype)), key
    assert model.card.weights_sha256 == digest


@pytest.mark.parametrize("name", TINY)
@settings(max_examples=25)
@given(data=st.data())
def test_altered_state_dicts_through_create_model(name: str, data: st.DataObject) -> None:
    saved, flat, done = data.draw(altered_states(name))
    path = _save(saved, data.draw(st.booleans()))
    route = data.draw(st.sampled_from(["file", "file", "folder", "cache"]))
    digest = weights_sha256(path)
    wrong = done & {"missing", "extra", "shape", "nonfinite", "dtype", "nontensor"}
    if route == "cache" and path.suffix != ".safetensors":
        wrong.add("cache file not safetensors")
    call, routed_digest = _route(name, path, route)

    def check(model: Any) -> None:
        assert not wrong, f"loaded a state dict with {wrong}"
        _expect_weights(model, flat, routed_digest or digest)

    outcome = run_case(f"weights: altered {name} -> create_model ({route})", call, check)
    assert (outcome == "correct") == (not wrong), (outcome, done)


@settings(max_examples=15)
@given(data=st.data())
def test_altered_state_dicts_through_promptseg_convert(data: st.DataObject) -> None:
    saved, flat, done = data.draw(altered_states("sine_test_tiny"))
    path = _save(saved, data.draw(st.booleans()))
    out = _fresh(".safetensors")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["convert", "sine_test_tiny", str(path), "-o", str(out)])
    wrong = done & {"missing", "extra", "shape", "nonfinite", "dtype", "nontensor"}
    if rc == 2:
        assert err.getvalue().startswith("promptseg convert: error: "), err.getvalue()
        assert wrong, err.getvalue()
        outcome = "clear_error"
    else:
        assert rc == 0 and not wrong, (rc, done)
        converted = load_state_dict_file(out)
        assert set(converted) == set(flat)
        assert all(torch.equal(converted[k], v.float()) for k, v in flat.items())
        outcome = "correct"
    from tests.robustness import COUNTS

    COUNTS["weights: altered sine_test_tiny -> promptseg convert"][outcome] += 1


def test_non_finite_weights_are_named_with_the_file(tmp_path: Path) -> None:
    state = dict(STATES["sine_test_tiny"])
    state["head.temp"] = torch.tensor(float("nan"))
    key = next(k for k in state if k.startswith("backbone."))
    state[key] = state[key].clone().fill_(float("inf"))
    path = tmp_path / "diverged.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointFormatError) as info:
        promptseg.create_model("sine_test_tiny", checkpoint_path=path)
    message = str(info.value)
    assert str(path) in message and "head.temp" in message and key in message
    assert "non-finite" in message and "use an earlier or freshly downloaded" in message


@pytest.mark.parametrize("name", TINY)
def test_weights_sha256_in_card_and_result_meta(name: str, tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_state_dict_file(STATES[name], path)
    model = promptseg.create_model(name, checkpoint_path=path)
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    mask = np.zeros((40, 50), bool)
    mask[5:20, 10:30] = True
    prompt = "a cat" if name.startswith("clipseg") else promptseg.VisualPrompt(image, mask)
    result = model.segment(image, prompt)
    assert model.card.weights_sha256 == _sha(path) == result.meta["weights_sha256"]
    random_init = promptseg.create_model(name, pretrained=False)
    assert random_init.card.weights_sha256 is None
    assert random_init.segment(image, prompt).meta["weights_sha256"] is None
