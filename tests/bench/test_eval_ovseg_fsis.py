"""`promptseg eval ovseg` and `promptseg eval fsis` end to end on the miniature datasets."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from promptseg.cli import main
from promptseg.data.dense import PanopticDataset
from promptseg.metrics.panoptic import read_id_png
from promptseg.testing.mini_dense import make_mini_dense
from promptseg.testing.mini_fewshot import make_mini_fewshot

SEMANTIC = ["coco-panoptic", "ade150", "ade847", "pc59", "pc459", "pas21"]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini_ov")
    make_mini_dense(root, datasets=SEMANTIC)
    make_mini_fewshot(root, datasets=["coco-novel"])
    return root


def ovseg(mini, out, model, dataset, *extra):
    argv = ["eval", "ovseg", "--dataset", dataset, "--model", model]
    assert main([*argv, "--data-root", str(mini), "--out", str(out), *extra]) == 0
    path = out / "ovseg" / dataset / "-" / "-" / model / "result.json"
    return json.loads(path.read_text()), path.parent


def fsis(mini, out, model, dataset, shots, *extra):
    argv = ["eval", "fsis", "--dataset", dataset, "--model", model, "--shots", str(shots)]
    argv += ["--seeds", "0-1", "--data-root", str(mini), "--out", str(out), *extra]
    assert main(argv) == 0
    path = out / "fsis" / dataset / "-" / str(shots) / model / "result.json"
    return json.loads(path.read_text())


def ade_hand_pq(mini) -> float:
    """(3 + building) / 4 with building = (n / area + 1) / 2 (see test_dense_readers)."""
    ds = PanopticDataset("ade150", mini)
    for it in ds.items():
        ids = read_id_png(it.panoptic_png)
        for s in it.segments_info:
            n = int((ids == s["id"]).sum())
            if s["area"] > n:
                building = (n / s["area"] + 1.0) / 2
    return 100 * (3 + building) / 4


def test_colorkey_coco_panoptic_is_perfect(mini, tmp_path, capsys):
    res, run = ovseg(mini, tmp_path, "test_colorkey", "coco-panoptic")
    m = res["metrics"]
    assert m["PQ"] == pytest.approx(100.0) and m["PQ_th"] == pytest.approx(100.0)
    assert m["PQ_st"] == pytest.approx(100.0)
    assert m["mIoU"] == pytest.approx(100.0) and m["AP"] == pytest.approx(100.0)
    assert res["tasks"] == ["pq", "ap", "miou"] and res["skipped_tasks"] == {}
    assert res["schema_version"] == 1 and res["benchmark"] == "ovseg"
    assert {"per_class", "accumulators", "env", "protocol", "timing", "model"} <= set(res)
    # panopticapi-format predictions, the confusion matrix and the COCO results are kept
    pred = json.loads((run / "panoptic_pred.json").read_text())
    assert len(pred["annotations"]) == 2
    for ann in pred["annotations"]:
        ids = read_id_png(run / "panoptic_pred" / ann["file_name"])
        assert {s["id"] for s in ann["segments_info"]} == set(np.unique(ids).tolist()) - {0}
    cm = np.load(run / "confusion_matrix.npy")
    assert cm.shape == (6 + 2, 6 + 2) and cm.dtype == np.int64
    dets = json.loads((run / "instances_results.json").read_text())["results"]
    assert dets and all("bbox" not in d and d["category_id"] in (1, 3, 18) for d in dets)
    assert "PQ 100.00" in capsys.readouterr().out


def test_colorkey_ade150_gives_the_hand_value(mini, tmp_path):
    res, _ = ovseg(mini, tmp_path, "test_colorkey", "ade150")
    assert res["metrics"]["PQ"] == pytest.approx(ade_hand_pq(mini))
    assert res["metrics"]["PQ_th"] == pytest.approx(100.0)
    assert res["metrics"]["mIoU"] == pytest.approx(100.0)
    assert "ap" in res["skipped_tasks"] and "AP" not in res["metrics"]  # no instances JSON


@pytest.mark.parametrize("dataset", ["ade847", "pc59", "pc459", "pas21"])
def test_semantic_only_datasets(mini, tmp_path, dataset):
    perfect, _ = ovseg(mini, tmp_path / "a", "test_colorkey", dataset)
    assert perfect["metrics"]["mIoU"] == pytest.approx(100.0)
    assert perfect["tasks"] == ["miou"] and set(perfect["skipped_tasks"]) == {"pq", "ap"}
    empty, run = ovseg(mini, tmp_path / "b", "test_empty", dataset, "--tasks", "miou")
    assert empty["metrics"]["mIoU"] == 0.0 and empty["metrics"]["pACC"] == 0.0
    cm = np.load(run / "confusion_matrix.npy")
    assert cm[:-2, :-2].sum() == 0 and cm[-2, :-1].sum() > 0  # everything on the '<none>' row


def test_empty_edge_values_on_coco(mini, tmp_path):
    res, _ = ovseg(mini, tmp_path, "test_empty", "coco-panoptic")
    m = res["metrics"]
    assert m["PQ"] == 0.0 and m["SQ"] == 0.0 and m["RQ"] == 0.0
    assert m["AP"] == 0.0 and m["empty_predictions"] is True
    assert m["mIoU"] == 0.0


@pytest.mark.parametrize("dataset", ["coco-panoptic", "ade150"])
def test_odise_tiny_runs_every_task_from_one_forward(mini, tmp_path, monkeypatch, dataset):
    """ODISE (toy size, random weights) through eval ovseg: one level="all" forward per image,
    the dataset's class names (the mini data roots have a few classes, not the presets'), finite
    metrics in range."""
    from promptseg.models.odise import ODISE

    calls = []
    forward = ODISE.encode_image
    monkeypatch.setattr(
        ODISE, "encode_image", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k)
    )
    res, run = ovseg(mini, tmp_path, "odise_test_tiny", dataset, "--random-weights")
    assert len(calls) == res["n_images"] == 2
    assert res["protocol"]["vocabulary"] == "dataset class names"
    expected = {"PQ", "mIoU"} | ({"AP"} if dataset == "coco-panoptic" else set())
    assert expected <= set(res["metrics"])
    assert all(0 <= res["metrics"][k] <= 100 for k in expected)
    assert (run / "panoptic_pred.json").is_file() and (run / "confusion_matrix.npy").is_file()


def test_ovseg_resume_gives_the_uninterrupted_numbers(
    mini, tmp_path, monkeypatch, interrupted_after
):
    full, _ = ovseg(mini, tmp_path / "full", "test_shifted", "coco-panoptic")

    with interrupted_after(1, every=1):
        ovseg(mini, tmp_path / "resumed", "test_shifted", "coco-panoptic")
    resumed, run = ovseg(mini, tmp_path / "resumed", "test_shifted", "coco-panoptic", "--resume")
    for k, v in full["metrics"].items():
        assert (math.isnan(v) and math.isnan(resumed["metrics"][k])) or resumed["metrics"][k] == v
    assert not (run / "progress.json").exists()


@pytest.mark.parametrize("dataset", ["coco-novel", "coco2voc"])
def test_fsis_colorkey_is_perfect_and_empty_zero(mini, tmp_path, dataset):
    for shots in (1, 5):
        res = fsis(mini, tmp_path / f"a{shots}", "test_colorkey", dataset, shots)
        assert res["metrics"]["AP"] == pytest.approx(100.0)
        assert res["metrics"]["AP50"] == pytest.approx(100.0)
        assert res["metrics"]["box AP"] == pytest.approx(100.0)
        assert [s["seed"] for s in res["per_seed"]] == [0, 1] and res["shots"] == shots
    empty = fsis(mini, tmp_path / "b", "test_empty", dataset, 1)
    assert empty["metrics"]["AP"] == 0.0
    assert all(s["empty_predictions"] for s in empty["per_seed"])
    assert empty["protocol"]["cat_ids"] == (
        [1, 2, 3, 4, 5, 6, 7, 9, 16, 17, 18, 19, 20, 21, 44, 62, 63, 64, 67, 72]
        if dataset == "coco-novel"
        else list(range(1, 21))
    )


def test_bad_tasks_and_seeds():
    from promptseg.bench.fsis import parse_seeds
    from promptseg.bench.ovseg import _parse_tasks

    assert parse_seeds("0-2,5") == [0, 1, 2, 5]
    assert _parse_tasks("miou,pq") == ["miou", "pq"]
    with pytest.raises(ValueError):
        _parse_tasks("pq,foo")
    with pytest.raises(ValueError):
        parse_seeds("")


def _count_model_calls(monkeypatch):
    """Record encode_prompt and encode_image calls of the test models."""
    from promptseg.models.testing import ColorKey

    calls = {"encode_prompt": 0, "encode_image": 0}
    encode_prompt, encode_image = ColorKey.encode_prompt, ColorKey.encode_image

    def counting_prompt(self, prompts, level=None):
        calls["encode_prompt"] += 1
        return encode_prompt(self, prompts, level)

    def counting_image(self, pixels, input="default"):
        calls["encode_image"] += 1
        return encode_image(self, pixels, input)

    monkeypatch.setattr(ColorKey, "encode_prompt", counting_prompt)
    monkeypatch.setattr(ColorKey, "encode_image", counting_image)
    return calls


def test_fsis_encodes_the_support_set_once_per_seed(mini, tmp_path, monkeypatch):
    calls = _count_model_calls(monkeypatch)
    res = fsis(mini, tmp_path, "test_colorkey", "coco-novel", 5)
    assert calls == {"encode_prompt": 2, "encode_image": 2 * res["n_images"]}
    assert res["metrics"]["AP"] == pytest.approx(100.0)
    acc = res["accumulators"]
    assert acc["img_ids"] == sorted(acc["img_ids"]) and len(acc["img_ids"]) == res["n_images"]
    run = tmp_path / "fsis" / "coco-novel" / "-" / "5" / "test_colorkey"
    for row, seed in zip(acc["seeds"], res["per_seed"], strict=True):
        saved = json.loads((run / row["results_json"]).read_text())["results"]
        assert len(saved) == seed["n_detections"] > 0
    assert res["env"]["dtype"] == "fp32"


def test_fsis_resume_skips_finished_seeds(mini, tmp_path, monkeypatch, interrupted_after):
    full = fsis(mini, tmp_path / "full", "test_shifted", "coco-novel", 1)
    n_images = full["n_images"]

    with interrupted_after(n_images + 3, every=1):  # seed 0 done, 3 images of seed 1 done
        fsis(mini, tmp_path / "res", "test_shifted", "coco-novel", 1)
    run = tmp_path / "res" / "fsis" / "coco-novel" / "-" / "1" / "test_shifted"
    assert (run / "seed0" / "segm_results.json").is_file()
    assert len(json.loads((run / "seed1" / "progress.json").read_text())["done"]) == 3
    calls = _count_model_calls(monkeypatch)
    resumed = fsis(mini, tmp_path / "res", "test_shifted", "coco-novel", 1, "--resume")
    assert calls == {"encode_prompt": 1, "encode_image": n_images - 3}  # seed 1's rest only
    assert resumed["per_seed"] == full["per_seed"] and resumed["metrics"] == full["metrics"]
    assert 0 < full["metrics"]["AP"] < 100
    assert not list(run.rglob("progress.json"))


def test_ovseg_segments_each_image_once_for_every_task(mini, tmp_path, monkeypatch):
    """PQ, AP and mIoU all read one level="all" result per image (one forward, several levels)."""
    from promptseg.models.testing import ColorKey

    levels = []
    segment = ColorKey.segment

    def counting(self, image, prompt, **kwargs):
        levels.append(kwargs.get("level"))
        return segment(self, image, prompt, **kwargs)

    monkeypatch.setattr(ColorKey, "segment", counting)
    res, _ = ovseg(mini, tmp_path, "test_colorkey", "coco-panoptic")
    assert res["tasks"] == ["pq", "ap", "miou"]
    assert levels == ["all"] * res["n_images"] and res["n_images"] > 0
    assert res["metrics"]["PQ"] == res["metrics"]["AP"] == res["metrics"]["mIoU"] == 100.0


def test_ovseg_names_a_level_the_model_lacks(mini, tmp_path, monkeypatch, capsys):
    from promptseg.models.testing import ColorKey

    monkeypatch.setattr(ColorKey, "levels", ("semantic", "panoptic", "all"))
    argv = ["eval", "ovseg", "--dataset", "coco-panoptic", "--model", "test_colorkey"]
    assert main([*argv, "--data-root", str(mini), "--out", str(tmp_path), "--tasks", "pq,ap"]) == 2
    err = capsys.readouterr().err
    assert "test_colorkey has no 'instance' output, which --tasks ap scores" in err


def test_each_dataset_has_its_prompt_engineered_vocabulary(tmp_path):
    """`--vocabulary`: the dataset's built-in preset (ODISE's protocol), its names, or a file;
    auto follows the model's eval_vocabulary."""
    from promptseg.bench.ovseg import DATASET_PRESETS, dataset_vocabulary
    from promptseg.vocabularies import read_preset

    for dataset, preset in DATASET_PRESETS.items():
        classes = read_preset(preset)[0]
        names = [c[0] for c in classes]
        got, source = dataset_vocabulary(dataset, names, "auto", "prompt-engineered")
        assert got == [list(c) for c in classes] and source == f"preset {preset}"
        assert dataset_vocabulary(dataset, names)[0] == [[n] for n in names]
    with pytest.raises(ValueError, match="--vocabulary names"):
        dataset_vocabulary("pc59", ["a", "b"], "prompt-engineered")
    path = tmp_path / "v.txt"
    path.write_text("0:a,alpha\n1:b\n")
    assert dataset_vocabulary("pc59", ["a", "b"], str(path)) == ([["a", "alpha"], ["b"]], str(path))
