"""Generated images, masks, label maps, files and prompts through the loaders and prompt types.

Each case must either give the documented answer (checked against an independent oracle: numpy
and PIL, not promptseg) or raise a clear error from promptseg's own code; anything else is a
crash or a silent wrong answer (tests/robustness.py counts them).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from promptseg import MixedPrompt, SupportSet, TextPrompt, VisualPrompt, Vocabulary
from promptseg.imageio import load_image, load_label_map, load_mask
from promptseg.prompts import as_prompt
from tests.robustness import run_case

# function-scoped fixtures (the autouse offline env, tmp_path) hold nothing a case could change
CHEAP = settings(max_examples=700, suppress_health_check=[HealthCheck.function_scoped_fixture])

DTYPES = ("bool", "uint8", "uint16", "int8", "int32", "int64", "float16", "float32", "float64")
SIDES = st.one_of(st.integers(1, 24), st.sampled_from([1, 2, 300]))


def _values(rng: np.random.Generator, shape: tuple[int, ...], dtype: str, style: str) -> np.ndarray:
    """Random data of `dtype`; `style` picks in-range, 0..255, negative or NaN/inf values."""
    if dtype == "bool":
        return rng.random(shape) > 0.5
    if dtype.startswith("float"):
        a = rng.random(shape)
        if style == "x255":
            a = a * 255
        elif style == "negative":
            a = a - 0.5
        elif style == "nonfinite" and a.size:
            a.flat[rng.integers(a.size)] = rng.choice([np.nan, np.inf, -np.inf])
        return a.astype(dtype)
    info = np.iinfo(dtype)
    lo = info.min if style == "negative" else 0
    return rng.integers(lo, min(info.max, 2**31 - 1), size=shape, endpoint=True).astype(dtype)


# -- images ---------------------------------------------------------------------------------------
@st.composite
def image_arrays(draw: st.DrawFn) -> tuple[Any, str]:
    """(array or tensor, layout) over shapes, channel counts, dtypes, value ranges, layouts."""
    h, w = draw(SIDES), draw(SIDES)
    channels = draw(st.sampled_from([None, 1, 2, 3, 3, 3, 4, 5]))
    layout = draw(st.sampled_from(["numpy_hwc", "torch_chw"] * 3 + ["numpy_chw", "torch_hwc"]))
    dtype = draw(st.sampled_from(["uint8", "uint8", "float32", "float64", "float16", *DTYPES]))
    style = draw(st.sampled_from(["unit", "unit", "unit", "x255", "negative", "nonfinite"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    shape = (h, w) if channels is None else (h, w, channels)
    a = _values(rng, shape, dtype, style)
    if channels is not None and layout.endswith("chw"):
        a = np.ascontiguousarray(np.moveaxis(a, 2, 0))
    return (torch.from_numpy(a) if layout.startswith("torch") else a), layout


def _expected_image(x: Any, layout: str) -> np.ndarray | None:
    """The documented load_image answer (uint8 [3, H, W]) from numpy alone, or None = reject."""
    a = x.numpy() if isinstance(x, torch.Tensor) else x
    if a.ndim == 2:
        hwc = a[..., None]
    elif isinstance(x, np.ndarray) and a.shape[2] in (1, 3, 4):
        hwc = a
    elif isinstance(x, torch.Tensor) and a.shape[0] in (1, 3, 4):
        hwc = np.moveaxis(a, 0, 2)
    else:
        return None
    if hwc.dtype == np.uint8:
        out = hwc
    elif hwc.dtype.kind == "f":
        f = hwc.astype(np.float32)
        if not np.isfinite(f).all() or f.min() < 0 or f.max() > 1:
            return None
        out = np.rint(f * np.float32(255)).astype(np.uint8)
    else:
        return None
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return np.moveaxis(out[..., :3], 2, 0)


@CHEAP
@given(image_arrays())
def test_load_image_arrays(case):
    """Every accepted array/tensor gives the oracle's pixels; every other one a clear error."""
    x, layout = case
    expected = _expected_image(x, layout)

    def check(out: torch.Tensor) -> None:
        assert expected is not None, f"accepted an input the contract rejects ({layout})"
        assert out.dtype == torch.uint8 and tuple(out.shape) == expected.shape
        assert np.array_equal(out.numpy(), expected)

    outcome = run_case("inputs: image array/tensor", lambda: load_image(x), check)
    assert expected is None or outcome == "correct", "a valid image was rejected"


