"""A stock diffusers `UNet2DConditionModel` as a conditioned backbone (DiffewS; ODISE next).

Built from a diffusers UNet config (the `config.json` of a pipeline's `unet/` folder), never a
fork. `forward_features(latents, timestep=, encoder_hidden_states=)` returns the UNet's output
as `{"sample": ...}`. Attention processors (e.g. the K/V bank of `layers/kv_bank.py` on the
`attn1` layers) are installed with `set_attention_processor`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from ..contracts import FeatureInfo
from ..registry import register_backbone
from .base import Backbone

__all__ = ["DiffusersUNet"]


@register_backbone("diffusers_unet")
class DiffusersUNet(Backbone):
    """Conditioned UNet: latents + timestep + encoder hidden states -> {"sample": output}."""

    provides = ("unet_taps",)

    def __init__(
        self, unet: Mapping[str, Any], *, output: str | None = None, frozen: bool = False
    ) -> None:
        super().__init__(output)
        self.unet = UNet2DConditionModel.from_config(dict(unet))
        if frozen:
            self.requires_grad_(False)

    @property
    def feature_info(self) -> FeatureInfo:
        return FeatureInfo("unet_taps", ("sample",), (int(self.unet.config.out_channels),), (1,))

    def attention_owner(self) -> nn.Module:
        return self.unet

    def forward_features(self, pixels: torch.Tensor, **conditioning: Any) -> dict[str, Any]:
        """latents [B, C, h, w] + timestep= + encoder_hidden_states= -> {"sample": output}."""
        missing = {"timestep", "encoder_hidden_states"} - set(conditioning)
        if missing:
            raise TypeError(f"the UNet needs conditioning {sorted(missing)} besides the latents")
        return {"sample": self.unet(pixels, **conditioning).sample}
