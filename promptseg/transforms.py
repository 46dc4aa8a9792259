"""Preprocessing from a tag's data config, and mapping outputs back to the original image size.

A data config is a mapping from zoo.yaml: `input_size` [H, W], `resize` ("squash" = resize to
exactly input_size ignoring aspect ratio; "shortest_edge" = detectron2 `ResizeShortestEdge` to
the keys `shortest_edge` and `max_size`, aspect kept, PIL bilinear on the uint8 image),
`interpolation`, `antialias`,
`channels` ("rgb" default, or "bgr": the channels are reversed before normalising), `mean`, `std`,
and optional zero padding at the bottom/right: `canvas` (to a square of that side) or
`size_divisibility` (to multiples of it). A model may have several named configs (one per input it
feeds, e.g. a diffusion input and a CLIP input): `named_data_configs` splits them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "DATA_CONFIG_KEYS",
    "preprocess",
    "named_data_configs",
    "resized_size",
    "shortest_edge_size",
    "resize_mask",
    "resize_logits",
    "crop_resize",
]

#: keys a data config may set (in zoo.yaml or as create_model(data_config=) overrides)
DATA_CONFIG_KEYS = (
    "input_size",
    "resize",
    "shortest_edge",
    "max_size",
    "interpolation",
    "antialias",
    "channels",
    "mean",
    "std",
    "canvas",
    "size_divisibility",
    "eval_resolution",
    "eval_vocabulary",
)


def named_data_configs(data_config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{"default": the top-level keys, name: the default updated by each dict-valued key}."""
    default = {k: v for k, v in data_config.items() if not isinstance(v, Mapping)}
    named = {k: {**default, **v} for k, v in data_config.items() if isinstance(v, Mapping)}
    return {"default": default, **named}


def resized_size(image_size: tuple[int, int], data_config: Mapping[str, Any]) -> tuple[int, int]:
    """(h', w') an image of `image_size` takes at the config's resolution, before any padding."""
    mode = data_config.get("resize", "squash")
    if mode == "shortest_edge":
        short, max_size = int(data_config["shortest_edge"]), int(data_config["max_size"])
        return shortest_edge_size(*image_size, short, max_size)
    if mode == "squash" and "input_size" in data_config:
        return tuple(int(s) for s in data_config["input_size"])
    return tuple(int(s) for s in image_size)


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
        x = x.flip(1)  # detectron2 reads BGR and normalises with the RGB statistics
    elif channels != "rgb":
        raise ValueError(f"unsupported channel order {channels!r}; known: 'rgb', 'bgr'")
    mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)
    return _pad(((x - mean) / std).to(dtype), data_config)


def _pad(x: torch.Tensor, data_config: Mapping[str, Any]) -> torch.Tensor:
    """Zero-pad [1, 3, h, w] at the bottom/right to the config's canvas or size divisibility."""
    h, w = x.shape[-2:]
    if "canvas" in data_config:
        side = int(data_config["canvas"])
        if h > side or w > side:
            raise ValueError(f"a {h}x{w} input does not fit the {side}x{side} canvas")
        th, tw = side, side
    elif data_config.get("size_divisibility"):
        d = int(data_config["size_divisibility"])
        th, tw = -(-h // d) * d, -(-w // d) * d
    else:
        return x
    return F.pad(x, (0, tw - w, 0, th - h)) if (th, tw) != (h, w) else x


def shortest_edge_size(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2 ResizeShortestEdge output (h', w'): short side to `short`, long side capped at
    `max_size`, sizes rounded with int(x + 0.5) and kept >= 1 (a 1x300 image would round to 0)."""
    scale = short / min(h, w)
    newh, neww = (short, scale * w) if h < w else (scale * h, short)
    if max(newh, neww) > max_size:
        scale = max_size / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return max(1, int(newh + 0.5)), max(1, int(neww + 0.5))


def _resize_shortest_edge(image: torch.Tensor, data_config: Mapping[str, Any]) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, h', w'] as detectron2 does it (PIL bilinear on uint8)."""
    h, w = image.shape[-2:]
    size = shortest_edge_size(h, w, int(data_config["shortest_edge"]), int(data_config["max_size"]))
    if size == (h, w):
        return image
    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy())
    out = np.asarray(pil.resize((size[1], size[0]), Image.BILINEAR))
    return torch.from_numpy(out.copy()).permute(2, 0, 1)


def resize_mask(mask: torch.Tensor, size: Sequence[int], *, grid: str = "floor") -> torch.Tensor:
    """Nearest resize of a bool / integer / float mask or label map [..., H, W], dtype kept.

    `grid` "floor": torch's `nearest` (source index floor(dst * in / out)), what the benchmark
    protocols use; "center": the source pixel PIL NEAREST picks (pixel centres, its rounding at
    ties; the index map is taken from PIL itself), what image and mask loading use. Labels are
    never blended; integer labels stay exact (float64 work, or a gather for "center").
    """
    size = tuple(int(s) for s in size)
    if tuple(mask.shape[-2:]) == size:
        return mask
    if grid == "center":
        rows = _pil_nearest_index(mask.shape[-2], size[0]).to(mask.device)
        cols = _pil_nearest_index(mask.shape[-1], size[1]).to(mask.device)
        return mask.index_select(-2, rows).index_select(-1, cols)
    if grid != "floor":
        raise ValueError(f"unknown resize grid {grid!r}; known: 'floor', 'center'")
    exact = mask.dtype in (torch.int32, torch.int64, torch.float64)
    flat = mask.reshape(-1, 1, *mask.shape[-2:]).to(torch.float64 if exact else torch.float32)
    out = F.interpolate(flat, size=size, mode="nearest")
    return out.reshape(*mask.shape[:-2], *size).to(mask.dtype)


def _pil_nearest_index(n: int, m: int) -> torch.Tensor:
    """int64 [m]: the input index (of n) PIL NEAREST samples for each output pixel of one axis."""
    ramp = Image.fromarray(np.arange(n, dtype=np.int32).reshape(1, n), "I")
    return torch.from_numpy(np.asarray(ramp.resize((m, 1), Image.NEAREST))[0].astype(np.int64))


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of logits [N, h, w] to `size`, in float32."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits[:, None], size=tuple(size), mode="bilinear", align_corners=False)[
        :, 0
    ]


def crop_resize(logits: torch.Tensor, valid: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """detectron2 sem_seg_postprocess: [N, H, W] on a padded canvas -> crop the image region
    `valid` (h', w') at the top left -> bilinear to `size` -> float32 [N, *size]."""
    return resize_logits(logits[..., : valid[0], : valid[1]], tuple(size))
