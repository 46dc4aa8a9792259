"""Miniature PerSeg in the exact on-disk layout of PerSeg.

`<root>/data/Images/<object>/<nn>.jpg` flat-colour scenes (grey `BACKGROUND`, the object an
8-pixel-aligned rectangle painted `class_color(<object>)`) and `<root>/data/Annotations/<object>/
<nn>.png` RGB masks (object white). Deliberate quirks, each exercised by the tests:

- mask pixels of colour (0, 0, 4) outside the object: grayscale 0, so background (`> 0` is taken
  after grayscale conversion, as the reference's cv2 BGR2GRAY does);
- one object has 11 images, so stems run 00..10 (only the exact stem `00` is the reference);
- some queries also show another object (a distractor the prompt must not pick up) and one
  query shows only a distractor (empty GT);
- image sizes differ within an object.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from promptseg.testing.colors import class_color
from promptseg.testing.mini_dense import _canvas, _check_separable, _save_jpeg, _save_png

__all__ = ["PERSEG_OBJECTS", "make_mini_perseg"]

PERSEG_OBJECTS: dict[str, int] = {"backpack": 4, "cat2": 3, "rc_car": 11}
"""Object name -> number of images (reference `00` included), as real PerSeg object names."""

_SIZES = ((64, 96), (80, 64), (96, 104))  # halves stay 8-aligned
_WHITE = (255, 255, 255)
_DARK = (0, 0, 4)  # non-zero RGB whose grayscale is 0: background


def _box(rng: np.random.Generator, h: int, w: int) -> tuple[int, int, int, int]:
    """A random 8-aligned rectangle (rows y0:y1, cols x0:x1), >= 16 px a side."""
    y0 = 8 * int(rng.integers(0, h // 8 - 2))
    x0 = 8 * int(rng.integers(0, w // 8 - 2))
    y1 = 8 * int(rng.integers(y0 // 8 + 2, h // 8 + 1))
    x1 = 8 * int(rng.integers(x0 // 8 + 2, w // 8 + 1))
    return y0, y1, x0, x1


def make_mini_perseg(root: str | Path, seed: int = 0) -> Path:
    """Write the miniature PerSeg under `root` (the data root); returns `root`."""
    root = Path(root)
    names = list(PERSEG_OBJECTS)
    _check_separable(names, names, "PerSeg")
    rng = np.random.default_rng([seed, 11])
    data = root / "data"
    for k, (obj, n) in enumerate(PERSEG_OBJECTS.items()):
        distractor = names[(k + 1) % len(names)]
        for i in range(n):
            h, w = _SIZES[(k + i) % len(_SIZES)]
            img = _canvas(h, w)
            mask = np.zeros((h, w, 3), dtype=np.uint8)
            absent = obj == "rc_car" and i == n - 1  # only the distractor: empty GT
            if (i > 0 and i % 2 == 0) or absent:
                y0, y1, x0, x1 = _box(rng, h // 2, w)  # top half: never under the object
                img[y0:y1, x0:x1] = class_color(distractor)
            if not absent:
                y0, y1, x0, x1 = _box(rng, h // 2, w)
                y0, y1 = y0 + h // 2, y1 + h // 2  # bottom half
                img[y0:y1, x0:x1] = class_color(obj)
                mask[y0:y1, x0:x1] = _WHITE
            mask[0, 0] = mask[0, -1] = _DARK  # top row: never the object
            _save_jpeg(data / "Images" / obj / f"{i:02d}.jpg", img)
            _save_png(data / "Annotations" / obj / f"{i:02d}.png", mask)
    return root
