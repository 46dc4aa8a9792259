"""`Backbone`: the base of every backbone adapter (timm / open_clip / diffusers wrappers).

A backbone declares the feature kinds it can return (`provides`, see `promptseg.contracts`), is
built for one of them (`output`), and describes what it returns with `feature_info`.
`forward_features(pixels, **conditioning)` takes conditioning besides pixels (a diffusion UNet's
timestep and encoder hidden states); backbones over diffusers models can have their attention
processors swapped with `set_attention_processor` (e.g. a K/V-bank processor).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from ..contracts import FEATURE_KINDS, FeatureInfo

__all__ = ["Backbone", "vit_taps", "vit_feature_info"]


class Backbone(nn.Module, ABC):
    """Image encoder adapter: pixels (+ conditioning) -> a dict of features of one kind."""

    provides: ClassVar[tuple[str, ...]] = ()

    def __init__(self, output: str | None = None) -> None:
        super().__init__()
        output = output or self.provides[0]
        if output not in self.provides:
            raise ValueError(
                f"{type(self).__name__} provides {list(self.provides)} features, not {output!r}"
            )
        if output not in FEATURE_KINDS:
            raise ValueError(f"unknown feature kind {output!r}; known: {sorted(FEATURE_KINDS)}")
        self.output = output

    @property
    @abstractmethod
    def feature_info(self) -> FeatureInfo:
        """Kind, keys, channels and strides of what `forward_features` returns."""

    @abstractmethod
    def forward_features(self, pixels: torch.Tensor, **conditioning: Any) -> dict[str, Any]:
        """[B, 3, H, W] normalised pixels (+ conditioning) -> features of kind `self.output`."""

    def forward(self, pixels: torch.Tensor, **conditioning: Any) -> dict[str, Any]:
        """Same as `forward_features`."""
        return self.forward_features(pixels, **conditioning)

    def attention_owner(self) -> nn.Module | None:
        """The diffusers model whose attention processors can be replaced (None: no such model)."""
        return None

    def set_attention_processor(self, processor: Any) -> None:
        """Install diffusers attention processor(s) (one, or a dict by layer name)."""
        owner = self.attention_owner()
        if owner is None or not hasattr(owner, "set_attn_processor"):
            raise TypeError(
                f"{type(self).__name__} has no diffusers attention layers; attention processors "
                "can only be installed on backbones over a diffusers model (UNet, VAE)"
            )
        owner.set_attn_processor(processor)

    @property
    def attention_processors(self) -> dict[str, Any]:
        """The installed attention processors by layer name (empty without diffusers layers)."""
        owner = self.attention_owner()
        return dict(owner.attn_processors) if owner is not None else {}


def vit_taps(output: str, taps: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """Blocks a ViT adapter returns: `taps` for vit_tokens, the last block for feature_map."""
    chosen = tuple(int(t) for t in taps) if output == "vit_tokens" else (depth - 1,)
    if not chosen or max(chosen) >= depth or min(chosen) < 0:
        raise ValueError(f"taps {list(chosen)} must be block indices of a {depth}-block ViT")
    return chosen


def vit_feature_info(output: str, taps: tuple[int, ...], width: int, patch: int) -> FeatureInfo:
    """What a ViT adapter returns: {"map"} for feature_map, {"block<i>"} per tap for vit_tokens."""
    if output == "feature_map":
        return FeatureInfo("feature_map", ("map",), (width,), (patch,))
    keys = tuple(f"block{i}" for i in taps)
    return FeatureInfo("vit_tokens", keys, (width,) * len(keys), (patch,) * len(keys))
