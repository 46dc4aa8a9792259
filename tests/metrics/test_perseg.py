"""Tests of promptseg.metrics.perseg: benchmarks.md §3.7 by hand, edge cases, stem matching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from promptseg.metrics import PerSegEvaluator, evaluate_perseg
from promptseg.metrics.perseg import EPS, MissingPredictionsError, read_mask


def m(rows: str) -> np.ndarray:
    """'0110/0011' -> 2-D uint8 array (rows top to bottom)."""
    return np.array([[int(c) for c in r] for r in rows.split("/")], dtype=np.uint8)


# (object, pred, gt): counts summed per object, not averaged per image
EXAMPLE = [
    ("dog", "1100/1100/0000", "0110/0110/0000"),  # I 2, U 6, T 4
    ("dog", "0000/0011/0011", "0000/0001/0001"),  # I 2, U 4, T 2
    ("cat", "1111/0000/0000", "1111/0000/0000"),  # I 4, U 4, T 4
    ("cat", "0000/0000/0000", "0000/0000/0110"),  # I 0, U 2, T 2
]


def run_example() -> PerSegEvaluator:
    ev = PerSegEvaluator(["dog", "cat"])
    for obj, p, g in EXAMPLE:
        ev.update(obj, m(p), m(g))
    return ev


def test_worked_example_sums_per_object_then_averages_objects() -> None:
    ev = run_example()
    assert ev.objects == ["cat", "dog"]  # sorted, as the reference lists its folders
    assert ev.inter.tolist() == [4, 4] and ev.union.tolist() == [6, 10]
    assert ev.target.tolist() == [6, 6] and ev.n_images.tolist() == [2, 2]
    iou = {"cat": 4 / (6 + 1e-10), "dog": 4 / (10 + 1e-10)}
    acc = {"cat": 4 / (6 + 1e-10), "dog": 4 / (6 + 1e-10)}
    # the reference: mIoU += iou_obj in object order, then / count, then x 100
    assert ev.miou() == 100 * ((iou["cat"] + iou["dog"]) / 2)
    assert ev.macc() == 100 * ((acc["cat"] + acc["dog"]) / 2)
    assert ev.miou() == pytest.approx(100 * (2 / 3 + 2 / 5) / 2)  # 53.33
    rows = {r["object"]: r for r in ev.records()}
    assert rows["dog"] == {
        "object": "dog",
        "iou": 100 * iou["dog"],
        "acc": 100 * acc["dog"],
        "inter": 4,
        "union": 10,
        "target": 6,
        "n_images": 2,
    }


def test_exact_formula_keeps_the_1e10_denominator() -> None:
    ev = PerSegEvaluator(["a"])
    ev.update("a", m("11/00"), m("11/00"))
    assert EPS == 1e-10
    assert ev.miou() == 100 * (2 / (2 + 1e-10)) == pytest.approx(100.0)
    assert ev.miou() < 100.0


def test_edge_cases_score_zero_and_still_count() -> None:
    ev = PerSegEvaluator(["absent", "never", "hit"])
    ev.update("absent", m("00/00"), m("00/00"))  # empty GT and prediction: 0 / (0 + 1e-10)
    ev.update("hit", m("10/00"), m("10/00"))
    iou = dict(zip(ev.objects, ev.object_iou().tolist(), strict=True))
    assert iou["absent"] == 0.0 and iou["never"] == 0.0
    assert ev.miou() == pytest.approx(100 / 3)  # all three objects count
    empty = PerSegEvaluator(["x"])
    empty.update("x", m("00/00"), m("01/11"))  # nothing predicted
    assert empty.miou() == 0.0 and empty.macc() == 0.0
    fp_only = PerSegEvaluator(["x"])
    fp_only.update("x", m("11/11"), m("00/00"))  # prediction on an empty GT: union counts
    assert fp_only.union.tolist() == [4] and fp_only.miou() == 0.0


def test_bad_inputs_are_errors() -> None:
    ev = PerSegEvaluator(["a"])
    with pytest.raises(ValueError, match="is not one of"):
        ev.update("b", m("1"), m("1"))
    with pytest.raises(ValueError, match="shape"):
        ev.update("a", m("11"), m("1"))
    with pytest.raises(ValueError, match="only 0 and 1"):
        ev.update("a", np.array([[255]]), m("1"))
    with pytest.raises(ValueError, match="duplicates"):
        PerSegEvaluator(["a", "a"])
    with pytest.raises(ValueError, match="empty"):
        PerSegEvaluator([])


def test_state_dict_round_trip_and_merge_are_exact() -> None:
    full = run_example()
    first, second = PerSegEvaluator(["cat", "dog"]), PerSegEvaluator(["cat", "dog"])
    for i, (obj, p, g) in enumerate(EXAMPLE):
        (first if i % 2 else second).update(obj, m(p), m(g))
    merged = PerSegEvaluator.from_state_dict(first.state_dict()).merge(second)
    assert merged.state_dict() == full.state_dict()
    assert merged.miou() == full.miou() and merged.macc() == full.macc()
    with pytest.raises(ValueError, match="objects"):
        PerSegEvaluator(["cat"]).load_state_dict(full.state_dict())


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_read_mask_binarises_after_grayscale(tmp_path) -> None:
    rgb = np.zeros((1, 4, 3), np.uint8)
    rgb[0, 1] = (0, 0, 4)  # luma 0.456 -> 0: background
    rgb[0, 2] = (0, 0, 5)  # luma 0.57 -> 1: foreground
    rgb[0, 3] = (128, 0, 0)  # PerSAM's output colour
    _png(tmp_path / "m.png", rgb)
    assert read_mask(tmp_path / "m.png").tolist() == [[False, False, True, True]]
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png is not a readable mask image"):
        read_mask(tmp_path / "bad.png")


def _tree(root: Path, files: dict[str, str]) -> None:
    for name, rows in files.items():
        _png(root / name, m(rows) * 255)


def test_folders_are_matched_by_exact_stem(tmp_path) -> None:
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    # the reference would skip '100.png' and all of 'car_007/' (paths containing '00') and pair
    # sorted lists by position, so pred '01b.png' would shift every later pairing
    _tree(gt, {"car_007/00.png": "11", "car_007/01.png": "10", "toy/00.png": "11"})
    _tree(gt, {"toy/01.png": "01", "toy/100.png": "11"})
    _tree(pred, {"car_007/00.png": "00", "car_007/01.png": "10", "toy/01b.png": "11"})
    _tree(pred, {"toy/01.png": "01", "toy/100.png": "10"})
    ev = evaluate_perseg(gt, pred)
    assert ev.objects == ["car_007", "toy"]
    assert ev.state_dict() == {
        "objects": ["car_007", "toy"],
        "inter": [1, 2],
        "union": [1, 3],
        "target": [1, 3],
        "n_images": [1, 2],
    }


def test_missing_predictions_are_listed(tmp_path) -> None:
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    _tree(gt, {"a/00.png": "1", "a/01.png": "1", "a/02.png": "1", "b/00.png": "1", "b/01.png": "1"})
    _tree(pred, {"a/01.png": "1"})
    with pytest.raises(MissingPredictionsError, match=r"2 prediction PNG\(s\) missing") as err:
        evaluate_perseg(gt, pred)
    assert "a/02.png" in str(err.value) and "b/01.png" in str(err.value)
    assert "a/00.png" not in str(err.value)  # the reference needs no prediction
    _tree(pred, {"a/02.png": "11", "b/01.png": "1"})
    with pytest.raises(ValueError, match="prediction size"):
        evaluate_perseg(gt, pred)
