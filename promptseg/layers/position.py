"""DETR / Mask2Former sine position embedding over a feature grid."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["sine_position_embedding"]


def sine_position_embedding(
    h: int, w: int, dim: int, temperature: float = 10000.0, device: torch.device | None = None
) -> Tensor:
    """DETR sine PE (normalize=True, scale 2*pi, eps 1e-6) over an h x w grid -> [h*w, dim].

    fp32, channels [y-part (dim/2); x-part (dim/2)], each sin/cos interleaved; rows row-major.
    """
    npf = dim // 2
    scale = 2 * math.pi
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device) / (h + 1e-6) * scale  # [h]
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device) / (w + 1e-6) * scale  # [w]
    dim_t = torch.arange(npf, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * (dim_t // 2) / npf)  # [npf]

    def interleave(p: Tensor) -> Tensor:  # [n, npf] -> sin/cos interleaved [n, npf]
        return torch.stack((p[:, 0::2].sin(), p[:, 1::2].cos()), dim=2).flatten(1)

    py = interleave(y[:, None] / dim_t)  # [h, npf]
    px = interleave(x[:, None] / dim_t)  # [w, npf]
    pe = torch.cat((py[:, None].expand(h, w, npf), px[None].expand(h, w, npf)), dim=-1)
    return pe.reshape(h * w, 2 * npf)
