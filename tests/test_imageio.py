"""Tests of promptseg.imageio: every accepted image / mask form and the error messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from promptseg.imageio import content_hash, load_image, load_label_map, load_mask, to_pil

H, W = 6, 10


@pytest.fixture
def rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def _check_rgb(t: torch.Tensor, h: int = H, w: int = W) -> None:
    assert isinstance(t, torch.Tensor)
    assert t.dtype == torch.uint8
    assert t.shape == (3, h, w)
    assert t.device.type == "cpu"
    assert t.is_contiguous()


# ------------------------------------------------------------------------------------------
# images: accepted forms
# ------------------------------------------------------------------------------------------


def test_path_png(tmp_path: Path, rgb: np.ndarray) -> None:
    path = tmp_path / "img.png"
    Image.fromarray(rgb).save(path)
    for p in (path, str(path)):
        t = load_image(p)
        _check_rgb(t)
        assert torch.equal(t, torch.from_numpy(rgb).permute(2, 0, 1))


def test_path_jpeg_exif_orientation(tmp_path: Path, rgb: np.ndarray) -> None:
    path = tmp_path / "img.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(path, exif=exif)
    with Image.open(path) as raw:
        assert raw.size == (W, H)  # stored size, (width, height)
    t = load_image(path)
    _check_rgb(t, h=W, w=H)  # transposed


def test_pil_modes(rgb: np.ndarray) -> None:
    rgb_img = Image.fromarray(rgb)
    _check_rgb(load_image(rgb_img))
    gray = load_image(rgb_img.convert("L"))
    _check_rgb(gray)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[0], gray[2])
    rgba = rgb_img.convert("RGBA")
    rgba.putalpha(0)  # alpha is dropped, not composited
    assert torch.equal(load_image(rgba), load_image(rgb_img))
    _check_rgb(load_image(rgb_img.convert("P")))
    _check_rgb(load_image(rgb_img.convert("LA")))
    _check_rgb(load_image(rgb_img.convert("CMYK")))
    _check_rgb(load_image(rgb_img.convert("1")))


def test_pil_16bit_is_scaled() -> None:
    a = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    img = Image.fromarray(a)
    assert img.mode == "I;16"
    t = load_image(img)
    assert t[:, 0].tolist() == [[0, 100, 255]] * 3


def test_numpy_forms(rgb: np.ndarray) -> None:
    expected = torch.from_numpy(rgb).permute(2, 0, 1)
    assert torch.equal(load_image(rgb), expected)
    rgba = np.concatenate([rgb, np.zeros((H, W, 1), np.uint8)], axis=2)
    assert torch.equal(load_image(rgba), expected)
    gray = rgb[..., 0]
    for g in (gray, gray[..., None]):
        t = load_image(g)
        _check_rgb(t)
        assert torch.equal(t, torch.from_numpy(gray).expand(3, H, W))
    for dtype in (np.float32, np.float64, np.float16):
        f = (rgb / 255.0).astype(dtype)
        assert torch.equal(load_image(f), expected)
    assert torch.equal(load_image((gray / 255.0).astype(np.float32)), load_image(gray))


def test_numpy_input_is_copied(rgb: np.ndarray) -> None:
    t = load_image(rgb)
    rgb[:] = 0
    assert t.any()


def test_torch_forms(rgb: np.ndarray) -> None:
    chw = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    assert torch.equal(load_image(chw), chw)
    assert torch.equal(load_image(chw.float() / 255), chw)
    rgba = torch.cat([chw, torch.full((1, H, W), 7, dtype=torch.uint8)])
    assert torch.equal(load_image(rgba), chw)
    hw = chw[0]
    assert torch.equal(load_image(hw), hw.expand(3, H, W))
    assert torch.equal(load_image(hw[None]), hw.expand(3, H, W))
    assert torch.equal(load_image((hw.double() / 255).requires_grad_()), hw.expand(3, H, W))


# ------------------------------------------------------------------------------------------
# images: errors
# ------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(path)


@pytest.mark.parametrize("fmt,suffix", [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_file(tmp_path: Path, rgb: np.ndarray, fmt: str, suffix: str) -> None:
    big = np.tile(rgb, (20, 20, 1))
    full = tmp_path / f"full.{suffix}"
    Image.fromarray(big).save(full, fmt)
    data = full.read_bytes()
    path = tmp_path / f"truncated.{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"could not read image '.*truncated\." + suffix):
        load_image(path)


def test_not_an_image_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(ValueError, match="could not read image .*notes.png"):
        load_image(path)


def test_bool_image_is_rejected() -> None:
    with pytest.raises(ValueError, match="mask, not an image"):
        load_image(np.zeros((H, W), dtype=bool))
    with pytest.raises(ValueError, match="mask, not an image"):
        load_image(torch.zeros(1, H, W, dtype=torch.bool))


def test_float_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\].*divide it by 255"):
        load_image(np.full((H, W, 3), 200.0, dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_image(torch.full((3, H, W), -0.5))
    with pytest.raises(ValueError, match="NaN"):
        load_image(torch.full((3, H, W), float("nan")))


@pytest.mark.parametrize(
    "bad,exc,pattern",
    [
        (np.zeros((H, W, 3), np.int64), TypeError, "int64"),
        (np.zeros((H, W, 3), np.uint16), TypeError, "uint16"),
        (torch.zeros(3, H, W, dtype=torch.int32), TypeError, "int32"),
        (np.zeros((H, W, 2), np.uint8), ValueError, r"\(6, 10, 2\)"),
        (np.zeros((3, H, W), np.uint8), ValueError, "channels-last"),
        (torch.zeros(H, W, 3, dtype=torch.uint8), ValueError, "channels-first"),
        (torch.zeros(1, 3, H, W, dtype=torch.uint8), ValueError, "batch"),
        (torch.zeros(2, H, W, dtype=torch.uint8), ValueError, r"\(2, 6, 10\)"),
        (np.zeros((2, 2, 2, 2), np.uint8), ValueError, "shape"),
        ([[0, 1], [2, 3]], TypeError, "list"),
        (b"\x89PNG", TypeError, "bytes"),
    ],
)
def test_bad_image_inputs(bad: object, exc: type[Exception], pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        load_image(bad)  # type: ignore[arg-type]


def test_zero_size_image() -> None:
    with pytest.raises(ValueError, match="zero size"):
        load_image(np.zeros((0, W, 3), np.uint8))
    with pytest.raises(ValueError, match="zero size"):
        load_image(torch.zeros(3, H, 0))
    with pytest.raises(ValueError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))


# ------------------------------------------------------------------------------------------
# to_pil / content_hash
# ------------------------------------------------------------------------------------------


def test_to_pil_round_trip(rgb: np.ndarray) -> None:
    t = load_image(rgb)
    img = to_pil(t)
    assert img.mode == "RGB" and img.size == (W, H)
    assert torch.equal(load_image(img), t)
    with pytest.raises(TypeError, match=r"uint8 torch tensor \[3, H, W\]"):
        to_pil(t.float())


def test_content_hash() -> None:
    a = torch.arange(12, dtype=torch.uint8).reshape(3, 2, 2)
    h = content_hash(a)
    assert len(h) == 40 and h == content_hash(a.clone())
    assert h == content_hash(a.permute(0, 2, 1).contiguous().permute(0, 2, 1))  # layout-free
    assert h != content_hash(a.reshape(3, 4))  # shape matters
    assert h != content_hash(a.to(torch.int8))  # dtype matters
    b = a.clone()
    b[0, 0, 0] = 1
    assert h != content_hash(b)
    assert len(content_hash(torch.zeros(2, dtype=torch.bfloat16))) == 40


# ------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------

PATTERN = np.array([[1, 0, 0], [0, 1, 1]], dtype=bool)


def test_mask_value_forms() -> None:
    expected = torch.from_numpy(PATTERN)
    forms = [
        PATTERN,
        PATTERN.astype(np.uint8),
        PATTERN.astype(np.uint8) * 255,
        PATTERN.astype(np.int64),
        PATTERN.astype(np.float32),
        PATTERN.astype(np.float32) * 255,
        PATTERN * 0.8 + 0.1,  # soft mask, thresholded at 0.5
        torch.from_numpy(PATTERN),
        torch.from_numpy(PATTERN).to(torch.uint8) * 255,
        torch.from_numpy(PATTERN).float(),
    ]
    for form in forms:
        m = load_mask(form)
        assert m.dtype == torch.bool and torch.equal(m, expected), form


def test_mask_shape_forms() -> None:
    expected = torch.from_numpy(PATTERN)
    u8 = PATTERN.astype(np.uint8) * 255
    for form in (
        u8[None],
        u8[..., None],
        np.repeat(u8[..., None], 3, axis=2),
        np.concatenate([np.repeat(u8[..., None], 3, axis=2), np.full((2, 3, 1), 255, np.uint8)], 2),
        torch.from_numpy(PATTERN)[None],
    ):
        assert torch.equal(load_mask(form), expected)


def test_mask_from_files(tmp_path: Path) -> None:
    expected = torch.from_numpy(PATTERN)
    u8 = PATTERN.astype(np.uint8) * 255
    for mode in ("L", "1", "RGB"):
        path = tmp_path / f"mask_{mode}.png"
        Image.fromarray(u8).convert(mode).save(path)
        assert torch.equal(load_mask(path), expected), mode
    # palette PNG: index 1 = foreground whatever its colour
    pal = Image.fromarray(PATTERN.astype(np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 200, 30, 30] + [0] * (254 * 3))
    path = tmp_path / "palette.png"
    pal.save(path)
    with Image.open(path) as check:
        assert check.mode == "P"
    assert torch.equal(load_mask(path), expected)
    assert torch.equal(load_mask(Image.open(path)), expected)


def test_mask_resize_nearest() -> None:
    small = np.array([[1, 0], [0, 1]], dtype=np.uint8)
    m = load_mask(small, size=(4, 6))
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 1, 1],
            [0, 0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, expected)
    assert torch.equal(load_mask(small, size=(2, 2)), torch.from_numpy(small.astype(bool)))


def test_mask_resize_matches_pil_nearest() -> None:
    rng = np.random.default_rng(1)
    a = rng.random((7, 9)) > 0.5
    for h, w in ((5, 13), (23, 31), (3, 4)):
        pil = Image.fromarray(a.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)
        assert torch.equal(load_mask(a, size=(h, w)), torch.from_numpy(np.asarray(pil) > 0))


def test_mask_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"label map.*mask == label"):
        load_mask(np.array([[0, 1], [2, 0]]))
    with pytest.raises(ValueError, match="label map"):
        load_mask(np.array([[0, 1], [255, 0]], dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_mask(np.array([[0.0, 2.0]]))
    with pytest.raises(ValueError, match="channels that differ"):
        load_mask(np.dstack([PATTERN, ~PATTERN, PATTERN]).astype(np.uint8))
    with pytest.raises(ValueError, match="shape"):
        load_mask(np.zeros((2, 2, 2, 2), bool))
    with pytest.raises(ValueError, match="size must be"):
        load_mask(PATTERN, size=(0, 3))
    with pytest.raises(TypeError, match="unsupported mask type"):
        load_mask([[0, 1]])  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_mask(tmp_path / "missing.png")
    pal = Image.fromarray(np.array([[0, 1], [2, 0]], np.uint8), mode="P")
    with pytest.raises(ValueError, match="palette indices"):
        load_mask(pal)


def test_load_label_map(tmp_path: Path) -> None:
    labels = np.array([[0, 1, 1], [2, 2, 0]], dtype=np.uint8)
    pal = Image.fromarray(labels, mode="P")
    pal.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (253 * 3))
    path = tmp_path / "first_frame.png"
    pal.save(path)
    expected = torch.from_numpy(labels).long()
    for form in (path, str(path), pal, labels, labels.astype(np.int32), torch.from_numpy(labels)):
        t = load_label_map(form)
        assert t.dtype == torch.int64 and torch.equal(t, expected)
    big = load_label_map(path, size=(4, 6))
    assert big.dtype == torch.int64 and big.shape == (4, 6)
    assert big[0].tolist() == [0, 0, 1, 1, 1, 1] and big[3].tolist() == [2, 2, 2, 2, 0, 0]
    assert torch.equal(load_label_map(PATTERN), torch.from_numpy(PATTERN).long())
    assert load_label_map(np.array([[70000, 0]], dtype=np.uint32)).tolist() == [[70000, 0]]
    with pytest.raises(ValueError, match="whole numbers"):
        load_label_map(np.array([[0.5, 1.0]]))
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (128, 0, 0)
    with pytest.raises(ValueError, match="channels that differ"):
        load_label_map(rgb)
