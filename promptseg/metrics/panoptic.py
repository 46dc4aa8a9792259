"""Panoptic quality (PQ, SQ, RQ) with panopticapi's exact rules.

Per-category int64 tp/fp/fn and float IoU sums merge exactly across shards; results keep
panopticapi's structure and scale (fractions in [0, 1], not percentages).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from promptseg.errors import PromptsegError

__all__ = [
    "OFFSET",
    "VOID",
    "PQStat",
    "PanopticFormatError",
    "id2rgb",
    "pq_compute",
    "pq_results",
    "pq_stat_image",
    "read_id_png",
    "rgb2id",
]

VOID = 0
OFFSET = 256 * 256 * 256  # segment ids are < 2**24 (three 8-bit channels)

Categories = Mapping[Any, Mapping[str, Any]] | Sequence[Mapping[str, Any]]


class PanopticFormatError(PromptsegError, ValueError):
    """Prediction PNG and JSON disagree, or an input is malformed; the message names the image."""


def rgb2id(color: np.ndarray) -> np.ndarray:
    """Segment id map from an RGB(A) array [H, W, >=3]: id = R + 256 G + 256^2 B (alpha ignored)."""
    color = np.asarray(color)
    if color.ndim != 3 or color.shape[-1] < 3:
        raise ValueError(f"rgb2id expects an array [H, W, 3], got shape {color.shape}")
    c = color[..., :3].astype(np.int64)
    return c[..., 0] + 256 * c[..., 1] + 256 * 256 * c[..., 2]


def id2rgb(id_map: np.ndarray) -> np.ndarray:
    """RGB uint8 array [H, W, 3] encoding a segment id map (inverse of `rgb2id`), to write PNGs."""
    ids = np.asarray(id_map).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= OFFSET):
        raise ValueError(f"segment ids must lie in [0, {OFFSET}), got {ids.min()}..{ids.max()}")
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def read_id_png(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a panoptic PNG (RGB or RGBA) as an int64 segment id map [H, W]."""
    with Image.open(path) as im:
        if im.mode not in ("RGB", "RGBA"):
            raise PanopticFormatError(
                f"{path}: panoptic PNGs must be RGB (id = R + 256 G + 256^2 B), "
                f"got PIL mode {im.mode!r}"
            )
        return rgb2id(np.asarray(im))


def _as_id_map(x: np.ndarray, name: str) -> np.ndarray:
    """Return an int64 id map [H, W] from an id map or an RGB-encoded array [H, W, 3]."""
    a = np.asarray(x)
    if a.ndim == 3:
        return rgb2id(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be an id map [H, W] or RGB [H, W, 3], got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise ValueError(f"{name} must have an integer dtype, got {a.dtype}")
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= OFFSET):
        raise ValueError(f"{name}: segment ids must lie in [0, 2**24), got {a.min()}..{a.max()}")
    return a


def _segment_id(segment: Any, where: str, what: str) -> int:
    """The int id of one `segments_info` entry, which must also have a hashable category_id."""
    if not isinstance(segment, Mapping) or "id" not in segment or "category_id" not in segment:
        raise PanopticFormatError(
            f"{where}: each {what} segment must be a dict with 'id' and 'category_id', "
            f"got {segment!r}"
        )
    sid, cat = segment["id"], segment["category_id"]
    if isinstance(sid, bool) or not isinstance(sid, numbers.Integral):
        raise PanopticFormatError(f"{where}: {what} segment id must be an int, got {sid!r}")
    if not isinstance(cat, int | str) or isinstance(cat, bool):
        raise PanopticFormatError(
            f"{where}: {what} segment {sid} has category_id {cat!r}; expected an int (or str)"
        )
    return int(sid)


def _category_table(categories: Categories) -> dict[Any, Mapping[str, Any]]:
    """Categories as panopticapi's {category_id: category dict} (a list is keyed by 'id')."""
    if isinstance(categories, Mapping):
        table = dict(categories)
    else:
        if not all(isinstance(c, Mapping) and "id" in c for c in categories):
            raise ValueError("categories must be dicts with an 'id' (and 'isthing' 0 / 1)")
        table = {c["id"]: c for c in categories}
    bad = [
        k for k, c in table.items() if not isinstance(c, Mapping) or c.get("isthing") not in (0, 1)
    ]
    if bad:
        raise ValueError(f"categories {bad[:5]} lack 'isthing' (0 or 1), which PQ needs")
    return table


