"""Mask2Former head as ODISE uses it: pixel decoder + masked decoder.

`MSDeformAttnPixelDecoder`: the three deepest pyramid levels (strides 8, 16, 32) go through a
deformable-attention encoder; the shallower ones are merged top-down FPN-style into the
stride-4 mask features. It always computes in float32 (weights kept in float32, inputs cast,
autocast off), whatever dtype the rest of the model has.
`MaskedAttentionDecoder`: learned queries refine over the three encoder levels in turn (layer l
reads level l % 3), each cross-attending only inside the mask predicted before it; every
prediction also yields a `PooledMaskEmbed` embedding (mask-pooled features + query -> MLP) that
the model classifies against text. Batched over images, each image independent.
State-dict keys are the official ones minus `sem_seg_head.`, so checkpoints map one to one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..contracts import FeatureInfo
from ..layers.attention import (
    CrossAttentionBlock,
    FeedForwardBlock,
    SelfAttentionBlock,
    cross_attention_mask,
)
from ..layers.deform_attn import MSDeformAttn
from ..layers.mlp import MLP
from ..layers.position import sine_position_embedding
from ..registry import register_head
from .base import Head

__all__ = [
    "Mask2FormerHead",
    "MSDeformAttnPixelDecoder",
    "MaskedAttentionDecoder",
    "PooledMaskEmbed",
    "reference_points",
    "hard_mask_pool",
]

ENCODER_LEVELS = 3  # Mask2Former always encodes (and decodes over) the three deepest levels
GROUPS = 32  # GroupNorm groups of every pixel-decoder conv
POOL_EPS = 1e-8  # mask-pooling denominator
MAX_LOGIT_SCALE = 100.0


# ----------------------------------------------------------------------------------------------
# small pure functions


def reference_points(h: int, w: int, device: torch.device | None = None) -> Tensor:
    """Normalised (x, y) centres of an h x w grid's cells, row-major -> [h*w, 2] (float32)."""
    ys = torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device) / h
    xs = torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device) / w
    return torch.stack([xs[None].expand(h, w), ys[:, None].expand(h, w)], dim=-1).reshape(-1, 2)


def hard_mask_pool(features: Tensor, mask_logits: Tensor) -> Tensor:
    """Mean of features [B, C, H, W] over each mask's pixels with sigmoid > 0.5 -> [B, Q, C].

    mask_logits [B, Q, H, W] are detached; an empty mask pools to zeros (denominator + 1e-8,
    computed in float32 so a half-precision model gets zeros there too, not NaN).
    """
    inside = (mask_logits.detach().float().sigmoid() > 0.5).float()
    weights = inside / (inside.sum(dim=(-2, -1), keepdim=True) + POOL_EPS)
    return torch.einsum("bchw,bqhw->bqc", features, weights.to(features.dtype))


def _xavier_conv(conv: nn.Conv2d) -> None:
    """detectron2's `c2_xavier_fill`: kaiming-uniform with a = 1, zero bias."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


# ----------------------------------------------------------------------------------------------
# pixel decoder


class ConvGroupNorm(nn.Conv2d):
    """Bias-free conv -> GroupNorm(32) (-> ReLU); keys `weight`, `norm.*` as detectron2's Conv2d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, relu: bool) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
        )
        self.norm = nn.GroupNorm(GROUPS, out_channels)
        self.relu = relu
        _xavier_conv(self)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, Cin, H, W] -> [B, Cout, H, W]."""
        x = self.norm(super().forward(x))
        return F.relu(x) if self.relu else x


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention (+pos on queries), then ReLU FFN."""

    def __init__(self, dim: int, heads: int, ffn: int, levels: int, points: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(dim, levels, heads, points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm2 = nn.LayerNorm(dim)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(
        self, src: Tensor, pos: Tensor, points: Tensor, spatial_shapes: Sequence[tuple[int, int]]
    ) -> Tensor:
        """src [B, S, C], pos [1, S, C], reference points [1, S, 2] -> [B, S, C]."""
        src = self.norm1(src + self.self_attn(src + pos, points, src, spatial_shapes))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DeformableEncoder(nn.Module):
    """A stack of deformable encoder layers over the flattened levels."""

    def __init__(
        self, dim: int, heads: int, ffn: int, layers: int, levels: int, points: int
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(dim, heads, ffn, levels, points) for _ in range(layers)
        )

    def forward(
        self, src: Tensor, pos: Tensor, points: Tensor, spatial_shapes: Sequence[tuple[int, int]]
    ) -> Tensor:
        """src [B, S, C], pos [1, S, C], reference points [1, S, 2] -> [B, S, C]."""
        for layer in self.layers:
            src = layer(src, pos, points, spatial_shapes)
        return src


class DeformableTransformer(nn.Module):
    """Flattens the levels, adds sine PE + a learned level embedding, runs the encoder."""

    def __init__(
        self, dim: int, heads: int, ffn: int, layers: int, levels: int, points: int
    ) -> None:
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(levels, dim))
        self.encoder = DeformableEncoder(dim, heads, ffn, layers, levels, points)
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: Sequence[Tensor]) -> list[Tensor]:
        """Levels [B, C, H_l, W_l] (coarse to fine) -> encoded levels, same shapes."""
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        dim, device = srcs[0].shape[1], srcs[0].device
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], dim=1)  # [B, S, C]
        pos = torch.cat(
            [
                sine_position_embedding(h, w, dim, device=device) + self.level_embed[i]
                for i, (h, w) in enumerate(shapes)
            ]
        )[None]  # [1, S, C]
        points = torch.cat([reference_points(h, w, device) for h, w in shapes])[None]  # [1, S, 2]
        out = self.encoder(src, pos, points, shapes)
        return [
            level.transpose(1, 2).unflatten(2, shape)
            for level, shape in zip(
                out.split([h * w for h, w in shapes], dim=1), shapes, strict=True
            )
        ]


