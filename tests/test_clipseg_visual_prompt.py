"""Visual prompt engineering (spec clipseg.md §1.2) against an independent numpy/scipy recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from promptseg.models.clipseg import engineer_visual_prompt, gaussian_blur


def reference_recipe(v: np.ndarray, m: np.ndarray) -> np.ndarray:
    """The spec's five steps in numpy (v: [3, S, S] float, m: [S, S] bool)."""
    # 1. 15x15 Gaussian, sigma 3, reflect-101 border (scipy "mirror"), on normalised values
    b = np.stack([ndimage.gaussian_filter(c, sigma=3.0, mode="mirror", truncate=7 / 3) for c in v])
    # 2. keep the object, darken the blurred background to 10%
    u = v * m + 0.1 * b * (1 - m)
    # 3. bounding box + 10% context per axis
    h, w = m.shape
    ys, xs = np.where(m)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    dy, dx = 0.1 * (y1 - y0), 0.1 * (x1 - x0)
    y0, y1 = int(max(0, y0 - dy)), int(min(h, y1 + dy))
    x0, x1 = int(max(0, x0 - dx)), int(min(w, x1 + dx))
    crop = u[:, y0:y1, x0:x1]
    # 4. centred zero pad to a square
    ch, cw = crop.shape[1:]
    side = max(ch, cw)
    top, left = (side - ch) // 2, (side - cw) // 2
    sq = np.zeros((3, side, side), v.dtype)
    sq[:, top : top + ch, left : left + cw] = crop
    # 5. legacy nearest resize back to S x S: source index floor(i * side / S)
    idx = np.floor(np.arange(h) * (side / h)).astype(int)
    return sq[:, idx][:, :, idx]


def test_blur_matches_scipy_reflect101():
    x = torch.randn(3, 40, 40, dtype=torch.float64)
    ref = np.stack(
        [ndimage.gaussian_filter(c, 3.0, mode="mirror", truncate=7 / 3) for c in x.numpy()]
    )
    np.testing.assert_allclose(gaussian_blur(x).numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_engineering_matches_reference_recipe(seed):
    rng = np.random.default_rng(seed)
    s = 64
    v = rng.standard_normal((3, s, s))
    yy, xx = np.mgrid[:s, :s]
    cy, cx, ry, rx = (
        rng.integers(8, 56),
        rng.integers(8, 56),
        rng.integers(3, 20),
        rng.integers(3, 20),
    )
    m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    ours = engineer_visual_prompt(torch.from_numpy(v), torch.from_numpy(m)).numpy()
    np.testing.assert_allclose(ours, reference_recipe(v, m), atol=1e-10)


def test_full_mask_keeps_the_image():
    v = torch.randn(3, 32, 32, dtype=torch.float64)
    out = engineer_visual_prompt(v, torch.ones(32, 32, dtype=torch.bool))
    torch.testing.assert_close(out, v)