class PQStat:
    """Per-category PQ accumulators: int64 tp / fp / fn and float64 IoU sums per category id."""

    def __init__(self, category_ids: Iterable[Any] = ()) -> None:
        self.category_ids: list[Any] = []
        self._index: dict[Any, int] = {}
        self.tp = np.zeros(0, dtype=np.int64)
        self.fp = np.zeros(0, dtype=np.int64)
        self.fn = np.zeros(0, dtype=np.int64)
        self.iou = np.zeros(0, dtype=np.float64)
        for c in category_ids:
            self.index(c)

    def index(self, category_id: Any) -> int:
        """Position of a category in the arrays, appending a zero row for a new category."""
        i = self._index.get(category_id)
        if i is None:
            i = len(self.category_ids)
            self._index[category_id] = i
            self.category_ids.append(category_id)
            self.tp = np.append(self.tp, np.int64(0))
            self.fp = np.append(self.fp, np.int64(0))
            self.fn = np.append(self.fn, np.int64(0))
            self.iou = np.append(self.iou, 0.0)
        return i

    def get(self, category_id: Any) -> dict[str, float | int]:
        """Counters of one category as {'tp', 'fp', 'fn', 'iou'} (zeros if never seen)."""
        i = self._index.get(category_id)
        if i is None:
            return {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0}
        return {
            "tp": int(self.tp[i]),
            "fp": int(self.fp[i]),
            "fn": int(self.fn[i]),
            "iou": float(self.iou[i]),
        }

    def merge(self, other: PQStat) -> PQStat:
        """Add another stat into this one in place (categories aligned by id) and return self."""
        for j, c in enumerate(other.category_ids):
            i = self.index(c)
            self.tp[i] += other.tp[j]
            self.fp[i] += other.fp[j]
            self.fn[i] += other.fn[j]
            self.iou[i] += other.iou[j]
        return self

    def __iadd__(self, other: PQStat) -> PQStat:
        return self.merge(other)

    def state_dict(self) -> dict[str, list[Any]]:
        """JSON-serialisable raw accumulators (floats round-trip exactly through json)."""
        return {
            "category_ids": list(self.category_ids),
            "tp": self.tp.tolist(),
            "fp": self.fp.tolist(),
            "fn": self.fn.tolist(),
            "iou": self.iou.tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Sequence[Any]]) -> None:
        """Replace the accumulators by those of `state_dict()` output."""
        ids = list(state["category_ids"])
        arrays = {k: np.asarray(state[k]) for k in ("tp", "fp", "fn", "iou")}
        if len(set(ids)) != len(ids) or any(a.shape != (len(ids),) for a in arrays.values()):
            raise ValueError(
                "PQStat state: category_ids must be unique and match every array's length"
            )
        self.category_ids = ids
        self._index = {c: i for i, c in enumerate(ids)}
        self.tp, self.fp, self.fn = (arrays[k].astype(np.int64) for k in ("tp", "fp", "fn"))
        self.iou = arrays["iou"].astype(np.float64)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Sequence[Any]]) -> PQStat:
        """New stat holding the accumulators of `state`."""
        stat = cls()
        stat.load_state_dict(state)
        return stat

    def pq_average(
        self, categories: Categories, isthing: bool | None = None
    ) -> tuple[dict[str, float | int], dict[Any, dict[str, float]]]:
        """panopticapi's mean over things / stuff / all (None) categories with tp + fp + fn > 0;
        an empty selection gives NaN with a warning where panopticapi divides by zero."""
        table = _category_table(categories)
        pq = sq = rq = 0.0
        n = 0
        per_class: dict[Any, dict[str, float]] = {}
        for label, info in table.items():
            if isthing is not None and (info["isthing"] == 1) != isthing:
                continue
            s = self.get(label)
            tp, fp, fn, iou = s["tp"], s["fp"], s["fn"], s["iou"]
            if tp + fp + fn == 0:
                per_class[label] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            n += 1
            pq_class = iou / (tp + 0.5 * fp + 0.5 * fn)
            sq_class = iou / tp if tp != 0 else 0.0
            rq_class = tp / (tp + 0.5 * fp + 0.5 * fn)
            per_class[label] = {"pq": pq_class, "sq": sq_class, "rq": rq_class}
            pq += pq_class
            sq += sq_class
            rq += rq_class
        if n == 0:
            split = {None: "All", True: "Things", False: "Stuff"}[isthing]
            warnings.warn(
                f"PQ: no {split} category has any tp/fp/fn; its PQ/SQ/RQ are NaN",
                RuntimeWarning,
                stacklevel=2,
            )
            return {"pq": math.nan, "sq": math.nan, "rq": math.nan, "n": 0}, per_class
        return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}, per_class


