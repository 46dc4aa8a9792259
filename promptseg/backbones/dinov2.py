"""DINOv2 ViT adapter over timm: last-block patch tokens before the final LayerNorm, as a grid.

Wraps a timm DINOv2 `VisionTransformer` built at 518 px (37x37 position table, one CLS token, no
registers), so its state dict carries timm's = DINOv2's key names under `vit.`. Differences from
timm's own forward, all required by SINE:
- other input sizes use DINOv2's position-table interpolation (bicubic, scale factor
  (g + 0.1) / 37, no antialias, fp32), not timm's dynamic resize;
- the output is the last block's residual stream *before* `norm`, CLS dropped, as [B, C, gh, gw].
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import timm
import torch
import torch.nn.functional as F

from ..contracts import FeatureInfo
from ..registry import register_backbone
from .base import Backbone, vit_feature_info, vit_taps

__all__ = ["DINOv2", "DINOV2_ARCHS", "dinov2_position_table"]

#: timm names of the DINOv2 (no-register) ViTs this adapter builds.
DINOV2_ARCHS = ("vit_small_patch14_dinov2", "vit_base_patch14_dinov2", "vit_large_patch14_dinov2")
PATCH_SIZE = 14
IMG_SIZE = 518
_CACHE_SIZE = 4


def dinov2_position_table(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[1, 1 + M*M, C] CLS + square table -> [1, 1 + gh*gw, C] float32 by DINOv2's rule.

    Bicubic with `scale_factor=((gh + 0.1) / M, (gw + 0.1) / M)` (the scale, not the size, sets the
    sampling positions), antialias off, in fp32; the CLS row is kept. A grid of M x M is returned
    unchanged, as DINOv2 skips interpolation for a square input of the training size.
    """
    gh, gw = grid
    n = pos_embed.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"position table holds {n} patch rows, not a square grid")
    table = pos_embed.float()
    if (gh, gw) == (m, m):
        return table
    dim = table.shape[-1]
    patches = table[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
    patches = F.interpolate(
        patches,
        scale_factor=((gh + 0.1) / m, (gw + 0.1) / m),
        mode="bicubic",
        align_corners=False,
        antialias=False,
    )
    if patches.shape[-2:] != (gh, gw):  # DINOv2 asserts the same
        raise RuntimeError(f"interpolated position grid is {tuple(patches.shape[-2:])}, not {grid}")
    return torch.cat([table[:, :1], patches.permute(0, 2, 3, 1).reshape(1, gh * gw, dim)], dim=1)


@register_backbone("dinov2")
class DINOv2(Backbone):
    """Frozen DINOv2 ViT (timm modules) returning pre-norm patch tokens at any size.

    `feature_map` output: the last block's tokens as a grid; `vit_tokens`: the blocks in `taps`
    with the CLS token. `pretrained=True` takes timm's released weights (a replaced backbone's
    own source); otherwise weights are random until a checkpoint is loaded.
    """

    provides = ("feature_map", "vit_tokens")

    def __init__(
        self,
        arch: str | None = "vit_large_patch14_dinov2",
        *,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        taps: tuple[int, ...] = (),
        output: str | None = None,
        pretrained: bool = False,
        frozen: bool = True,
    ) -> None:
        super().__init__(output)
        overrides = {
            k: v
            for k, v in {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}.items()
            if v is not None
        }
        if arch is None:
            if len(overrides) != 3:
                raise ValueError("DINOv2(arch=None) needs embed_dim, depth and num_heads")
            arch = DINOV2_ARCHS[0]  # template: patch 14, LayerScale 1e-5, MLP ratio 4, no registers
        elif arch.split(".")[0] not in DINOV2_ARCHS:
            raise ValueError(f"unknown DINOv2 arch {arch!r}; expected one of {DINOV2_ARCHS}")
        self.vit = timm.create_model(
            arch if pretrained else arch.split(".")[0],
            pretrained=pretrained,
            img_size=IMG_SIZE,
            patch_size=PATCH_SIZE,
            init_values=1e-5,
            num_classes=0,
            reg_tokens=0,
            **overrides,
        )
        if self.vit.num_prefix_tokens != 1 or self.vit.no_embed_class:
            raise ValueError("DINOv2 adapter expects one CLS token and a CLS row in pos_embed")
        self.patch_size = PATCH_SIZE
        depth = len(self.vit.blocks)
        self.taps = vit_taps(self.output, taps, depth)
        self._pos_cache: dict[tuple[int, int], tuple[Any, tuple[Any, ...], torch.Tensor]] = {}
        if frozen:
            self.requires_grad_(False)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the position-table cache (it holds weak references)."""
        return {**self.__dict__, "_pos_cache": {}}

    def _grid(self, pixels: torch.Tensor) -> tuple[int, int]:
        """Token grid (gh, gw) of a [B, 3, H, W] batch; H and W must be multiples of 14."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"DINOv2 expects pixels [B, 3, H, W], got {tuple(pixels.shape)}")
        h, w = pixels.shape[-2:]
        if h % self.patch_size or w % self.patch_size or h == 0 or w == 0:
            raise ValueError(
                f"DINOv2 input {h}x{w} is not a multiple of the patch size {self.patch_size}; "
                "pad it (e.g. to 896 or 1036)"
            )
        return h // self.patch_size, w // self.patch_size

    def position_table(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position table [1, 1 + gh*gw, C] (float32) for a token grid, cached per grid.

        The cache entry is stamped with a weak reference to the parameter and its (version counter,
        data_ptr, device, dtype), so in-place edits, `load_state_dict`, `.to()` and replaced
        parameters all recompute it.
        While the table needs gradients (unfrozen, grad enabled) it is recomputed every call.
        """
        pos = self.vit.pos_embed
        if pos.requires_grad and torch.is_grad_enabled():
            return dinov2_position_table(pos, grid)
        stamp = (pos._version, pos.data_ptr(), pos.device, pos.dtype)
        hit = self._pos_cache.get(grid)
        if hit is not None and hit[0]() is pos and hit[1] == stamp:
            return hit[2]
        with torch.no_grad(), torch.inference_mode(False):
            table = dinov2_position_table(pos, grid)
        self._pos_cache.pop(grid, None)
        if len(self._pos_cache) >= _CACHE_SIZE:
            self._pos_cache.pop(next(iter(self._pos_cache)))
        self._pos_cache[grid] = (weakref.ref(pos), stamp, table)
        return table

    @property
    def feature_info(self) -> FeatureInfo:
        return vit_feature_info(self.output, self.taps, int(self.vit.embed_dim), PATCH_SIZE)

    def forward_features(self, pixels: torch.Tensor, **conditioning: Any) -> dict[str, Any]:
        """feature_map: {"map": [B, C, H/14, W/14]}, the last block before the final norm, CLS
        dropped; vit_tokens: {"block<i>": [B, 1 + gh*gw, C]} per tap, CLS first."""
        gh, gw = self._grid(pixels)
        vit = self.vit
        x = vit.patch_embed.norm(vit.patch_embed.proj(pixels).flatten(2).transpose(1, 2))
        x = torch.cat([vit.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.position_table((gh, gw)).to(x.dtype)
        x = vit.norm_pre(vit.patch_drop(vit.pos_drop(x)))
        out = {}
        for i, block in enumerate(vit.blocks[: max(self.taps) + 1]):
            x = block(x)
            if i in self.taps:
                out[f"block{i}"] = x
        if self.output == "feature_map":
            return {"map": x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, gh, gw)}
        return out
