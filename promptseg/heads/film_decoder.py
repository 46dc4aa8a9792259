"""CLIPSeg's decoder: FiLM-conditioned post-norm transformer over tapped ViT activations.

Per prompt: x = reduce(deepest tap); FiLM(x) with the conditional vector; then for each block k:
x = block_k(x) and, before every later block, x += reduce(next shallower tap). The CLS token is
dropped and the token grid is painted to pixels by a transposed-conv head. The blocks are torch's
`nn.TransformerEncoderLayer` (post-norm, ReLU), as in the official code. The `reduce`
projections do not depend on the prompt, so `project()` is cached per image.
"""

from __future__ import annotations

import torch
from torch import nn

from ..contracts import FeatureInfo
from ..registry import register_head
from .base import Head

__all__ = ["FiLMDecoder"]


@register_head("film_decoder")
class FiLMDecoder(Head):
    """Taps [B, 1 + g*g, C] (shallow -> deep) + condition [P, cond_dim] -> logits [P, g*p, g*p]."""

    needs = "vit_tokens"

    def __init__(
        self,
        features: FeatureInfo,
        cond_dim: int = 512,
        reduce_dim: int = 64,
        heads: int = 4,
        ffn: int = 2048,
        refined: bool = False,
    ) -> None:
        super().__init__()
        d, n_taps, patch = reduce_dim, len(features.keys), features.strides[0]
        if refined and patch % 4:
            raise ValueError(f"the refined head needs a patch size divisible by 4, got {patch}")
        self.reduces = nn.ModuleList(nn.Linear(c, d) for c in reversed(features.channels))
        self.film_mul = nn.Linear(cond_dim, d)
        self.film_add = nn.Linear(cond_dim, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, ffn, dropout=0.0, batch_first=True)
            for _ in range(n_taps)
        )
        if refined:
            k = patch // 4
            self.upsample = nn.Sequential(
                nn.Conv2d(d, d, 3, padding=1),
                nn.ReLU(),
                nn.ConvTranspose2d(d, d // 2, k, stride=k),
                nn.ReLU(),
                nn.ConvTranspose2d(d // 2, 1, 4, stride=4),
            )
        else:
            self.upsample = nn.ConvTranspose2d(d, 1, patch, stride=patch)
        self._init_upsample()

    def _init_upsample(self, logit_std: float = 2.0) -> None:
        """Random init that keeps activations' scale through the painting head, so an untrained
        model's logits spread around 0 (std ~`logit_std`) and its masks cover part of the image."""
        convs = [
            m for m in self.upsample.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
        ]
        for i, conv in enumerate(convs):
            k = conv.kernel_size[0] * conv.kernel_size[1] // (conv.stride[0] * conv.stride[1])
            fan_in = conv.in_channels * k  # weights reaching one output pixel
            gain = logit_std if i == len(convs) - 1 else 2**0.5  # ReLU between the others
            nn.init.normal_(conv.weight, std=gain / fan_in**0.5)
            nn.init.zeros_(conv.bias)

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