PIL_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "I;16", "I", "F", "CMYK", "YCbCr")
PIL_MODES += ("HSV", "LAB")


@st.composite
def pil_images(draw: st.DrawFn) -> Image.Image:
    """A PIL image of any common mode, sizes down to 1x1, values over the mode's range."""
    h, w = draw(SIDES), draw(SIDES)
    mode = draw(st.sampled_from(PIL_MODES))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    if mode == "F":
        scale = draw(st.sampled_from([1.0, 255.0, -1.0]))
        return Image.fromarray((rng.random((h, w)) * scale).astype(np.float32), "F")
    if mode in ("I;16", "I"):
        hi = draw(st.sampled_from([255, 65535, 2**20]))
        lo = draw(st.sampled_from([0, -5])) if mode == "I" else 0
        data = rng.integers(lo, min(hi, 65535) if mode == "I;16" else hi, (h, w))
        img = Image.fromarray(data.astype(np.uint16 if mode == "I;16" else np.int32))
        return img if img.mode == mode else img.convert(mode)
    return Image.fromarray(rgba, "RGBA").convert(mode)


def _pil_oracle(img: Image.Image) -> np.ndarray | None:
    """Expected uint8 [3, H, W] for modes with an unambiguous answer, None for the others."""
    if img.mode in ("L", "RGB", "RGBA", "RGBX", "1", "LA", "CMYK", "YCbCr"):
        return np.moveaxis(np.asarray(img.convert("RGB")), 2, 0)
    if img.mode == "I;16":
        g = np.rint(np.asarray(img).astype(np.float64) / 257.0).astype(np.uint8)
        return np.repeat(g[None], 3, axis=0)
    return None


@CHEAP
@given(pil_images())
def test_load_image_pil(img):
    """Every PIL mode loads to RGB uint8 [3, H, W] of the image's size, or fails clearly."""
    expected = _pil_oracle(img)

    def check(out: torch.Tensor) -> None:
        assert out.dtype == torch.uint8 and tuple(out.shape) == (3, img.height, img.width)
        if expected is not None:
            assert np.array_equal(out.numpy(), expected)

    outcome = run_case("inputs: PIL image", lambda: load_image(img), check)
    assert expected is None or outcome == "correct", f"a valid {img.mode} image was rejected"


FORMATS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "GIF": ".gif"}
FORMATS |= {"WEBP": ".webp"}


@st.composite
def image_files(draw: st.DrawFn) -> tuple[bytes, str, str, Image.Image]:
    """(file bytes, suffix, kind, the whole file decoded): whole, truncated or foreign files."""
    kind = draw(st.sampled_from(["whole", "whole", "truncated", "text", "random", "empty"]))
    h, w = draw(SIDES), draw(SIDES)
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    if fmt == "JPEG" and mode in ("RGBA", "P"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, fmt)
    data = buf.getvalue()
    whole = _pil_decode(data)
    if kind == "truncated":
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    elif kind == "text":
        data = draw(st.text(max_size=200)).encode()
    elif kind == "random":
        data = draw(st.binary(max_size=300))
    elif kind == "empty":
        data = b""
    return data, FORMATS[fmt], kind, whole


