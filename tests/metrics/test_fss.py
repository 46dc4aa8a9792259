"""Tests of promptseg.metrics.fss: worked examples of benchmarks.md §3.1 and edge cases."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest

from promptseg.metrics import fss
from promptseg.metrics.fss import FewShotSegEvaluator


def m(rows: str) -> np.ndarray:
    """'0110/0011' -> 2-D uint8 array (rows top to bottom)."""
    return np.array([[int(c) for c in r] for r in rows.split("/")], dtype=np.uint8)


FSS1 = [  # (class, pred, gt)
    (0, "0000/0110/0110/0000", "0000/0111/0111/0000"),
    (4, "1100/1100/0000/0000", "0000/0000/0011/0011"),
    (0, "0000/0000/0011/0011", "0000/0000/0011/0010"),
]


def run_fss1() -> FewShotSegEvaluator:
    ev = FewShotSegEvaluator([0, 4])
    for c, p, g in FSS1:
        ev.update(m(p), m(g), c)
    return ev


def test_fss1_per_episode_counts() -> None:
    expected = [([10, 4], [12, 6]), ([8, 0], [16, 8]), ([12, 3], [13, 4])]
    for (c, p, g), (inter, union) in zip(FSS1, expected, strict=True):
        ev = FewShotSegEvaluator([c])
        ev.update(m(p), m(g), c)
        assert ev.inter[:, 0].tolist() == inter
        assert ev.union[:, 0].tolist() == union


def test_fss1_miou_fbiou() -> None:
    ev = run_fss1()
    assert ev.miou() == pytest.approx(35.0, abs=1e-4)
    assert ev.fbiou() == pytest.approx(56.0298, abs=1e-4)
    assert ev.fbiou() == pytest.approx(100 * (30 / 41 + 7 / 18) / 2, abs=1e-12)
    assert ev.per_class() == pytest.approx({0: 70.0, 4: 0.0})
    assert ev.inter.tolist() == [[22, 8], [7, 0]]
    assert ev.union.tolist() == [[25, 16], [10, 8]]
    assert ev.n_episodes.tolist() == [2, 1]
    assert ev.inter.dtype == np.int64 and ev.union.dtype == np.int64


def test_fss2_pascal_ignore() -> None:
    gt, ign, pred = m("0000/0110/0110/0000"), m("0000/0001/0001/0000"), m("0000/0111/0111/0000")
    ev = FewShotSegEvaluator(range(5))
    ev.update(pred, gt, 2, ignore=ign.astype(bool))
    assert ev.inter[:, 2].tolist() == [10, 4] and ev.union[:, 2].tolist() == [10, 4]
    assert ev.per_class()[2] == pytest.approx(100.0)
    assert ev.miou() == pytest.approx(20.0, abs=1e-4)
    assert ev.fbiou() == pytest.approx(100.0, abs=1e-4)

    ev = FewShotSegEvaluator(range(5))
    ev.update(pred, gt, 2)
    assert ev.union[:, 2].tolist() == [12, 6]
    assert ev.miou() == pytest.approx(13.3333, abs=1e-4)
    assert ev.fbiou() == pytest.approx(75.0, abs=1e-4)


def test_fss3_empty_and_unsampled_classes() -> None:
    ev = FewShotSegEvaluator([1, 5, 9])
    ev.update(m("00/00"), m("00/00"), 1)
    ev.update(m("10/10"), m("11/11"), 5)
    assert ev.inter.tolist() == [[4, 0, 0], [0, 2, 0]]
    assert ev.union.tolist() == [[4, 2, 0], [0, 4, 0]]
    assert ev.per_class() == pytest.approx({1: 0.0, 5: 50.0, 9: 0.0})  # empty/empty scores 0, not 1
    assert ev.miou() == pytest.approx(16.6667, abs=1e-4)
    assert ev.fbiou() == pytest.approx(58.3333, abs=1e-4)
    assert ev.n_episodes.tolist() == [1, 1, 0]


def test_no_episodes() -> None:
    ev = FewShotSegEvaluator([0, 1])
    assert ev.miou() == 0.0
    assert math.isnan(ev.fbiou())


def test_empty_prediction_and_empty_gt() -> None:
    ev = FewShotSegEvaluator([0])
    ev.update(np.zeros((3, 3), bool), m("110/000/000"), 0)  # empty prediction
    assert ev.inter[:, 0].tolist() == [7, 0] and ev.union[:, 0].tolist() == [9, 2]
    ev2 = FewShotSegEvaluator([0])
    ev2.update(m("110/000/000"), np.zeros((3, 3), bool), 0)  # empty GT
    assert ev2.inter[:, 0].tolist() == [7, 0] and ev2.union[:, 0].tolist() == [9, 2]
    assert ev.miou() == 0.0 and ev2.miou() == 0.0
    assert ev.fbiou() == pytest.approx(100 * (7 / 9 + 0) / 2)


def test_fbiou_nan_when_foreground_pool_is_zero() -> None:
    ev = FewShotSegEvaluator([0])
    ev.update(np.zeros((2, 2)), np.zeros((2, 2)), 0)
    assert math.isnan(ev.fbiou())  # fg union sum 0 -> 0/0 as in the reference
    assert ev.miou() == 0.0


def test_all_ignore_episode_counts_nothing() -> None:
    ev = FewShotSegEvaluator([3])
    ev.update(np.ones((2, 2)), np.zeros((2, 2)), 3, ignore=np.ones((2, 2), bool))
    assert ev.inter.tolist() == [[0], [0]] and ev.union.tolist() == [[0], [0]]
    assert ev.n_episodes.tolist() == [1]
    assert ev.miou() == 0.0


def test_predicted_foreground_on_ignore_is_dropped() -> None:
    ev = FewShotSegEvaluator([0])
    ev.update(m("11/00"), m("10/00"), 0, ignore=m("01/00"))
    assert ev.inter[:, 0].tolist() == [2, 1] and ev.union[:, 0].tolist() == [2, 1]


def test_invalid_inputs() -> None:
    ev = FewShotSegEvaluator([0, 1])
    with pytest.raises(ValueError, match="GT foreground"):
        ev.update(m("10"), m("10"), 0, ignore=m("10"))
    with pytest.raises(ValueError, match="not one of"):
        ev.update(m("10"), m("10"), 7)
    with pytest.raises(ValueError, match="0 and 1"):
        ev.update(np.array([[2, 0]]), m("10"), 0)
    with pytest.raises(ValueError, match="shape"):
        ev.update(m("10"), m("100"), 0)
    with pytest.raises(ValueError, match="duplicates"):
        FewShotSegEvaluator([1, 1])
    with pytest.raises(ValueError):
        FewShotSegEvaluator([])
    assert ev.n_episodes.sum() == 0  # failed updates leave no trace


def test_bool_int_float_and_tensor_like_inputs_agree() -> None:
    class FakeTensor:
        def __init__(self, a: np.ndarray) -> None:
            self.a = a

        def detach(self) -> FakeTensor:
            return self

        def cpu(self) -> FakeTensor:
            return self

        def numpy(self) -> np.ndarray:
            return self.a

    c, p, g = FSS1[0]
    variants = [
        (m(p), m(g)),
        (m(p).astype(bool), m(g).astype(bool)),
        (m(p).astype(np.float32), m(g).astype(np.int64)),
        (FakeTensor(m(p)), FakeTensor(m(g))),
    ]
    states = []
    for pp, gg in variants:
        ev = FewShotSegEvaluator([0])
        ev.update(pp, gg, 0)
        states.append(ev.state_dict())
    assert all(s == states[0] for s in states)


def test_state_dict_json_roundtrip_and_merge() -> None:
    full = run_fss1()
    state = json.loads(json.dumps(full.state_dict()))
    assert state == {
        "class_ids": [0, 4],
        "inter": [[22, 8], [7, 0]],
        "union": [[25, 16], [10, 8]],
        "n_episodes": [2, 1],
    }
    restored = FewShotSegEvaluator.from_state_dict(state)
    assert restored.miou() == full.miou() and restored.fbiou() == full.fbiou()

    shards = [FewShotSegEvaluator([0, 4]) for _ in range(2)]
    for i, (c, p, g) in enumerate(FSS1):
        shards[i % 2].update(m(p), m(g), c)
    merged = shards[0].merge(shards[1])
    assert merged.state_dict() == full.state_dict()

    with pytest.raises(ValueError):
        FewShotSegEvaluator([0, 5]).load_state_dict(state)
    with pytest.raises(ValueError):
        FewShotSegEvaluator([0, 5]).merge(full)


def test_records() -> None:
    rec = run_fss1().records()
    assert rec[0] == {
        "class_id": 0,
        "iou": pytest.approx(70.0),
        "inter_fg": 7,
        "union_fg": 10,
        "inter_bg": 22,
        "union_bg": 25,
        "n_episodes": 2,
    }
    assert rec[1]["class_id"] == 4 and rec[1]["iou"] == 0.0


def test_large_counts_are_exact() -> None:
    # 2^24 + 1 pixels would round in float32 accumulation (HSNet); int64 stays exact.
    ev = FewShotSegEvaluator([0])
    big = np.ones((4097, 4097), dtype=bool)
    ev.update(big, big, 0)
    assert ev.inter[1, 0] == 4097 * 4097 and ev.union[1, 0] == 4097 * 4097


def test_module_does_not_import_torch() -> None:
    tree = ast.parse(Path(fss.__file__).read_text(encoding="utf-8"))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not any(x.split(".")[0] == "torch" for x in names)
