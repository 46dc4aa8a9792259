"""Set-prediction training pieces (Mask2Former): Hungarian matching and point-sampled mask losses.

Mask terms are computed on sampled points, not full masks: `point_sample` reads logits or targets
bilinearly (align_corners=False) at [0, 1]^2 coordinates, the matcher uses uniform points shared
by every prediction and target of an image, the losses PointRend importance sampling
(`uncertain_point_coords`). Pass a `torch.Generator` for reproducible points.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = [
    "Match",
    "HungarianMatcher",
    "point_sample",
    "uncertain_point_coords",
    "batch_sigmoid_ce",
    "batch_dice",
    "sigmoid_ce_loss",
    "dice_loss",
]

Match = tuple[Tensor, Tensor]  # (prediction indices [k], target indices [k]), int64, CPU


def point_sample(x: Tensor, coords: Tensor) -> Tensor:
    """Bilinear samples of x [B, C, H, W] at coords [B, P, 2] in [0, 1]^2 (x, y) -> [B, C, P]."""
    return F.grid_sample(x, 2.0 * coords[:, :, None] - 1.0, align_corners=False)[..., 0]


def _rand(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniform [0, 1) on `like`'s device (drawn on the generator's device, then moved)."""
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(like.device, like.dtype)


def uncertain_point_coords(
    logits: Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_ratio: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """PointRend sampling for logits [K, 1, H, W] -> coords [K, P, 2]: the most uncertain
    (-|logit|) int(ratio * P) of int(P * oversample) uniform draws, plus uniform points."""
    k = logits.shape[0]
    n_sampled = int(num_points * oversample_ratio)
    n_uncertain = int(importance_ratio * num_points)
    coords = _rand((k, n_sampled, 2), logits, generator)  # [K, P*os, 2]
    uncertainty = -point_sample(logits, coords)[:, 0].abs()  # [K, P*os]
    idx = uncertainty.topk(n_uncertain, dim=1).indices  # [K, P*ratio]
    coords = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    if num_points > n_uncertain:
        coords = torch.cat([coords, _rand((k, num_points - n_uncertain, 2), logits, generator)], 1)
    return coords


def batch_sigmoid_ce(inputs: Tensor, targets: Tensor) -> Tensor:
    """Pairwise mean BCE-with-logits: inputs [Q, P] logits, targets [T, P] in {0,1} -> [Q, T]."""
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    cost = torch.einsum("qp,tp->qt", pos, targets) + torch.einsum("qp,tp->qt", neg, 1 - targets)
    return cost / inputs.shape[1]


def batch_dice(inputs: Tensor, targets: Tensor) -> Tensor:
    """Pairwise dice loss with +1 smoothing: inputs [Q, P] logits, targets [T, P] -> [Q, T]."""
    p = inputs.sigmoid()
    numerator = 2 * torch.einsum("qp,tp->qt", p, targets)
    denominator = p.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def sigmoid_ce_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Point BCE, mean over points [K, P], summed over masks / num_masks -> scalar."""
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / (num_masks + 1e-8)


def dice_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Dice(+1) of logits [K, P] vs targets [K, P], summed over masks / num_masks -> scalar."""
    p = inputs.sigmoid()
    loss = 1 - (2 * (p * targets).sum(-1) + 1) / (p.sum(-1) + targets.sum(-1) + 1)
    return loss.sum() / (num_masks + 1e-8)


class HungarianMatcher:
    """Optimal one-to-one assignment of S queries to T target masks of one image (scipy)."""

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
    ) -> None:
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        labels: Tensor,
        masks: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Cost [S, T] for logits [S, K+1], mask logits [S, h, w], labels [T], masks [T, H, W]:
        cost_class x (-softmax prob of the label) + cost_mask x BCE + cost_dice x dice, the mask
        terms on num_points uniform points shared by every prediction and target."""
        coords = _rand((1, self.num_points, 2), pred_masks.float(), generator)  # [1, P, 2]
        tgt = point_sample(masks[None].to(coords), coords)[0]  # [T, P]
        out = point_sample(pred_masks[None].float(), coords)[0]  # [S, P]
        cost_class = -pred_logits.float().softmax(-1)[:, labels]  # [S, T]
        return (
            self.cost_mask * batch_sigmoid_ce(out, tgt)
            + self.cost_class * cost_class
            + self.cost_dice * batch_dice(out, tgt)
        )

    @torch.no_grad()
    def __call__(
        self,
        pred_logits: Tensor,
        pred_masks: Tensor,
        labels: Tensor,
        masks: Tensor,
        generator: torch.Generator | None = None,
    ) -> Match:
        """Matched (query indices, target indices), min(S, T) pairs, sorted by query."""
        cost = self.cost_matrix(pred_logits, pred_masks, labels, masks, generator)
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