def _pil_decode(data: bytes) -> Image.Image | None:
    """What PIL itself makes of the bytes (fully decoded, EXIF applied), or None if it fails."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return ImageOps.exif_transpose(img).copy()
    except Exception:  # noqa: BLE001 - the oracle only asks whether PIL can read it
        return None


@CHEAP
@given(image_files(), st.sampled_from(["image", "mask", "label_map"]))
def test_load_files(tmp_path, case, loader):
    """Files: what PIL reads loads at its size (a truncated file only if PIL had every pixel);
    truncated, foreign and empty files fail clearly."""
    data, suffix, kind, whole = case
    path = tmp_path / f"input{suffix}"
    path.write_bytes(data)
    decoded = _pil_decode(data)
    load = {"image": load_image, "mask": load_mask, "label_map": load_label_map}[loader]

    def check(out: torch.Tensor) -> None:
        assert decoded is not None, f"read a {kind} {suffix} file that PIL cannot decode"
        assert tuple(out.shape[-2:]) == (decoded.height, decoded.width)
        if kind == "truncated":
            assert decoded.size == whole.size
            assert np.array_equal(np.asarray(decoded), np.asarray(whole)), "made-up pixels"
        if loader == "image" and (expected := _pil_oracle(decoded)) is not None:
            assert np.array_equal(out.numpy(), expected)

    outcome = run_case(f"inputs: {loader} file", lambda: load(path), check)
    if decoded is not None and loader == "image":
        assert outcome == "correct", "an image PIL reads was rejected"


def test_missing_and_directory_paths(tmp_path):
    """A missing path and a directory fail clearly, naming the path."""
    for load in (load_image, load_mask, load_label_map):
        for path in (tmp_path / "nope.png", tmp_path, str(tmp_path / "nope.jpg")):
            outcome = run_case("inputs: bad path", lambda f=load, p=path: f(p), lambda r: None)
            assert outcome == "clear_error"


# -- masks and label maps ----------------------------------------------------------------------
@st.composite
def mask_inputs(draw: st.DrawFn) -> Any:
    """Masks over dtypes, layouts, value styles (binary, 0/255, one id, label maps, NaN)."""
    h, w = draw(SIDES), draw(SIDES)
    dtype = draw(st.sampled_from(DTYPES))
    style = draw(
        st.sampled_from(["01", "0255", "one_id", "labels", "empty", "full", "unit", "bad"])
    )
    layout = draw(st.sampled_from(["hw", "hw", "1hw", "hw1", "hw3", "hw3_diff", "hw4", "hw5"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if dtype == "bool" or style in ("01", "empty", "full"):
        a = rng.random((h, w)) > 0.5
        a = np.zeros_like(a) if style == "empty" else np.ones_like(a) if style == "full" else a
        a = a.astype(dtype)
    elif style == "0255":
        a = ((rng.random((h, w)) > 0.5) * 255).astype(dtype)
    elif style == "one_id":
        a = ((rng.random((h, w)) > 0.5) * int(rng.integers(1, 100))).astype(dtype)
    elif style == "labels":
        a = rng.integers(0, 5, (h, w)).astype(dtype)
    elif style == "unit" and dtype.startswith("float"):
        a = rng.random((h, w)).astype(dtype)
    else:
        a = _values(rng, (h, w), dtype, draw(st.sampled_from(["negative", "nonfinite", "x255"])))
    if layout == "1hw":
        a = a[None]
    elif layout == "hw1":
        a = a[..., None]
    elif layout in ("hw3", "hw4", "hw5"):
        a = np.repeat(a[..., None], int(layout[-1]), axis=2)
    elif layout == "hw3_diff":
        a = np.stack([a, np.zeros_like(a), a], axis=2)
    as_torch = draw(st.booleans())
    if as_torch:
        t = torch.from_numpy(
            np.ascontiguousarray(a).astype(np.int64 if dtype == "uint16" else a.dtype)
        )
        return t.to(torch.uint16) if dtype == "uint16" else t
    return a


def _mask_plane(x: Any) -> np.ndarray | None:
    """The 2-D plane the mask contract reads from `x`, or None when its shape is rejected.

    1xNxC is ambiguous: arrays and tensors are read as 1xHxW (PIL images are always HxWxC).
    """
    if isinstance(x, torch.Tensor):
        a = x.to(torch.int64).numpy() if x.dtype == torch.uint16 else x.numpy()
    else:
        a = x
    last = a.ndim == 3 and a.shape[2] in (1, 3, 4) and a.shape[0] != 1
    if a.ndim == 2:
        plane = a
    elif last and (a[..., :3] == a[..., :1]).all():
        plane = a[..., 0]
    elif not last and a.shape[0] == 1:
        plane = a[0]
    else:
        return None
    return None if plane.size == 0 else plane


def _expected_mask(x: Any) -> np.ndarray | None:
    """load_mask's documented answer from numpy alone (bool [H, W]), or None = reject."""
    a = _mask_plane(x)
    if a is None:
        return None
    if a.dtype == np.bool_:
        return a
    values = np.unique(a)
    if a.dtype.kind == "f":
        if not np.isfinite(a).all():
            return None
        if np.isin(values, [0, 255]).all():
            return a > 0
        return a > 0.5 if values.min() >= 0 and values.max() <= 1 else None
    if (values < 0).any() or (values != 0).sum() > 1:
        return None
    return a != 0


