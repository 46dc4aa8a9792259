"""Tests of promptseg.result.SegmentationResult."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from promptseg.result import LEVELS, SegmentationResult, palette

H, W = 10, 12


def _masks() -> torch.Tensor:
    m = torch.zeros(3, H, W, dtype=torch.bool)
    m[0, 2:5, 3:7] = True  # rows 2..4, cols 3..6
    m[1, 6:9, 1:4] = True  # rows 6..8, cols 1..3
    m[2, 0, 11] = True  # a single pixel in the top-right corner
    return m


def _result(**kw: object) -> SegmentationResult:
    args: dict = dict(
        masks=_masks(),
        scores=torch.tensor([0.2, 0.9, 0.5]),
        labels=["a cat", "dog/2", "x"],
        prompt_index=torch.tensor([0, 1, 1]),
        level=["binary", "instance", "instance"],
        class_ids=torch.tensor([4, 7, 7]),
        logits=torch.randn(3, 8, 8),
        image=torch.full((3, H, W), 100, dtype=torch.uint8),
        meta={"model": "test", "timings": {"encode": 0.01}},
    )
    args.update(kw)
    return SegmentationResult(**args)


# ------------------------------------------------------------------------------------------
# construction
# ------------------------------------------------------------------------------------------


def test_construction_normalises_dtypes() -> None:
    r = _result(
        scores=torch.tensor([0.2, 0.9, 0.5], dtype=torch.float64),
        prompt_index=torch.tensor([0, 1, 1], dtype=torch.int32),
        labels=("a", "b", "c"),
    )
    assert r.scores.dtype == torch.float32
    assert r.prompt_index.dtype == torch.int64
    assert r.class_ids is not None and r.class_ids.dtype == torch.int64
    assert r.labels == ["a", "b", "c"]
    assert len(r) == 3 and r.image_size == (H, W)
    assert "n=3" in repr(r)


@pytest.mark.parametrize(
    "kw,exc,pattern",
    [
        ({"masks": _masks().float()}, ValueError, "bool"),
        ({"masks": _masks()[0]}, ValueError, r"\[N, H, W\]"),
        ({"masks": np.zeros((3, H, W), bool)}, TypeError, "ndarray"),
        ({"scores": torch.tensor([1, 2, 3])}, TypeError, "float"),
        ({"scores": torch.tensor([0.1, 0.2])}, ValueError, r"\[N\] = \[3\]"),
        ({"labels": ["a", "b"]}, ValueError, "labels must have 3"),
        ({"labels": "abc"}, TypeError, "list of str"),
        ({"labels": ["a", "b", 3]}, TypeError, "int"),
        ({"prompt_index": torch.tensor([0.0, 1.0, 1.0])}, TypeError, "integer"),
        ({"prompt_index": torch.tensor([0, 1])}, ValueError, "prompt_index"),
        ({"level": ["binary", "instance", "foo"]}, ValueError, "foo"),
        ({"level": ["binary"]}, ValueError, "level must have 3"),
        ({"class_ids": torch.tensor([1, 2])}, ValueError, "class_ids"),
        ({"logits": torch.randn(2, 8, 8)}, ValueError, "N = 3"),
        ({"logits": torch.zeros(3, 8, 8, dtype=torch.long)}, ValueError, "float"),
        ({"logits": None, "logits_valid": (4, 4)}, ValueError, "logits is None"),
        ({"logits_valid": (9, 4)}, ValueError, "logits_valid"),
        ({"logits_valid": (0, 4)}, ValueError, "logits_valid"),
        ({"image": torch.zeros(3, H, W + 1, dtype=torch.uint8)}, ValueError, "match masks"),
        ({"image": torch.zeros(3, H, W)}, ValueError, "uint8"),
        ({"panoptic": {"id_map": torch.zeros(H, W)}}, ValueError, "segments_info"),
        (
            {"panoptic": {"id_map": torch.zeros(H, W + 1, dtype=torch.int32), "segments_info": []}},
            ValueError,
            "match masks",
        ),
        (
            {"panoptic": {"id_map": torch.zeros(H, W, dtype=torch.int32), "segments_info": [{}]}},
            ValueError,
            "isthing",
        ),
        ({"meta": None}, TypeError, "meta"),
    ],
)
def test_construction_errors(kw: dict, exc: type[Exception], pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        _result(**kw)


def test_empty() -> None:
    r = SegmentationResult.empty((H, W), meta={"model": "m"})
    assert len(r) == 0 and r.masks.shape == (0, H, W) and r.image_size == (H, W)
    assert r.boxes().shape == (0, 4)
    assert r.to_coco_rle() == []
    assert len(r.best()) == 0 and len(r.per_prompt(0)) == 0
    img = r.overlay()
    assert img.size == (W, H) and img.mode == "RGB"
    assert not np.asarray(img).any()  # black canvas
    e = SegmentationResult.empty((H, W), logits_size=(4, 4), with_class_ids=True)
    assert e.upsample().shape == (0, H, W)
    assert e.class_ids is not None and e.class_ids.shape == (0,)


# ------------------------------------------------------------------------------------------
# subsets
# ------------------------------------------------------------------------------------------


def test_best() -> None:
    r = _result()
    b = r.best()
    assert len(b) == 1
    assert b.labels == ["dog/2"] and torch.equal(b.masks[0], r.masks[1])
    assert b.class_ids is not None and b.class_ids.tolist() == [7]
    assert b.logits is not None and torch.equal(b.logits[0], r.logits[1])
    assert b.image is r.image


def test_select_forms() -> None:
    r = _result()
    by_list = r.select([2, 0])
    assert by_list.labels == ["x", "a cat"]
    assert by_list.scores.tolist() == pytest.approx([0.5, 0.2])
    assert by_list.prompt_index.tolist() == [1, 0]
    assert by_list.level == ["instance", "binary"]
    assert by_list.logits is not None and by_list.logits.shape == (2, 8, 8)
    by_bool = r.select(torch.tensor([True, False, True]))
    assert by_bool.labels == ["a cat", "x"]
    assert r.select(-1).labels == ["x"]
    assert len(r.select([])) == 0
    with pytest.raises(IndexError, match="out of range"):
        r.select([3])
    with pytest.raises(ValueError, match="bool index"):
        r.select([True, False])
    with pytest.raises(TypeError, match="integer or bool"):
        r.select(torch.tensor([0.5]))


def test_per_prompt() -> None:
    r = _result()
    p1 = r.per_prompt(1)
    assert p1.labels == ["dog/2", "x"] and p1.prompt_index.tolist() == [1, 1]
    assert len(r.per_prompt(5)) == 0


# ------------------------------------------------------------------------------------------
# boxes / RLE / logits
# ------------------------------------------------------------------------------------------


def test_boxes() -> None:
    masks = _masks()
    masks[2] = False  # empty mask -> zero box
    r = _result(masks=masks)
    b = r.boxes()
    assert b.dtype == torch.float32 and b.shape == (3, 4)
    assert b.tolist() == [[3, 2, 6, 4], [1, 6, 3, 8], [0, 0, 0, 0]]


# pycocotools' decode trips a numpy 2 deprecation inside its Cython code; not ours to fix.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_to_coco_rle_round_trip() -> None:
    r = _result()
    records = r.to_coco_rle()
    json.dumps(records)  # JSON-ready
    assert len(records) == 3
    for rec, mask, label in zip(records, r.masks, r.labels, strict=True):
        seg = rec["segmentation"]
        assert seg["size"] == [H, W] and isinstance(seg["counts"], str)
        decoded = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), mask.numpy())
        assert rec["area"] == int(mask.sum())
        assert rec["label"] == label
    assert records[0]["bbox"] == [3.0, 2.0, 4.0, 3.0]
    assert [rec["category_id"] for rec in records] == [4, 7, 7]
    assert records[1]["score"] == pytest.approx(0.9)
    assert _result(class_ids=None).to_coco_rle()[0]["category_id"] is None


def test_upsample_with_valid_crop() -> None:
    logits = torch.randn(3, 8, 8)
    r = _result(logits=logits, logits_valid=(4, 6))
    up = r.upsample((8, 12))
    ref = F.interpolate(logits[None, :, :4, :6], size=(8, 12), mode="bilinear", align_corners=False)
    assert up.shape == (3, 8, 12)
    assert torch.allclose(up, ref[0])
    assert r.upsample().shape == (3, H, W)  # default: image size
    full = _result(logits=logits).upsample((16, 16))
    ref_full = F.interpolate(logits[None], size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(full, ref_full[0])


def test_upsample_without_logits() -> None:
    with pytest.raises(ValueError, match="return_logits=True"):
        _result(logits=None).upsample()


# ------------------------------------------------------------------------------------------
# overlay / save
# ------------------------------------------------------------------------------------------


def test_palette_is_deterministic_and_distinct() -> None:
    p = palette(12)
    assert p.dtype == torch.uint8 and p.shape == (12, 3)
    assert torch.equal(p, palette(12)) and torch.equal(p[:5], palette(5))
    assert len({tuple(c) for c in p.tolist()}) == 12


def test_overlay() -> None:
    h, w = 64, 96
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[0, 4:30, 4:40] = True
    masks[1, 40:60, 50:90] = True
    base = torch.full((3, h, w), 100, dtype=torch.uint8)
    r = SegmentationResult(
        masks,
        torch.tensor([0.8, 0.6]),
        ["cat", "dog"],
        torch.tensor([0, 1]),
        ["instance"] * 2,
        image=base,
    )
    img = r.overlay(alpha=0.5)
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (w, h)
    out = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    changed = (out != base).any(0)
    assert changed[masks.any(0)].all()  # every mask pixel is tinted, outlined or labelled
    assert not changed[~masks.any(0)][: 4 * w].any()  # top rows, outside masks: untouched
    assert not changed[:, 92:].any() and not changed[62:].any()
    colours = palette(2).float()
    tinted = (0.5 * 100 + 0.5 * colours[0]).round()
    assert out[:, 6, 6].float().tolist() == tinted.tolist()  # inside mask 0, away from text
    assert out[:, 4, 20].tolist() == colours[0].tolist()  # contour: full colour
    # explicit image argument; no image at all -> black canvas
    other = np.full((h, w, 3), 30, np.uint8)
    assert np.asarray(r.overlay(image=other))[63, 0].tolist() == [30, 30, 30]
    black = replace(r, image=None).overlay()
    assert np.asarray(black)[63, 0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="size"):
        r.overlay(image=np.zeros((h + 1, w, 3), np.uint8))


def test_overlay_large_text_stays_in_bounds() -> None:
    m = torch.zeros(1, 40, 60, dtype=torch.bool)
    m[0, 30:40, 50:60] = True
    r = SegmentationResult(
        m, torch.tensor([0.5]), ["a rather long label"], torch.tensor([0]), ["binary"]
    )
    assert r.overlay().size == (60, 40)


def test_save(tmp_path: Path) -> None:
    ids = torch.zeros(H, W, dtype=torch.int32)
    ids[2:5, 3:7] = 300  # needs the G channel
    panoptic = {
        "id_map": ids,
        "segments_info": [
            {"id": 300, "category_id": 1, "isthing": True, "score": torch.tensor(0.7)}
        ],
    }
    r = _result(meta={"model": "m", "device": torch.device("cpu"), "t": np.float32(0.5)})
    r = _result(panoptic=panoptic, meta=r.meta)
    out = tmp_path / "nested" / "dir"
    paths = r.save(out, prefix="m")
    names = [p.name for p in paths]
    assert names == [
        "m_000_a_cat.png",
        "m_001_dog_2.png",
        "m_002_x.png",
        "overlay.png",
        "panoptic.png",
        "segments.json",
        "result.json",
    ]
    assert all(p.is_file() and p.parent == out for p in paths)
    for i, p in enumerate(paths[:3]):
        with Image.open(p) as im:
            assert im.mode == "L" and im.size == (W, H)
            a = np.asarray(im)
        assert set(np.unique(a).tolist()) <= {0, 255}
        assert np.array_equal(a == 255, r.masks[i].numpy())
    with Image.open(out / "overlay.png") as im:
        assert im.mode == "RGB" and im.size == (W, H)
    with Image.open(out / "panoptic.png") as im:
        rgb = np.asarray(im).astype(np.int64)
    decoded = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]
    assert np.array_equal(decoded, ids.numpy())
    data = json.loads((out / "result.json").read_text())
    assert data["labels"] == r.labels
    assert data["scores"] == pytest.approx(r.scores.tolist())
    assert data["prompt_index"] == [0, 1, 1] and data["class_ids"] == [4, 7, 7]
    assert data["level"] == r.level and all(lv in LEVELS for lv in data["level"])
    assert data["boxes"][0] == [3, 2, 6, 4]
    assert data["meta"]["model"] == "m" and data["meta"]["device"] == "cpu"
    assert data["meta"]["t"] == 0.5
    assert data["panoptic"]["segments_info"][0]["score"] == pytest.approx(0.7)
    segments = json.loads((out / "segments.json").read_text())
    assert segments == data["panoptic"]


def test_save_empty(tmp_path: Path) -> None:
    paths = SegmentationResult.empty((H, W)).save(tmp_path)
    assert [p.name for p in paths] == ["overlay.png", "result.json"]
    assert json.loads((tmp_path / "result.json").read_text())["labels"] == []