def pq_results(stat: PQStat, categories: Categories) -> dict[str, Any]:
    """panopticapi's result dict: 'All', 'Things', 'Stuff' ({pq, sq, rq, n}) and 'per_class'."""
    results: dict[str, Any] = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        results[name], per_class = stat.pq_average(categories, isthing=isthing)
        if name == "All":
            results["per_class"] = per_class
    return results


def pq_stat_image(
    gt_id_map: np.ndarray,
    gt_segments: Sequence[Mapping[str, Any]],
    pred_id_map: np.ndarray,
    pred_segments: Sequence[Mapping[str, Any]],
    categories: Categories | Iterable[Any],
    image_id: Any = None,
) -> PQStat:
    """PQ accumulators of one image from id maps ([H, W] ids or [H, W, 3] RGB) and `segments_info`;
    GT areas from the GT JSON, prediction areas from pixels, only the prediction is checked."""
    where = f"image {image_id!r}" if image_id is not None else "image"
    gt = _as_id_map(gt_id_map, "gt_id_map")
    pred = _as_id_map(pred_id_map, "pred_id_map")
    if gt.shape != pred.shape:
        raise PanopticFormatError(
            f"{where}: GT size {gt.shape} differs from prediction size {pred.shape}"
        )
    if isinstance(categories, Mapping):
        cat_ids = list(categories)
    else:
        cat_ids = [c["id"] if isinstance(c, Mapping) else c for c in categories]
    known = set(cat_ids)
    stat = PQStat(cat_ids)

    gt_segms = {_segment_id(s, where, "GT"): s for s in gt_segments}
    pred_cat: dict[int, Any] = {}
    for s in pred_segments:
        sid = _segment_id(s, where, "prediction")
        if sid in pred_cat:
            raise PanopticFormatError(
                f"{where}: segment id {sid} occurs twice in the prediction JSON"
            )
        pred_cat[sid] = s["category_id"]

    # prediction areas from pixels + sanity checks (panopticapi's order of checks)
    pred_area: dict[int, int] = {}
    labels, counts = np.unique(pred, return_counts=True)
    for label, cnt in zip(labels.tolist(), counts.tolist(), strict=True):
        if label not in pred_cat:
            if label == VOID:
                continue
            raise PanopticFormatError(
                f"{where}: segment id {label} is present in the prediction PNG but not in its JSON"
            )
        if pred_cat[label] not in known:
            raise PanopticFormatError(
                f"{where}: prediction segment {label} has unknown category_id {pred_cat[label]!r}"
            )
        pred_area[label] = cnt
    absent = sorted(set(pred_cat) - set(pred_area))
    if absent:
        raise PanopticFormatError(
            f"{where}: segment ids {absent} are in the prediction JSON but not in its PNG"
        )

    # joint pixel counts of (gt id, pred id), VOID included
    joint, inter = np.unique(gt * OFFSET + pred, return_counts=True)
    pairs = list(
        zip((joint // OFFSET).tolist(), (joint % OFFSET).tolist(), inter.tolist(), strict=True)
    )
    n_void = {p: n for g, p, n in pairs if g == VOID}

    gt_pixels: dict[int, int] = {}
    for g, _, n in pairs:
        gt_pixels[g] = gt_pixels.get(g, 0) + n

    def gt_area(g: int) -> int:
        area = gt_segms[g].get("area")
        if area is None:
            raise PanopticFormatError(f"{where}: GT segment {g} has no 'area' in its JSON")
        if (
            isinstance(area, bool)
            or not isinstance(area, numbers.Real)
            or not math.isfinite(area)
            or area < gt_pixels[g]
        ):
            raise PanopticFormatError(
                f"{where}: GT segment {g} has 'area' {area!r} in its JSON; it must be a number "
                f"of at least its {gt_pixels[g]} pixels in the PNG"
            )
        return int(area)

    gt_matched: set[int] = set()
    pred_matched: set[int] = set()
    for g, p, n in pairs:
        if g not in gt_segms or p not in pred_cat:
            continue
        gs = gt_segms[g]
        if gs.get("iscrowd", 0) == 1 or gs["category_id"] != pred_cat[p]:
            continue
        union = pred_area[p] + gt_area(g) - n - n_void.get(p, 0)
        iou = n / union
        if iou > 0.5:
            i = stat.index(gs["category_id"])
            stat.tp[i] += 1
            stat.iou[i] += iou
            gt_matched.add(g)
            pred_matched.add(p)

    crowd_of: dict[Any, int] = {}
    for g, gs in gt_segms.items():
        if g in gt_matched:
            continue
        if gs.get("iscrowd", 0) == 1:
            crowd_of[gs["category_id"]] = g  # the last crowd segment of a category wins
            continue
        stat.fn[stat.index(gs["category_id"])] += 1

    joint_map = {(g, p): n for g, p, n in pairs}
    for p, cat in pred_cat.items():
        if p in pred_matched:
            continue
        excused = n_void.get(p, 0)
        if cat in crowd_of:
            excused += joint_map.get((crowd_of[cat], p), 0)
        if excused / pred_area[p] > 0.5:
            continue
        stat.fp[stat.index(cat)] += 1
    return stat


def _load_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a JSON file."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _default_folder(json_file: str | os.PathLike[str]) -> Path:
    """panopticapi's default PNG folder: the JSON path without its '.json' suffix."""
    s = os.fspath(json_file)
    return Path(s[: -len(".json")] if s.endswith(".json") else s)


def pq_compute(
    gt_json_file: str | os.PathLike[str],
    pred_json_file: str | os.PathLike[str],
    gt_folder: str | os.PathLike[str] | None = None,
    pred_folder: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """panopticapi's pq_compute: {'All', 'Things', 'Stuff': {pq, sq, rq, n}, 'per_class': {id: {pq,
    sq, rq}}} as fractions, for a prediction JSON + PNG folder against the GT ones."""
    gt_json = _load_json(gt_json_file)
    pred_json = _load_json(pred_json_file)
    gt_dir = Path(gt_folder) if gt_folder is not None else _default_folder(gt_json_file)
    pred_dir = Path(pred_folder) if pred_folder is not None else _default_folder(pred_json_file)
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"folder {gt_dir} with ground truth segmentations doesn't exist")
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"folder {pred_dir} with predicted segmentations doesn't exist")
    categories = {c["id"]: c for c in gt_json["categories"]}

    pred_annotations: dict[Any, Mapping[str, Any]] = {}
    for ann in pred_json["annotations"]:
        if ann["image_id"] in pred_annotations:
            raise PanopticFormatError(
                f"prediction JSON has two annotations for image {ann['image_id']!r}"
            )
        pred_annotations[ann["image_id"]] = ann
    missing = [
        a["image_id"] for a in gt_json["annotations"] if a["image_id"] not in pred_annotations
    ]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise PanopticFormatError(f"no prediction for {len(missing)} GT image(s): {shown}")

    stat = PQStat(categories)
    for gt_ann in gt_json["annotations"]:
        pred_ann = pred_annotations[gt_ann["image_id"]]
        stat.merge(
            pq_stat_image(
                read_id_png(gt_dir / gt_ann["file_name"]),
                gt_ann["segments_info"],
                read_id_png(pred_dir / pred_ann["file_name"]),
                pred_ann["segments_info"],
                categories,
                image_id=gt_ann["image_id"],
            )
        )
    return pq_results(stat, categories)
