"""`SegmentationResult.overlay` pictures: labels inside their masks, never on each other,
readable on any colour, a legend for what does not fit, and the image's size kept."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch
from PIL import ImageFont
from scipy import ndimage

from promptseg import viz
from promptseg.result import SegmentationResult
from promptseg.viz import OverlayLayout, TextBox, contrast_ratio, font_size_for, label_layout


def _result(masks: np.ndarray, labels: list[str], scores: list[float] | None = None, image=None):
    n = len(masks)
    scores = [0.9 - 0.01 * i for i in range(n)] if scores is None else scores
    return SegmentationResult(
        torch.from_numpy(np.asarray(masks, dtype=bool)),
        torch.tensor(scores, dtype=torch.float32),
        labels,
        torch.arange(n),
        ["instance"] * n,
        image=image,
    )


def _layout(r: SegmentationResult) -> OverlayLayout:
    return label_layout(r.masks.numpy(), r.labels, r.scores.numpy())


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1


def _inside(mask: np.ndarray, box: tuple[int, int, int, int]) -> bool:
    x0, y0, x1, y1 = box
    return (
        0 <= x0 < x1 <= mask.shape[1] and 0 <= y0 < y1 <= mask.shape[0] and mask[y0:y1, x0:x1].all()
    )


def _overlap(a: TextBox, b: TextBox) -> bool:
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box, b.box
    return ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1


def _check_no_overlaps(layout: OverlayLayout) -> None:
    """Labels, tags and the legend's panel are pairwise disjoint and inside the image."""
    h, w = layout.size
    top = layout.of_kind("label", "tag", "legend")
    for b in layout.boxes:
        x0, y0, x1, y1 = b.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, b
    for a, b in itertools.combinations(top, 2):
        assert not _overlap(a, b), (a, b)
    if layout.legend is not None:
        for b in layout.of_kind("swatch", "entry"):
            lx0, ly0, lx1, ly1 = layout.legend.box
            assert lx0 <= b.box[0] and ly0 <= b.box[1] and b.box[2] <= lx1 and b.box[3] <= ly1


def _scene(h: int = 240, w: int = 320) -> tuple[np.ndarray, list[str]]:
    masks = np.zeros((4, h, w), dtype=bool)
    masks[0, 10:110, 10:150] = True
    masks[1] = _ellipse(h, w, 170, 90, 55, 80)
    masks[2, 20:200, 190:310] = True
    masks[2, 60:120, 220:280] = False  # a hole
    masks[3] = _ellipse(h, w, 80, 110, 30, 45)  # overlaps mask 0
    return masks, ["a rectangle", "an ellipse", "a frame", "a blob"]


# ------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------


def test_labels_inside_their_masks_and_disjoint() -> None:
    masks, labels = _scene()
    layout = _layout(_result(masks, labels))
    placed = layout.of_kind("label")
    assert sorted(b.index for b in placed) == [0, 1, 2, 3] and layout.legend is None
    for b in placed:
        assert _inside(masks[b.index], b.box), b
        assert b.text.startswith(labels[b.index])
    _check_no_overlaps(layout)
    assert label_layout(masks, labels, [0.9, 0.89, 0.88, 0.87]) == layout  # deterministic


def test_duplicate_masks_get_separate_labels() -> None:
    """Duplicate detections share a pole: the second label moves to the next best place."""
    h, w = 200, 260
    blob = _ellipse(h, w, 100, 130, 80, 110)
    masks = np.stack([blob, blob, blob & (np.arange(w) < 200)])
    layout = _layout(_result(masks, ["dog", "dog", "a dog"], [0.9, 0.6, 0.5]))
    placed = layout.of_kind("label")
    assert sorted(b.index for b in placed) == [0, 1, 2]
    for b in placed:
        assert _inside(masks[b.index], b.box)
    _check_no_overlaps(layout)