class MSDeformAttnPixelDecoder(nn.Module):
    """Pyramid -> mask features (finest stride) + the three encoded levels (coarse to fine).

    `encoder_keys` (the three deepest levels) are projected (1x1 conv + GN), encoded jointly
    with deformable attention; each shallower key (`fpn_keys`, fine to coarse = adapter_1, ...)
    adds its lateral 1x1 conv to the bilinearly upsampled level above, then a 3x3 conv.
    Weights stay float32 under `.half()` / `.to(dtype)`; inputs are cast to float32.
    """

    def __init__(
        self,
        in_channels: Mapping[str, int],
        strides: Mapping[str, int],
        conv_dim: int = 256,
        mask_dim: int = 256,
        heads: int = 8,
        ffn: int = 1024,
        layers: int = 6,
        points: int = 4,
    ) -> None:
        super().__init__()
        keys = sorted(in_channels, key=lambda k: strides[k])  # fine to coarse
        if len(keys) < ENCODER_LEVELS:
            raise ValueError(
                f"the Mask2Former pixel decoder needs at least {ENCODER_LEVELS} pyramid levels, "
                f"got {keys}; use a backbone that provides a 'pyramid' (res2..res5)"
            )
        self.fpn_keys = keys[:-ENCODER_LEVELS]
        self.encoder_keys = keys[-ENCODER_LEVELS:]
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels[k], conv_dim, 1), nn.GroupNorm(GROUPS, conv_dim))
            for k in reversed(self.encoder_keys)
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            nn.init.zeros_(proj[0].bias)
        self.transformer = DeformableTransformer(
            conv_dim, heads, ffn, layers, ENCODER_LEVELS, points
        )
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 1)
        _xavier_conv(self.mask_features)
        for i, key in enumerate(self.fpn_keys, start=1):
            self.add_module(f"adapter_{i}", ConvGroupNorm(in_channels[key], conv_dim, 1, False))
            self.add_module(f"layer_{i}", ConvGroupNorm(conv_dim, conv_dim, 3, True))

    def _apply(self, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> nn.Module:
        """Follow device moves but keep floating tensors float32 (cast from the untouched
        float32 originals, so a round trip through half precision loses nothing)."""

        def keep_float32(t: Tensor) -> Tensor:
            moved = fn(t)
            if moved.is_floating_point() and moved.dtype != torch.float32:
                return t.to(device=moved.device, dtype=torch.float32)
            return moved

        return super()._apply(keep_float32, *args, **kwargs)

    def forward(self, features: Mapping[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Pyramid {key: [B, C_k, H/s_k, W/s_k]} -> mask features [B, mask_dim, H/s0, W/s0] and
        the encoded levels [B, conv_dim, H/s, W/s] for s = 32, 16, 8, all float32."""
        device = next(iter(features.values())).device
        with torch.autocast(device.type, enabled=False):
            srcs = [
                proj(features[k].float())
                for proj, k in zip(self.input_proj, reversed(self.encoder_keys), strict=True)
            ]
            levels = self.transformer(srcs)
            finest = levels[-1]
            for i in range(len(self.fpn_keys), 0, -1):  # top-down: coarse to fine
                lateral = getattr(self, f"adapter_{i}")(features[self.fpn_keys[i - 1]].float())
                up = F.interpolate(
                    finest, size=lateral.shape[-2:], mode="bilinear", align_corners=False
                )
                finest = getattr(self, f"layer_{i}")(lateral + up)
            return self.mask_features(finest), levels


# ----------------------------------------------------------------------------------------------
# transformer decoder


class PooledMaskEmbed(nn.Module):
    """ODISE's mask embedding z = MLP(LN(Linear(LN(pool(F, M))) + d)) and its logit scale."""

    def __init__(self, hidden_dim: int, mask_dim: int, temperature: float = 0.07) -> None:
        super().__init__()
        self.pool_proj = nn.Sequential(nn.LayerNorm(mask_dim), nn.Linear(mask_dim, hidden_dim))
        self.mask_embed = nn.Sequential(nn.LayerNorm(hidden_dim), MLP(hidden_dim, mask_dim, 3))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))

    def forward(
        self, decoder_output: Tensor, mask_features: Tensor, mask_logits: Tensor
    ) -> tuple[Tensor, Tensor]:
        """d [B, Q, hidden], F [B, mask_dim, H, W], M [B, Q, H, W] -> z [B, Q, mask_dim] and
        min(exp(s), 100) (a scalar tensor)."""
        pooled = hard_mask_pool(mask_features, mask_logits)
        z = self.mask_embed(self.pool_proj(pooled) + decoder_output)
        return z, self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)


