"""`promptseg eval perseg` end to end on the miniature PerSeg."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from promptseg.cli import main
from promptseg.data import PerSegDataset
from promptseg.metrics import evaluate_perseg
from promptseg.testing import make_mini


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini_perseg")
    make_mini(root, "perseg")
    return root


def run(mini, out, model, *extra):
    argv = ["eval", "perseg", "--model", model, "--data-root", str(mini), "--out", str(out)]
    assert main([*argv, *extra]) == 0
    return json.loads((out / "perseg" / "perseg" / "-" / "1" / model / "result.json").read_text())


def test_colorkey_is_perfect_and_preds_rescore_identically(mini, tmp_path, capsys):
    r = run(mini, tmp_path, "test_colorkey", "--save-preds")
    assert "mIoU 100.00  mAcc 100.00  (3 objects, 15 query images)" in capsys.readouterr().out
    assert r["metrics"]["mIoU"] == pytest.approx(100.0, abs=1e-8)  # 1e-10 denominators
    assert r["metrics"]["mAcc"] == pytest.approx(100.0, abs=1e-8)
    assert [row["n_images"] for row in r["per_object"]] == [3, 2, 10]
    assert all(row["inter"] == row["union"] == row["target"] > 0 for row in r["per_object"])
    assert r["schema_version"] == 1 and r["benchmark"] == "perseg" and r["shots"] == 1
    assert r["protocol"]["resolution"] == "original" and r["n_images"] == 15
    assert {"model", "env", "protocol", "timing", "accumulators", "items_digest"} <= set(r)
    # the saved PNGs re-scored from disk give the same integer sums
    rescored = evaluate_perseg(mini / "data" / "Annotations", r["preds"])
    assert rescored.state_dict() == r["accumulators"]


def test_empty_scores_the_edge_value(mini, tmp_path):
    r = run(mini, tmp_path, "test_empty")
    assert r["metrics"] == {"mIoU": 0.0, "mAcc": 0.0}
    assert all(row["inter"] == 0 and row["union"] == row["target"] for row in r["per_object"])
    run_dir = tmp_path / "perseg" / "perseg" / "-" / "1" / "test_empty"
    assert r["preds"] is None and not (run_dir / "preds").exists()


def test_shifted_matches_hand_shifted_ground_truth(mini, tmp_path):
    data = PerSegDataset(mini)
    inter: dict[str, int] = {}
    union: dict[str, int] = {}
    for item in data.items():
        gt = data.mask(item)
        pred = np.zeros_like(gt)
        pred[:, 8:] = gt[:, :-8]  # test_shifted: dx = 8, zero-filled
        inter[item.object] = inter.get(item.object, 0) + int((pred & gt).sum())
        union[item.object] = union.get(item.object, 0) + int((pred | gt).sum())
    r = run(mini, tmp_path, "test_shifted")
    assert r["accumulators"]["inter"] == [inter[o] for o in data.objects()]
    assert r["accumulators"]["union"] == [union[o] for o in data.objects()]
    expected = 100 * sum(inter[o] / (union[o] + 1e-10) for o in data.objects()) / 3
    assert r["metrics"]["mIoU"] == pytest.approx(expected, abs=1e-12)
    assert 0.0 < r["metrics"]["mIoU"] < 100.0


def test_resume_gives_the_uninterrupted_numbers(mini, tmp_path, monkeypatch, interrupted_after):
    from promptseg.bench import perseg, runner
    from promptseg.models.testing import ColorKey

    full = run(mini, tmp_path / "full", "test_shifted")
    monkeypatch.setattr(perseg, "Progress", functools.partial(runner.Progress, every=4))
    with interrupted_after(5):
        run(mini, tmp_path / "res", "test_shifted")
    calls = []
    segment = ColorKey.segment

    def counting(self, *a, **k):
        calls.append(1)
        return segment(self, *a, **k)

    monkeypatch.setattr(ColorKey, "segment", counting)
    resumed = run(mini, tmp_path / "res", "test_shifted", "--resume")
    assert len(calls) == 15 - 4  # the first 4 images were checkpointed before the crash
    assert resumed["metrics"] == full["metrics"]
    assert resumed["accumulators"] == full["accumulators"]
    assert not next((tmp_path / "res").rglob("result.json")).with_name("progress.json").exists()


def test_bad_data_root_is_a_one_line_error(tmp_path, capsys):
    argv = ["eval", "perseg", "--model", "test_empty", "--data-root", str(tmp_path)]
    assert main([*argv, "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "promptseg eval perseg: error: PerSeg: layout not found" in err
    assert str(tmp_path / "data" / "Images") in err
