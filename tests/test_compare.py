"""`promptseg.compare` and `promptseg compare`: models side by side on the same image(s)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import promptseg
from promptseg import VisualPrompt
from promptseg.cli import main
from promptseg.models.clipseg import CLIPSeg
from promptseg.models.testing import ColorKey
from promptseg.testing.colors import BACKGROUND, class_color

compare_module = sys.modules["promptseg.compare"]  # the package exports the function as well
H, W = 48, 64
BOX = (slice(8, 40), slice(16, 48))  # the "cat" rectangle: 32 x 32 pixels


@pytest.fixture
def scene(tmp_path):
    """A grey image with a "cat"-coloured square (test_colorkey finds it), its mask as PNG."""
    img = np.zeros((H, W, 3), np.uint8)
    img[:] = BACKGROUND
    img[BOX] = class_color("cat")
    mask = np.zeros((H, W), np.uint8)
    mask[BOX] = 255
    Image.fromarray(img).save(tmp_path / "scene.png")
    Image.fromarray(mask).save(tmp_path / "scene_mask.png")
    return tmp_path / "scene.png", tmp_path / "scene_mask.png"


def test_grid_geometry_columns_models_rows_prompts(scene):
    image, mask = scene
    cmp = promptseg.compare(image, ["cat", "dog"], models=["test_colorkey", "test_empty"])
    assert isinstance(cmp, promptseg.Comparison)
    assert cmp.model_names == ["test_colorkey", "test_empty"]
    assert len(cmp.prompts) == 2 and len(cmp.cells) == 4
    boxes = cmp.cell_boxes(cell_width=128)
    assert sorted(boxes) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for x0, y0, x1, y1 in boxes.values():
        assert (x1 - x0, y1 - y0) == (128, 96)  # the image's aspect ratio, 128 px wide
    assert boxes[(0, 0)][0] < boxes[(1, 0)][0] and boxes[(0, 0)][1] == boxes[(1, 0)][1]
    assert boxes[(0, 0)][1] < boxes[(0, 1)][1] and boxes[(0, 0)][0] == boxes[(0, 1)][0]
    grid = cmp.grid(cell_width=128)
    assert grid.width >= boxes[(1, 1)][2] and grid.height > boxes[(1, 1)][3]
    # the cell holds the overlay of its result, resized to the cell
    x0, y0, x1, y1 = boxes[(0, 0)]
    cell = np.asarray(grid)[y0:y1, x0:x1]
    expected = compare_module._resized(
        cmp.cell(0, "test_colorkey", 0).result,
        torch.from_numpy(
            np.array(Image.open(image).resize((128, 96), Image.Resampling.LANCZOS))
        ).permute(2, 0, 1),
        (96, 128),
    )
    assert cell.shape == (96, 128, 3)
    assert np.abs(cell.astype(int) - np.asarray(expected.overlay()).astype(int)).mean() < 1
    with pytest.raises(ValueError, match="cell_width"):
        cmp.grid(cell_width=10)


def test_unsupported_prompt_gives_a_labelled_empty_cell(scene):
    image, mask = scene
    cmp = promptseg.compare(
        image,
        ["cat", VisualPrompt(image, mask)],
        models=["sine_test_tiny", "test_colorkey"],
        random_weights=True,
    )
    cell = cmp.cell(0, "sine_test_tiny", 0)
    assert cell.result is None and not cell.ran
    assert "sine_test_tiny cannot take a TextPrompt" in cell.reason
    assert cmp.cell(0, "sine_test_tiny", 1).ran  # the reference prompt it takes
    x0, y0, x1, y1 = cmp.cell_boxes(cell_width=160)[(0, 0)]
    pixels = np.asarray(cmp.grid(cell_width=160))[y0:y1, x0:x1]
    assert (pixels[2, 2] == compare_module._EMPTY).all()  # grey, with the reason written on it
    assert (pixels != compare_module._EMPTY).any(axis=-1).sum() > 100
    assert "not supported: sine_test_tiny cannot take a TextPrompt" in cmp.table()


def test_compare_json_fields(scene, tmp_path):
    image, mask = scene
    cmp = promptseg.compare(
        image, ["cat"], models=["clipseg_test_tiny", "test_colorkey"], random_weights=True
    )
    written = cmp.save(tmp_path / "out")
    assert [p.name for p in written] == ["grid.png", "compare.md", "compare.json"]
    record = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert record["memory"]["unit"] == "MiB" and record["memory"]["method"]
    assert record["images"][0] | {"seconds": 0} == {
        "name": "scene.png",
        "size": [H, W],
        "seconds": 0,
        "grid": "grid.png",
    }
    models = {m["name"]: m for m in record["models"]}
    assert models["clipseg_test_tiny"]["weights"] == "random"
    assert models["test_colorkey"]["weights"] == "none"
    cells = {c["model"]: c for c in record["cells"]}
    for c in cells.values():
        assert {
            "image",
            "prompt",
            "supported",
            "reason",
            "n_masks",
            "scores",
            "score",
            "area",
            "area_fraction",
            "encode_image_s",
            "encode_prompt_s",
            "decode_s",
            "peak_memory_mib",
            "weights_sha256",
            "random_weights",
            "iou",
        } <= set(c)
        assert c["weights_sha256"] is None and c["decode_s"] >= 0 and c["peak_memory_mib"] >= 0
    assert cells["clipseg_test_tiny"]["random_weights"] is True
    assert cells["test_colorkey"]["area"] == 32 * 32 and cells["test_colorkey"]["score"] == 1.0
    assert record["ranking"] is None
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "clipseg_test_tiny (RANDOM)" in table and "**RANDOM (masks mean nothing)**" in table


def test_gt_iou_and_ranking(scene, tmp_path):
    image, mask = scene
    cmp = promptseg.compare(
        image, ["cat"], models=["test_empty", "test_shifted", "test_colorkey"], gt=mask
    )
    iou = {m: cmp.cell(0, m, 0).iou for m in cmp.model_names}
    assert iou["test_colorkey"] == 1.0
    assert iou["test_empty"] == 0.0
    assert iou["test_shifted"] == pytest.approx((32 - 8) / (32 + 8))  # shifted 8 px right
    ranking = cmp.ranking()
    assert [r["model"] for r in ranking] == ["test_colorkey", "test_shifted", "test_empty"]
    assert [r["rank"] for r in ranking] == [1, 2, 3]
    assert "## Ranking by IoU" in cmp.table()
    cmp.save(tmp_path)
    record = json.loads((tmp_path / "compare.json").read_text())
    assert record["ranking"][0]["model"] == "test_colorkey" and "union" in record["iou"]


def test_folder_builds_each_model_once_and_encodes_each_image_once(scene, tmp_path, monkeypatch):
    image, mask = scene
    folder = tmp_path / "images"
    folder.mkdir()
    for k in range(3):
        Image.open(image).rotate(90 * k).save(folder / f"im{k}.png")
    calls = {"create": 0, "colorkey": 0, "clipseg": 0, "prompt": 0}
    create = promptseg.zoo.create_model

    def counting_create(*args, **kwargs):
        calls["create"] += 1
        return create(*args, **kwargs)

    def counting(method, key):
        def wrapper(self, *args, **kwargs):
            calls[key] += 1
            return method(self, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(promptseg.zoo, "create_model", counting_create)
    monkeypatch.setattr(ColorKey, "encode_image", counting(ColorKey.encode_image, "colorkey"))
    monkeypatch.setattr(CLIPSeg, "encode_image", counting(CLIPSeg.encode_image, "clipseg"))
    monkeypatch.setattr(CLIPSeg, "encode_prompt", counting(CLIPSeg.encode_prompt, "prompt"))
    cmp = promptseg.compare(
        folder, ["cat", "dog"], models=["clipseg_test_tiny", "test_colorkey"], random_weights=True
    )
    assert calls == {"create": 2, "colorkey": 3, "clipseg": 3, "prompt": 2}
    assert cmp.images == ["im0.png", "im1.png", "im2.png"] and len(cmp.cells) == 3 * 2 * 2
    work = cmp.timings()["work"]["clipseg_test_tiny"]
    assert work == {"builds": 1, "image_encodes": 3, "prompt_encodes": 2, "decodes": 6}
    written = [p.name for p in cmp.save(tmp_path / "out", cell_width=96)]
    assert written[:3] == ["grid_im0.png", "grid_im1.png", "grid_im2.png"]
    assert "(means over 3 images)" in (tmp_path / "out" / "compare.md").read_text()


def test_models_given_built_and_bad_arguments(scene):
    image, mask = scene
    model = promptseg.create_model("test_colorkey", pretrained=False)
    cmp = promptseg.compare(image, "cat", models=[model])
    assert cmp.models[0].build_seconds is None and cmp.cell(0, 0, 0).area == 32 * 32
    with pytest.raises(ValueError, match="no released weights: pass random_weights=True"):
        promptseg.compare(image, "cat", models=["clipseg_test_tiny"])
    with pytest.raises(ValueError, match="non-empty list of model names"):
        promptseg.compare(image, "cat", models="test_colorkey")
    with pytest.raises(ValueError, match="prompt list is empty"):
        promptseg.compare(image, [], models=["test_colorkey"])


def test_cli_compare_end_to_end(scene, tmp_path, capsys):
    image, mask = scene
    out = tmp_path / "out"
    argv = ["compare", str(image), "--models", "test_colorkey", "sine_test_tiny"]
    argv += ["--text", "cat", "--ref", str(image), str(mask), "--gt", str(mask)]
    argv += ["--random-weights", "--cell-width", "128", "-o", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "rank 1: test_colorkey mean IoU 1.000" in printed.out
    assert "sine_test_tiny with RANDOM weights" in printed.err
    assert "test_colorkey with RANDOM" not in printed.err  # a test model has no weights at all
    record = json.loads((out / "compare.json").read_text())
    assert [m["weights"] for m in record["models"]] == ["none", "random"]
    assert record["prompts"] == ['text "cat"', "reference scene.png"]
    assert Image.open(out / "grid.png").width > 2 * 128
    assert main(["compare", str(image), "--models", "test_colorkey", "-o", str(out)]) == 2
    assert "compare: give at least one prompt" in capsys.readouterr().err
