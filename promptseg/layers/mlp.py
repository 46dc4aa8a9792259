"""The Mask2Former / DETR prediction MLP (mask embedding)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """`layers.{i}` Linear stack dim -> ... -> out_dim with ReLU between (none after the last)."""

    def __init__(self, dim: int, out_dim: int, n_layers: int) -> None:
        super().__init__()
        dims = [dim] * n_layers + [out_dim]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        """x [..., dim] -> [..., out_dim]."""
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x
