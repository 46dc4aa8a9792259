"""The colour code of the miniature datasets: every class / object is painted in its own colour.

`class_color(name)` is what the mini datasets paint a class (or a video object, or a panoptic
segment's class) with, and what the `ColorKey` test model looks for when a text prompt or a
vocabulary names that class; visual prompts need no code (the model reads the reference's colour).
"""

from __future__ import annotations

import hashlib

__all__ = ["BACKGROUND", "class_color"]

BACKGROUND = (128, 128, 128)


def class_color(name: str | int) -> tuple[int, int, int]:
    """A deterministic RGB colour for a class name (or id), far from the grey background.

    Channels are multiples of 8 in 16..240 with one channel >= 64 away from 128. JPEG keeps flat
    8x8-aligned blocks within +-2 of their colour. Names can collide (24,389 colours): a mini
    dataset only paints classes whose colour is unique within its whole vocabulary.
    """
    digest = hashlib.sha256(str(name).encode("utf-8")).digest()
    for start in range(0, len(digest) - 2, 3):
        rgb = tuple(16 + 8 * (b % 29) for b in digest[start : start + 3])
        if max(abs(c - g) for c, g in zip(rgb, BACKGROUND, strict=True)) >= 64:
            return rgb  # type: ignore[return-value]
    return (240, 16, 16)
