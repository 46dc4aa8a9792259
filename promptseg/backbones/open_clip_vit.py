"""CLIP ViT adapters over open_clip: the image tower as a backbone, the text tower beside it.

Both are open_clip modules built with QuickGELU (OpenAI CLIP), so state dicts carry the OpenAI
key names (`visual.*` for the image tower; `transformer.*`, `token_embedding`, ... for the text
tower). Differences from open_clip's own forward, all required by CLIPSeg:
- the square position table is resized bicubically *without* antialias to any square grid;
- `forward_features` stops after the deepest tapped block and returns raw tokens (no LayerNorm);
- text is encoded at the batch's longest length instead of 77 (identical under the causal mask).
"""

from __future__ import annotations

from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, _build_text_tower, _build_vision_tower
from torch import nn

from ..contracts import FeatureInfo
from ..registry import register_backbone
from .base import Backbone, vit_feature_info, vit_taps

__all__ = ["clip_input_tokens", "OpenCLIPViT", "OpenCLIPText", "resize_position_embedding"]


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


def _open_clip_model(arch: str, pretrained: str | None) -> tuple[nn.Module | None, dict]:
    """(model with a pretrained tag's weights, or None without a tag; its config) by name."""
    config = open_clip.get_model_config(arch)
    if config is None:
        raise ValueError(
            f"open_clip knows no model {arch!r}; see open_clip.list_models() (e.g. 'ViT-B-16')"
        )
    model = open_clip.create_model(arch, pretrained=pretrained) if pretrained else None
    return model, config


def clip_input_tokens(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """An open_clip image tower's CLS + patch tokens [B, 1 + g*g, C] of square pixels, with the
    position table resized to the input's grid, after ln_pre (the transformer's input)."""
    h, w = pixels.shape[-2:]
    if h != w:
        raise ValueError(f"CLIP ViT input must be square, got {h}x{w}")
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)  # [B, g*g, C]
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    grid = h // visual.conv1.kernel_size[0]
    x = x + resize_position_embedding(visual.positional_embedding, grid).to(x.dtype)
    return visual.ln_pre(x)


@register_backbone("open_clip_vit")
class OpenCLIPViT(Backbone):
    """OpenAI-style CLIP image tower exposing the residual stream a decoder taps.

    Built from explicit sizes (`embed_dim`, `width`, `layers`, `heads`, `patch_size`,
    `image_size`) or from an open_clip model name (`arch`, e.g. "ViT-B-16", with an optional
    open_clip `pretrained` tag such as "openai"). `vit_tokens` output: the blocks in `taps`;
    `feature_map` output: the last block's patch tokens as a grid (no final LayerNorm).
    """

    provides = ("vit_tokens", "feature_map")

    def __init__(
        self,
        embed_dim: int | None = None,
        width: int | None = None,
        layers: int | None = None,
        heads: int | None = None,
        patch_size: int | None = None,
        image_size: int = 224,
        *,
        arch: str | None = None,
        pretrained: str | None = None,
        taps: tuple[int, ...] = (),
        output: str | None = None,
        frozen: bool = True,
    ) -> None:
        super().__init__(output)
        tower = None
        if arch is not None:
            model, config = _open_clip_model(arch, pretrained)
            tower = model.visual if model is not None else None
            vision = config["vision_cfg"]
            embed_dim, width, layers = config["embed_dim"], vision["width"], vision["layers"]
            patch_size, image_size = vision["patch_size"], vision["image_size"]
            heads = width // vision.get("head_width", 64)
        elif None in (embed_dim, width, layers, heads, patch_size):
            raise ValueError(
                "open_clip_vit needs an open_clip `arch` name, or embed_dim, width, layers, "
                "heads and patch_size"
            )
        self.visual = tower or _build_vision_tower(
            embed_dim,
            CLIPVisionCfg(
                width=width,
                layers=layers,
                head_width=width // heads,
                patch_size=patch_size,
                image_size=image_size,
            ),
            quick_gelu=True,
        )
        self.taps = vit_taps(self.output, taps, layers)
        self.patch_size = int(patch_size)
        self.width = int(width)
        if frozen:
            self.requires_grad_(False)

    @property
    def feature_info(self) -> FeatureInfo:
        return vit_feature_info(self.output, self.taps, self.width, self.patch_size)

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return clip_input_tokens(self.visual, pixels)

    def forward_features(self, pixels: torch.Tensor, **conditioning: Any) -> dict[str, Any]:
        """vit_tokens: residual stream [B, 1 + g*g, C] after each tapped block, CLS first;
        feature_map: {"map": [B, C, g, g]} of the last block."""
        x = self._tokens(pixels)
        out = {}
        for i, block in enumerate(self.visual.transformer.resblocks[: max(self.taps) + 1]):
            x = block(x)
            if i in self.taps:
                out[f"block{i}"] = x
        if self.output == "feature_map":
            g = pixels.shape[-1] // self.patch_size
            return {"map": x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, g, g)}
        return out

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected, unnormalised CLS embedding [B, embed_dim] through all blocks at any size."""
        v = self.visual
        x = v.transformer(self._tokens(pixels))
        return v.ln_post(x[:, 0]) @ v.proj


class OpenCLIPText(nn.Module):
    """OpenAI-style CLIP text tower (open_clip `TextTransformer`) with CLIP's BPE tokenizer."""

    def __init__(
        self,
        embed_dim: int | None = None,
        width: int | None = None,
        layers: int | None = None,
        heads: int | None = None,
        context_length: int = 77,
        vocab_size: int = 49408,
        *,
        arch: str | None = None,
        pretrained: str | None = None,
        frozen: bool = True,
    ) -> None:
        super().__init__()
        model = None
        if arch is not None:
            model, config = _open_clip_model(arch, pretrained)
            text = config["text_cfg"]
            embed_dim, width, layers = config["embed_dim"], text["width"], text["layers"]
            heads, context_length = text["heads"], text.get("context_length", 77)
            vocab_size = text.get("vocab_size", 49408)
        elif None in (embed_dim, width, layers, heads):
            raise ValueError(
                "the CLIP text tower needs an `arch` or embed_dim, width, layers, heads"
            )
        cfg = CLIPTextCfg(
            width=width,
            layers=layers,
            heads=heads,
            context_length=context_length,
            vocab_size=vocab_size,
        )
        tower = _build_text_tower(embed_dim, cfg, quick_gelu=True)
        if model is not None:  # open_clip's CLIP keeps the text tower's parts at its top level
            tower.load_state_dict(
                {k: v for k, v in model.state_dict().items() if k in tower.state_dict()}
            )
        self.transformer = tower.transformer
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        self.context_length = int(context_length)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
        if frozen:
            self.requires_grad_(False)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """BPE ids [B, L], zero-padded to the longest text; a text over the context limit raises."""
        ids = [self.tokenizer.encode(t) for t in texts]
        sot, eot = self.tokenizer.sot_token_id, self.tokenizer.eot_token_id
        limit = self.context_length - 2
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

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Projected, unnormalised EOT embedding [B, embed_dim] of token ids [B, L <= 77]."""
        length = token_ids.shape[1]
        x = self.token_embedding(token_ids) + self.positional_embedding[:length]
        x = self.transformer(x, attn_mask=self.attn_mask[:length, :length].to(x.dtype))
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), token_ids.argmax(dim=-1)]
        return x @ self.text_projection
