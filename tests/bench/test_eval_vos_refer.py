"""`promptseg eval vos` and `promptseg eval refer` end to end on the miniature datasets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from promptseg.cli import main
from promptseg.testing.mini_dense import make_mini_dense


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini_dense")
    make_mini_dense(root, ["davis", "phrasecut"])
    return root


def run(mini, out, benchmark, dataset, model, *extra):
    argv = ["eval", benchmark, "--dataset", dataset, "--model", model]
    argv += ["--data-root", str(mini), "--out", str(out), *extra]
    assert main(argv) == 0
    path = out / benchmark / dataset / "-" / "-" / model / "result.json"
    return json.loads(path.read_text())


@pytest.mark.parametrize("dataset", ["davis17-val", "davis16-val"])
def test_vos_colorkey_is_perfect(mini, tmp_path, dataset):
    result = run(mini, tmp_path, "vos", dataset, "test_colorkey", "--save-pngs")
    m = result["metrics"]
    assert m["J&F-Mean"] == m["J-Mean"] == m["F-Mean"] == 100.0
    assert m["J-Recall"] == m["F-Recall"] == 100.0 and m["J-Decay"] == m["F-Decay"] == 0.0
    assert result["n_objects"] == (5 if dataset == "davis17-val" else 1)
    assert result["sequences"] == (
        ["bmx-trees", "dogs-jump"] if dataset == "davis17-val" else ["bmx-trees"]
    )
    row = result["per_object"][0]
    assert row["J-Mean"] == row["F-Mean"] == 1.0 and "J" not in row
    frames = result["accumulators"][row["name"]]
    assert frames["frames"] == ["00001", "00002", "00003", "00004"]  # first and last excluded
    assert frames["J"] == frames["F"] == [1.0] * 4
    assert set(result["accumulators"]) == {r["name"] for r in result["per_object"]}
    assert result["protocol"]["memory"] is None  # ColorKey has no video memory
    assert {"model", "env", "protocol", "timing"} <= set(result)
    assert result["schema_version"] == 1 and result["benchmark"] == "vos"
    # indexed palette PNGs at GT size, labels as the model numbered them (merged for DAVIS-16)
    run_dir = tmp_path / "vos" / dataset / "-" / "-" / "test_colorkey"
    pngs = sorted((run_dir / "pngs" / "bmx-trees").glob("*.png"))
    assert [p.stem for p in pngs] == [f"{t:05d}" for t in range(6)]
    with Image.open(pngs[2]) as im:
        assert im.mode == "P" and im.size == (112, 64)
        labels = set(np.unique(np.asarray(im)).tolist())
    assert labels == ({0, 1, 2} if dataset == "davis17-val" else {0, 1})


def test_vos_empty_gives_the_edge_values(mini, tmp_path):
    # nothing predicted: J = F = 0 wherever the object exists; dogs-jump object 3 leaves the scene
    # after frame 3, so on evaluated frame 4 GT and prediction are both empty -> J = F = 1
    r17 = run(mini, tmp_path, "vos", "davis17-val", "test_empty")
    rows = r17["accumulators"]
    assert rows["dogs-jump_3"]["J"] == rows["dogs-jump_3"]["F"] == [0.0, 0.0, 0.0, 1.0]
    for name in ("bmx-trees_1", "bmx-trees_2", "dogs-jump_1", "dogs-jump_2"):
        assert rows[name]["J"] == rows[name]["F"] == [0.0] * 4
    m = r17["metrics"]
    assert m["J-Mean"] == pytest.approx(100 * 0.25 / 5)  # per-object averaging (P15)
    assert m["J&F-Mean"] == pytest.approx(5.0) and m["F-Mean"] == pytest.approx(5.0)
    assert not (tmp_path / "vos" / "davis17-val" / "-" / "-" / "test_empty" / "pngs").exists()
    r16 = run(mini, tmp_path, "vos", "davis16-val", "test_empty")
    assert r16["metrics"]["J&F-Mean"] == 0.0 and r16["n_objects"] == 1


def test_vos_shifted_matches_direct_scoring(mini, tmp_path):
    r = run(mini, tmp_path, "vos", "davis16-val", "test_shifted")
    assert 0.0 < r["metrics"]["J-Mean"] < 100.0
    assert r["metrics"]["J&F-Mean"] == pytest.approx(
        (r["metrics"]["J-Mean"] + r["metrics"]["F-Mean"]) / 2
    )


def test_vos_resume_skips_written_sequences(mini, tmp_path, monkeypatch, interrupted_after):
    full = run(mini, tmp_path / "full", "vos", "davis17-val", "test_colorkey")
    from promptseg.models.testing import ColorKey

    with interrupted_after(1):
        run(mini, tmp_path / "res", "vos", "davis17-val", "test_colorkey")
    calls = []
    video = ColorKey.segment_video

    def counting(self, frames, first_mask):
        calls.append(frames[0])
        return video(self, frames, first_mask)

    monkeypatch.setattr(ColorKey, "segment_video", counting)
    resumed = run(mini, tmp_path / "res", "vos", "davis17-val", "test_colorkey", "--resume")
    assert len(calls) == 1 and "dogs-jump" in calls[0]
    assert resumed["metrics"] == full["metrics"]
    assert resumed["per_object"] == full["per_object"]
    assert resumed["accumulators"] == full["accumulators"]
    assert not next((tmp_path / "res").rglob("result.json")).with_name("progress.json").exists()


def test_vos_passes_the_dataset_memory_size(mini, tmp_path, monkeypatch):
    from promptseg.models.testing import ColorKey

    seen = []
    video = ColorKey.segment_video

    def with_memory(self, frames, first_mask, *, memory=None):
        seen.append(memory)
        return video(self, frames, first_mask)

    monkeypatch.setattr(ColorKey, "segment_video", with_memory)
    r16 = run(mini, tmp_path, "vos", "davis16-val", "test_colorkey")
    assert seen == [2] and r16["protocol"]["memory"] == 2  # SINE: DAVIS-16 keeps 2 frames
    seen.clear()
    r17 = run(mini, tmp_path, "vos", "davis17-val", "test_colorkey")
    assert seen == [6, 6] and r17["protocol"]["memory"] == 6
    assert r17["metrics"]["J&F-Mean"] == 100.0


def _expected_refer(mini):
    """Per-phrase smoothed IoU of a perfect prediction: |GT| / (1 + |GT|) at 352x352."""
    from promptseg.data.dense import PhraseCutDataset
    from promptseg.transforms import resize_mask

    data = PhraseCutDataset(mini)
    sizes = [
        int(resize_mask(torch.from_numpy(data.gt_mask(s.image_id, s.j)), (352, 352)).sum())
        for s in data.samples()
    ]
    return sizes


def test_refer_colorkey_is_perfect_and_empty_scores_zero(mini, tmp_path):
    r = run(mini, tmp_path, "refer", "phrasecut-test", "test_colorkey", "--thresholds", "0.3,0.5")
    sizes = _expected_refer(mini)
    assert r["n_samples"] == len(sizes) == 4  # the listed invalid image id is left out
    miou = 100 * np.mean([n / (1 + n) for n in sizes])
    fg = 100 * sum(sizes) / (1 + sum(sizes))
    for t in ("0.3", "0.5"):
        assert r["metrics"][f"mIoU@{t}"] == pytest.approx(miou, abs=1e-9)
        assert r["metrics"][f"IoU_FG@{t}"] == pytest.approx(fg, abs=1e-9)
    assert r["oracle"]["oracle"] is True and r["oracle"]["mIoU"] == pytest.approx(miou)
    assert r["protocol"]["resolution"] == "model:352"
    assert r["protocol"]["thresholds"] == [0.3, 0.5]
    tp, fp, fn, _ = r["accumulators"]["total"][14]  # t = 0.3
    assert (tp, fp, fn) == (sum(sizes), 0, 0)

    e = run(mini, tmp_path, "refer", "phrasecut-test", "test_empty")
    assert e["protocol"]["thresholds"] == [0.3]  # 'paper'
    assert e["metrics"] == {
        "mIoU@0.3": 0.0,
        "IoU_FG@0.3": 0.0,
        "IoU_BIN@0.3": e["metrics"]["IoU_BIN@0.3"],
        "AP": 0.0,
    }
    assert 0.0 < e["metrics"]["IoU_BIN@0.3"] < 50.0  # background IoU only
    assert e["oracle"]["mIoU"] == 0.0


def test_refer_thresholds_must_be_on_the_grid(mini, tmp_path):
    from promptseg.bench.refer import parse_thresholds

    assert parse_thresholds("paper") == [0.3]
    assert parse_thresholds("0.1,0.5") == [0.1, 0.5]
    with pytest.raises(ValueError, match="grid"):
        parse_thresholds("0.31")
    with pytest.raises(ValueError, match="paper"):
        parse_thresholds("high")


def test_refer_resume_gives_the_uninterrupted_numbers(
    mini, tmp_path, monkeypatch, interrupted_after
):
    full = run(mini, tmp_path / "full", "refer", "phrasecut-test", "test_shifted")
    from promptseg.models.base import PromptSegModel
    from promptseg.models.testing import ColorKey

    with interrupted_after(1, every=1):
        run(mini, tmp_path / "res", "refer", "phrasecut-test", "test_shifted")
    progress = next((tmp_path / "res").rglob("progress.json"))
    assert json.loads(progress.read_text())["done"] == [0]
    images = []

    def counting(self, image, prompt, **kw):
        images.append(image)
        return PromptSegModel.segment(self, image, prompt, **kw)

    monkeypatch.setattr(ColorKey, "segment", counting)
    resumed = run(mini, tmp_path / "res", "refer", "phrasecut-test", "test_shifted", "--resume")
    assert len(images) == 1  # only the second image is segmented again
    assert resumed["accumulators"] == full["accumulators"]
    assert resumed["metrics"] == full["metrics"] and 0 < full["metrics"]["mIoU@0.3"] < 100
    assert not progress.exists()