class MaskedAttentionDecoder(nn.Module):
    """Mask2Former's transformer decoder (post-norm; cross-attn -> self-attn -> FFN per layer)."""

    def __init__(
        self,
        in_channels: int = 256,
        hidden_dim: int = 256,
        num_queries: int = 100,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        dec_layers: int = 9,
        mask_dim: int = 256,
        class_head: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = nheads
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionBlock(hidden_dim, nheads, pre_norm=False) for _ in range(dec_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionBlock(hidden_dim, nheads, pre_norm=False) for _ in range(dec_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FeedForwardBlock(hidden_dim, dim_feedforward, pre_norm=False) for _ in range(dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # content
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # position
        self.level_embed = nn.Embedding(ENCODER_LEVELS, hidden_dim)
        self.input_proj = nn.ModuleList(
            nn.Identity() if in_channels == hidden_dim else nn.Conv2d(in_channels, hidden_dim, 1)
            for _ in range(ENCODER_LEVELS)
        )
        for proj in self.input_proj:
            if isinstance(proj, nn.Conv2d):
                _xavier_conv(proj)
        # caption model: 2-way (foreground, no-object); label model: none (classes come from text)
        self.class_embed = nn.Linear(hidden_dim, 2) if class_head else None
        self.mask_embed = MLP(hidden_dim, mask_dim, 3)
        self.post_mask_embed = PooledMaskEmbed(hidden_dim, mask_dim)

    def predict(self, queries: Tensor, mask_features: Tensor, embed: bool) -> dict[str, Any]:
        """Prediction heads on queries [B, Q, hidden]: pred_masks [B, Q, H, W], pred_logits
        [B, Q, 2] or None, and (if `embed`) mask_embed [B, Q, mask_dim], logit_scale."""
        d = self.decoder_norm(queries)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(d), mask_features)
        out: dict[str, Any] = {
            "pred_masks": masks,
            "pred_logits": self.class_embed(d) if self.class_embed is not None else None,
        }
        if embed:
            out["mask_embed"], out["logit_scale"] = self.post_mask_embed(d, mask_features, masks)
        return out

    def forward(
        self, levels: Sequence[Tensor], mask_features: Tensor, aux: bool = True
    ) -> dict[str, Any]:
        """Levels [B, C, h_l, w_l] (strides 32, 16, 8) + mask features [B, mask_dim, H, W] ->
        the last prediction's pred_masks, pred_logits, mask_embed, logit_scale, and `aux` (the
        earlier predictions, initial queries first; empty if not `aux`, whose heads are then
        reduced to the masks that steer attention)."""
        if len(levels) != ENCODER_LEVELS:
            raise ValueError(f"expected {ENCODER_LEVELS} feature levels, got {len(levels)}")
        dtype = self.query_feat.weight.dtype
        mask_features = mask_features.to(dtype)
        b = mask_features.shape[0]
        sizes, memory, memory_pos = [], [], []
        for i, (x, proj) in enumerate(zip(levels, self.input_proj, strict=True)):
            h, w = x.shape[-2:]
            sizes.append((h, w))
            memory.append(proj(x.to(dtype)).flatten(2).transpose(1, 2) + self.level_embed.weight[i])
            pe = sine_position_embedding(h, w, memory[-1].shape[-1], device=x.device)
            memory_pos.append(pe.to(dtype)[None])  # [1, h*w, hidden]
        queries = self.query_feat.weight[None].expand(b, -1, -1)
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)

        n_layers = len(self.transformer_ffn_layers)
        predictions = [self.predict(queries, mask_features, embed=aux or n_layers == 0)]
        for i in range(n_layers):
            level = i % ENCODER_LEVELS
            blocked = cross_attention_mask(predictions[-1]["pred_masks"], sizes[level])
            queries = self.transformer_cross_attention_layers[i](
                queries, memory[level], query_pos, memory_pos[level], blocked
            )
            queries = self.transformer_self_attention_layers[i](queries, query_pos)
            queries = self.transformer_ffn_layers[i](queries)
            last = i == n_layers - 1
            predictions.append(self.predict(queries, mask_features, embed=aux or last))
        return {**predictions[-1], "aux": predictions[:-1] if aux else []}


# ----------------------------------------------------------------------------------------------
# head


@register_head("mask2former")
class Mask2FormerHead(Head):
    """MSDeformAttn pixel decoder + masked-attention decoder with ODISE's pooled mask embedding.

    Submodules `pixel_decoder` and `predictor` are separate so a caller can cache the pixel
    decoder's output; `forward` runs both.
    """

    needs = "pyramid"

    @classmethod
    def from_features(cls, features: FeatureInfo, **config: Any) -> Mask2FormerHead:
        """Built on a backbone's pyramid: channels and strides of each of its levels."""
        return cls(
            in_channels=dict(zip(features.keys, features.channels, strict=True)),
            strides=dict(zip(features.keys, features.strides, strict=True)),
            **config,
        )

    def __init__(
        self,
        in_channels: Mapping[str, int] | None = None,
        strides: Mapping[str, int] | None = None,
        hidden_dim: int = 256,
        num_queries: int = 100,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        dec_layers: int = 9,
        enc_layers: int = 6,
        enc_dim_feedforward: int = 1024,
        conv_dim: int = 256,
        mask_dim: int = 256,
        class_head: bool = False,
    ) -> None:
        """in_channels / strides by pyramid key (default: ODISE's res2..res5, 512 channels,
        strides 4, 8, 16, 32)."""
        super().__init__()
        in_channels = dict(in_channels or {f"res{i}": 512 for i in range(2, 6)})
        strides = dict(strides or {f"res{i}": 2**i for i in range(2, 6)})
        if set(in_channels) != set(strides):
            raise ValueError(
                f"in_channels keys {sorted(in_channels)} and strides keys {sorted(strides)} "
                "must name the same pyramid levels"
            )
        self.num_queries = num_queries
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            in_channels, strides, conv_dim, mask_dim, nheads, enc_dim_feedforward, enc_layers
        )
        self.predictor = MaskedAttentionDecoder(
            conv_dim,
            hidden_dim,
            num_queries,
            nheads,
            dim_feedforward,
            dec_layers,
            mask_dim,
            class_head,
        )

    def forward(self, features: Mapping[str, Tensor], aux: bool = True) -> dict[str, Any]:
        """Pyramid {key: [B, C_k, H/s_k, W/s_k]} -> dict of the last prediction:

        pred_masks [B, Q, H/4, W/4] (mask logits), pred_logits [B, Q, 2] or None (no class
        head), mask_embed [B, Q, mask_dim], logit_scale (scalar), and `aux`: the same dicts for
        the earlier predictions (initial queries first; empty if not `aux`). Images in the
        batch do not interact.
        """
        needed = (*self.pixel_decoder.fpn_keys, *self.pixel_decoder.encoder_keys)
        missing = [k for k in needed if k not in features]
        if missing:
            raise KeyError(
                f"the Mask2Former head needs pyramid levels {missing} but got {sorted(features)}"
            )
        mask_features, levels = self.pixel_decoder(features)
        return self.predictor(levels, mask_features, aux=aux)
