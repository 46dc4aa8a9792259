"""CLIP ViT adapter over open_clip: the residual stream after chosen blocks, and both embeddings.

Wraps `open_clip.model.CLIP` built with QuickGELU (OpenAI CLIP), so its state dict carries the
OpenAI key names. Differences from open_clip's own forward, all required by CLIPSeg:
- the 14x14 position table is resized bicubically *without* antialias to any square grid;
- `forward_features` stops after the deepest tapped block and returns raw tokens (no LayerNorm);
- text is encoded at the batch's longest length instead of 77 (identical under the causal mask).
"""

from __future__ import annotations

from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from torch import nn

from ..registry import register_backbone

__all__ = ["OpenCLIPViT", "resize_position_embedding"]


def resize_position_embedding(table: torch.Tensor, grid: int) -> torch.Tensor:
    """[1 + g*g, C] CLS + square grid table -> [1 + grid*grid, C], bicubic, no antialias."""
    old = int(round((table.shape[0] - 1) ** 0.5))
    if old == grid:
        return table
    cls, patches = table[:1], table[1:]
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(
        patches.float(), size=(grid, grid), mode="bicubic", align_corners=False, antialias=False
    ).to(table.dtype)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


@register_backbone("open_clip_vit")
class OpenCLIPViT(nn.Module):
    """OpenAI-style CLIP ViT (image + text towers) exposing the activations a decoder taps."""

    def __init__(
        self,
        embed_dim: int,
        vision: dict[str, Any],
        text: dict[str, Any],
        taps: tuple[int, ...],
        data_config: dict[str, Any],
    ) -> None:
        super().__init__()
        self.clip = open_clip.model.CLIP(
            embed_dim,
            vision_cfg=CLIPVisionCfg(
                width=vision["width"],
                layers=vision["layers"],
                head_width=vision["width"] // vision["heads"],
                patch_size=vision["patch_size"],
                image_size=vision["image_size"],
            ),
            text_cfg=CLIPTextCfg(**text),
            quick_gelu=True,
        )
        if max(taps) >= vision["layers"]:
            raise ValueError(f"tap {max(taps)} does not exist in a {vision['layers']}-block ViT")
        self.taps = tuple(taps)
        self.patch_size = int(vision["patch_size"])
        self.out_channels = int(vision["width"])
        self.strides = (self.patch_size,) * len(taps)
        self.data_config = data_config
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=text["context_length"])
        self.clip.requires_grad_(False)

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch + CLS tokens plus the position table resized to the input's grid, after ln_pre."""
        v = self.clip.visual
        h, w = pixels.shape[-2:]
        if h != w:
            raise ValueError(f"CLIP ViT input must be square, got {h}x{w}")
        x = v.conv1(pixels).flatten(2).transpose(1, 2)  # [B, g*g, C]
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + resize_position_embedding(v.positional_embedding, h // self.patch_size).to(x.dtype)
        return v.ln_pre(x)

    def forward_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Residual stream [B, 1 + g*g, C] after each tapped block (0-based), CLS first."""
        x = self._tokens(pixels)
        out = {}
        for i, block in enumerate(self.clip.visual.transformer.resblocks[: max(self.taps) + 1]):
            x = block(x)
            if i in self.taps:
                out[f"block{i}"] = x
        return out

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected, unnormalised CLS embedding [B, embed_dim] through all blocks at any size."""
        v = self.clip.visual
        x = v.transformer(self._tokens(pixels))
        return v.ln_post(x[:, 0]) @ v.proj

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """BPE ids [B, L], zero-padded to the longest text; a text over the context limit raises."""
        ids = [self.tokenizer.encode(t) for t in texts]
        sot, eot = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        limit = self.clip.context_length - 2
        for t, seq in zip(texts, ids, strict=True):
            if len(seq) > limit:
                raise ValueError(
                    f"text prompt is {len(seq)} tokens long, CLIP takes at most {limit}: {t[:60]!r}"
                )
        length = max(len(s) for s in ids) + 2
        out = torch.zeros(len(ids), length, dtype=torch.long)
        for row, seq in enumerate(ids):
            out[row, : len(seq) + 2] = torch.tensor([sot, *seq, eot])
        return out

    def encode_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Projected, unnormalised EOT embedding [B, embed_dim] of token ids [B, L <= 77]."""
        c = self.clip
        length = token_ids.shape[1]
        x = c.token_embedding(token_ids) + c.positional_embedding[:length]
        x = c.transformer(x, attn_mask=c.attn_mask[:length, :length].to(x.dtype))
        x = c.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), token_ids.argmax(dim=-1)]
        return x @ c.text_projection
