"""Generated bad and good inputs for every public metric entry point (tests/robustness.py)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pycocotools import mask as mask_utils

from promptseg.metrics import davis
from promptseg.metrics.clipseg import FixedIntervalMetrics, resize_bilinear_align_corners
from promptseg.metrics.coco_ap import STAT_NAMES, coco_mask_ap
from promptseg.metrics.fss import FewShotSegEvaluator
from promptseg.metrics.panoptic import pq_results, pq_stat_image
from promptseg.metrics.perseg import PerSegEvaluator
from promptseg.metrics.semseg import SemSegEvaluator
from tests.robustness import run_case

N = 400  # examples per test

DTYPES = st.sampled_from(
    [np.bool_, np.uint8, np.int8, np.int32, np.int64, np.uint16, np.float16, np.float32, np.float64]
)
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)
SHAPE2 = hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=6)


def masks(shape=SHAPES, binary_bias: bool = True) -> st.SearchStrategy[Any]:
    """Arrays of every dtype and shape: mostly 0/1, sometimes any value (NaN, inf, 255, -1)."""
    binary = st.tuples(shape, DTYPES).flatmap(
        lambda sd: hnp.arrays(sd[1], sd[0], elements=st.sampled_from([0, 1]).map(sd[1]))
    )
    anything = st.tuples(shape, DTYPES).flatmap(lambda sd: hnp.arrays(sd[1], sd[0]))
    odd = st.sampled_from([None, "mask", 3, [[0, 1], [1]], [[True, False]], np.array(["a"])])
    if binary_bias:
        return st.one_of(binary, binary, binary, anything, odd)
    return st.one_of(anything, odd)


def pair(shape2=SHAPE2) -> st.SearchStrategy[tuple[Any, Any]]:
    """(gt, pred): same-shape binary pairs most of the time, otherwise anything."""
    same = shape2.flatmap(
        lambda s: st.tuples(
            hnp.arrays(np.bool_, s), hnp.arrays(st.sampled_from([np.bool_, np.uint8]), s)
        )
    )
    return st.one_of(same, same, st.tuples(masks(), masks()))


def in_range(x: float, lo: float, hi: float) -> None:
    assert math.isfinite(x) and lo <= x <= hi, f"{x} not in [{lo}, {hi}]"


def iou(g: np.ndarray, p: np.ndarray) -> float:
    u = np.count_nonzero(g | p)
    return np.count_nonzero(g & p) / u if u else 1.0


# ------------------------------------------------------------------------------------------- fss


@settings(max_examples=N)
@given(
    ids=st.one_of(
        st.just([0, 1, 2]),
        st.just([0, 1, 2]),
        st.lists(st.integers(-3, 50), max_size=4),
        st.sampled_from([["a"], "ab", 3, None, [1.5], [True], [np.int64(2)]]),
    ),
    gp=pair(),
    cls=st.one_of(st.integers(0, 2), st.integers(0, 2), st.sampled_from([-1, "1", 1.0, None])),
    ignore=st.one_of(st.none(), st.none(), masks(SHAPE2)),
)
def test_fss(ids: Any, gp: tuple[Any, Any], cls: Any, ignore: Any) -> None:
    gt, pred = gp

    def call() -> FewShotSegEvaluator:
        ev = FewShotSegEvaluator(ids)
        ev.update(pred, gt, cls, ignore)
        return ev

    def check(ev: FewShotSegEvaluator) -> None:
        g, p = np.asarray(gt, bool), np.asarray(pred, bool)
        assert (ev.inter >= 0).all() and (ev.union >= ev.inter).all()
        in_range(ev.miou(), 0, 100)
        for v in ev.per_class().values():
            in_range(v, 0, 100)
        fb = ev.fbiou()
        assert math.isnan(fb) == bool((ev.union.sum(axis=1) == 0).any())
        if not math.isnan(fb):
            in_range(fb, 0, 100)
        if ignore is None:
            u = np.count_nonzero(g | p)
            want = np.count_nonzero(g & p) / u if u else 0.0
            assert math.isclose(ev.per_class()[int(cls)], 100 * want)

    run_case("fss.update", call, check)


# ------------------------------------------------------------------------------------------ davis


@settings(max_examples=N)
@given(gp=pair(hnp.array_shapes(min_dims=2, max_dims=3, min_side=0, max_side=7)))
def test_davis_j(gp: tuple[Any, Any]) -> None:
    gt, pred = gp

    def check(j: Any) -> None:
        g, p = np.asarray(gt, bool), np.asarray(pred, bool)
        vals = np.atleast_1d(j)
        assert all(0 <= v <= 1 for v in vals)
        if g.ndim == 2:
            assert math.isclose(j, iou(g, p))
            assert davis.j_measure(gt, gt) == 1.0
            if g.any():
                assert davis.j_measure(gt, np.zeros_like(g)) == 0.0

    run_case("davis.j_measure", lambda: davis.j_measure(gt, pred), check)


@settings(max_examples=N)
@given(
    gp=pair(hnp.array_shapes(min_dims=2, max_dims=3, min_side=0, max_side=7)),
    th=st.one_of(
        st.just(0.008),
        st.floats(allow_nan=True, allow_infinity=True, width=32),
        st.integers(-2, 4),
        st.sampled_from(["0.1", None, True]),
    ),
)
def test_davis_f(gp: tuple[Any, Any], th: Any) -> None:
    gt, pred = gp

    def check(f: Any) -> None:
        vals = np.atleast_1d(f)
        assert all(0 <= v <= 1 for v in vals)
        if np.asarray(gt).ndim == 2:
            assert davis.f_measure(gt, gt, th) == 1.0

    run_case("davis.f_measure", lambda: davis.f_measure(gt, pred, th), check)


@settings(max_examples=N)
@given(
    v=st.one_of(
        st.lists(st.floats(0, 1), max_size=30),
        st.lists(st.one_of(st.floats(0, 1), st.just(math.nan)), max_size=10),
        masks(),
        st.sampled_from([3, "abc", None, [[0.5]], [[1], [2, 3]]]),
    )
)
def test_davis_statistics(v: Any) -> None:
    def check(stats: tuple[float, float, float]) -> None:
        a = np.asarray(v, dtype=np.float64)
        mean, recall, decay = stats
        if a.size == 0 or np.isnan(a).all():
            assert math.isnan(mean)
            return
        if np.nanmin(a) >= 0 and np.nanmax(a) <= 1:
            in_range(mean, 0, 1)
            in_range(recall, 0, 1)
            assert math.isnan(decay) or -1 <= decay <= 1
            assert math.isclose(mean, float(np.nanmean(a)))

    run_case("davis.db_statistics", lambda: davis.db_statistics(v), check)


def _write_png(path, a: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


@settings(max_examples=60)
@given(
    n_frames=st.integers(0, 4),
    hw=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    data=st.data(),
)
def test_davis_evaluate(tmp_path_factory, n_frames: int, hw: tuple[int, int], data) -> None:
    root = tmp_path_factory.mktemp("davis")
    labels = st.sampled_from([0, 1, 2, 255]).map(np.uint8)
    for i in range(n_frames):
        size = hw if data.draw(st.integers(0, 9)) else (hw[0] + 1, hw[1])
        _write_png(
            root / f"Annotations/480p/s/{i:05d}.png",
            data.draw(hnp.arrays(np.uint8, size, elements=labels)),
        )
        if 0 < i < n_frames - 1 and data.draw(st.integers(0, 9)):
            res = root / f"res/s/{i:05d}.png"
            if data.draw(st.integers(0, 9)):
                _write_png(res, data.draw(hnp.arrays(np.uint8, size, elements=labels)))
            else:
                res.parent.mkdir(parents=True, exist_ok=True)
                res.write_bytes(b"\x89PNG\r\n truncated")
    seqs = data.draw(st.sampled_from([["s"], "s", [3], ["../x"], []]))

    def check(out: dict[str, Any]) -> None:
        assert out["n_objects"] >= 0
        for row in out["per_object"]:
            for k in ("J-Mean", "F-Mean", "J-Recall", "F-Recall"):
                in_range(row[k], 0, 1)
        if out["n_objects"]:
            in_range(out["J&F-Mean"], 0, 1)

    run_case(
        "davis.evaluate_davis",
        lambda: davis.evaluate_davis(root, root / "res", sequences=seqs),
        check,
    )


# ----------------------------------------------------------------------------------------- semseg


@settings(max_examples=N)
@given(
    k=st.one_of(st.just(5), st.just(5), st.integers(-1, 6), st.sampled_from(["3", None, True])),
    ignore=st.one_of(st.just(255), st.just(255), st.integers(-2, 8), st.sampled_from(["255"])),
    pred=hnp.arrays(np.int64, (3, 4), elements=st.integers(0, 4)) | masks(binary_bias=False),
    gt=hnp.arrays(np.uint8, (3, 4), elements=st.sampled_from([0, 1, 2, 3, 4, 255]))
    | masks(binary_bias=False),
)
def test_semseg(k: Any, ignore: Any, pred: Any, gt: Any) -> None:
    def call() -> tuple[SemSegEvaluator, dict[str, float]]:
        ev = SemSegEvaluator(k, ignore)
        ev.update(pred, gt)
        return ev, ev.compute()

    def check(res: tuple[SemSegEvaluator, dict[str, float]]) -> None:
        ev, out = res
        assert (ev.confusion_matrix >= 0).all()
        assert ev.confusion_matrix.sum() == np.asarray(gt).size
        for v in out.values():
            assert math.isnan(v) or 0 <= v <= 100 + 1e-9
        g = np.asarray(gt).astype(np.int64)
        if not (g != ignore).any():
            assert math.isnan(out["mIoU"])
        if np.array_equal(np.asarray(pred), g) and g.size:
            assert out["mIoU"] == 100.0

    run_case("semseg", call, check)


# --------------------------------------------------------------------------------------- panoptic

CATS = [{"id": 1, "isthing": 1}, {"id": 2, "isthing": 0}, {"id": 7, "isthing": 1}]


def _segments(ids: np.ndarray, draw, crowd: bool) -> list[dict[str, Any]]:
    segs = []
    for sid in np.unique(ids).tolist():
        if sid == 0:
            continue
        segs.append(
            {
                "id": sid,
                "category_id": draw(st.sampled_from([1, 2, 7])),
                "area": int(np.count_nonzero(ids == sid)) + draw(st.sampled_from([0, 0, 0, 3])),
                "iscrowd": int(crowd and draw(st.integers(0, 5)) == 0),
            }
        )
    return segs


@settings(max_examples=N)
@given(
    shape=st.tuples(st.integers(0, 5), st.integers(0, 5)),
    data=st.data(),
)
def test_panoptic(shape: tuple[int, int], data) -> None:
    ids = st.integers(0, 4)
    gt = data.draw(hnp.arrays(np.int64, shape, elements=ids))
    perfect = data.draw(st.integers(0, 3)) == 0
    pred = gt.copy() if perfect else data.draw(hnp.arrays(np.int64, shape, elements=ids))
    gt_segs = _segments(gt, data.draw, crowd=not perfect)
    pred_segs = [dict(s) for s in gt_segs] if perfect else _segments(pred, data.draw, False)
    if perfect:
        for s in gt_segs:
            s["area"] = int(np.count_nonzero(gt == s["id"]))
    mutate = data.draw(st.integers(0, 9))
    if mutate == 0 and gt_segs:
        gt_segs[0] = data.draw(
            st.sampled_from(
                [
                    {},
                    {"id": "x", "category_id": 1},
                    {"id": gt_segs[0]["id"], "category_id": [1]},
                    {**gt_segs[0], "area": -1},
                    {**gt_segs[0], "area": math.nan},
                    5,
                ]
            )
        )
    elif mutate == 1:
        pred = data.draw(st.sampled_from([pred.astype(float), pred[None], "x", -pred - 1]))
    elif mutate == 2 and pred_segs:
        pred_segs[0] = {**pred_segs[0], "category_id": 99}
    cats = CATS if data.draw(st.integers(0, 9)) else [{"id": 1}, 3]

    def call() -> tuple[Any, dict[str, Any]]:
        stat = pq_stat_image(gt, gt_segs, pred, pred_segs, cats)
        return stat, pq_results(stat, cats)

    def check(res: tuple[Any, dict[str, Any]]) -> None:
        stat, out = res
        assert (stat.tp >= 0).all() and (stat.fp >= 0).all() and (stat.fn >= 0).all()
        assert (stat.iou >= 0).all() and (stat.iou <= stat.tp + 1e-9).all()
        for name in ("All", "Things", "Stuff"):
            for k in ("pq", "sq", "rq"):
                v = out[name][k]
                assert (math.isnan(v) and out[name]["n"] == 0) or 0 <= v <= 1 + 1e-12
        if perfect and gt_segs:
            assert out["All"]["pq"] == 1.0

    run_case("panoptic.pq_stat_image", call, check)


# ---------------------------------------------------------------------------------------- coco AP

H = W = 6


def _rle(m: np.ndarray) -> dict[str, Any]:
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode()}


def _gt(boxes: list[np.ndarray]) -> dict[str, Any]:
    anns = []
    for i, m in enumerate(boxes, start=1):
        seg = _rle(m)
        anns.append(
            {"id": i, "image_id": 1, "category_id": 1, "segmentation": seg, "iscrowd": 0,
             "area": float(m.sum()), "bbox": [float(v) for v in mask_utils.toBbox(seg)]}
        )  # fmt: skip
    return {
        "images": [{"id": 1, "height": H, "width": W}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": anns,
    }


def _box_mask(draw) -> np.ndarray:
    y0, x0 = draw(st.integers(0, H - 1)), draw(st.integers(0, W - 1))
    y1, x1 = draw(st.integers(y0 + 1, H)), draw(st.integers(x0 + 1, W))
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


@settings(max_examples=250)
@given(data=st.data())
def test_coco_ap(data) -> None:
    gt_masks = [_box_mask(data.draw) for _ in range(data.draw(st.integers(1, 2)))]
    gt = _gt(gt_masks)
    perfect = data.draw(st.integers(0, 3)) == 0
    dets: Any = []
    for m in (
        gt_masks if perfect else [_box_mask(data.draw) for _ in range(data.draw(st.integers(0, 3)))]
    ):  # noqa: E501
        dets.append({"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": _rle(m)})
    mutate = data.draw(st.integers(0, 12))
    bad: list[Any] = [
        {"category_id": 1, "score": 0.5, "segmentation": _rle(gt_masks[0])},
        {"image_id": 1, "category_id": 1, "segmentation": _rle(gt_masks[0])},
        {"image_id": 1, "category_id": 1, "score": 0.5, "segmentation": gt_masks[0]},
        {"image_id": 1, "category_id": 1, "score": 0.5, "segmentation": "abc"},
        {"image_id": 1, "category_id": 1, "score": math.nan, "segmentation": _rle(gt_masks[0])},
        {"image_id": [1], "category_id": 1, "score": 0.5, "segmentation": _rle(gt_masks[0])},
        {"image_id": 9, "category_id": 1, "score": 0.5, "segmentation": _rle(gt_masks[0])},
        {"image_id": 1, "category_id": 1, "score": 0.5,
         "segmentation": _rle(np.ones((H + 1, W), bool))},
        {"image_id": 1, "category_id": 1, "score": 0.5, "segmentation": {"size": [H, W]}},
        "det",
    ]  # fmt: skip
    if mutate < len(bad):
        dets.append(bad[mutate])
    elif mutate == len(bad):
        dets = data.draw(st.sampled_from([None, "x", {"image_id": 1}, 3]))
    iou_type = data.draw(st.sampled_from(["segm", "segm", "bbox", "mask"]))
    perfect = perfect and mutate > len(bad)

    def check(out: dict[str, Any]) -> None:
        for name in STAT_NAMES:
            v = out[name]
            assert math.isnan(v) or 0 <= v <= 100 + 1e-9
        assert not math.isnan(out["AP"])
        if perfect:
            assert math.isclose(out["AP"], 100.0)
        if not dets:
            assert out["AP"] == 0.0 and out["empty_predictions"] is True

    run_case("coco_ap.coco_mask_ap", lambda: coco_mask_ap(gt, dets, iou_type), check)


# ---------------------------------------------------------------------------------------- clipseg


@settings(max_examples=N)
@given(
    pred=st.one_of(
        hnp.arrays(
            np.float32,
            st.sampled_from([(3, 4), (1, 1), (2, 2), (0, 4), (3,)]),
            elements=st.floats(0, 1, width=32),
        ),
        masks(binary_bias=False),
    ),  # fmt: skip
    gt=st.one_of(
        hnp.arrays(np.bool_, st.sampled_from([(3, 4), (1, 1), (5, 7), (0, 0), (3,)])),
        masks(),
    ),
    sig=st.booleans(),
    resize=st.booleans(),
    cls=st.sampled_from([None, 0, "a", [1]]),
)
def test_clipseg(pred: Any, gt: Any, sig: bool, resize: bool, cls: Any) -> None:
    def call() -> FixedIntervalMetrics:
        m = FixedIntervalMetrics(sigmoid=sig, resize_pred=resize)
        m.update(pred, gt, cls)
        return m

    def check(m: FixedIntervalMetrics) -> None:
        assert (m.total >= 0).all()
        assert (m.total.sum(axis=1) == np.asarray(gt).size).all()
        out = m.compute()
        for k, v in out.items():
            if isinstance(v, float) and not k.endswith("_t"):
                assert 0 <= v <= 1, (k, v)
        g = np.asarray(gt, bool)
        if not sig and np.asarray(pred).shape == g.shape:
            p = np.asarray(pred, np.float32) > np.float32(0.5)
            tp = np.count_nonzero(p & g)
            want = tp / (1 + np.count_nonzero(p | g))
            assert math.isclose(m.value_at(0.5)["fgiou"], want)

    run_case("clipseg.FixedIntervalMetrics", call, check)


@settings(max_examples=N)
@given(
    x=st.one_of(
        hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=5)),
        masks(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5), False),
    ),
    size=st.one_of(
        st.tuples(st.integers(1, 7), st.integers(1, 7)),
        st.tuples(st.integers(-1, 7), st.integers(-1, 7)),
        st.sampled_from([(3,), "ab", (2.5, 3), None, (True, 2)]),
    ),
)
def test_resize_bilinear(x: Any, size: Any) -> None:
    def check(out: np.ndarray) -> None:
        a = np.asarray(x, np.float32)
        assert out.shape == (*a.shape[:-2], *size) and out.dtype == np.float32
        if a.size and np.isfinite(a).all():
            assert out.min() >= a.min() - 1e-3 * (1 + abs(a.min()))
            assert out.max() <= a.max() + 1e-3 * (1 + abs(a.max()))

    run_case("clipseg.resize_bilinear", lambda: resize_bilinear_align_corners(x, size), check)


# ----------------------------------------------------------------------------------------- perseg


@settings(max_examples=N)
@given(
    objects=st.one_of(st.just(["a", "b"]), st.sampled_from([["a", "b"], [], "ab", 3, ["a", "a"]])),
    obj=st.sampled_from(["a", "b", "a", "b", "c", 1, None]),
    gp=pair(),
)
def test_perseg(objects: Any, obj: Any, gp: tuple[Any, Any]) -> None:
    gt, pred = gp

    def call() -> PerSegEvaluator:
        ev = PerSegEvaluator(objects)
        ev.update(obj, pred, gt)
        return ev

    def check(ev: PerSegEvaluator) -> None:
        in_range(ev.miou(), 0, 100)
        in_range(ev.macc(), 0, 100)
        g, p = np.asarray(gt, bool), np.asarray(pred, bool)
        k = ev.objects.index(obj)
        assert ev.inter[k] == np.count_nonzero(g & p) and ev.union[k] == np.count_nonzero(g | p)

    run_case("perseg.PerSegEvaluator", call, check)
