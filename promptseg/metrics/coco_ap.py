"""COCO mask (or box) AP by calling pycocotools' COCOeval, fed as benchmarks.md §3.3 prescribes.

pycocotools is the reference, so it is not re-implemented: this module only prepares the inputs
(drops `bbox` from segm results, str RLE counts, no mutation of the caller's dicts), silences its
printing and returns the 12 summary statistics by name, ×100 as detectron2 reports them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

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


def _prepare_detection(det: Mapping[str, Any], iou_type: str) -> dict[str, Any]:
    """Copy one result dict into what loadRes expects for `iou_type`."""
    d = dict(det)
    seg = d.get("segmentation")
    if isinstance(seg, Mapping):
        seg = dict(seg)
        counts = seg.get("counts")
        if isinstance(counts, bytes):
            seg["counts"] = counts.decode("ascii")
        d["segmentation"] = seg
    if iou_type == "segm":
        if seg is None:
            raise ValueError("segm detections need a 'segmentation' (COCO RLE)")
        # With a bbox present, loadRes would take the detection's area from the box (APs/APm/APl
        # change).
        d.pop("bbox", None)
    elif iou_type == "bbox" and "bbox" not in d:
        if seg is None:
            raise ValueError("bbox detections need a 'bbox' or a 'segmentation' to derive it from")
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
    if len(detections) == 0:
        out: dict[str, float | bool] = dict.fromkeys(STAT_NAMES, 0.0)
        out["empty_predictions"] = True
        return out

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = [_prepare_detection(d, iou_type) for d in detections]
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
        unknown = {r["image_id"] for r in results} - set(gt.getImgIds())
        if unknown:
            raise ValueError(f"detections refer to image ids not in the GT: {sorted(unknown)[:5]}")
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType=iou_type)
        if cat_ids is not None:
            ev.params.catIds = sorted(int(c) for c in cat_ids)
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
