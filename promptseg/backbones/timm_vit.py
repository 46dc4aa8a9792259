"""Any timm ViT as a backbone (e.g. the ImageNet ViT of CLIPSeg's ViTSeg baseline).

Built with `dynamic_img_size=True`, so timm resizes its position table to the input's grid.
`vit_tokens`: the tapped blocks' residual streams with the class token first (timm's
`forward_intermediates`, no final norm); `feature_map`: the last block's patch tokens as a grid.
`pretrained=True` loads timm's released weights for `arch` (its own source, through timm).
"""

from __future__ import annotations

from typing import Any

import timm
import torch

from ..contracts import FeatureInfo
from ..registry import register_backbone
from .base import Backbone, vit_feature_info, vit_taps

__all__ = ["TimmViT"]


@register_backbone("timm_vit")
class TimmViT(Backbone):
    """A timm VisionTransformer with one class token, tapped after chosen blocks."""

    provides = ("vit_tokens", "feature_map")

    def __init__(
        self,
        arch: str = "vit_base_patch16_224.augreg_in21k",
        *,
        taps: tuple[int, ...] = (),
        output: str | None = None,
        pretrained: bool = False,
        frozen: bool = True,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__(output)
        self.vit = timm.create_model(
            arch, pretrained=pretrained, num_classes=0, dynamic_img_size=True, **timm_kwargs
        )
        if getattr(self.vit, "num_prefix_tokens", None) != 1 or not hasattr(self.vit, "blocks"):
            raise ValueError(
                f"timm_vit needs a ViT with exactly one class token and no register tokens; "
                f"{arch!r} has {getattr(self.vit, 'num_prefix_tokens', 'no')} prefix tokens"
            )
        depth = len(self.vit.blocks)
        self.taps = vit_taps(self.output, taps, depth)
        self.patch_size = int(self.vit.patch_embed.patch_size[0])
        self.width = int(self.vit.embed_dim)
        if frozen:
            self.requires_grad_(False)

    @property
    def feature_info(self) -> FeatureInfo:
        return vit_feature_info(self.output, self.taps, self.width, self.patch_size)

    def forward_features(self, pixels: torch.Tensor, **conditioning: Any) -> dict[str, Any]:
        """vit_tokens: {"block<i>": [B, 1 + gh*gw, C]}; feature_map: {"map": [B, C, gh, gw]}."""
        gh, gw = (s // self.patch_size for s in pixels.shape[-2:])
        taps = self.vit.forward_intermediates(
            pixels,
            indices=list(self.taps),
            norm=False,
            output_fmt="NLC",
            intermediates_only=True,
            return_prefix_tokens=True,
        )  # per tap: (patch tokens [B, gh*gw, C], class token [B, 1, C])
        if self.output == "feature_map":
            x = taps[-1][0]
            return {"map": x.transpose(1, 2).reshape(x.shape[0], -1, gh, gw)}
        return {
            f"block{i}": torch.cat([cls, x], dim=1)
            for i, (x, cls) in zip(self.taps, taps, strict=True)
        }
