"""COCO mask (or box) AP by calling pycocotools' COCOeval, fed as the COCO protocol prescribes.

pycocotools is the reference, so it is not re-implemented: this module only prepares the inputs
(drops `bbox` from segm results, str RLE counts, no mutation of the caller's dicts), silences its
printing and returns the 12 summary statistics by name, ×100 as detectron2 reports them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ._arrays import as_int

__all__ = ["STAT_NAMES", "coco_mask_ap"]

#: Names of COCOeval.stats[0..11], in order.
STAT_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)


def _check_number(value: Any, what: str) -> None:
    """A finite real number (not a bool), else a TypeError / ValueError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}")


def _check_rle(seg: Any, where: str) -> dict[str, Any]:
    """A COCO compressed RLE {"size": [H, W], "counts": str | bytes}, counts as str."""
    if not isinstance(seg, Mapping):
        raise TypeError(
            f"{where}: 'segmentation' must be a COCO RLE dict {{'size': [H, W], 'counts': str}} "
            f"(pycocotools.mask.encode), got {type(seg).__name__}"
        )
    size, counts = seg.get("size"), seg.get("counts")
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in size)
        or min(size) < 0
    ):
        raise ValueError(f"{where}: RLE 'size' must be [H, W] (two ints >= 0), got {size!r}")
    if not isinstance(counts, str | bytes):
        raise TypeError(
            f"{where}: RLE 'counts' must be the compressed string of pycocotools.mask.encode, "
            f"got {type(counts).__name__}"
        )
    out = dict(seg)
    out["size"] = [int(v) for v in size]
    out["counts"] = counts.decode("ascii") if isinstance(counts, bytes) else counts
    return out


def _prepare_detection(det: Any, iou_type: str, i: int) -> dict[str, Any]:
    """Copy one result dict into what loadRes expects for `iou_type`, checking its fields."""
    where = f"detection {i}"
    if not isinstance(det, Mapping):
        raise TypeError(f"{where} must be a dict, got {type(det).__name__}")
    missing = [k for k in ("image_id", "category_id", "score") if k not in det]
    if missing:
        raise ValueError(f"{where} lacks {missing}; each needs image_id, category_id and score")
    for key in ("image_id", "category_id"):
        if not isinstance(det[key], int | str) or isinstance(det[key], bool):
            raise TypeError(f"{where}: {key} must be an int (or str id), got {det[key]!r}")
    _check_number(det["score"], f"{where}: score")
    d = dict(det)
    seg = d.get("segmentation")
    if seg is not None:
        seg = d["segmentation"] = _check_rle(seg, where)
    if iou_type == "segm":
        if seg is None:
            raise ValueError(f"{where}: segm detections need a 'segmentation' (COCO RLE)")
        # With a bbox present, loadRes would take the detection's area from the box (APs/APm/APl
        # change).
        d.pop("bbox", None)
    elif "bbox" in d:
        box = d["bbox"]
        if not isinstance(box, Sequence) or isinstance(box, str) or len(box) != 4:
            raise ValueError(f"{where}: bbox must be [x, y, w, h], got {box!r}")
        for v in box:
            _check_number(v, f"{where}: bbox value")
    else:
        if seg is None:
            raise ValueError(
                f"{where}: bbox detections need a 'bbox' or a 'segmentation' to derive it from"
            )
        from pycocotools import mask as mask_utils

        d["bbox"] = [float(v) for v in mask_utils.toBbox(seg)]
        d.pop("segmentation")
    return d


def coco_mask_ap(
    gt_coco: Mapping[str, Any] | str | os.PathLike[str],
    detections: Sequence[Mapping[str, Any]],
    iou_type: str = "segm",
    cat_ids: Iterable[int] | None = None,
    img_ids: Iterable[Any] | None = None,
    verbose: bool = False,
) -> dict[str, float | bool]:
    """COCOeval summary of `detections` against COCO-format ground truth `gt_coco` (dict or path).

    Detections: dicts with image_id, category_id (dataset id), score and `segmentation` as COCO RLE
    ({"size": [H, W], "counts": str}) at original image size. `cat_ids` / `img_ids` restrict the
    evaluation (e.g. the 20 COCO-NOVEL ids). Returns the 12 stats by name in percent; a stat that
    COCOeval leaves undefined (−1: no GT in that area range) becomes NaN, as in detectron2. An empty
    detection list gives 0.0 everywhere and `empty_predictions: True` without calling pycocotools
    (it fails on empty input). pycocotools' printing is suppressed unless `verbose`.
    """
    if iou_type not in ("segm", "bbox"):
        raise ValueError(f"iou_type must be 'segm' or 'bbox', not {iou_type!r}")
    if isinstance(detections, str | bytes | Mapping) or not isinstance(detections, Sequence):
        raise TypeError(
            f"detections must be a list of result dicts, got {type(detections).__name__}"
        )
    if not isinstance(gt_coco, Mapping | str | os.PathLike):
        raise TypeError(
            f"gt_coco must be a COCO dict or a path to its JSON, got {type(gt_coco).__name__}"
        )
    if len(detections) == 0:
        out: dict[str, float | bool] = dict.fromkeys(STAT_NAMES, 0.0)
        out["empty_predictions"] = True
        return out

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = [_prepare_detection(d, iou_type, i) for i, d in enumerate(detections)]
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        if isinstance(gt_coco, Mapping):
            gt = COCO()
            gt.dataset = copy.deepcopy(dict(gt_coco))
            gt.createIndex()
        else:
            with open(gt_coco, encoding="utf-8") as f:
                data = json.load(f)
            gt = COCO()
            gt.dataset = data
            gt.createIndex()
        if not isinstance(gt.dataset.get("images"), list):
            raise ValueError("gt_coco has no 'images' list; it must be a COCO-format dataset")
        unknown = {r["image_id"] for r in results} - set(gt.getImgIds())
        if unknown:
            shown = sorted(unknown, key=repr)[:5]
            raise ValueError(f"detections refer to image ids not in the GT: {shown}")
        for i, r in enumerate(results):
            img = gt.imgs[r["image_id"]]
            hw = [img.get("height"), img.get("width")]
            if "segmentation" in r and None not in hw and r["segmentation"]["size"] != hw:
                raise ValueError(
                    f"detection {i}: RLE size {r['segmentation']['size']} differs from image "
                    f"{r['image_id']!r} size {hw}; encode masks at the original image size"
                )
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType=iou_type)
        if cat_ids is not None:
            ev.params.catIds = sorted(as_int(c, "each of cat_ids") for c in cat_ids)
        if img_ids is not None:
            ev.params.imgIds = sorted(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {
        name: (100.0 * float(v) if v >= 0 else float("nan"))
        for name, v in zip(STAT_NAMES, ev.stats, strict=True)
    }
    out["empty_predictions"] = False
    return out
