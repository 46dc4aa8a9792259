"""SINE's trainable part: conv neck, in-context fusion and the M-Former decoder.

Target tokens F_t and reference tokens (mask-pooled from reference features) meet in one post-norm
fusion block that is applied with the same weights in both directions. The M-Former then decodes
N ID queries, S instance queries and M + 1 semantic prototypes jointly; ID and instance queries do
masked cross-attention with the mask from the stage-0 prediction in every layer (as released).
Cacheable pieces are separate methods: `neck`, `mask_features`, `pool_sums`, `image_self_attention`.
One `forward` decodes a batch of targets. The generic pieces (attention sub-layers, MLP, sine PE,
masked-attention rule) are `promptseg.layers`; the SINE-specific ones are here.
State-dict keys are the official ones minus `image_encoder.` / `transformer_decoder.`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from ..contracts import FeatureInfo
from ..layers.attention import (
    CrossAttentionBlock,
    FeedForwardBlock,
    SelfAttentionBlock,
    cross_attention_mask,
)
from ..layers.mlp import MLP
from ..layers.position import sine_position_embedding
from ..registry import register_head
from .base import Head
from .mask_inference import mask_prob_mean

__all__ = [
    "MFormerHead",
    "PooledTokens",
    "gaussian_prior",
    "id_position_embedding",
    "cosine_logits",
    "group_attention_mask",
    "binarize_masks",
    "masked_sums",
    "tokens_from_sums",
    "id_scores",
    "unbatch",
]

POOL_EPS = 1e-8  # mask pooling denominator
MAX_LOGIT_SCALE = 100.0


# ----------------------------------------------------------------------------------------------
# small pure functions


def gaussian_prior(corr: Tensor, h: int, w: int, sigma: float = 10.0) -> Tensor:
    """Multiply corr [B, N, h*w] by a Gaussian (sigma in cells) around each row's argmax cell."""
    center = corr.argmax(dim=-1)  # [B, N]
    cy = torch.div(center, w, rounding_mode="floor").to(corr.dtype)[..., None, None]
    cx = (center % w).to(corr.dtype)[..., None, None]
    ys = torch.arange(h, device=corr.device, dtype=corr.dtype)[:, None]  # [h, 1]
    xs = torch.arange(w, device=corr.device, dtype=corr.dtype)[None, :]  # [1, w]
    kernel = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))  # [B, N, h, w]
    return corr * kernel.flatten(-2)


def id_position_embedding(
    id_queries: Tensor,
    image: Tensor,
    image_pe: Tensor,
    temp: Tensor,
    hw: tuple[int, int],
    sigma: float = 10.0,
) -> Tensor:
    """Soft location of each ID token: softmax(temp * gauss(cos-sim))-weighted image PE [B, N, C].

    id_queries [B, N, C], image (fused target tokens) [B, HW, C], image_pe [B, HW, C].
    """
    corr = torch.einsum(
        "bnc,bpc->bnp", F.normalize(id_queries, dim=-1), F.normalize(image, dim=-1)
    )  # [B, N, HW]
    dist = torch.softmax(gaussian_prior(corr, hw[0], hw[1], sigma) * temp, dim=-1)
    return torch.einsum("bnp,bpc->bnc", dist, image_pe)


def cosine_logits(x: Tensor, prototypes: Tensor, logit_scale: Tensor) -> Tensor:
    """Cosine sim of x [B, S, C] and prototypes [B, K, C] x min(exp(scale), 100) -> [B, S, K]."""
    scale = torch.clamp(logit_scale.exp(), max=MAX_LOGIT_SCALE)
    sim = torch.einsum("bsc,bkc->bsk", F.normalize(x, dim=-1), F.normalize(prototypes, dim=-1))
    return scale * sim


def group_attention_mask(n_id: int, n_rest: int, device: torch.device | None = None) -> Tensor:
    """Block-diagonal self-attention mask (True = blocked): ID vs {instance, semantic} -> [L, L]."""
    blocked = torch.ones(n_id + n_rest, n_id + n_rest, dtype=torch.bool, device=device)
    blocked[:n_id, :n_id] = False
    blocked[n_id:, n_id:] = False
    return blocked


