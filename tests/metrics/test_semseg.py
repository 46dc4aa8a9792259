"""Tests of promptseg.metrics.semseg: worked examples of benchmarks.md §3.5 and edge cases."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest

from promptseg.metrics import semseg
from promptseg.metrics.semseg import SemSegEvaluator


def lab(rows: str) -> np.ndarray:
    """'0 0 1 / 2 255 1' -> 2-D int array."""
    return np.array([[int(v) for v in r.split()] for r in rows.split("/")], dtype=np.int64)


def test_s1_three_classes_with_ignore() -> None:
    ev = SemSegEvaluator(3, ignore_label=255)
    ev.update(lab("0 0 1 1 / 0 2 2 1 / 2 2 2 0"), lab("0 0 1 255 / 0 0 2 1 / 2 2 255 1"))
    r = ev.compute()
    assert [r["IoU-0"], r["IoU-1"], r["IoU-2"]] == pytest.approx([60.0, 66.6667, 75.0], abs=1e-4)
    assert r["mIoU"] == pytest.approx(67.2222, abs=1e-4)
    assert r["fwIoU"] == pytest.approx(66.5, abs=1e-4)
    assert r["mACC"] == pytest.approx(80.5556, abs=1e-4)
    assert r["pACC"] == pytest.approx(80.0, abs=1e-4)
    assert [r["ACC-0"], r["ACC-1"], r["ACC-2"]] == pytest.approx([75.0, 66.6667, 100.0], abs=1e-4)
    assert list(r)[:2] == ["mIoU", "fwIoU"]
    # rows = prediction, columns = GT, last column = ignore
    cm = ev.confusion_matrix
    assert cm.dtype == np.int64 and cm.shape == (4, 4)
    assert cm.tolist() == [[3, 1, 0, 0], [0, 2, 0, 1], [1, 0, 3, 1], [0, 0, 0, 0]]


def test_s2_class_absent_from_gt_is_excluded() -> None:
    ev = SemSegEvaluator(3)
    ev.update(lab("0 0 2 / 0 2 2"), lab("0 0 1 / 0 0 1"))
    r = ev.compute()
    assert r["IoU-0"] == pytest.approx(75.0)
    assert r["IoU-1"] == 0.0
    assert math.isnan(r["IoU-2"]) and math.isnan(r["ACC-2"])
    assert r["mIoU"] == pytest.approx(37.5)
    assert r["pACC"] == pytest.approx(50.0)
    assert r["mACC"] == pytest.approx(100 * (3 / 4 + 0) / 2)
    assert r["fwIoU"] == pytest.approx(100 * 0.75 * 4 / 6)


def test_s3_dataset_level_accumulation() -> None:
    ev = SemSegEvaluator(2)
    ev.update(lab("1 1 / 1 1"), lab("1 1 / 1 0"))
    ev.update(lab("0 0 / 0 0"), lab("0 0 / 0 1"))
    assert ev.compute()["mIoU"] == pytest.approx(60.0)


def test_uint16_ground_truth_with_65535_ignore() -> None:
    ev = SemSegEvaluator(700, ignore_label=65535)
    gt = np.array([[699, 65535], [0, 699]], dtype=np.uint16)
    pred = np.array([[699, 5], [0, 0]], dtype=np.uint16)
    ev.update(pred, gt)
    r = ev.compute()
    assert r["IoU-699"] == pytest.approx(50.0)
    assert r["IoU-0"] == pytest.approx(50.0)
    assert math.isnan(r["IoU-5"])  # predicted on an ignored pixel only: absent from GT
    assert ev.confusion_matrix[5].sum() == 1 and ev.confusion_matrix[5, 700] == 1


def test_empty_and_all_ignore() -> None:
    ev = SemSegEvaluator(2)
    r = ev.compute()
    assert all(math.isnan(v) for v in r.values())
    ev.update(lab("0 1 / 1 1"), np.full((2, 2), 255))
    assert ev.confusion_matrix[:2, :2].sum() == 0
    assert math.isnan(ev.compute()["mIoU"]) and math.isnan(ev.compute()["pACC"])


def test_empty_prediction_of_a_class() -> None:
    ev = SemSegEvaluator(2)
    ev.update(lab("0 0 / 0 0"), lab("0 0 / 1 1"))
    r = ev.compute()
    assert r["IoU-1"] == 0.0 and r["IoU-0"] == pytest.approx(50.0)
    assert r["mIoU"] == pytest.approx(25.0)


def test_class_names_and_validation() -> None:
    ev = SemSegEvaluator(2, class_names=["wall", "sky"])
    ev.update(lab("0 1"), lab("0 1"))
    r = ev.compute()
    assert r["IoU-wall"] == 100.0 and r["ACC-sky"] == 100.0
    with pytest.raises(ValueError):
        ev.update(lab("0 2"), lab("0 1"))  # prediction outside [0, K)
    with pytest.raises(ValueError):
        ev.update(lab("0 1"), lab("0 7"))  # GT neither a class nor ignore
    with pytest.raises(ValueError):
        ev.update(lab("0 1"), lab("0 1 1"))
    with pytest.raises(TypeError):
        ev.update(np.zeros((1, 2), np.float32), lab("0 1"))
    with pytest.raises(ValueError):
        SemSegEvaluator(2, class_names=["a"])
    with pytest.raises(ValueError):
        SemSegEvaluator(300, ignore_label=255)
    assert ev.confusion_matrix.sum() == 2


def test_state_dict_and_merge() -> None:
    full = SemSegEvaluator(2)
    a, b = SemSegEvaluator(2), SemSegEvaluator(2)
    pairs = [(lab("1 1 / 1 1"), lab("1 1 / 1 0")), (lab("0 0 / 0 0"), lab("0 0 / 0 1"))]
    for (p, g), shard in zip(pairs, (a, b), strict=True):
        full.update(p, g)
        shard.update(p, g)
    assert np.array_equal(a.merge(b).confusion_matrix, full.confusion_matrix)
    state = full.state_dict()
    state["confusion_matrix"] = state["confusion_matrix"].tolist()  # JSON form also loads
    restored = SemSegEvaluator.from_state_dict(state)
    assert restored.compute() == full.compute()
    with pytest.raises(ValueError):
        SemSegEvaluator(3).load_state_dict(state)
    with pytest.raises(ValueError):
        SemSegEvaluator(2, ignore_label=65535).merge(full)


def test_module_does_not_import_torch() -> None:
    tree = ast.parse(Path(semseg.__file__).read_text(encoding="utf-8"))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any(x.split(".")[0] == "torch" for x in names)
