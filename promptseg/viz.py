"""Drawing for `SegmentationResult.overlay`: tinted, outlined masks with readable labels.

Each label ("label score") goes on a box in its mask's colour, with black or white text, whichever
contrasts more (WCAG ratio >= 4.5 on any colour). A label is placed inside its mask, at the
feasible position farthest from the mask's edge (the distance-transform maximum, i.e. the pole of
inaccessibility), off smaller masks lying inside it when it can, never on another label. A label
that does not fit on one line tries two ("label" over "score"), then a smaller font, then the
label alone. Labels that still cannot fit inside their mask go to a legend in the least crowded
corner of the image (swatch + label + score); their masks get a number tag that points at the
legend row. The overlay keeps the image's size.

`label_layout` returns where everything goes, without drawing; `draw_overlay` draws it.
"""

from __future__ import annotations

import colorsys
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

__all__ = [
    "OverlayLayout",
    "TextBox",
    "contrast_ratio",
    "draw_overlay",
    "font_size_for",
    "label_layout",
    "palette",
]

Box = tuple[int, int, int, int]
"""x0, y0, x1, y1 in pixels; x1 and y1 exclusive."""
Colour = tuple[int, int, int]
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

_MIN_FONT = 9
_MAX_FONT = 72
_CELLS = 192  # the distance transform runs on at most about this many cells per side
_LEGEND_BG: Colour = (24, 24, 24)
_LEGEND_INK: Colour = (255, 255, 255)


def palette(n: int) -> torch.Tensor:
    """`n` distinct, deterministic colours as uint8 [n, 3] (golden-ratio hue steps)."""
    golden = (math.sqrt(5.0) - 1.0) / 2.0
    cols = []
    for i in range(n):
        sat, val = (0.85, 1.0) if i % 2 == 0 else (0.6, 0.85)
        cols.append(colorsys.hsv_to_rgb((0.1 + i * golden) % 1.0, sat, val))
    return (torch.tensor(cols, dtype=torch.float32).reshape(n, 3) * 255).round().to(torch.uint8)


# ------------------------------------------------------------------------------------------------
# colour and fonts
# ------------------------------------------------------------------------------------------------


def _luminance(rgb: Sequence[float]) -> float:
    """WCAG 2 relative luminance of an sRGB colour given as 0..255 values."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(lin @ np.array([0.2126, 0.7152, 0.0722]))


def contrast_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """WCAG 2 contrast ratio of two RGB colours (1 to 21; >= 4.5 is readable body text)."""
    la, lb = _luminance(a), _luminance(b)
    return (max(la, lb) + 0.05) / (min(la, lb) + 0.05)


def _ink(fill: Colour) -> Colour:
    """Black or white, whichever contrasts more with `fill` (always a ratio >= 4.58)."""
    black, white = (0, 0, 0), (255, 255, 255)
    return black if contrast_ratio(fill, black) >= contrast_ratio(fill, white) else white


def font_size_for(h: int, w: int) -> int:
    """Label font size in pixels for an image of size (h, w): 3 + 1/40 of the short side, 9..72."""
    return int(min(_MAX_FONT, max(_MIN_FONT, round(3 + min(h, w) / 40))))


@functools.lru_cache(maxsize=32)
def _font(size: int) -> Font:
    """A scalable font of `size` px: Pillow's built-in one (>= 10.1), DejaVu, or the bitmap one."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        pass
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


