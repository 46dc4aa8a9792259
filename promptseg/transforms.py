"""Preprocessing from a tag's data config, and mapping outputs back to the original image size.

A data config is a mapping from zoo.yaml: `input_size` [H, W], `resize` ("squash" = resize to
exactly input_size ignoring aspect ratio), `interpolation`, `antialias`, `mean`, `std`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["preprocess", "resize_mask", "resize_logits"]


def preprocess(
    image: torch.Tensor, data_config: Mapping[str, Any], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 [3, H, W] -> normalised float [1, 3, h, w] at the config's input size."""
    if data_config.get("resize", "squash") != "squash":
        raise ValueError(f"unsupported resize mode {data_config['resize']!r}; known: 'squash'")
    x = image.unsqueeze(0).float() / 255.0
    size = tuple(data_config["input_size"])
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(
            x,
            size=size,
            mode=data_config.get("interpolation", "bilinear"),
            align_corners=False,
            antialias=bool(data_config.get("antialias", False)),
        )
    mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a bool/int mask [..., H, W] (labels are never blended)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    lead = mask.shape[:-2]
    flat = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    out = F.interpolate(flat, size=tuple(size), mode="nearest")
    return out.reshape(*lead, *size).to(mask.dtype)


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of logits [N, h, w] to `size`, in float32."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits[:, None], size=tuple(size), mode="bilinear", align_corners=False)[
        :, 0
    ]
