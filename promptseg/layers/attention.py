"""Mask2Former-style transformer sub-layers and the masked-attention rule.

Each sub-layer is one residual step with its LayerNorm before (pre-norm, `x + f(LN x)`) or after
(post-norm, `LN(x + f(x))`): self-attention, cross-attention or FFN, dropout 0. Attention is
`nn.MultiheadAttention(batch_first=True)` called with `need_weights=False`, so it runs through
`F.scaled_dot_product_attention`. Parameter names are the official ones (`self_attn.*`,
`multihead_attn.*`, `norm`, `linear1`, `linear2`), so official checkpoints map one to one.
Masks are bool with True = blocked (torch's convention).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SelfAttentionBlock",
    "CrossAttentionBlock",
    "FeedForwardBlock",
    "cross_attention_mask",
    "per_head_mask",
]


def per_head_mask(blocked: Tensor | None, heads: int) -> Tensor | None:
    """A bool mask in nn.MultiheadAttention's layout: [Lq, Lk] as is, [B, Lq, Lk] repeated per
    head (batch-major) -> [B*heads, Lq, Lk]."""
    if blocked is None or blocked.dim() == 2:
        return blocked
    return blocked.repeat_interleave(heads, dim=0)


def cross_attention_mask(mask_logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Mask2Former attention mask (True = blocked) from logits [B, Q, Hm, Wm] -> [B, Q, h*w].

    Bilinear to `size`, blocked where sigmoid < 0.5; rows blocking every key are fully unblocked,
    so no query is left without keys (a softmax over nothing would be NaN).
    """
    small = F.interpolate(mask_logits.detach(), size=size, mode="bilinear", align_corners=False)
    blocked = small.sigmoid().flatten(2) < 0.5  # [B, Q, h*w]
    return blocked & ~blocked.all(dim=-1, keepdim=True)


def _xavier_matrices(module: nn.Module) -> None:
    """Official init: xavier-uniform on every >1-dim parameter of a sub-layer."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SelfAttentionBlock(nn.Module):
    """Self-attention sub-layer; `pos` is added to queries and keys, not to values."""

    def __init__(self, dim: int, heads: int, pre_norm: bool) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.pre_norm = pre_norm
        _xavier_matrices(self)

    def forward(
        self, x: Tensor, pos: Tensor | None = None, blocked: Tensor | None = None
    ) -> Tensor:
        """x, pos [B, L, C]; blocked [L, L] or [B, L, L] -> [B, L, C]."""
        h = self.norm(x) if self.pre_norm else x
        qk = h if pos is None else h + pos
        mask = per_head_mask(blocked, self.self_attn.num_heads)
        out = x + self.self_attn(qk, qk, h, attn_mask=mask, need_weights=False)[0]
        return out if self.pre_norm else self.norm(out)


class CrossAttentionBlock(nn.Module):
    """Cross-attention sub-layer: q = norm?(x) + pos, k = memory + memory_pos, v = memory."""

    def __init__(self, dim: int, heads: int, pre_norm: bool) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.pre_norm = pre_norm
        _xavier_matrices(self)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        pos: Tensor | None = None,
        memory_pos: Tensor | None = None,
        blocked: Tensor | None = None,
    ) -> Tensor:
        """x, pos [B, L, C]; memory, memory_pos [B, L', C]; blocked [L, L'] or [B, L, L']."""
        h = self.norm(x) if self.pre_norm else x
        q = h if pos is None else h + pos
        k = memory if memory_pos is None else memory + memory_pos
        mask = per_head_mask(blocked, self.multihead_attn.num_heads)
        out = x + self.multihead_attn(q, k, memory, attn_mask=mask, need_weights=False)[0]
        return out if self.pre_norm else self.norm(out)


class FeedForwardBlock(nn.Module):
    """FFN sub-layer linear2(relu(linear1 .)) with a pre- or post-norm residual."""

    def __init__(self, dim: int, ffn: int, pre_norm: bool) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm = nn.LayerNorm(dim)
        self.pre_norm = pre_norm
        _xavier_matrices(self)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, L, C] -> [B, L, C]."""
        h = self.norm(x) if self.pre_norm else x
        out = x + self.linear2(F.relu(self.linear1(h)))
        return out if self.pre_norm else self.norm(out)
