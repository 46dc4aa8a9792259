"""Tests of promptseg.metrics.coco_ap: benchmarks.md §3.3 examples, pycocotools as the oracle."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from promptseg.metrics.coco_ap import STAT_NAMES, coco_mask_ap  # noqa: E402

H = W = 10


def box(x0: int, y0: int, x1: int, y1: int, h: int = H, w: int = W) -> np.ndarray:
    """Ones on rows y0..y1-1 and columns x0..x1-1 (the spec's box())."""
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")}


def make_gt(
    anns: list[tuple[int, int, np.ndarray, int]], n_images: int = 1, n_cats: int = 1
) -> dict:
    """anns: (image_id, category_id, mask, iscrowd)."""
    annotations = []
    for i, (img, cat, mask, crowd) in enumerate(anns, start=1):
        seg = rle(mask)
        annotations.append(
            {
                "id": i,
                "image_id": img,
                "category_id": cat,
                "segmentation": seg,
                "area": float(mask.sum()),
                "bbox": [float(v) for v in mask_utils.toBbox(seg)],
                "iscrowd": crowd,
            }
        )
    return {
        "images": [{"id": i, "height": H, "width": W} for i in range(1, n_images + 1)],
        "categories": [{"id": c, "name": f"c{c}"} for c in range(1, n_cats + 1)],
        "annotations": annotations,
    }


def det(img: int, cat: int, mask: np.ndarray, score: float) -> dict:
    return {"image_id": img, "category_id": cat, "segmentation": rle(mask), "score": score}


def reference_stats(
    gt: dict, dets: list[dict], iou_type: str = "segm", **params: list
) -> np.ndarray:
    """COCOeval run directly (the oracle), silently."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(dets)), iouType=iou_type)
        for k, v in params.items():
            setattr(ev.params, k, v)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def assert_matches_reference(res: dict, stats: np.ndarray) -> None:
    for name, v in zip(STAT_NAMES, stats, strict=True):
        if v < 0:
            assert math.isnan(res[name]), name
        else:
            assert res[name] == pytest.approx(100 * v, abs=1e-10), name


def test_ap1_greedy_score_order() -> None:
    gt = make_gt([(1, 1, box(2, 2, 6, 6), 0)])
    dets = [det(1, 1, box(3, 2, 7, 6), 0.9), det(1, 1, box(2, 2, 6, 6), 0.8)]
    res = coco_mask_ap(gt, dets)
    assert res["AP"] == pytest.approx(65.0, abs=1e-4)
    assert res["AP50"] == pytest.approx(100.0) and res["AP75"] == pytest.approx(50.0)
    assert res["AR1"] == pytest.approx(30.0) and res["AR100"] == pytest.approx(100.0)
    assert res["APs"] == pytest.approx(65.0, abs=1e-4)
    assert math.isnan(res["APm"]) and math.isnan(res["APl"])  # COCOeval's -1 -> NaN
    assert res["empty_predictions"] is False
    assert_matches_reference(res, reference_stats(gt, dets))
    swapped = [dict(dets[0], score=0.8), dict(dets[1], score=0.9)]
    assert coco_mask_ap(gt, swapped)["AP"] == pytest.approx(100.0)


def test_ap2_crowd_absorbs_detection() -> None:
    anns = [(1, 1, box(0, 0, 10, 3), 1), (1, 1, box(2, 5, 6, 9), 0)]
    dets = [det(1, 1, box(1, 0, 5, 2), 0.95), det(1, 1, box(2, 5, 6, 8), 0.6)]
    gt = make_gt(anns)
    res = coco_mask_ap(gt, dets)
    assert res["AP"] == pytest.approx(60.0, abs=1e-4)
    assert res["AR1"] == 0.0 and res["AR100"] == pytest.approx(60.0)
    assert_matches_reference(res, reference_stats(gt, dets))
    gt_no_crowd = make_gt([(1, 1, anns[0][2], 0), anns[1]])
    res2 = coco_mask_ap(gt_no_crowd, dets)
    assert res2["AP"] == pytest.approx(15.15, abs=1e-2)
    assert res2["AP"] == pytest.approx(100 * 0.5 * 51 / 101 * 6 / 10, abs=1e-10)
    assert_matches_reference(res2, reference_stats(gt_no_crowd, dets))


def test_ap3_two_images_category_without_gt() -> None:
    gt = make_gt(
        [(1, 1, box(0, 0, 4, 4), 0), (1, 1, box(5, 5, 9, 9), 0), (2, 1, box(0, 0, 4, 4), 0)],
        n_images=2,
        n_cats=2,
    )
    dets = [
        det(1, 1, box(5, 5, 9, 9), 0.3),
        det(1, 1, box(0, 0, 4, 4), 0.2),
        det(2, 1, box(0, 0, 4, 4), 0.9),
        det(2, 2, box(5, 5, 9, 9), 0.99),
    ]
    res = coco_mask_ap(gt, dets)
    assert res["AP"] == pytest.approx(100.0)
    assert res["AR1"] == pytest.approx(66.6667, abs=1e-4)
    assert res["AR10"] == pytest.approx(100.0)
    assert_matches_reference(res, reference_stats(gt, dets))
    only_cat2 = coco_mask_ap(gt, dets, cat_ids=[2])
    assert all(math.isnan(only_cat2[n]) for n in STAT_NAMES)  # no GT in category 2
    assert coco_mask_ap(gt, dets, cat_ids=[1])["AP"] == pytest.approx(100.0)
    res_img2 = coco_mask_ap(gt, dets, img_ids=[2])
    assert_matches_reference(res_img2, reference_stats(gt, dets, imgIds=[2]))
    assert res_img2["AR1"] == pytest.approx(100.0)


SYNTH_GT = [
    (1, 1, box(0, 0, 5, 5), 0),
    (1, 2, box(5, 5, 10, 10), 0),
    (2, 1, box(1, 1, 9, 9), 0),
    (2, 2, box(0, 8, 10, 10), 0),
    (2, 1, box(8, 0, 10, 2), 1),
]


def synthetic_case() -> tuple[dict, list[dict]]:
    """2 images, 2 categories, a few masks of various sizes; imperfect detections."""
    gt = make_gt(SYNTH_GT, n_images=2, n_cats=2)
    big = SYNTH_GT[2][2]
    shifted = np.roll(big, 1, axis=1)
    dets = [
        det(1, 1, box(0, 0, 5, 4), 0.8),
        det(1, 1, box(5, 5, 10, 10), 0.85),  # wrong category location
        det(1, 2, box(5, 5, 9, 10), 0.7),
        det(2, 1, shifted, 0.6),
        det(2, 1, box(8, 0, 10, 2), 0.95),  # on the crowd region
        det(2, 2, box(0, 7, 10, 10), 0.5),
        det(2, 2, box(0, 0, 3, 3), 0.5),  # equal scores: stable order matters
    ]
    return gt, dets


def test_imperfect_case_equals_cocoeval() -> None:
    gt, dets = synthetic_case()
    res = coco_mask_ap(gt, dets)
    stats = reference_stats(gt, dets)
    assert_matches_reference(res, stats)
    assert 0 < res["AP"] < 100


def test_perfect_detections_give_100() -> None:
    gt, _ = synthetic_case()
    dets = [det(img, cat, mask, 0.9) for img, cat, mask, crowd in SYNTH_GT if not crowd]
    res = coco_mask_ap(gt, dets)
    for name in ("AP", "AP50", "AP75", "AR1", "AR10", "AR100"):
        assert res[name] == pytest.approx(100.0), name


def test_bbox_is_dropped_from_segm_results() -> None:
    # A small false positive carrying a huge box: with the box, loadRes takes its area from the box
    # and the detection leaves the 'small' range (APs 100); the spec requires mask areas (APs 50).
    gt = make_gt([(1, 1, box(0, 0, 4, 4), 0)])
    dets = [det(1, 1, box(0, 0, 4, 4), 0.5), det(1, 1, box(6, 6, 9, 9), 0.9)]
    with_box = copy.deepcopy(dets)
    with_box[0]["bbox"] = [0.0, 0.0, 4.0, 4.0]  # loadRes looks at the first result only
    with_box[1]["bbox"] = [0.0, 0.0, 100.0, 100.0]
    ours = coco_mask_ap(gt, with_box)
    assert ours["APs"] == pytest.approx(50.0)
    plain = coco_mask_ap(gt, dets)
    assert all(
        ours[n] == plain[n] or (math.isnan(ours[n]) and math.isnan(plain[n])) for n in STAT_NAMES
    )
    assert reference_stats(gt, with_box)[3] == pytest.approx(1.0)  # what keeping bbox would give
    assert "bbox" in with_box[1]  # caller's dicts are not mutated
    assert set(dets[0]) == {"image_id", "category_id", "segmentation", "score"}


def test_empty_detections() -> None:
    gt = make_gt([(1, 1, box(2, 2, 6, 6), 0)])
    res = coco_mask_ap(gt, [])
    assert res["empty_predictions"] is True
    assert all(res[n] == 0.0 for n in STAT_NAMES)


def test_json_path_bytes_counts_and_printing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gt = make_gt([(1, 1, box(2, 2, 6, 6), 0)])
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt), encoding="utf-8")
    d = det(1, 1, box(3, 2, 7, 6), 0.9)
    d["segmentation"]["counts"] = d["segmentation"]["counts"].encode("ascii")
    res = coco_mask_ap(str(path), [d])
    assert res["AP"] == pytest.approx(30.0, abs=1e-4)  # IoU 0.6: TP for t in 0.50, 0.55, 0.60
    assert capsys.readouterr().out == ""
    coco_mask_ap(path, [d], verbose=True)
    assert "Average Precision" in capsys.readouterr().out


def test_bbox_iou_type() -> None:
    gt = make_gt([(1, 1, box(2, 2, 6, 6), 0)])
    dets = [det(1, 1, box(3, 2, 7, 6), 0.9)]  # bbox derived from the mask
    res = coco_mask_ap(gt, dets, iou_type="bbox")
    ref = [{"image_id": 1, "category_id": 1, "bbox": [3.0, 2.0, 4.0, 4.0], "score": 0.9}]
    assert_matches_reference(res, reference_stats(gt, ref, iou_type="bbox"))
    with pytest.raises(ValueError):
        coco_mask_ap(gt, dets, iou_type="keypoints")
    with pytest.raises(ValueError, match="image ids"):
        coco_mask_ap(gt, [det(5, 1, box(0, 0, 2, 2), 0.5)])