def _pil_nearest(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL NEAREST resize of a 2-D bool / integer array (the documented resize rule)."""
    return np.asarray(Image.fromarray(a.astype(np.int32), "I").resize(size[::-1], Image.NEAREST))


@CHEAP
@given(mask_inputs(), st.one_of(st.none(), st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_load_mask(x, size):
    """Binary masks come back bool at `size` (PIL NEAREST), label maps and NaN fail clearly."""
    expected = _expected_mask(x)

    def check(out: torch.Tensor) -> None:
        assert expected is not None, "accepted a mask the contract rejects"
        want = expected if size is None else _pil_nearest(expected, size).astype(bool)
        assert out.dtype == torch.bool and tuple(out.shape) == want.shape
        assert np.array_equal(out.numpy(), want)

    outcome = run_case("inputs: mask", lambda: load_mask(x, size=size), check)
    assert expected is None or outcome == "correct", "a valid mask was rejected"


@CHEAP
@given(mask_inputs(), st.one_of(st.none(), st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_load_label_map(x, size):
    """Label maps come back int64 with their values; non-integral floats fail clearly."""
    plane = _mask_plane(x)
    valid = plane is not None and (
        plane.dtype.kind != "f" or (np.isfinite(plane).all() and (plane == np.round(plane)).all())
    )

    def check(out: torch.Tensor) -> None:
        assert valid, "accepted a label map the contract rejects"
        want = plane.astype(np.int64)
        want = want if size is None else _pil_nearest(want, size)
        assert out.dtype == torch.int64 and np.array_equal(out.numpy(), want)

    outcome = run_case("inputs: label map", lambda: load_label_map(x, size=size), check)
    assert not valid or outcome == "correct", "a valid label map was rejected"


@CHEAP
@given(st.one_of(st.none(), st.integers(), st.text(max_size=5), st.tuples(st.integers(-3, 50))))
def test_load_mask_bad_size(size):
    """Any size that is not a pair of positive ints fails clearly."""
    mask = np.ones((4, 5), bool)
    ok = isinstance(size, tuple) and len(size) == 2 and min(size) > 0 or size is None

    def check(out: torch.Tensor) -> None:
        assert ok, f"accepted size {size!r}"

    run_case("inputs: mask size", lambda: load_mask(mask, size=size), check)


# -- prompts ------------------------------------------------------------------------------------
IMG = np.zeros((8, 8, 3), np.uint8)
MASK = np.ones((8, 8), bool)
TEXTS = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", " ", "\n\t", "a cup", "é猫🙂", "x" * 5000, "a.png", "b.jpg"]),
)
IDS = st.one_of(
    st.integers(-2, 3),
    st.sampled_from([None, "x", 2**31 - 1, 2**31, 2**63, 1.0, True, np.int64(4), float("nan")]),
)
MEMBERS = st.one_of(
    TEXTS,
    st.sampled_from([None, 5, 1.5, b"bytes", (IMG, MASK), (IMG,), (IMG, MASK, MASK), {"a": 1}]),
    st.builds(VisualPrompt, st.just(IMG), st.just(MASK)),
    st.builds(lambda s: TextPrompt(s), st.sampled_from(["a", "b c"])),
)


@st.composite
def prompt_objects(draw: st.DrawFn) -> Any:
    """Something a user might pass as a prompt, valid or not (built lazily: ctor errors count)."""
    kind = draw(
        st.sampled_from(["text", "member", "list", "visual", "mixed", "support", "vocab", "pair"])
    )
    if kind == "text":
        text = draw(TEXTS)
        return lambda: text
    if kind == "member":
        member = draw(MEMBERS)
        return lambda: member
    if kind == "list":
        items = draw(st.lists(MEMBERS, max_size=4))
        return lambda: items
    if kind == "visual":
        cid, oid = draw(IDS), draw(IDS)
        return lambda: VisualPrompt(IMG, MASK, class_id=cid, object_id=oid)
    if kind == "mixed":
        text, visual, weight = (
            draw(MEMBERS),
            draw(MEMBERS),
            draw(
                st.one_of(st.floats(allow_nan=True), st.sampled_from([0, 1, "0.5", None, True, 5]))
            ),
        )
        return lambda: MixedPrompt(text, visual, weight)
    if kind == "support":
        shots = draw(st.one_of(st.lists(MEMBERS, max_size=3), MEMBERS))
        return lambda: SupportSet(shots)
    if kind == "vocab":
        classes = draw(st.one_of(TEXTS, st.lists(st.one_of(TEXTS, st.lists(TEXTS, max_size=3)))))
        return lambda: Vocabulary(classes)
    pair = (
        draw(st.sampled_from([IMG, "ref.png", 3])),
        draw(st.sampled_from([MASK, "m.png", None])),
    )
    return lambda: pair


PROMPT_TYPES = (TextPrompt, VisualPrompt, MixedPrompt, SupportSet, Vocabulary)


def _check_prompts(out: list) -> None:
    assert isinstance(out, list) and out, "as_prompt gave no prompt"
    for p in out:
        assert isinstance(p, PROMPT_TYPES), f"as_prompt gave a {type(p).__name__}"
        if isinstance(p, TextPrompt):
            assert isinstance(p.text, str) and p.text.strip()
        if isinstance(p, (VisualPrompt, MixedPrompt, SupportSet)):
            shots = (
                p.shots
                if isinstance(p, SupportSet)
                else ((p.visual,) if isinstance(p, MixedPrompt) else (p,))
            )
            for s in shots:
                assert isinstance(s, VisualPrompt)
                assert type(s.class_id) is int and 0 <= s.class_id < 2**31
                assert s.object_id is None or (type(s.object_id) is int and s.object_id >= 0)
        if isinstance(p, MixedPrompt):
            assert isinstance(p.text, TextPrompt) and 0.0 <= p.text_weight <= 1.0


@settings(CHEAP, max_examples=1500)
@given(prompt_objects())
def test_prompts(make):
    """Building and normalising any prompt gives typed, valid prompts or a clear error."""
    run_case("inputs: prompt", lambda: as_prompt(make()), _check_prompts)


@pytest.mark.parametrize(
    "make",
    [
        lambda: MixedPrompt(5, VisualPrompt(IMG, MASK)),
        lambda: VisualPrompt(IMG, MASK, class_id=None),
        lambda: VisualPrompt(IMG, MASK, object_id="x"),
        lambda: VisualPrompt(IMG, MASK, class_id=2**63),
        lambda: SupportSet([VisualPrompt(IMG, MASK, object_id="a"), VisualPrompt(IMG, MASK)]),
        lambda: SupportSet(5),
    ],
)
def test_prompt_reproducers(make):
    """The probe's crashing prompts now fail clearly when built."""
    assert run_case("inputs: prompt reproducers", make, lambda r: None) == "clear_error"
