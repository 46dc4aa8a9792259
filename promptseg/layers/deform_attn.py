"""Multi-scale deformable attention (Deformable DETR) in pure PyTorch, no compiled op.

Each query attends to `points` sampled locations per head and per level: a learned offset around
its reference point, bilinearly sampled (zeros outside the map, `align_corners=False`) and
mixed with softmax weights over all (level, point) pairs of its head. Sampling goes through
`F.grid_sample`, which gives the same values as the CUDA kernel of the official code.
Parameter names (`sampling_offsets`, `attention_weights`, `value_proj`, `output_proj`) are the
official ones, so Mask2Former / ODISE checkpoints map one to one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ms_deform_attn", "MSDeformAttn"]


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Weighted sum of bilinear samples of `value` at normalised (x, y) locations.

    value [B, S, heads, Dh] holds the levels' maps flattened row-major one after another
    (S = sum H_l * W_l); sampling_locations [B, Lq, heads, L, P, 2] in [0, 1] ((0, 0) = top-left
    corner of the map, outside = zero padding); attention_weights [B, Lq, heads, L, P].
    Returns [B, Lq, heads * Dh].
    """
    b, s, heads, dh = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    sizes = [h * w for h, w in spatial_shapes]
    if len(spatial_shapes) != levels or sum(sizes) != s:
        raise ValueError(
            f"value has {s} positions and the sampling locations {levels} levels, but "
            f"spatial_shapes {list(spatial_shapes)} give {len(sizes)} levels of {sum(sizes)} "
            "positions; pass one (H, W) per level, in the order the levels are flattened in value"
        )
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] frame
    samples = []
    for level, ((h, w), level_value) in enumerate(
        zip(spatial_shapes, value.split(sizes, dim=1), strict=True)
    ):
        maps = level_value.permute(0, 2, 3, 1).reshape(b * heads, dh, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).reshape(b * heads, lq, points, 2)
        samples.append(
            F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # [B*heads, Dh, Lq, P]
    stacked = torch.stack(samples, dim=-2).flatten(-2)  # [B*heads, Dh, Lq, L*P]
    weights = attention_weights.transpose(1, 2).reshape(b * heads, 1, lq, levels * points)
    out = (stacked * weights).sum(-1)  # [B*heads, Dh, Lq]
    return out.view(b, heads * dh, lq).transpose(1, 2)


class MSDeformAttn(nn.Module):
    """Deformable attention of queries over a multi-level flattened feature map."""

    def __init__(self, dim: int = 256, levels: int = 4, heads: int = 8, points: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by the number of heads {heads}")
        self.dim, self.levels, self.heads, self.points = dim, levels, heads, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Training-from-scratch init: offsets start on rings around the reference point.

        Head h looks in direction 2*pi*h/heads (pushed out to the unit square), its point p at
        distance p + 1; the offset weights and attention logits start at zero (uniform mixing).
        """
        angles = torch.arange(self.heads, dtype=torch.float32) * (2 * math.pi / self.heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)  # [heads, 2] (x, y)
        directions = directions / directions.abs().amax(dim=-1, keepdim=True)
        distances = torch.arange(1, self.points + 1, dtype=torch.float32)
        rings = directions[:, None, None, :] * distances[None, None, :, None]
        rings = rings.expand(self.heads, self.levels, self.points, 2)
        with torch.no_grad():
            nn.init.zeros_(self.sampling_offsets.weight)
            self.sampling_offsets.bias.copy_(rings.reshape(-1))
            nn.init.zeros_(self.attention_weights.weight)
            nn.init.zeros_(self.attention_weights.bias)
            for proj in (self.value_proj, self.output_proj):
                nn.init.xavier_uniform_(proj.weight)
                nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> Tensor:
        """query [B, Lq, C] (with its position embedding), reference_points [B or 1, Lq, 2]
        normalised (x, y), the same on every level; value [B, S, C] the flattened levels of
        `spatial_shapes` [(H_l, W_l), ...]. Returns [B, Lq, C]."""
        b, lq, _ = query.shape
        heads, levels, points = self.heads, self.levels, self.points
        if len(spatial_shapes) != levels:
            raise ValueError(
                f"MSDeformAttn was built for {levels} levels but got {len(spatial_shapes)} "
                "spatial shapes; build it with levels=len(spatial_shapes)"
            )
        values = self.value_proj(value).view(b, value.shape[1], heads, self.dim // heads)
        offsets = self.sampling_offsets(query).view(b, lq, heads, levels, points, 2)
        logits = self.attention_weights(query).view(b, lq, heads, levels * points)
        weights = logits.softmax(-1).view(b, lq, heads, levels, points)
        # offsets are in cells of each level: divide by (W_l, H_l) to get map fractions
        cells = torch.tensor(
            [(w, h) for h, w in spatial_shapes], dtype=offsets.dtype, device=offsets.device
        )  # [L, 2]
        locations = reference_points[:, :, None, None, None, :] + offsets / cells[:, None, :]
        return self.output_proj(ms_deform_attn(values, spatial_shapes, locations, weights))
