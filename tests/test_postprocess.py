"""CLIPSeg post-processing: bilinear upsampling of the logits, threshold and score formula.

Checked through the public API only (`segment(..., return_logits=True)`), on an image whose size
differs from the model's input, so the upsampling step matters and can be told apart from
nearest or align_corners=True upsampling.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import promptseg

SIZE = (50, 70)  # differs from clipseg_test_tiny's 64x64 input in both sides
PROMPTS = ["a cup", "a dog on a sofa", "wood"]
DEFAULT_THRESHOLD = 0.3  # CLIPSeg's threshold when the card has none


def coverage(masks: torch.Tensor) -> torch.Tensor:
    """Share of foreground pixels of each mask [N, H, W] -> [N]."""
    return masks.flatten(1).float().mean(dim=1)


def assert_non_degenerate(masks: torch.Tensor) -> None:
    """Every mask covers part of the image: between 1% and 99% of its pixels."""
    cov = coverage(masks)
    assert len(cov) > 0
    assert bool(((cov >= 0.01) & (cov <= 0.99)).all()), f"mask coverage {cov.tolist()}"


def upsampled_probs(logits: torch.Tensor, mode: str, align_corners: bool | None) -> torch.Tensor:
    """Low-res logits [N, h, w] -> probabilities [N, *SIZE] by one interpolation mode."""
    up = F.interpolate(logits[:, None].float(), size=SIZE, mode=mode, align_corners=align_corners)
    return torch.sigmoid(up[:, 0])


def expected_scores(probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean probability over each mask's pixels, 0 for an empty mask."""
    return torch.stack(
        [p[m].mean() if m.any() else torch.zeros(()) for p, m in zip(probs, masks, strict=True)]
    )


@pytest.fixture(scope="module")
def clipseg() -> torch.nn.Module:
    torch.manual_seed(0)
    return promptseg.create_model("clipseg_test_tiny", pretrained=False)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (*SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def default(clipseg, image) -> promptseg.SegmentationResult:
    return clipseg.segment(image, PROMPTS, return_logits=True)


def test_logits_are_low_res_and_masks_original_size(default):
    assert default.logits is not None and default.logits.ndim == 3
    assert len(default.logits) == len(PROMPTS)
    assert tuple(default.logits.shape[-2:]) != SIZE  # so the upsampling step is exercised
    assert default.masks.shape == (len(PROMPTS), *SIZE) and default.masks.dtype == torch.bool
    assert default.meta["threshold"] == pytest.approx(DEFAULT_THRESHOLD)


def test_masks_are_not_degenerate(default):
    """Random tiny weights must give masks covering part of the image, else nothing is tested."""
    assert_non_degenerate(default.masks)


def test_default_threshold_masks_are_bilinear_upsampled_logits(default):
    probs = upsampled_probs(default.logits, "bilinear", align_corners=False)
    assert torch.equal(default.masks, probs > DEFAULT_THRESHOLD)


def test_explicit_threshold(clipseg, image, default):
    probs = upsampled_probs(default.logits, "bilinear", align_corners=False)
    threshold = round(float(probs.quantile(0.6)), 2)
    assert threshold != DEFAULT_THRESHOLD
    res = clipseg.segment(image, PROMPTS, threshold=threshold, return_logits=True)
    assert torch.equal(res.logits, default.logits)
    assert res.meta["threshold"] == pytest.approx(threshold)
    assert torch.equal(res.masks, probs > threshold)
    assert not torch.equal(res.masks, default.masks)
    torch.testing.assert_close(res.scores, expected_scores(probs, res.masks), rtol=1e-5, atol=1e-6)


def test_scores_are_mean_probability_inside_the_mask(default):
    probs = upsampled_probs(default.logits, "bilinear", align_corners=False)
    want = expected_scores(probs, default.masks)
    torch.testing.assert_close(default.scores, want, rtol=1e-5, atol=1e-6)
    # other plausible formulas give other numbers here, so the check above discriminates
    assert not torch.allclose(default.scores, probs.flatten(1).mean(dim=1), rtol=1e-3)
    assert not torch.allclose(default.scores, probs.flatten(1).amax(dim=1), rtol=1e-3)


def test_empty_masks_score_zero(clipseg, image):
    res = clipseg.segment(image, PROMPTS, threshold=1.0)
    assert not res.masks.any()
    assert torch.equal(res.scores, torch.zeros(len(PROMPTS)))


@pytest.mark.parametrize(
    "mode,align_corners", [("nearest", None), ("bilinear", True)], ids=["nearest", "align_corners"]
)
def test_other_upsampling_would_give_other_masks(default, mode, align_corners):
    """The exact-equality checks above would catch a switch to another interpolation."""
    other = upsampled_probs(default.logits, mode, align_corners) > DEFAULT_THRESHOLD
    for i in range(len(PROMPTS)):
        assert not torch.equal(other[i], default.masks[i]), f"prompt {i}: {mode} gives the same"


@pytest.mark.parametrize("level", ["identity", "instance"])
def test_sine_masks_are_not_degenerate(sine, scene, rgb, level):
    """The tiny SINE's masks cover part of the image (its semantic map, a sum over queries, is
    above the threshold everywhere with random weights)."""
    ref, a, _ = scene
    res = sine.segment(rgb, promptseg.VisualPrompt(ref, a), level=level)
    assert res.masks.shape[-2:] == rgb.shape[:2]
    assert res.level == [level] * len(res)
    assert_non_degenerate(res.masks)
