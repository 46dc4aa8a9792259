"""Panoptic quality against the worked examples and golden numbers of spec benchmarks.md §3.2."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from promptseg.metrics.panoptic import (
    OFFSET,
    PanopticFormatError,
    PQStat,
    id2rgb,
    pq_compute,
    pq_results,
    pq_stat_image,
    read_id_png,
    rgb2id,
)

SAMPLE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "panopticapi-sample"
needs_sample = pytest.mark.skipif(
    not (SAMPLE / "panoptic_examples.json").is_file(),
    reason=f"panopticapi sample fixture not found at {SAMPLE} (../shared/data beside the checkout)",
)

# worked-example categories: 1 person (thing), 2 car (thing), 10 sky (stuff), 11 grass (stuff)
CATS = {
    1: {"id": 1, "name": "person", "isthing": 1},
    2: {"id": 2, "name": "car", "isthing": 1},
    10: {"id": 10, "name": "sky", "isthing": 0},
    11: {"id": 11, "name": "grass", "isthing": 0},
}


def grid(text: str) -> np.ndarray:
    """Segment-id array from rows separated by '/'."""
    return np.array([[int(v) for v in row.split()] for row in text.split("/")], dtype=np.int64)


def segments(
    id_map: np.ndarray,
    cat_of: dict[int, int],
    crowd: tuple[int, ...] = (),
    area: dict[int, int] | None = None,
) -> list[dict[str, Any]]:
    """segments_info for the given id -> category map; areas from pixels unless overridden."""
    ids, counts = np.unique(id_map, return_counts=True)
    pixels = dict(zip(ids.tolist(), counts.tolist(), strict=True))
    area = area or {}
    return [
        {
            "id": i,
            "category_id": c,
            "iscrowd": int(i in crowd),
            "area": area.get(i, pixels.get(i, 0)),
        }
        for i, c in cat_of.items()
    ]


def scaled(results: dict[str, Any]) -> dict[str, tuple[float, float, float, int]]:
    """All/Things/Stuff as (PQ, SQ, RQ) x100 and n."""
    return {
        k: (100 * v["pq"], 100 * v["sq"], 100 * v["rq"], v["n"])
        for k, v in results.items()
        if k != "per_class"
    }


def assert_split(results: dict[str, Any], name: str, pq: float, sq: float, rq: float, n: int):
    got = scaled(results)[name]
    assert got[3] == n
    assert got[:3] == pytest.approx((pq, sq, rq), abs=1e-4)


# --- worked examples -----------------------------------------------------------------------------

PQ1_GT = grid("10 10 10 10 10 10 / 1 1 1 10 2 2 / 1 1 1 10 2 2 / 11 11 11 11 11 11")
PQ1_PRED = grid("10 10 10 10 10 10 / 5 5 10 10 7 7 / 5 5 5 10 10 10 / 11 11 11 11 11 11")
PQ1_GT_CATS = {1: 1, 2: 2, 10: 10, 11: 11}
PQ1_PRED_CATS = {5: 1, 7: 1, 10: 10, 11: 11}


def test_pq1_basic_matching():
    stat = pq_stat_image(
        PQ1_GT, segments(PQ1_GT, PQ1_GT_CATS), PQ1_PRED, segments(PQ1_PRED, PQ1_PRED_CATS), CATS
    )
    assert stat.get(1) == {"tp": 1, "fp": 1, "fn": 0, "iou": pytest.approx(5 / 6)}
    assert stat.get(2) == {"tp": 0, "fp": 0, "fn": 1, "iou": 0.0}
    assert stat.get(10)["iou"] == pytest.approx(8 / 11)
    r = pq_results(stat, CATS)
    assert_split(r, "All", 57.0707, 64.0152, 66.6667, 4)
    assert_split(r, "Things", 27.7778, 41.6667, 33.3333, 2)
    assert_split(r, "Stuff", 86.3636, 86.3636, 100.0, 2)
    pc = r["per_class"]
    assert (100 * pc[1]["pq"], 100 * pc[1]["sq"], 100 * pc[1]["rq"]) == pytest.approx(
        (55.5556, 83.3333, 66.6667), abs=1e-4
    )
    assert pc[2] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
    assert 100 * pc[10]["pq"] == pytest.approx(72.7273, abs=1e-4)
    assert pc[11]["pq"] == 1.0


def test_pq2_void_and_crowd():
    gt = grid("0 0 10 10 10 10 / 0 0 10 10 10 10 / 3 3 3 1 1 10 / 3 3 3 1 1 10")
    pred = grid("20 20 20 20 10 10 / 20 20 20 20 10 10 / 21 21 21 1 1 10 / 21 21 21 1 1 10")
    stat = pq_stat_image(
        gt,
        segments(gt, {1: 1, 3: 1, 10: 10}, crowd=(3,)),
        pred,
        segments(pred, {20: 10, 21: 1, 1: 1, 10: 2}),
        CATS,
    )
    # sky pred 20: IoU 0.4, VOID fraction exactly 0.5 -> FP; GT sky -> FN; pred 21 on the crowd ->
    # ignored; the crowd itself is neither TP nor FN; pred 10 (car) -> FP
    assert stat.get(10) == {"tp": 0, "fp": 1, "fn": 1, "iou": 0.0}
    assert stat.get(1) == {"tp": 1, "fp": 0, "fn": 0, "iou": 1.0}
    assert stat.get(2) == {"tp": 0, "fp": 1, "fn": 0, "iou": 0.0}
    r = pq_results(stat, CATS)
    assert_split(r, "All", 33.3333, 33.3333, 33.3333, 3)
    assert_split(r, "Things", 50.0, 50.0, 50.0, 2)
    assert_split(r, "Stuff", 0.0, 0.0, 0.0, 1)


def test_pq3_gt_area_from_json_not_pixels():
    gt = grid("11 11 1 1 / 11 11 1 1")
    pred = grid("11 11 1 0 / 11 11 0 0")
    stat = pq_stat_image(
        gt, segments(gt, {11: 11, 1: 1}, area={11: 6}), pred, segments(pred, {11: 11, 1: 1}), CATS
    )
    assert stat.get(11)["iou"] == pytest.approx(4 / 6)
    assert stat.get(1) == {"tp": 0, "fp": 1, "fn": 1, "iou": 0.0}
    r = pq_results(stat, CATS)
    assert_split(r, "All", 33.3333, 33.3333, 50.0, 2)
    assert_split(r, "Things", 0.0, 0.0, 0.0, 1)
    assert_split(r, "Stuff", 66.6667, 66.6667, 100.0, 1)


# --- edge cases ----------------------------------------------------------------------------------


def test_iou_exactly_half_is_not_a_match():
    gt = grid("1 1 1 1")
    pred = grid("1 1 0 0")  # n = 2, union = 2 + 4 - 2 = 4
    stat = pq_stat_image(gt, segments(gt, {1: 1}), pred, segments(pred, {1: 1}), CATS)
    assert stat.get(1) == {"tp": 0, "fp": 1, "fn": 1, "iou": 0.0}
    pred = grid("1 1 1 0")  # IoU 3/4
    stat = pq_stat_image(gt, segments(gt, {1: 1}), pred, segments(pred, {1: 1}), CATS)
    assert stat.get(1) == {"tp": 1, "fp": 0, "fn": 0, "iou": 0.75}


def test_predicted_pixels_on_void_leave_the_union():
    gt = grid("0 0 1 1")
    pred = grid("1 1 1 1")  # union = 4 + 2 - 2 - 2 = 2
    stat = pq_stat_image(gt, segments(gt, {1: 1}), pred, segments(pred, {1: 1}), CATS)
    assert stat.get(1) == {"tp": 1, "fp": 0, "fn": 0, "iou": 1.0}


def test_unlisted_gt_id_is_neither_void_nor_segment():
    gt = grid("9 9 1 1")  # 9 is in the PNG but not in the GT JSON: its pixels stay in the union
    pred = grid("1 1 1 1")
    stat = pq_stat_image(gt, segments(gt, {1: 1}), pred, segments(pred, {1: 1}), CATS)
    assert stat.get(1) == {"tp": 0, "fp": 1, "fn": 1, "iou": 0.0}


def test_void_fraction_above_half_excuses_a_false_positive():
    gt = grid("0 0 0 10")
    pred = grid("2 2 2 2")  # car on 3/4 VOID: ignored; GT sky unmatched -> FN
    stat = pq_stat_image(gt, segments(gt, {10: 10}), pred, segments(pred, {2: 2}), CATS)
    assert stat.get(2) == {"tp": 0, "fp": 0, "fn": 0, "iou": 0.0}
    assert stat.get(10)["fn"] == 1


@pytest.mark.parametrize(("order", "fp"), [((3, 4), 1), ((4, 3), 0)])
def test_last_crowd_segment_of_a_category_is_used(order: tuple[int, int], fp: int):
    gt = grid("3 3 4 4")  # two person crowd segments
    pred = grid("5 5 0 0")  # person prediction lying on crowd 3
    gt_segs = segments(gt, {i: 1 for i in order}, crowd=(3, 4))
    stat = pq_stat_image(gt, gt_segs, pred, segments(pred, {5: 1}), CATS)
    assert stat.get(1) == {"tp": 0, "fp": fp, "fn": 0, "iou": 0.0}


def test_crowd_of_another_category_does_not_excuse():
    gt = grid("3 3 3 0")  # person crowd
    pred = grid("5 5 5 5")  # car
    stat = pq_stat_image(gt, segments(gt, {3: 1}, crowd=(3,)), pred, segments(pred, {5: 2}), CATS)
    assert stat.get(2)["fp"] == 1


def test_empty_split_gives_nan_with_warning():
    gt = grid("1 1 2 2")
    stat = pq_stat_image(gt, segments(gt, {1: 1, 2: 2}), gt, segments(gt, {1: 1, 2: 2}), CATS)
    with pytest.warns(RuntimeWarning, match="Stuff"):
        r = pq_results(stat, CATS)
    assert math.isnan(r["Stuff"]["pq"]) and r["Stuff"]["n"] == 0
    assert r["Things"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2}
    assert r["per_class"][10] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}


def test_category_zero_and_string_image_ids():
    cats = [{"id": 0, "isthing": 0}, {"id": 5, "isthing": 1}]  # ADE: category 0 (wall) is real
    gt = grid("7 7 8 8")
    stat = pq_stat_image(
        gt, segments(gt, {7: 0, 8: 5}), gt, segments(gt, {7: 0, 8: 5}), cats, image_id="ADE_val_1"
    )
    assert stat.get(0)["tp"] == 1
    assert pq_results(stat, cats)["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2}


def test_rgb_input_equals_id_map_input():
    a = pq_stat_image(
        PQ1_GT, segments(PQ1_GT, PQ1_GT_CATS), PQ1_PRED, segments(PQ1_PRED, PQ1_PRED_CATS), CATS
    )
    b = pq_stat_image(
        id2rgb(PQ1_GT * 70001),
        segments(PQ1_GT * 70001, {k * 70001: v for k, v in PQ1_GT_CATS.items()}),
        id2rgb(PQ1_PRED),
        segments(PQ1_PRED, PQ1_PRED_CATS),
        CATS,
    )
    assert a.state_dict() == b.state_dict()


def test_rgb2id_roundtrip():
    ids = np.array([[0, 1, 255, 256], [65535, 65536, OFFSET - 1, 4260062]])
    rgb = id2rgb(ids)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 4, 3)
    assert rgb[0, 3].tolist() == [0, 1, 0]
    assert np.array_equal(rgb2id(rgb), ids)
    with pytest.raises(ValueError):
        id2rgb(np.array([OFFSET]))


# --- accumulators --------------------------------------------------------------------------------


def test_pqstat_merge_and_state_dict_roundtrip():
    s1 = pq_stat_image(
        PQ1_GT, segments(PQ1_GT, PQ1_GT_CATS), PQ1_PRED, segments(PQ1_PRED, PQ1_PRED_CATS), CATS
    )
    gt = grid("11 11 1 1 / 11 11 1 1")
    pred = grid("11 11 1 0 / 11 11 0 0")
    s2 = pq_stat_image(
        gt, segments(gt, {11: 11, 1: 1}, area={11: 6}), pred, segments(pred, {11: 11, 1: 1}), CATS
    )
    for a in (s1.tp, s1.fp, s1.fn):
        assert a.dtype == np.int64
    assert s1.iou.dtype == np.float64
    total = PQStat(CATS).merge(s1).merge(s2)
    assert total.get(1) == {"tp": 1, "fp": 2, "fn": 1, "iou": pytest.approx(5 / 6)}
    assert total.get(11) == {"tp": 2, "fp": 0, "fn": 0, "iou": pytest.approx(1 + 4 / 6)}
    restored = PQStat.from_state_dict(json.loads(json.dumps(total.state_dict())))
    assert restored.state_dict() == total.state_dict()
    assert restored.tp.dtype == np.int64
    assert pq_results(restored, CATS) == pq_results(total, CATS)
    other = PQStat([2, 99])  # different category set and order: aligned by id
    other.fn[0] = 3
    restored += other
    assert restored.get(2)["fn"] == total.get(2)["fn"] + 3
    assert restored.get(99)["fn"] == 0
    with pytest.raises(ValueError):
        bad = {"category_ids": [1, 1], "tp": [0, 0], "fp": [0, 0], "fn": [0, 0], "iou": [0.0, 0.0]}
        PQStat().load_state_dict(bad)


# --- prediction sanity errors --------------------------------------------------------------------


def test_error_png_id_missing_from_json():
    with pytest.raises(PanopticFormatError, match="PNG but not in its JSON"):
        pq_stat_image(
            PQ1_GT,
            segments(PQ1_GT, PQ1_GT_CATS),
            PQ1_PRED,
            segments(PQ1_PRED, {5: 1, 10: 10}),
            CATS,
        )


def test_error_json_id_missing_from_png():
    cats = {**PQ1_PRED_CATS, 8: 1}
    with pytest.raises(PanopticFormatError, match=r"\[8\] are in the prediction JSON"):
        pq_stat_image(
            PQ1_GT, segments(PQ1_GT, PQ1_GT_CATS), PQ1_PRED, segments(PQ1_PRED, cats), CATS
        )


def test_error_unknown_category():
    with pytest.raises(PanopticFormatError, match="unknown category_id 3"):
        pq_stat_image(
            PQ1_GT,
            segments(PQ1_GT, PQ1_GT_CATS),
            PQ1_PRED,
            segments(PQ1_PRED, {**PQ1_PRED_CATS, 7: 3}),
            CATS,
            image_id=42,
        )


def test_error_duplicate_prediction_segment():
    segs = segments(PQ1_PRED, PQ1_PRED_CATS)
    with pytest.raises(PanopticFormatError, match="twice"):
        pq_stat_image(PQ1_GT, segments(PQ1_GT, PQ1_GT_CATS), PQ1_PRED, segs + segs[:1], CATS)


def test_error_size_mismatch():
    with pytest.raises(PanopticFormatError, match="size"):
        pq_stat_image(PQ1_GT, [], PQ1_PRED[:, :5], [], CATS)


def test_error_invalid_ids_and_missing_gt_area():
    with pytest.raises(ValueError, match="segment ids must lie"):
        pq_stat_image(
            np.full_like(PQ1_GT, -1), [], PQ1_PRED, segments(PQ1_PRED, PQ1_PRED_CATS), CATS
        )
    gt_segs = [{k: v for k, v in s.items() if k != "area"} for s in segments(PQ1_GT, PQ1_GT_CATS)]
    with pytest.raises(PanopticFormatError, match="no 'area'"):
        pq_stat_image(PQ1_GT, gt_segs, PQ1_PRED, segments(PQ1_PRED, PQ1_PRED_CATS), CATS)


# --- pq_compute on files -------------------------------------------------------------------------


def write_panoptic(
    root: Path, name: str, images: list[tuple[Any, np.ndarray, list[dict[str, Any]]]], cats: Any
) -> tuple[Path, Path]:
    """panopticapi-format JSON + PNG folder (`<name>.json`, `<name>/`) under root."""
    folder = root / name
    folder.mkdir(parents=True)
    anns = []
    for image_id, ids, segs in images:
        fname = f"{image_id}.png"
        Image.fromarray(id2rgb(ids)).save(folder / fname)
        anns.append({"image_id": image_id, "file_name": fname, "segments_info": segs})
    path = root / f"{name}.json"
    path.write_text(json.dumps({"annotations": anns, "categories": list(cats.values())}))
    return path, folder


def test_pq_compute_files_match_worked_examples(tmp_path: Path):
    gt2 = grid("11 11 1 1 / 11 11 1 1")
    pred2 = grid("11 11 1 0 / 11 11 0 0")
    gt_json, _ = write_panoptic(
        tmp_path,
        "gt",
        [
            ("a", PQ1_GT, segments(PQ1_GT, PQ1_GT_CATS)),
            ("b", gt2, segments(gt2, {11: 11, 1: 1}, area={11: 6})),
        ],
        CATS,
    )
    pred_json, pred_dir = write_panoptic(
        tmp_path,
        "pred",
        [
            ("b", pred2, segments(pred2, {11: 11, 1: 1})),
            ("a", PQ1_PRED, segments(PQ1_PRED, PQ1_PRED_CATS)),
            ("extra", pred2, segments(pred2, {11: 11, 1: 1})),  # not in GT: ignored
        ],
        CATS,
    )
    r = pq_compute(gt_json, pred_json)  # default folders: JSON path without '.json'
    expected = PQStat(CATS)
    expected.merge(
        pq_stat_image(
            PQ1_GT, segments(PQ1_GT, PQ1_GT_CATS), PQ1_PRED, segments(PQ1_PRED, PQ1_PRED_CATS), CATS
        )
    )
    expected.merge(
        pq_stat_image(
            gt2,
            segments(gt2, {11: 11, 1: 1}, area={11: 6}),
            pred2,
            segments(pred2, {11: 11, 1: 1}),
            CATS,
        )
    )
    assert r == pq_results(expected, CATS)
    assert set(r) == {"All", "Things", "Stuff", "per_class"}
    assert r["All"]["n"] == 4
    assert r == pq_compute(str(gt_json), str(pred_json), tmp_path / "gt", pred_dir)


def test_pq_compute_errors(tmp_path: Path):
    gt_json, _ = write_panoptic(tmp_path, "gt", [(1, PQ1_GT, segments(PQ1_GT, PQ1_GT_CATS))], CATS)
    pred_json, _ = write_panoptic(
        tmp_path, "pred", [(2, PQ1_PRED, segments(PQ1_PRED, PQ1_PRED_CATS))], CATS
    )
    with pytest.raises(PanopticFormatError, match="no prediction for 1 GT image"):
        pq_compute(gt_json, pred_json)
    with pytest.raises(FileNotFoundError, match="doesn't exist"):
        pq_compute(gt_json, pred_json, pred_folder=tmp_path / "nowhere")
    dup = json.loads(pred_json.read_text())
    dup["annotations"] *= 2
    pred_json.write_text(json.dumps(dup))
    with pytest.raises(PanopticFormatError, match="two annotations"):
        pq_compute(gt_json, pred_json)


def test_read_id_png_rejects_non_rgb(tmp_path: Path):
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "grey.png")
    with pytest.raises(PanopticFormatError, match="must be RGB"):
        read_id_png(tmp_path / "grey.png")


# --- panopticapi sample fixture (PQ-4) -----------------------------------------------------------


@needs_sample
def test_pq4_sample_fixture_layout():
    gt = json.loads((SAMPLE / "panoptic_examples.json").read_text())
    assert len(gt["categories"]) == 133 and len(gt["annotations"]) == 2
    segs = [s for a in gt["annotations"] for s in a["segments_info"]]
    assert len(segs) == 50 and sum(s["iscrowd"] for s in segs) == 3
    for ann in gt["annotations"]:  # JSON areas equal PNG pixel counts
        id_map = read_id_png(SAMPLE / "panoptic_examples" / ann["file_name"])
        ids, counts = np.unique(id_map, return_counts=True)
        pixels = dict(zip(ids.tolist(), counts.tolist(), strict=True))
        assert all(pixels[s["id"]] == s["area"] for s in ann["segments_info"])


@needs_sample
def test_pq4_sample_against_itself():
    gt_json = SAMPLE / "panoptic_examples.json"
    r = pq_compute(gt_json, gt_json)
    assert r["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 8}
    assert r["Things"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 4}
    assert r["Stuff"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 4}
    assert len(r["per_class"]) == 133


@needs_sample
def test_pq4_sample_without_persons(tmp_path: Path):
    gt_json = SAMPLE / "panoptic_examples.json"
    gt = json.loads(gt_json.read_text())
    out = tmp_path / "pred"
    out.mkdir()
    for ann in gt["annotations"]:
        ids = read_id_png(SAMPLE / "panoptic_examples" / ann["file_name"])
        persons = [s["id"] for s in ann["segments_info"] if s["category_id"] == 1]
        ids[np.isin(ids, persons)] = 0
        Image.fromarray(id2rgb(ids)).save(out / ann["file_name"])
        ann["segments_info"] = [s for s in ann["segments_info"] if s["category_id"] != 1]
    pred_json = tmp_path / "pred.json"
    pred_json.write_text(json.dumps(gt))
    r = pq_compute(gt_json, pred_json, SAMPLE / "panoptic_examples", out)
    assert_split(r, "All", 87.5, 87.5, 87.5, 8)
    assert_split(r, "Things", 75.0, 75.0, 75.0, 4)
    assert_split(r, "Stuff", 100.0, 100.0, 100.0, 4)
    assert r["per_class"][1] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
