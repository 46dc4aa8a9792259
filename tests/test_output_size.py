"""`output_size` and the result's metadata, the same for every family and output level."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import promptseg

SIZE = (50, 70)
COLOR = (200, 30, 30)  # the flat box ColorKey finds from the visual prompt
CASES = [
    ("clipseg_test_tiny", "semantic"),
    ("sine_test_tiny", "semantic"),
    ("sine_test_tiny", "instance"),
    ("sine_test_tiny", "identity"),
    ("sine_test_tiny", "all"),
    ("test_colorkey", "semantic"),
    ("test_colorkey", "instance"),
    ("test_colorkey", "panoptic"),
    ("test_colorkey", "identity"),
]
IDS = [f"{name}-{level}" for name, level in CASES]
# the 50x70 image at each input's resolution, without padding: CLIPSeg squashes to 64x64; SINE's
# semantic/identity input squashes to 84x84 (on a 112 canvas), its instance input scales the short
# side to 112 with the long side capped at 112 (-> 80x112); "all" reports its first (semantic)
# input; ColorKey works at the original size
INPUT_SIZES = {
    ("clipseg_test_tiny", "semantic"): (64, 64),
    ("sine_test_tiny", "semantic"): (84, 84),
    ("sine_test_tiny", "instance"): (80, 112),
    ("sine_test_tiny", "identity"): (84, 84),
    ("sine_test_tiny", "all"): (84, 84),
    ("test_colorkey", "semantic"): SIZE,
    ("test_colorkey", "instance"): SIZE,
    ("test_colorkey", "panoptic"): SIZE,
    ("test_colorkey", "identity"): SIZE,
}
INVALID = ["inputs", (5,), (0, 5), (-1, 5), (1.5, 2.5), 5, ("a", "b"), (2**40, 1), None]
META_KEYS = {"model", "tag", "input_size", "output_size", "threshold"}


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    """Models built on first use, once per module (a family that fails to build fails alone)."""
    return {}


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, np.ndarray]:
    """A 50x70 random image with a flat-coloured box, and the box's mask."""
    image = np.random.default_rng(0).integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    mask = np.zeros(SIZE, dtype=bool)
    mask[12:36, 20:52] = True
    image[mask] = COLOR
    return image, mask


def segment(models, scene, name: str, level: str, **kw: Any) -> promptseg.SegmentationResult:
    """One segment() call with a prompt the family takes (a text for CLIPSeg, else the box)."""
    image, mask = scene
    if name not in models:
        torch.manual_seed(0)
        models[name] = promptseg.create_model(name, pretrained=False)
    prompt = "a red box" if name.startswith("clipseg") else promptseg.VisualPrompt(image, mask)
    return models[name].segment(image, prompt, level=level, **kw)


@pytest.mark.parametrize("name,level", CASES, ids=IDS)
def test_original_size(models, scene, name, level):
    res = segment(models, scene, name, level, output_size="original")
    assert res.masks.shape[-2:] == SIZE
    assert tuple(res.meta["output_size"]) == SIZE


@pytest.mark.parametrize("name,level", CASES, ids=IDS)
def test_input_size(models, scene, name, level):
    res = segment(models, scene, name, level, output_size="input")
    assert res.masks.shape[-2:] == tuple(res.meta["input_size"])
    assert tuple(res.meta["output_size"]) == tuple(res.meta["input_size"])


@pytest.mark.parametrize("name,level", CASES, ids=IDS)
def test_input_size_is_the_processing_resolution_without_padding(models, scene, name, level):
    res = segment(models, scene, name, level)
    assert tuple(res.meta["input_size"]) == INPUT_SIZES[name, level]


@pytest.mark.parametrize(
    "size",
    [(33, 47), [33, 47], np.array([33, 47]), (np.int32(33), np.int64(47))],
    ids=["tuple", "list", "array", "numpy-ints"],
)
@pytest.mark.parametrize("name,level", CASES, ids=IDS)
def test_explicit_size(models, scene, name, level, size):
    res = segment(models, scene, name, level, output_size=size)
    assert res.masks.shape[-2:] == (33, 47)
    assert tuple(res.meta["output_size"]) == (33, 47)


@pytest.mark.parametrize("size", INVALID, ids=[repr(s) for s in INVALID])
@pytest.mark.parametrize("name,level", CASES, ids=IDS)
def test_invalid_size_raises(models, scene, name, level, size):
    with pytest.raises(ValueError, match="output_size"):
        segment(models, scene, name, level, output_size=size)


@pytest.mark.parametrize("name,level", CASES, ids=IDS)
def test_meta_keys(models, scene, name, level):
    res = segment(models, scene, name, level)
    assert META_KEYS <= set(res.meta), f"missing {sorted(META_KEYS - set(res.meta))}"
    assert res.meta["model"] == name