@dataclass(frozen=True)
class _Style:
    """A font and the box geometry around one line of its text."""

    size: int
    font: Font
    top: int  # y offset of the line's top above the drawing origin
    line: int  # line height
    pad: int  # padding between text and box edge

    @classmethod
    @functools.lru_cache(maxsize=32)
    def make(cls, size: int) -> _Style:
        font = _font(size)
        _, top, _, bottom = (int(v) for v in font.getbbox("Ayg|"))
        return cls(size, font, top, bottom - top, max(1, round(size * 0.2)))

    def text_width(self, text: str) -> int:
        x0, _, x1, _ = self.font.getbbox(text)
        return int(math.ceil(max(x1, self.font.getlength(text)) - min(x0, 0)))

    @property
    def spacing(self) -> int:
        """Gap between the lines of a two-line label."""
        return max(1, self.pad // 2)

    def box_size(self, text: str) -> tuple[int, int]:
        """(height, width) of the box around `text` (lines split at "\\n")."""
        lines = text.split("\n")
        height = len(lines) * self.line + (len(lines) - 1) * self.spacing
        return height + 2 * self.pad, max(self.text_width(t) for t in lines) + 2 * self.pad

    def draw(self, draw: ImageDraw.ImageDraw, box: TextBox, centre: bool) -> None:
        """Draw the text of `box` in it, each line centred or left-aligned."""
        y = box.box[1] + self.pad - self.top
        for line in box.text.split("\n"):
            left = min(0, int(self.font.getbbox(line)[0]))
            x = box.box[0] + self.pad
            if centre:
                x = (box.box[0] + box.box[2] - self.text_width(line)) // 2
            draw.text((x - left, y), line, fill=box.ink, font=self.font)
            y += self.line + self.spacing

    def fit(self, text: str, width: int) -> str:
        """`text`, shortened with an ellipsis to at most `width` px ("" if not even that fits)."""
        if self.text_width(text) <= width:
            return text
        lo, hi = 0, len(text)  # the longest prefix + "…" that fits: bisect on its length
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.text_width(text[:mid].rstrip() + "…") <= width:
                lo = mid
            else:
                hi = mid - 1
        short = text[:lo].rstrip() + "…"
        return short if self.text_width(short) <= width else ""


# ------------------------------------------------------------------------------------------------
# layout
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextBox:
    """One box drawn on the overlay: a filled rectangle, possibly with one line of text."""

    kind: str
    """"label" (inside its mask), "tag" (a legend row's number at its mask), "legend" (the
    legend's background), "swatch" (a legend row's colour and number) or "entry" (a row's text)."""
    index: int
    """The mask it belongs to; -1 for the legend background and its "+k more" row."""
    text: str
    box: Box
    fill: Colour
    ink: Colour
    font_size: int


@dataclass(frozen=True)
class OverlayLayout:
    """Everything `draw_overlay` puts over the tinted masks, in drawing order."""

    size: tuple[int, int]
    """(H, W) of the image (and the overlay)."""
    font_size: int
    boxes: tuple[TextBox, ...]

    def of_kind(self, *kinds: str) -> list[TextBox]:
        """The boxes of the given kinds."""
        return [b for b in self.boxes if b.kind in kinds]

    @property
    def legend(self) -> TextBox | None:
        """The legend's background box, or None when every label fits inside its mask."""
        found = self.of_kind("legend")
        return found[0] if found else None


def _integral(a: np.ndarray) -> np.ndarray:
    """Summed-area table with a leading zero row and column."""
    s = np.zeros((a.shape[0] + 1, a.shape[1] + 1), dtype=np.float64)
    s[1:, 1:] = a.astype(np.float64).cumsum(0).cumsum(1)
    return s


def _window_sums(a: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """Sum of `a` over every kh x kw window, indexed by the window's top-left cell."""
    s = _integral(a)
    return s[kh:, kw:] - s[:-kh, kw:] - s[kh:, :-kw] + s[:-kh, :-kw]


def _reduce(a: np.ndarray, s: int, how: str, fill: bool) -> np.ndarray:
    """Block-reduce a bool array by `s` with all/any, padding the far edges with `fill`."""
    if s == 1:
        return a
    h, w = a.shape
    hc, wc = -(-h // s), -(-w // s)
    padded = np.full((hc * s, wc * s), fill, dtype=bool)
    padded[:h, :w] = a
    blocks = padded.reshape(hc, s, wc, s)
    return blocks.all(axis=(1, 3)) if how == "all" else blocks.any(axis=(1, 3))


def _best_window(
    allowed: np.ndarray, score: np.ndarray, kh: int, kw: int
) -> tuple[int, int] | None:
    """Top-left cell of the kh x kw window of all-`allowed` cells with the best centre `score`."""
    hc, wc = allowed.shape
    if kh > hc or kw > wc:
        return None
    ok = _window_sums(allowed, kh, kw) == kh * kw
    if not ok.any():
        return None
    centre = score[kh // 2 : kh // 2 + hc - kh + 1, kw // 2 : kw // 2 + wc - kw + 1]
    gy, gx = np.unravel_index(np.argmax(np.where(ok, centre, -np.inf)), ok.shape)
    return int(gy), int(gx)


class _Mask:
    """One mask's crop, on a grid of s x s pixel cells, with its distance transforms."""

    def __init__(self, mask: np.ndarray, region: np.ndarray, bbox: Box, cell: int) -> None:
        x0, y0, x1, y1 = bbox
        self.bbox = bbox
        self.s = max(1, min(cell, math.ceil(max(y1 - y0, x1 - x0) / _CELLS)))
        self.full = _reduce(mask[y0:y1, x0:x1], self.s, "all", False)
        part = _reduce(region, self.s, "all", False)
        # where a label may go, in order: off the smaller masks inside this one, then anywhere
        self.tries = [(self.full, self._score(self.full))]
        if part.any() and not np.array_equal(part, self.full):
            self.tries.insert(0, (part, self._score(part)))

    def _score(self, cells: np.ndarray) -> np.ndarray:
        """Distance to the nearest outside cell, with a tie-break towards the centroid."""
        dist = ndimage.distance_transform_edt(np.pad(cells, 1))[1:-1, 1:-1]
        if not cells.any():
            return dist
        ys, xs = np.nonzero(cells)
        gy, gx = np.ogrid[: cells.shape[0], : cells.shape[1]]
        off = np.hypot(gy - ys.mean(), gx - xs.mean())
        return dist - 1e-3 * off / max(cells.shape)

    def occupied(self, occ: np.ndarray) -> np.ndarray:
        """The occupancy map over this mask's cells (a cell counts if any pixel is taken)."""
        x0, y0, _, _ = self.bbox
        hc, wc = self.full.shape
        s = self.s
        crop = np.ones((hc * s, wc * s), dtype=bool)
        part = occ[y0 : y0 + hc * s, x0 : x0 + wc * s]
        crop[: part.shape[0], : part.shape[1]] = part
        return _reduce(crop, s, "any", True)

    def place_inside(self, occ: np.ndarray, bh: int, bw: int) -> Box | None:
        """A bh x bw box inside the mask (preferably off smaller masks) on free pixels."""
        taken = self.occupied(occ)
        kh, kw = -(-bh // self.s), -(-bw // self.s)
        for cells, score in self.tries:
            at = _best_window(cells & ~taken, score, kh, kw)
            if at is not None:
                y = self.bbox[1] + at[0] * self.s + (kh * self.s - bh) // 2
                x = self.bbox[0] + at[1] * self.s + (kw * self.s - bw) // 2
                return x, y, x + bw, y + bh
        return None


def _place_near(mask: np.ndarray, bbox: Box, occ: np.ndarray, bh: int, bw: int) -> Box | None:
    """A bh x bw box on free pixels of the image, as close to the mask as possible."""
    h, w = mask.shape
    x0, y0, x1, y1 = bbox
    m = max(bh, bw) + 2
    cx0, cy0, cx1, cy1 = max(0, x0 - m), max(0, y0 - m), min(w, x1 + m), min(h, y1 + m)
    s = max(1, math.ceil(max(cy1 - cy0, cx1 - cx0) / _CELLS))
    free = _reduce(~occ[cy0:cy1, cx0:cx1], s, "all", False)
    near = _reduce(mask[cy0:cy1, cx0:cx1], s, "any", False)
    score = -ndimage.distance_transform_edt(~near)
    kh, kw = -(-bh // s), -(-bw // s)
    at = _best_window(free & ~near, score, kh, kw)  # beside the mask, leaving it visible
    if at is None:
        at = _best_window(free, score, kh, kw)
    if at is None:
        return None
    y = min(cy0 + at[0] * s, h - bh)
    x = min(cx0 + at[1] * s, w - bw)
    return x, y, x + bw, y + bh


def _mark(occ: np.ndarray, box: Box, gap: int) -> None:
    x0, y0, x1, y1 = box
    occ[max(0, y0 - gap) : y1 + gap, max(0, x0 - gap) : x1 + gap] = True


def _overlaps(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _contains(outer: Box, inner: Box) -> bool:
    return all(outer[k] <= inner[k] for k in (0, 1)) and all(inner[k] <= outer[k] for k in (2, 3))


def _legend(
    rows: list[tuple[int, str, Colour]], style: _Style, h: int, w: int
) -> tuple[int, int, list[TextBox]] | None:
    """Legend boxes laid out from (0, 0), with its (height, width); None if nothing fits.

    `rows` are (mask index, text, colour) in legend order; row k is numbered k + 1. Rows go in
    columns, as long as they cover at most half the image's width, when the image is too short;
    what still does not fit is summed up as "+k more".
    """
    pad, margin = style.pad, max(2, style.pad)
    row_h = style.line + 2 * pad
    gap = max(1, pad // 2)
    swatch_w = max(row_h, style.text_width(str(len(rows))) + 2 * pad)
    avail_h, avail_w = h - 2 * margin - 2 * pad, w - 2 * margin - 2 * pad
    max_rows = (avail_h + gap) // (row_h + gap)
    text_cap = avail_w - swatch_w - pad
    if max_rows < 1 or text_cap < style.text_width("…") + 2:
        return None
    col_text = min(text_cap, max(style.text_width(t) for _, t, _ in rows))
    col_w = swatch_w + pad + col_text
    n_rows = min(len(rows), max_rows)
    room = max(col_w, avail_w // 2)  # more columns only while they leave half the image free
    n_cols = min(-(-len(rows) // n_rows), max(1, (room + 2 * pad) // (col_w + 2 * pad)))
    shown = rows if n_rows * n_cols >= len(rows) else rows[: n_rows * n_cols - 1]
    n_rows = min(n_rows, len(shown) + (len(shown) < len(rows)))
    boxes: list[TextBox] = []
    ink = _LEGEND_INK
    for k in range(len(shown) + (len(shown) < len(rows))):
        r, c = k % n_rows, k // n_rows
        x = margin + pad + c * (col_w + 2 * pad)
        y = margin + pad + r * (row_h + gap)
        tx = (x + swatch_w + pad, y, x + col_w, y + row_h)
        if k < len(shown):
            i, text, colour = shown[k]
            sw = (x, y, x + swatch_w, y + row_h)
            boxes.append(TextBox("swatch", i, str(k + 1), sw, colour, _ink(colour), style.size))
            fitted = style.fit(text, col_text)
            boxes.append(TextBox("entry", i, fitted, tx, _LEGEND_BG, ink, style.size))
        else:
            more = style.fit(f"+{len(rows) - len(shown)} more", col_w)
            tx = (x, y, x + col_w, y + row_h)
            boxes.append(TextBox("entry", -1, more, tx, _LEGEND_BG, ink, style.size))
    width = max(b.box[2] for b in boxes) + pad + margin
    height = margin + pad + n_rows * (row_h + gap) - gap + pad + margin
    panel_box = (margin, margin, width - margin, height - margin)
    panel = TextBox("legend", -1, "", panel_box, _LEGEND_BG, ink, style.size)
    return height, width, [panel, *boxes]


def _shift(boxes: list[TextBox], dx: int, dy: int) -> list[TextBox]:
    """The boxes moved by (dx, dy)."""
    return [
        replace(b, box=(b.box[0] + dx, b.box[1] + dy, b.box[2] + dx, b.box[3] + dy)) for b in boxes
    ]


def label_layout(
    masks: np.ndarray | torch.Tensor,
    labels: Sequence[str],
    scores: Sequence[float] | np.ndarray | torch.Tensor,
    colours: np.ndarray | torch.Tensor | None = None,
) -> OverlayLayout:
    """Where `draw_overlay` puts each label, number tag and the legend (no drawing).

    `masks` is bool [N, H, W]; `colours` uint8 [N, 3] defaults to `palette(N)`. Every returned
    box lies in the image and no two of the labels, tags and legend overlap; a "label" box lies
    inside its mask.
    """
    masks = np.asarray(masks, dtype=bool)
    n, h, w = masks.shape
    size = font_size_for(h, w)
    if n == 0:
        return OverlayLayout((h, w), size, ())
    scores = np.asarray(scores, dtype=np.float64).reshape(n)
    cols = np.asarray(palette(n) if colours is None else colours, dtype=np.uint8).reshape(n, 3)
    colour = [tuple(int(v) for v in c) for c in cols]
    names = [" ".join(str(lab).split()) for lab in labels]
    texts = [f"{lab} {s:.2f}".strip() for lab, s in zip(names, scores.tolist(), strict=True)]
    styles = [_Style.make(size)]
    if round(size * 0.75) >= _MIN_FONT:
        styles.append(_Style.make(round(size * 0.75)))
    gap = styles[0].pad  # free pixels kept between two boxes

    rows_any, cols_any = masks.any(2), masks.any(1)
    areas = masks.reshape(n, -1).sum(1)
    order = [int(i) for i in np.argsort(areas, kind="stable") if areas[i] > 0]
    geoms: dict[int, _Mask] = {}
    covered = np.zeros((h, w), dtype=bool)  # union of the smaller masks: labels avoid them
    for i in order:
        ys, xs = np.flatnonzero(rows_any[i]), np.flatnonzero(cols_any[i])
        bbox = (int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1)
        crop = (slice(bbox[1], bbox[3]), slice(bbox[0], bbox[2]))
        region = masks[i][crop] & ~covered[crop]
        geoms[i] = _Mask(masks[i], region, bbox, max(1, styles[-1].line // 4))
        covered[crop] |= masks[i][crop]

    occ = np.zeros((h, w), dtype=bool)
    labels_at: dict[int, TextBox] = {}

    def place(i: int) -> bool:
        # "label score" on one line, then on two, in the full then the smaller font; then, for
        # tight masks, the label alone (the legend has the score when the label goes there)
        name, score = names[i], f"{scores[i]:.2f}"
        lines = [texts[i], f"{name}\n{score}"] if name else [texts[i]]
        candidates = [(t, st) for st in styles for t in lines]
        candidates += [(name, st) for st in styles] if name else []
        for text, st in candidates:
            bh, bw = st.box_size(text)
            box = geoms[i].place_inside(occ, bh, bw)
            if box is not None:
                fill = colour[i]
                labels_at[i] = TextBox("label", i, text, box, fill, _ink(fill), st.size)
                _mark(occ, box, gap)
                return True
        return False

    forced = [i for i in order if not place(i)]
    legend: list[TextBox] = []
    corner: tuple[bool, bool] | None = None  # (right, bottom), chosen once, then kept
    panel: Box | None = None
    legend_style = styles[0]
    while forced:
        rows = sorted(forced, key=lambda i: (-scores[i], i))
        made = _legend([(i, texts[i], colour[i]) for i in rows], legend_style, h, w)
        if made is None:
            break
        lh, lw, boxes = made
        if corner is None:
            corner = _corner(masks, areas, lh, lw)
        dx, dy = (w - lw if corner[0] else 0), (h - lh if corner[1] else 0)
        legend = _shift(boxes, dx, dy)
        new_panel = legend[0].box
        if panel is not None and _contains(panel, new_panel):
            break
        panel = new_panel
        moved = [i for i, b in labels_at.items() if _overlaps(b.box, panel)]
        for i in moved:  # labels under the grown legend: free their space and place them again
            del labels_at[i]
        occ[:] = False
        _mark(occ, panel, gap)
        for b in labels_at.values():
            _mark(occ, b.box, gap)
        forced += [i for i in moved if not place(i)]

    tags: list[TextBox] = []
    for b in legend:
        if b.kind != "swatch":
            continue
        i, st = b.index, legend_style
        bh, bw = st.box_size(b.text)
        box = geoms[i].place_inside(occ, bh, bw)
        if box is None:
            box = _place_near(masks[i], geoms[i].bbox, occ, bh, bw)
        if box is not None:
            tags.append(TextBox("tag", i, b.text, box, colour[i], _ink(colour[i]), st.size))
            _mark(occ, box, gap)
    placed = [labels_at[i] for i in order if i in labels_at]
    return OverlayLayout((h, w), size, tuple(placed + tags + legend))


def _corner(masks: np.ndarray, areas: np.ndarray, lh: int, lw: int) -> tuple[bool, bool]:
    """The corner (right, bottom) where an lh x lw box hides the least of the masks."""
    h, w = masks.shape[1:]
    best, best_cost = (True, False), math.inf
    for right, bottom in ((True, False), (False, False), (False, True), (True, True)):
        ys = slice(h - lh, h) if bottom else slice(0, lh)
        xs = slice(w - lw, w) if right else slice(0, lw)
        hidden = masks[:, ys, xs].reshape(len(masks), -1).sum(1)
        cost = float((hidden / np.maximum(areas, 1)).sum())
        if cost < best_cost - 1e-9:
            best, best_cost = (right, bottom), cost
    return best


# ------------------------------------------------------------------------------------------------
# drawing
# ------------------------------------------------------------------------------------------------


def _outline_width(h: int, w: int) -> int:
    """Mask outline width in pixels: 1 px per 400 px of the short side, at least 1."""
    return max(1, round(min(h, w) / 400))


def draw_overlay(
    base: np.ndarray | torch.Tensor,
    masks: np.ndarray | torch.Tensor,
    labels: Sequence[str],
    scores: Sequence[float] | np.ndarray | torch.Tensor,
    alpha: float = 0.5,
) -> Image.Image:
    """RGB image of `base` (uint8 [H, W, 3]) with the masks tinted, outlined and labelled.

    Masks are blended in order with their `palette` colour at `alpha` and get an inner outline
    in full colour; then the boxes of `label_layout` are drawn.
    """
    masks = np.asarray(masks, dtype=bool)
    n, h, w = masks.shape
    canvas = np.array(base, dtype=np.float32)  # a copy
    if n == 0:
        return Image.fromarray(canvas.astype(np.uint8), "RGB")
    colours = palette(n).numpy()
    width = _outline_width(h, w)
    rows_any, cols_any = masks.any(2), masks.any(1)
    for i in range(n):
        ys, xs = np.flatnonzero(rows_any[i]), np.flatnonzero(cols_any[i])
        if ys.size == 0:
            continue
        y0, y1 = max(0, int(ys[0]) - width), min(h, int(ys[-1]) + 1 + width)
        x0, x1 = max(0, int(xs[0]) - width), min(w, int(xs[-1]) + 1 + width)
        m = masks[i, y0:y1, x0:x1]
        sub = canvas[y0:y1, x0:x1]
        c = colours[i].astype(np.float32)
        np.copyto(sub, (1.0 - alpha) * sub + alpha * c, where=m[..., None])
        # inner outline: the mask minus its erosion; the image border counts as inside
        inner = ndimage.minimum_filter(m, size=2 * width + 1, mode="nearest")
        np.copyto(sub, c, where=(m & ~inner)[..., None])
    out = Image.fromarray(np.rint(canvas, out=canvas).clip(0, 255).astype(np.uint8), "RGB")

    layout = label_layout(masks, labels, scores, colours)
    draw = ImageDraw.Draw(out)
    for b in layout.boxes:
        draw.rectangle((b.box[0], b.box[1], b.box[2] - 1, b.box[3] - 1), fill=b.fill)
        if b.text:
            _Style.make(b.font_size).draw(draw, b, centre=b.kind != "entry")
    return out
