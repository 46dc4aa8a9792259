"""Preprocessing from a tag's data config, and mapping outputs back to the original image size.

A data config is a mapping from zoo.yaml: `input_size` [H, W], `resize` ("squash" = resize to
exactly input_size ignoring aspect ratio; "shortest_edge" = detectron2 `ResizeShortestEdge(short,
max_size)`, aspect kept, PIL bilinear on the uint8 image), `interpolation`, `antialias`,
`channels` ("rgb" default, or "bgr": the channels are reversed before normalising), `mean`, `std`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["preprocess", "shortest_edge_size", "resize_mask", "resize_logits"]


def preprocess(
    image: torch.Tensor, data_config: Mapping[str, Any], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 [3, H, W] -> normalised float [1, 3, h, w] at the config's input size."""
    mode = data_config.get("resize", "squash")
    if mode == "shortest_edge":
        x = _resize_shortest_edge(image, data_config).unsqueeze(0).float() / 255.0
    elif mode == "squash":
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
    else:
        raise ValueError(f"unsupported resize mode {mode!r}; known: 'squash', 'shortest_edge'")
    channels = data_config.get("channels", "rgb")
    if channels == "bgr":
        x = x.flip(1)  # detectron2 reads BGR and normalises with the RGB statistics (sine.md §1.3)
    elif channels != "rgb":
        raise ValueError(f"unsupported channel order {channels!r}; known: 'rgb', 'bgr'")
    mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


def shortest_edge_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2 ResizeShortestEdge output (h', w'): short side to `short`, long side capped at
    `max_size`, sizes rounded with int(x + 0.5)."""
    scale = short / min(h, w)
    newh, neww = (short, scale * w) if h < w else (scale * h, short)
    if max(newh, neww) > max_size:
        scale = max_size / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def _resize_shortest_edge(image: torch.Tensor, data_config: Mapping[str, Any]) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, h', w'] as detectron2 does it (PIL bilinear on uint8)."""
    h, w = image.shape[-2:]
    size = shortest_edge_size(h, w, int(data_config["short"]), int(data_config["max_size"]))
    if size == (h, w):
        return image
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy())
    out = np.asarray(pil.resize((size[1], size[0]), Image.BILINEAR))
    return torch.from_numpy(out.copy()).permute(2, 0, 1)


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
