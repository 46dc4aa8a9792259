"""Tests of promptseg.metrics.clipseg against benchmarks.md §3.6 (C-1, C-2) and clipseg.md §6.1."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest

from promptseg.metrics import clipseg
from promptseg.metrics.clipseg import (
    THRESHOLDS,
    FixedIntervalMetrics,
    resize_bilinear_align_corners,
    sigmoid,
    simpson_avg,
)

C1_PRED = np.array([[0.9, 0.7, 0.7, 0.5], [0.5, 0.2, 0.2, 0.2]])
C1_GT = np.array([[1, 1, 0, 1], [0, 1, 0, 0]])
C2_PRED = np.array([[0.8, 0.4], [0.4, 0.1]])
C2_GT = np.array([[1, 1], [0, 1]])


def t_index(t: float) -> int:
    return int(np.flatnonzero(np.abs(THRESHOLDS - t) < 1e-9)[0])


def test_threshold_grid() -> None:
    assert THRESHOLDS.shape == (49,)
    assert THRESHOLDS[0] == pytest.approx(0.02) and THRESHOLDS[-1] == pytest.approx(0.98)
    lst = THRESHOLDS.tolist()
    assert [lst.index(t) for t in (0.1, 0.2, 0.3, 0.5)] == [4, 9, 14, 24]  # exact float equality


def test_c1_single_sample() -> None:
    m = FixedIntervalMetrics()
    m.update(C1_PRED, C1_GT, class_id=0)
    assert m.total[t_index(0.3)].tolist() == [3, 2, 1, 2]  # tp fp fn tn
    v = m.value_at(0.3)
    assert v["fgiou"] == pytest.approx(3 / 7, abs=1e-6)
    assert v["miou"] == pytest.approx(0.428571, abs=1e-6)
    assert v["biniou"] == pytest.approx(0.380952, abs=1e-6)
    assert m.value_at(0.5)["fgiou"] == pytest.approx(0.333333, abs=1e-6)  # 0.5 is not > 0.5
    b = m.best()
    assert b["oracle"] is True
    assert b["fgiou_best"] == pytest.approx(0.444444, abs=1e-6)
    assert b["fgiou_best_t"] == pytest.approx(0.02)
    r, p, ties = m.pr_curve()
    assert r.tolist() == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert p.tolist() == pytest.approx([0.5, 0.5, 0.5, 4 / 9])
    assert ties is False
    assert m.ap() == pytest.approx(0.295370, abs=1e-6)


def test_c2_two_samples_two_classes() -> None:
    m = FixedIntervalMetrics()
    m.update(C1_PRED, C1_GT, class_id=0)
    m.update(C2_PRED, C2_GT, class_id=1)
    res = m.compute()
    assert res["fgiou_0.3"] == pytest.approx(0.454545, abs=1e-6)
    assert res["fgiou_0.5"] == pytest.approx(0.333333, abs=1e-6)
    assert res["fgiou_best"] == pytest.approx(0.538462, abs=1e-6)
    assert res["fgiou_best_t"] == pytest.approx(0.02)
    assert res["miou_0.3"] == pytest.approx(0.414286, abs=1e-6)
    assert res["miou_best"] == pytest.approx(0.522222, abs=1e-6)
    assert res["biniou_0.3"] == pytest.approx(0.352273, abs=1e-6)
    assert res["ap"] == pytest.approx(0.429248, abs=1e-6)
    assert res["ap_ties"] is False and res["oracle"] is True and res["n_samples"] == 2


def test_per_sample_classes_phrasecut_vs_shared_class() -> None:
    per_sample = FixedIntervalMetrics()
    per_sample.update(C1_PRED, C1_GT)  # class_id None: each sample is its own "class"
    per_sample.update(C2_PRED, C2_GT)
    explicit = FixedIntervalMetrics()
    explicit.update(C1_PRED, C1_GT, class_id=0)
    explicit.update(C2_PRED, C2_GT, class_id=1)
    assert np.array_equal(per_sample.mean_iou(), explicit.mean_iou())
    pooled = FixedIntervalMetrics()
    pooled.update(C1_PRED, C1_GT, class_id=7)
    pooled.update(C2_PRED, C2_GT, class_id=7)
    assert np.allclose(pooled.mean_iou(), pooled.fg_iou())  # one class: mIoU = cumulative IoU
    assert pooled.value_at(0.3)["miou"] == pytest.approx(0.454545, abs=1e-6)


def test_probabilities_compared_in_float32_like_torch() -> None:
    # float32(0.3) > 0.3 in float64, but torch compares a float32 map with the threshold in float32.
    m = FixedIntervalMetrics()
    m.update(np.array([[np.float32(0.3)]]), np.array([[1]]))
    assert m.total[t_index(0.3)].tolist() == [0, 0, 1, 0]
    assert m.total[t_index(0.3) - 1].tolist() == [1, 0, 0, 0]
    f32 = FixedIntervalMetrics()
    f32.update(C1_PRED.astype(np.float32), C1_GT, 0)
    f64 = FixedIntervalMetrics()
    f64.update(C1_PRED, C1_GT, 0)
    assert np.array_equal(f32.total, f64.total)


def test_counts_match_a_naive_loop() -> None:
    rng = np.random.default_rng(0)
    pred = rng.random((17, 23)).astype(np.float32)
    gt = rng.random((17, 23)) > 0.6
    ign = rng.random((17, 23)) > 0.8
    m = FixedIntervalMetrics()
    counts = m.sample_counts(pred, gt, ign)
    v = ~ign
    for i, t in enumerate(THRESHOLDS.astype(np.float32)):
        pos = pred > t
        expect = [
            np.sum(pos & gt & v),
            np.sum(pos & ~gt & v),
            np.sum(~pos & gt & v),
            np.sum(~pos & ~gt & v),
        ]
        assert counts[i].tolist() == expect
    assert counts.dtype == np.int64


def test_ignore_mask_excludes_pixels() -> None:
    m = FixedIntervalMetrics()
    ign = np.zeros_like(C1_GT, dtype=bool)
    ign[0, 2] = True  # the 0.7 false positive
    m.update(C1_PRED, C1_GT, 0, ignore=ign)
    assert m.total[t_index(0.3)].tolist() == [3, 1, 1, 2]
    all_ign = FixedIntervalMetrics()
    all_ign.update(C1_PRED, C1_GT, 0, ignore=np.ones_like(C1_GT, dtype=bool))
    assert all_ign.total.sum() == 0


def test_empty_gt_and_empty_prediction_edges() -> None:
    m = FixedIntervalMetrics()
    m.update(np.zeros((2, 3)), np.zeros((2, 3)))  # nothing predicted, nothing to find
    assert np.all(m.fg_iou() == 0.0)  # 0 / (1 + 0): +1 smoothing, no NaN
    assert np.allclose(m.bin_iou(), 0.5 * 6 / 7)
    assert m.pr_curve()[0].size == 0
    assert m.ap() == 0.0  # the reference asserts here; promptseg reports 0.0
    e = FixedIntervalMetrics()
    e.update(np.zeros((2, 2)), np.ones((2, 2)))  # empty prediction on a full GT
    assert np.all(e.fg_iou() == 0.0) and np.all(e.mean_iou() == 0.0)


def test_no_samples() -> None:
    m = FixedIntervalMetrics()
    assert np.all(np.isnan(m.mean_iou()))
    assert math.isnan(m.best()["miou_best"])
    assert m.ap() == 0.0


def test_sigmoid_option() -> None:
    logits = np.array([[-4.0, -0.5, 0.0, 0.5], [1.0, 2.0, -1.0, 3.0]], dtype=np.float32)
    gt = np.array([[0, 0, 1, 1], [1, 1, 0, 1]])
    a = FixedIntervalMetrics(sigmoid=True)
    a.update(logits, gt)
    b = FixedIntervalMetrics()
    b.update(sigmoid(logits), gt)
    assert np.array_equal(a.total, b.total)
    assert sigmoid(np.array([0.0]))[0] == 0.5
    assert sigmoid(np.array([-200.0, 200.0])).tolist() == [0.0, 1.0]
    assert sigmoid(np.array([2.0])).dtype == np.float32


def test_resize_hand_values() -> None:
    x = np.array([[0.0, 1.0], [2.0, 3.0]])
    out = resize_bilinear_align_corners(x, (3, 3))
    assert out.tolist() == [[0.0, 0.5, 1.0], [1.0, 1.5, 2.0], [2.0, 2.5, 3.0]]
    assert out.dtype == np.float32
    assert resize_bilinear_align_corners(x, (1, 1)).tolist() == [[0.0]]  # scale 0 -> first pixel
    assert resize_bilinear_align_corners(x, (2, 2)).tolist() == x.tolist()  # identity
    # corners are preserved exactly with align_corners=True
    rng = np.random.default_rng(3)
    y = rng.random((2, 5, 7)).astype(np.float32)
    r = resize_bilinear_align_corners(y, (11, 4))
    assert r.shape == (2, 11, 4)
    assert np.array_equal(
        r[:, [0, 0, -1, -1], [0, -1, 0, -1]], y[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    )


def test_resize_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    for h, w, hh, ww in [(88, 88, 352, 352), (7, 5, 40, 33), (10, 13, 4, 3), (3, 4, 5, 7)]:
        x = rng.random((2, h, w)).astype(np.float32)
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(x)[None], size=(hh, ww), mode="bilinear", align_corners=True
        )[0].numpy()
        np.testing.assert_allclose(
            resize_bilinear_align_corners(x, (hh, ww)), ref, rtol=0, atol=2e-7
        )
    z = rng.standard_normal(1000).astype(np.float32) * 6
    np.testing.assert_allclose(sigmoid(z), torch.sigmoid(torch.from_numpy(z)).numpy(), atol=2e-7)


def test_resize_pred_in_metrics() -> None:
    pred = np.array([[0.0, 1.0], [0.0, 1.0]])  # -> columns 0, 0.5, 1 at 3x3
    gt = np.array([[0, 1, 1]] * 3)
    m = FixedIntervalMetrics(resize_pred=True)
    m.update(pred, gt)
    assert m.total[t_index(0.3)].tolist() == [6, 0, 0, 3]
    assert m.total[t_index(0.5)].tolist() == [3, 0, 3, 3]  # 0.5 is not > 0.5
    with pytest.raises(ValueError, match="resize_pred"):
        FixedIntervalMetrics().update(pred, gt)


def test_pr_ties_are_flagged_and_ordered_by_precision() -> None:
    # positives 0.9, 0.9, 0.1; negatives 0.5, 0.3, 0.3: recall 2/4 at three precisions.
    pred = np.array([[0.9, 0.9, 0.1, 0.5, 0.3, 0.3]])
    gt = np.array([[1, 1, 1, 0, 0, 0]])
    m = FixedIntervalMetrics()
    m.update(pred, gt)
    r, p, ties = m.pr_curve()
    assert ties is True
    assert r.tolist() == pytest.approx([0.5, 0.5, 0.5, 0.75])
    assert p.tolist() == pytest.approx([2 / 6, 2 / 4, 2 / 3, 3 / 7])  # ties: precision ascending
    assert m.ap() == simpson_avg(p, r)
    assert m.compute()["ap_ties"] is True


# SciPy 1.10.1 `scipy.integrate.simps(y, x)` values (even='avg'), recorded once in a separate env.
SIMPS_1_10_1 = [
    ([0.05, 0.2, 0.3, 0.55, 0.7, 0.95], [0.95, 0.9, 0.85, 0.6, 0.5, 0.2], 0.5805138888888889),
    ([0.0, 0.1, 0.3, 0.6, 1.0], [1.0, 0.8, 0.7, 0.4, 0.1], 0.4920833333333333),
    ([0.1, 0.2, 0.2, 0.5, 0.7, 0.9], [0.9, 0.7, 0.8, 0.6, 0.5, 0.3], 0.42902777777777773),
    ([0.0, 0.1, 0.5, 1.0], [1.0, 0.9, 0.5, 0.0], 0.49999999999999994),
    ([0.2, 0.6], [0.5, 0.25], 0.15),
    ([0.3], [0.7], 0.0),
]


@pytest.mark.parametrize(("x", "y", "expected"), SIMPS_1_10_1)
def test_simpson_avg_matches_old_scipy(x: list[float], y: list[float], expected: float) -> None:
    assert simpson_avg(y, x) == pytest.approx(expected, abs=1e-13)


def test_simpson_avg_vs_new_scipy() -> None:
    integrate = pytest.importorskip("scipy.integrate")
    x, y, old = SIMPS_1_10_1[0]
    new = float(integrate.simpson(y, x=x))
    if hasattr(integrate, "simps"):  # SciPy < 1.11 would agree; nothing to contrast
        return
    assert new == pytest.approx(0.5788194444444444, abs=1e-9)  # SciPy >= 1.11 even-N rule
    assert abs(new - simpson_avg(y, x)) > 1e-3
    rng = np.random.default_rng(0)
    for n in (3, 5, 9):  # odd N: both rules are plain composite Simpson
        xs = np.sort(rng.random(n))
        ys = rng.random(n)
        assert simpson_avg(ys, xs) == pytest.approx(float(integrate.simpson(ys, x=xs)), abs=1e-12)


def test_simpson_avg_edge_cases() -> None:
    assert simpson_avg([], []) == 0.0
    assert simpson_avg([1.0, 1.0, 1.0], [0.5, 0.5, 0.5]) == 0.0  # zero-width intervals give 0
    assert simpson_avg([2.0, 4.0], [0.0, 1.0]) == 3.0  # N = 2: trapezoid
    with pytest.raises(ValueError):
        simpson_avg([1.0, 2.0], [0.0])


def test_value_at_off_grid_and_custom_grid() -> None:
    m = FixedIntervalMetrics()
    m.update(C1_PRED, C1_GT)
    assert m.value_at(0.7)["threshold"] == pytest.approx(0.7)  # 0.7000000000000001 on the grid
    with pytest.raises(ValueError, match="not on the grid"):
        m.value_at(0.31)
    coarse = FixedIntervalMetrics(n_values=11)
    assert coarse.thresholds.size == 9
    coarse.update(C1_PRED, C1_GT)
    assert coarse.value_at(0.3)["fgiou"] == pytest.approx(3 / 7)


def test_invalid_inputs() -> None:
    m = FixedIntervalMetrics()
    with pytest.raises(ValueError, match="0 and 1"):
        m.update(C1_PRED, C1_GT * 255)
    with pytest.raises(ValueError, match="NaN"):
        m.update(np.full((1, 2), np.nan), np.array([[0, 1]]))
    with pytest.raises(ValueError):
        m.update(C1_PRED, C1_GT, ignore=np.zeros((3, 3), bool))
    assert m.n_samples == 0 and m.total.sum() == 0


def test_state_dict_merge_and_batch() -> None:
    full = FixedIntervalMetrics()
    full.update_batch(np.stack([C1_PRED, C1_PRED]), np.stack([C1_GT, C1_GT]), [0, None])
    full.update(C2_PRED, C2_GT, 0)
    full.update(C2_PRED, C2_GT)
    a, b = FixedIntervalMetrics(), FixedIntervalMetrics()
    a.update(C1_PRED, C1_GT, 0)
    a.update(C1_PRED, C1_GT)
    b.update(C2_PRED, C2_GT, 0)
    b.update(C2_PRED, C2_GT)
    merged = a.merge(b)
    assert merged.n_samples == full.n_samples == 4
    assert merged.compute() == full.compute()
    state = full.state_dict()
    assert state["class_counts"].shape == (1, 49, 4) and state["sample_counts"].shape == (2, 49, 4)
    assert state["total"].dtype == np.int64
    restored = FixedIntervalMetrics.from_state_dict(state)
    assert restored.compute() == full.compute()
    with pytest.raises(ValueError):
        FixedIntervalMetrics(n_values=11).merge(full)


def test_module_does_not_import_torch() -> None:
    tree = ast.parse(Path(clipseg.__file__).read_text(encoding="utf-8"))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any(x.split(".")[0] == "torch" for x in names)
