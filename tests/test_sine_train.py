"""`promptseg train sine`: the tiny config learns on a synthetic COCO dataset (loss falls)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from promptseg.cli import main
from promptseg.errors import DatasetLayoutError
from promptseg.train import CocoInstances, TrainConfig, train_sine


def write_coco(root, n_images=3):
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(n_images):
        img = np.full((64, 80, 3), 128, np.uint8)
        for k, (cat, color) in enumerate([(1, (200, 40, 40)), (2, (40, 200, 40))]):
            y, x = int(rng.integers(0, 30)), int(rng.integers(0, 40))
            img[y : y + 24, x : x + 30] = color
            poly = [x, y, x + 29, y, x + 29, y + 23, x, y + 23]
            anns.append(
                {
                    "id": 10 * i + k + 1,
                    "image_id": i,
                    "category_id": cat,
                    "iscrowd": 0,
                    "segmentation": [poly],
                    "area": 720,
                    "bbox": [x, y, 30, 24],
                }
            )
        Image.fromarray(img).save(root / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": 64, "width": 80})
    path = root / "instances.json"
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": anns,
                "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
            }
        )
    )
    return path


def test_loss_falls_on_the_tiny_config(tmp_path):
    ann = write_coco(tmp_path)
    config = TrainConfig(
        model="sine_test_tiny",
        annotations=str(ann),
        images=str(tmp_path),
        pretrained=False,
        steps=30,
        lr=1e-3,
        out=str(tmp_path / "run"),
    )
    losses = train_sine(config, progress=False)
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert (tmp_path / "run" / "promptseg.safetensors").is_file()


def test_train_command_and_bad_data(tmp_path, capsys):
    ann = write_coco(tmp_path, n_images=1)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        f"model: sine_test_tiny\npretrained: false\nannotations: {ann}\n"
        f"images: {tmp_path}\nsteps: 2\nout: {tmp_path / 'run'}\n"
    )
    assert main(["train", "sine", "--config", str(cfg)]) == 0
    assert "2 steps" in capsys.readouterr().out
    with pytest.raises(DatasetLayoutError, match="not found"):
        CocoInstances(tmp_path / "nope.json", tmp_path)
    cfg.write_text("modle: x\n")
    assert main(["train", "sine", "--config", str(cfg)]) == 2
    assert "unknown keys" in capsys.readouterr().err