def binarize_masks(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Masks [..., H, W] -> bilinear (align_corners=False) to `size` -> `> 0` float [..., *size]."""
    lead, (hh, ww) = masks.shape[:-2], masks.shape[-2:]
    m = masks.detach().reshape(-1, 1, hh, ww).float()
    m = F.interpolate(m, size=size, mode="bilinear", align_corners=False) if (hh, ww) != size else m
    return (m > 0).float().reshape(*lead, *size)


def masked_sums(feats: Tensor, binary: Tensor) -> tuple[Tensor, Tensor]:
    """Pooled sums [R, K, C], pixel counts [R, K] of feats [R, C, s, s] under masks [R, K, s, s]."""
    sums = torch.einsum("rchw,rkhw->rkc", feats, binary.to(feats.dtype))
    return sums, binary.sum(dim=(-2, -1)).to(feats.dtype)


def tokens_from_sums(sums: Tensor, counts: Tensor) -> Tensor:
    """Mask-pooled tokens sums [..., C] / (counts [...] + 1e-8) -> [..., C]."""
    return sums / (counts[..., None] + POOL_EPS)


def id_scores(pred_id_logits: Tensor, pred_id_masks: Tensor) -> Tensor:
    """ID score per token: softmax(logits [N, 2])[:, 0] x mask_prob_mean(masks [N, H, W]) -> [N]."""
    return pred_id_logits.softmax(dim=-1)[:, 0] * mask_prob_mean(pred_id_masks)


# ----------------------------------------------------------------------------------------------
# SINE layers (built from the shared sub-layers)


class FusionLayer(nn.Module):
    """Post-norm encoder block (SA -> CA -> FFN, no PE) used for tokens->image and image->tokens."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.transformer_self_attention_layer = SelfAttentionBlock(dim, heads, pre_norm=False)
        self.transformer_cross_attention_layer = CrossAttentionBlock(dim, heads, pre_norm=False)
        self.transformer_ffn_layer = FeedForwardBlock(dim, ffn, pre_norm=False)

    def forward(self, x: Tensor, memory: Tensor, after_sa: Tensor | None = None) -> Tensor:
        """x [B, L, C], memory [B, L', C] -> [B, L, C]; `after_sa` = cached LN(x + SA(x))."""
        if after_sa is None:
            after_sa = self.transformer_self_attention_layer(x)
        x = self.transformer_cross_attention_layer(after_sa, memory)
        return self.transformer_ffn_layer(x)


class MFormerLayer(nn.Module):
    """Pre-norm M-Former layer: grouped SA over all queries, masked CA for ID+instance, two FFNs."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.transformer_self_attention_layer = SelfAttentionBlock(dim, heads, pre_norm=True)
        self.transformer_cross_attention_layer = CrossAttentionBlock(dim, heads, pre_norm=True)
        self.transformer_ffn_layer1 = FeedForwardBlock(dim, ffn, pre_norm=True)  # ID + instance
        self.transformer_ffn_layer2 = FeedForwardBlock(dim, ffn, pre_norm=True)  # semantic

    def forward(
        self,
        queries: Tensor,
        pos: Tensor,
        memory: Tensor,
        memory_pos: Tensor,
        n_masked: int,
        sa_mask: Tensor,
        ca_mask: Tensor,
    ) -> Tensor:
        """queries/pos [B, N+S+M+1, C]; the first `n_masked` (= N+S) rows cross-attend.

        sa_mask [L, L] and ca_mask [B, N+S, HW] are bool, True = blocked.
        """
        z = self.transformer_self_attention_layer(queries, pos, sa_mask)
        y = self.transformer_cross_attention_layer(
            z[:, :n_masked], memory, pos[:, :n_masked], memory_pos, ca_mask
        )
        sem = self.transformer_ffn_layer2(z[:, n_masked:])
        return torch.cat([self.transformer_ffn_layer1(y), sem], dim=1)


class PooledTokens(NamedTuple):
    """Reference tokens: id_tokens [N, C], sem_tokens [M, C] and the sorted id / class values."""

    id_tokens: Tensor
    sem_tokens: Tensor
    ids: Tensor
    classes: Tensor


# ----------------------------------------------------------------------------------------------
# head


@register_head("mformer")
class MFormerHead(Head):
    """Neck + in-context fusion + M-Former: target/reference features -> ID, instance, semantic."""

    needs = "feature_map"

    @classmethod
    def from_features(cls, features: FeatureInfo, **config: Any) -> MFormerHead:
        """Built on a backbone's single-scale map: the neck takes its channels."""
        return cls(in_channels=features.out_channels, **config)

    def __init__(
        self,
        in_channels: int = 1024,
        dim: int = 256,
        heads: int = 8,
        ffn: int = 2048,
        layers: int = 6,
        queries: int = 200,
        fusion_layers: int = 1,
        temp: float = 30.0,
        sigma: float = 10.0,
    ) -> None:
        super().__init__()
        self.dim, self.heads, self.num_queries, self.sigma = dim, heads, queries, sigma
        self.neck = nn.Sequential(  # call as `head.neck(tokens [B, Cin, g, g]) -> [B, C, g, g]`
            nn.Conv2d(in_channels, dim, 1, bias=False),
            LayerNorm2d(dim),
            nn.Conv2d(dim, dim, 3, padding=1, bias=False),
            LayerNorm2d(dim),
        )
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.fusion_layers = nn.ModuleList(
            FusionLayer(dim, heads, ffn) for _ in range(fusion_layers)
        )
        self.transformer_layers = nn.ModuleList(
            MFormerLayer(dim, heads, ffn) for _ in range(layers)
        )
        self.decoder_norm = nn.LayerNorm(dim)
        self.mask_feat_layer = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
            LayerNorm2d(dim // 2),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim, 2, stride=2),
        )
        self.query_feat = nn.Embedding(queries, dim)
        self.query_embed = nn.Embedding(queries, dim)
        self.query_grained_embed = nn.Embedding(3, dim)  # rows: ID, instance, semantic
        self.neg_class_embed = nn.Embedding(1, dim)
        self.id_class_embed = nn.Linear(dim, 2)  # [present, no-object]
        self.mask_embed = MLP(dim, dim, 3)

    # -- cacheable, target- or reference-only ---------------------------------------------------

    def mask_features(self, feats: Tensor) -> Tensor:
        """Mask-feature map from the UNFUSED neck output: [B, C, g, g] -> [B, C, 4g, 4g]."""
        return self.mask_feat_layer(feats)

    def image_self_attention(self, feats: Tensor) -> Tensor:
        """Cacheable target-only fusion sub-layer LN(F + SA(F)): [B, C, g, g] -> [B, g*g, C]."""
        return self.fusion_layers[0].transformer_self_attention_layer(
            feats.flatten(2).transpose(1, 2)
        )

    def pool_sums(
        self, ref_feats: Tensor, masks: Sequence[Tensor], size: tuple[int, int] | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per reference r: pooled sums [K_r, C] and pixel counts [K_r] of masks[r] [K_r, H, W].

        Features [R, C, g, g] are bilinearly upsampled to `size` (default 4g x 4g, the Mfeat grid),
        masks resized bilinearly and binarised `> 0`. Any multi-reference token is then exactly
        sum(sums) / (sum(counts) + 1e-8) (`tokens_from_sums`), as the official width-concatenation.
        """
        size = size or (4 * ref_feats.shape[-2], 4 * ref_feats.shape[-1])
        sums, counts = [], []
        for feat, mask in zip(ref_feats, masks, strict=True):
            up = F.interpolate(feat[None], size=size, mode="bilinear", align_corners=False)
            s, c = masked_sums(up, binarize_masks(mask, size)[None])  # [1, K, C], [1, K]
            sums.append(s[0])
            counts.append(c[0])
        return sums, counts

    def pool_tokens(
        self,
        ref_feats: Tensor,
        masks: Sequence[Tensor],
        ids: Sequence[Tensor] | None = None,
        classes: Sequence[Tensor] | None = None,
        size: tuple[int, int] | None = None,
    ) -> PooledTokens:
        """ID tokens (one per unique id) and semantic tokens (one per unique class), across refs.

        masks[r] [K_r, H, W] with ids[r], classes[r] [K_r]; default ids = one per mask in order,
        default classes = all 0. A token pools the union of its masks in each reference, then
        sums over references / total pixel count.
        """
        device = ref_feats.device
        if ids is None:
            offsets = torch.tensor([0] + [len(m) for m in masks]).cumsum(0).tolist()
            ids = [torch.arange(a, b) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        if classes is None:
            classes = [torch.zeros(len(m), dtype=torch.long) for m in masks]
        ids = [torch.as_tensor(i, device=device).long() for i in ids]
        classes = [torch.as_tensor(c, device=device).long() for c in classes]
        uid = torch.unique(torch.cat(ids)) if ids else torch.zeros(0, dtype=torch.long)
        ucls = torch.unique(torch.cat(classes)) if classes else torch.zeros(0, dtype=torch.long)

        def union(mask: Tensor, labels: Tensor, values: Tensor) -> Tensor:  # -> [V, H, W]
            onehot = (labels[:, None] == values[None]).to(mask.dtype)  # [K, V]
            return torch.einsum("khw,kv->vhw", mask, onehot)  # non-negative sum: > 0 = union

        group_masks = [
            torch.cat([union(m.float(), i, uid), union(m.float(), c, ucls)])
            for m, i, c in zip(masks, ids, classes, strict=True)
        ]  # [N + M, H, W] per reference; a zero group contributes nothing
        sums, counts = self.pool_sums(ref_feats, group_masks, size)
        tokens = tokens_from_sums(torch.stack(sums).sum(0), torch.stack(counts).sum(0))
        n = len(uid)
        return PooledTokens(tokens[:n], tokens[n:], uid, ucls)

    # -- per (target, reference set) -------------------------------------------------------------

    def fuse(
        self, image: Tensor, tokens: Tensor, image_sa: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Fusion, same weights both ways + outer residual: image [B, HW, C], tokens [B, T, C]."""
        for i, layer in enumerate(self.fusion_layers):
            new_tokens = layer(tokens, image)
            new_image = layer(image, tokens, image_sa if i == 0 else None)
            tokens, image = new_tokens + tokens, new_image + image
        return image, tokens

    def predict(
        self, queries: Tensor, n_id: int, n_ins: int, mfeat: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Heads on queries [B, N+S+M+1, C]: ID logits [B, N, 2], instance logits [B, S, M+1],
        and [ID; instance] mask logits [B, N+S, 4g, 4g]."""
        x = self.decoder_norm(queries)
        x_id, x_ins, x_sem = x.split([n_id, n_ins, x.shape[1] - n_id - n_ins], dim=1)
        id_logits = self.id_class_embed(x_id)
        ins_logits = cosine_logits(x_ins, x_sem, self.logit_scale)
        emb = self.mask_embed(x[:, : n_id + n_ins])  # [B, N+S, C]
        masks = torch.einsum("bqc,bchw->bqhw", emb, mfeat)
        return id_logits, ins_logits, masks

    def forward(
        self,
        target_feats: Tensor,
        mfeat: Tensor,
        id_tokens: Tensor | None,
        sem_tokens: Tensor,
        image_sa: Tensor | None = None,
        aux: bool = True,
    ) -> dict:
        """Decode B targets [B, C, g, g] (`mfeat` [B, C, 4g, 4g]) with ID tokens [B, N, C] or
        shared [N, C] (N may be 0, or None) and semantic tokens [B, M, C] or shared [M, C].

        Returns batched tensors: pred_id_logits [B, N, 2], pred_id_masks [B, N, 4g, 4g],
        pred_logits [B, S, M+1], pred_masks [B, S, 4g, 4g], and aux_outputs (stages 0..L-1, dicts
        of the same four; empty if not `aux`). Items do not interact: each equals its B = 1 call.
        `image_sa` [B, g*g, C] is the cached `image_self_attention(target_feats)`. With aux=False
        the heads of stages 1..L-1 are skipped (they never feed the attention: stage-0 mask).
        """
        b, c, h, w = target_feats.shape
        if id_tokens is None:
            id_tokens = sem_tokens.new_zeros(0, c)
        if id_tokens.dim() == 2:
            id_tokens = id_tokens[None].expand(b, -1, -1)
        if sem_tokens.dim() == 2:
            sem_tokens = sem_tokens[None].expand(b, -1, -1)
        n, m, s = id_tokens.shape[1], sem_tokens.shape[1], self.num_queries
        if m == 0:
            raise ValueError("SINE needs at least one semantic token (M >= 1)")

        # In-context fusion: tokens T = [ID; semantic] [B, N+M, C], image I [B, HW, C]
        image = target_feats.flatten(2).transpose(1, 2)
        image, tokens = self.fuse(image, torch.cat([id_tokens, sem_tokens], dim=1), image_sa)
        q_id, p_sem = tokens[:, :n], tokens[:, n:]

        # Queries: content + grained embedding; PE (ID: soft location, instance: learned, sem: 0)
        image_pe = sine_position_embedding(h, w, c, device=image.device).to(image.dtype)
        image_pe = image_pe[None].expand(b, -1, -1)  # [B, HW, C]
        pe_id = id_position_embedding(q_id, image, image_pe, self.temp, (h, w), self.sigma)
        g_id, g_ins, g_sem = self.query_grained_embed.weight
        ins = self.query_feat.weight[None].expand(b, -1, -1)
        neg = self.neg_class_embed.weight[None].expand(b, -1, -1)
        queries = torch.cat([q_id + g_id, ins + g_ins, torch.cat([p_sem, neg], 1) + g_sem], dim=1)
        pos = torch.cat(
            [
                pe_id,
                self.query_embed.weight[None].expand(b, -1, -1),
                queries.new_zeros(b, m + 1, c),
            ],
            dim=1,
        )  # [B, N+S+M+1, C]
        sa_mask = group_attention_mask(n, s + m + 1, device=image.device)

        stages = [self.predict(queries, n, s, mfeat)]
        ca_mask = cross_attention_mask(stages[0][2], (h, w))  # stage 0, reused by ALL layers
        for i, layer in enumerate(self.transformer_layers):
            queries = layer(
                queries, pos, image, image_pe, n_masked=n + s, sa_mask=sa_mask, ca_mask=ca_mask
            )
            if aux or i == len(self.transformer_layers) - 1:
                stages.append(self.predict(queries, n, s, mfeat))

        def as_dict(stage: tuple[Tensor, Tensor, Tensor]) -> dict:
            id_logits, ins_logits, masks = stage
            return {
                "pred_id_logits": id_logits,
                "pred_id_masks": masks[:, :n],
                "pred_logits": ins_logits,
                "pred_masks": masks[:, n:],
            }

        out = as_dict(stages[-1])
        out["aux_outputs"] = [as_dict(st) for st in stages[:-1]] if aux else []
        return out


def unbatch(out: dict) -> list[dict]:
    """A batched head output -> one dict per target (tensors without the batch axis; its
    `aux_outputs` likewise), for code that handles targets one at a time."""

    def item(stage: dict, j: int) -> dict:
        return {k: v[j] for k, v in stage.items() if k != "aux_outputs"}

    return [
        {**item(out, j), "aux_outputs": [item(st, j) for st in out.get("aux_outputs", [])]}
        for j in range(out["pred_logits"].shape[0])
    ]