def test_label_of_a_big_mask_avoids_the_small_mask_inside_it() -> None:
    h, w = 300, 260
    person = _ellipse(h, w, 150, 130, 140, 110)
    tie = np.zeros((h, w), dtype=bool)
    tie[130:190, 105:165] = True
    layout = _layout(_result(np.stack([person, tie]), ["a person", "a tie"], [0.93, 0.71]))
    boxes = {b.index: b for b in layout.of_kind("label")}
    assert set(boxes) == {0, 1} and layout.legend is None
    assert boxes[0].text == "a person 0.93" and boxes[1].text == "a tie 0.71"
    assert _inside(person, boxes[0].box) and _inside(tie, boxes[1].box)
    x0, y0, x1, y1 = boxes[0].box
    assert not tie[y0:y1, x0:x1].any()  # the person's label is not on the tie
    _check_no_overlaps(layout)


def test_two_part_mask_label_sits_on_one_part() -> None:
    h, w = 200, 300
    mask = _ellipse(h, w, 100, 70, 60, 60) | _ellipse(h, w, 100, 230, 40, 50)
    parts, n = ndimage.label(mask)
    assert n == 2
    (label,) = _layout(_result(mask[None], ["two parts"])).of_kind("label")
    x0, y0, x1, y1 = label.box
    assert _inside(mask, label.box)
    assert len(np.unique(parts[y0:y1, x0:x1])) == 1  # one part, not the gap between them
    assert parts[(y0 + y1) // 2, (x0 + x1) // 2] == parts[100, 70]  # the larger part


def test_label_goes_to_the_pole_of_inaccessibility() -> None:
    h, w = 200, 200
    mask = np.zeros((h, w), dtype=bool)
    mask[20:180, 20:180] = True
    mask[20:180, 20:60] = False  # a fat right part with its centre at x = 120
    (label,) = _layout(_result(mask[None], ["cat"])).of_kind("label")
    x0, y0, x1, y1 = label.box
    assert abs((x0 + x1) / 2 - 120) <= 4 and abs((y0 + y1) / 2 - 100) <= 4


def test_twenty_small_instances_use_a_legend() -> None:
    h, w = 256, 320
    masks = np.zeros((20, h, w), dtype=bool)
    for i in range(20):
        y, x = 20 + (i // 5) * 55, 20 + (i % 5) * 60
        masks[i, y : y + 10, x : x + 12] = True
    scores = np.linspace(0.95, 0.3, 20).tolist()
    r = _result(masks, [f"instance {i}" for i in range(20)], scores)
    layout = _layout(r)
    assert layout.legend is not None and not layout.of_kind("label")
    swatches = layout.of_kind("swatch")
    rows = [b.index for b in swatches]
    assert len(rows) == len(set(rows)) > 1
    assert [s.text for s in swatches] == [str(k + 1) for k in range(len(swatches))]
    assert rows == sorted(rows, key=lambda i: -scores[i])  # best first
    entries = [b for b in layout.of_kind("entry") if b.index >= 0]
    for b in entries:
        assert b.text.startswith(f"instance {b.index}") or b.text.endswith("…")
    more = [b for b in layout.of_kind("entry") if b.index < 0]
    assert len(rows) + (int(more[0].text.split()[0][1:]) if more else 0) == 20
    tags = {b.index: b.text for b in layout.of_kind("tag")}
    assert tags and all(tags[i] == str(rows.index(i) + 1) for i in tags)  # tag = legend row
    _check_no_overlaps(layout)
    img = r.overlay()
    assert img.size == (w, h) and img.mode == "RGB"
    lx0, ly0, _, _ = layout.legend.box
    assert np.asarray(img)[ly0, lx0].tolist() == list(layout.legend.fill)


def test_legend_and_tags_stay_apart_when_crowded() -> None:
    rng = np.random.default_rng(0)
    h, w = 200, 200
    masks = np.zeros((60, h, w), dtype=bool)
    for i in range(60):
        y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
        masks[i, y : y + 6, x : x + 6] = True
    layout = _layout(_result(masks, [f"object {i}" for i in range(60)], None))
    assert layout.legend is not None
    lx0, _, lx1, _ = layout.legend.box
    assert lx1 - lx0 <= w // 2 + 40  # columns stop at about half the width
    assert any(b.text.startswith("+") for b in layout.of_kind("entry"))
    _check_no_overlaps(layout)


def test_tight_masks_get_two_lines_or_the_name_alone() -> None:
    h, w = 40, 60
    masks = np.zeros((2, h, w), dtype=bool)
    masks[0, 5:30, 4:28] = True
    masks[1, 18:38, 34:58] = True
    r = _result(masks, ["cat", "dog"], [0.91, 0.64])
    layout = _layout(r)
    texts = {b.index: b.text for b in layout.of_kind("label")}
    assert texts[0] in ("cat", "cat\n0.91") and texts[1] in ("dog", "dog\n0.64")
    assert "dog" in texts.values() and layout.legend is None  # no room for dog's score
    for b in layout.of_kind("label"):
        assert _inside(masks[b.index], b.box)
    assert r.overlay().size == (w, h)


# ------------------------------------------------------------------------------------------
# readability
# ------------------------------------------------------------------------------------------


def test_text_contrast_on_every_palette_colour() -> None:
    h, w = 400, 600
    masks = np.zeros((24, h, w), dtype=bool)
    for i in range(24):
        y, x = (i // 6) * 100, (i % 6) * 100
        masks[i, y + 5 : y + 95, x + 5 : x + 95] = True
    r = _result(masks, [f"c{i}" for i in range(24)], None)
    layout = _layout(r)
    assert len(layout.of_kind("label")) == 24
    img = np.asarray(r.overlay())
    for b in layout.boxes:
        if b.text:
            assert contrast_ratio(b.ink, b.fill) >= 4.5, b
        x0, y0, _, _ = b.box
        assert img[y0, x0].tolist() == list(b.fill)  # the box is drawn in its fill colour
    for grey in range(256):  # black or white ink reads on any box colour
        fill = (grey, grey, grey)
        assert contrast_ratio(viz._ink(fill), fill) >= 4.5


def test_contrast_ratio_reference_values() -> None:
    assert contrast_ratio((0, 0, 0), (255, 255, 255)) == pytest.approx(21.0)
    assert contrast_ratio((255, 255, 255), (255, 255, 255)) == pytest.approx(1.0)
    assert contrast_ratio((0, 0, 255), (255, 255, 255)) == pytest.approx(8.59, abs=0.01)


def test_font_scales_with_the_image() -> None:
    sizes = [font_size_for(s, s) for s in (10, 40, 200, 512, 1024, 4000, 20000)]
    assert sizes == sorted(sizes) and sizes[0] >= 9 and sizes[-1] <= 72
    assert font_size_for(512, 2000) == font_size_for(2000, 512)
    small = _layout(_result(np.ones((1, 256, 256), dtype=bool), ["sky"])).of_kind("label")[0]
    big = _layout(_result(np.ones((1, 1024, 1024), dtype=bool), ["sky"])).of_kind("label")[0]
    assert big.box[3] - big.box[1] > 2 * (small.box[3] - small.box[1])


def test_older_pillow_without_a_scalable_default_font(monkeypatch: pytest.MonkeyPatch) -> None:

    def no_size(size: float | None = None) -> ImageFont.ImageFont:
        if size is not None:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return ImageFont.load_default_imagefont()  # the bitmap font of older Pillow

    def no_truetype(*args: object, **kwargs: object) -> ImageFont.FreeTypeFont:
        raise OSError("cannot open resource")

    monkeypatch.setattr(ImageFont, "load_default", no_size)
    monkeypatch.setattr(ImageFont, "truetype", no_truetype)
    viz._font.cache_clear()
    viz._Style.make.cache_clear()
    try:
        masks, labels = _scene()
        r = _result(masks, labels)
        layout = _layout(r)
        for b in layout.of_kind("label"):
            assert _inside(masks[b.index], b.box)
        _check_no_overlaps(layout)
        assert r.overlay().size == (320, 240)
    finally:
        viz._font.cache_clear()
        viz._Style.make.cache_clear()


# ------------------------------------------------------------------------------------------
# size, mode, edge cases, speed
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(1, 1), (3, 200), (200, 3), (40, 60), (17, 500)])
def test_overlay_size_and_mode(hw: tuple[int, int]) -> None:
    h, w = hw
    masks = np.zeros((3, h, w), dtype=bool)
    masks[0] = True
    masks[1, : max(1, h // 2)] = True  # masks[2] stays empty
    r = _result(masks, ["a long label for a small image", "b", "c"], [0.5, float("nan"), 0.1])
    img = r.overlay()
    assert img.size == (w, h) and img.mode == "RGB"
    layout = _layout(r)
    assert all(b.index != 2 for b in layout.boxes)  # nothing to point at for an empty mask
    _check_no_overlaps(layout)


def test_empty_result_overlay_is_the_image() -> None:
    h, w = 30, 50
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    r = SegmentationResult.empty((h, w), image=image)
    img = r.overlay()
    assert img.size == (w, h) and img.mode == "RGB"
    assert np.array_equal(np.asarray(img), image.permute(1, 2, 0).numpy())
    assert label_layout(np.zeros((0, h, w), dtype=bool), [], []).boxes == ()
    blank = _result(np.zeros((2, h, w), dtype=bool), ["x", "y"], [0.5, 0.4], image=image)
    assert _layout(blank).boxes == ()
    assert np.array_equal(np.asarray(blank.overlay()), image.permute(1, 2, 0).numpy())


def test_mask_colours_and_outlines_are_kept() -> None:
    h, w = 120, 160
    masks = np.zeros((2, h, w), dtype=bool)
    masks[0, 10:60, 10:80] = True
    masks[1, 70:115, 90:150] = True
    base = torch.full((3, h, w), 100, dtype=torch.uint8)
    r = _result(masks, ["a", "b"], [0.9, 0.8], image=base)
    img = np.asarray(r.overlay(alpha=0.4)).astype(int)
    colours = viz.palette(2).numpy().astype(int)
    assert img[10, 40].tolist() == colours[0].tolist()  # outline in full colour
    assert img[114, 120].tolist() == colours[1].tolist()
    expected = np.rint(np.float32(0.6) * 100 + np.float32(0.4) * colours[0].astype(np.float32))
    assert img[12, 12].tolist() == expected.tolist()  # tinted, away from the label
    assert img[0, 0].tolist() == [100, 100, 100] and img[65, 5].tolist() == [100, 100, 100]


def test_overlay_is_fast_on_a_large_image() -> None:
    h, w = 1024, 1365
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:h, :w]
    masks = np.zeros((20, h, w), dtype=bool)
    for i in range(20):
        r = rng.integers(10, 140)
        cy, cx = rng.integers(r, h - r), rng.integers(r, w - r)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    res = _result(masks, [f"thing {i}" for i in range(20)], None)
    res.overlay()  # fonts loaded and cached
    start = time.perf_counter()
    img = res.overlay()
    elapsed = time.perf_counter() - start
    assert img.size == (w, h)
    assert elapsed < 3.0, f"overlay took {elapsed:.2f} s (typically ~0.15 s)"


def test_overlay_matches_its_layout() -> None:
    """What `label_layout` reports is what `overlay` draws."""
    masks, labels = _scene()
    r = _result(masks, labels)
    arr = np.asarray(r.overlay())
    for b in _layout(r).boxes:
        x0, y0, x1, y1 = b.box
        assert arr[y1 - 1, x1 - 1].tolist() == list(b.fill)
