"""CLIPSeg's decoder: FiLM-conditioned post-norm transformer over tapped ViT activations.

Per prompt: x = reduce(deepest tap); FiLM(x) with the 512-d conditional vector; then for each
block k: x = block_k(x) and, before every later block, x += reduce(next shallower tap). The CLS
token is dropped and the token grid is painted to pixels by a transposed-conv head.
The `reduce` projections do not depend on the prompt, so `project()` is cached per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register_head

__all__ = ["FiLMDecoder", "PostNormBlock"]


class PostNormBlock(nn.Module):
    """`x = LN1(x + MHA(x)); x = LN2(x + W2 relu(W1 x))` — torch's TransformerEncoderLayer, eval."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = self.norm1(x + self.proj(attn))
        return self.norm2(x + self.fc2(F.relu(self.fc1(x))))


@register_head("film_decoder")
class FiLMDecoder(nn.Module):
    """Taps [B, 1 + g*g, C] (shallow -> deep) + condition [P, cond_dim] -> logits [P, g*p, g*p]."""

    def __init__(
        self,
        in_dim: int,
        cond_dim: int,
        reduce_dim: int,
        n_taps: int,
        heads: int,
        ffn: int,
        patch_size: int,
        refined: bool,
    ) -> None:
        super().__init__()
        d = reduce_dim
        self.reduces = nn.ModuleList(nn.Linear(in_dim, d) for _ in range(n_taps))
        self.film_mul = nn.Linear(cond_dim, d)
        self.film_add = nn.Linear(cond_dim, d)
        self.blocks = nn.ModuleList(PostNormBlock(d, heads, ffn) for _ in range(n_taps))
        if refined:
            k = patch_size // 4
            self.upsample = nn.Sequential(
                nn.Conv2d(d, d, 3, padding=1),
                nn.ReLU(),
                nn.ConvTranspose2d(d, d // 2, k, stride=k),
                nn.ReLU(),
                nn.ConvTranspose2d(d // 2, 1, 4, stride=4),
            )
        else:
            self.upsample = nn.ConvTranspose2d(d, 1, patch_size, stride=patch_size)

    def project(self, taps: list[torch.Tensor]) -> torch.Tensor:
        """Prompt-independent part: reduce each tap, deepest first -> [n_taps, B, T, D]."""
        return torch.stack([r(t) for r, t in zip(self.reduces, reversed(taps), strict=True)])

    def forward(
        self, reduced: torch.Tensor, cond: torch.Tensor, image_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decode every prompt row of `cond` against image `image_index[row]` (default: image 0)."""
        if image_index is None:
            image_index = torch.zeros(cond.shape[0], dtype=torch.long, device=cond.device)
        reduced = reduced[:, image_index]  # [n_taps, P, T, D]
        x = self.film_mul(cond)[:, None] * reduced[0] + self.film_add(cond)[:, None]
        for k, block in enumerate(self.blocks):
            if k > 0:
                x = x + reduced[k]
            x = block(x)
        tokens = x[:, 1:]  # drop CLS -> [P, g*g, D]
        grid = int(round(tokens.shape[1] ** 0.5))
        fmap = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, grid, grid)
        return self.upsample(fmap)[:, 0]
