"""Mask-classification inference shared by Mask2Former-style heads (SINE, ODISE).

From per-query class logits [Q, K+1] (last = no object) and mask logits [Q, H, W]:
`semantic_map` (class prob x mask prob summed over queries), `instance_topk` (top-k
(query, class) pairs scored by class prob x mean mask prob) and `panoptic_inference`
(each pixel to its most confident kept query; overlapping stuff segments of one class merged).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "mask_prob_mean",
    "semantic_map",
    "semantic_scores",
    "instance_topk",
    "panoptic_inference",
]

SCORE_EPS = 1e-6  # mask-probability mean denominator


def mask_prob_mean(mask_logits: Tensor) -> Tensor:
    """Mean sigmoid over pixels with logit > 0 (eps 1e-6): [K, H, W] -> [K]."""
    fg = (mask_logits > 0).to(mask_logits.dtype).flatten(1)
    return (mask_logits.sigmoid().flatten(1) * fg).sum(1) / (fg.sum(1) + SCORE_EPS)


def semantic_map(
    pred_logits: Tensor,
    pred_masks: Tensor,
    resize: Callable[[Tensor], Tensor] | None = None,
    chunk: int = 32,
) -> Tensor:
    """Sum over queries of class prob x mask prob: logits [S, M+1], masks [S, H, W] -> [M, H', W'].

    `resize` maps mask logits [k, H, W] to the output frame [k, H', W'] BEFORE the sigmoid, as the
    official FSS evaluation does (upsample to the canvas, then sigmoid and sum); it is applied
    `chunk` queries at a time so 200 canvas-size maps never coexist. Not normalised: a pixel covered
    by several confident queries can exceed 1 (FSS threshold 0.7). Computed in float32, so
    half-precision and float64 models give the same map type.
    """
    probs = pred_logits.float().softmax(dim=-1)[:, :-1]  # [S, M], float32 whatever the model's
    if resize is None:
        return torch.einsum("sm,shw->mhw", probs, pred_masks.float().sigmoid())
    total = None
    for i in range(0, len(pred_masks), chunk):
        masks = resize(pred_masks[i : i + chunk]).float()
        part = torch.einsum("sm,shw->mhw", probs[i : i + chunk], masks.sigmoid())
        total = part if total is None else total + part
    return total


def semantic_scores(semantic: Tensor, masks: Tensor) -> Tensor:
    """Score of each class's semantic mask, in [0, 1]: its semantic map [K, H, W] capped at 1
    (a pixel claimed by several confident queries counts once) averaged over the mask [K, H, W];
    0 for an empty mask."""
    area = masks.flatten(1).sum(1)
    inside = (semantic.float().clamp(max=1) * masks).flatten(1).sum(1)
    return torch.where(area > 0, inside / area.clamp(min=1), 0.0)


def instance_topk(
    pred_logits: Tensor,
    pred_masks: Tensor,
    k: int = 100,
    resize: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-k (query, class) pairs from logits [S, M+1] and masks [S, H, W], with scores.

    Class prob = softmax over M+1 without the last column, ranked over all S*M pairs (returned in
    descending class-prob order; the official `sorted=False` order is unspecified). `resize` maps
    the selected mask logits [k, H, W] to the output frame before scoring (per-mask, so selecting
    first is exact); score = class prob x mask_prob_mean.
    """
    n_cls = pred_logits.shape[-1] - 1
    probs = pred_logits.softmax(dim=-1)[:, :-1].flatten()  # [S*M]
    top, idx = probs.topk(min(k, probs.numel()))
    query = torch.div(idx, n_cls, rounding_mode="floor")
    classes = idx % n_cls
    masks = pred_masks[query]
    if resize is not None:
        masks = resize(masks)
    return top * mask_prob_mean(masks), classes, query, masks


def panoptic_inference(
    probs: Tensor,
    mask_probs: Tensor,
    is_thing: Sequence[bool],
    *,
    overlap_threshold: float = 0.8,
    object_mask_threshold: float = 0.0,
) -> tuple[Tensor, list[dict]]:
    """Mask2Former panoptic merge: class probs [Q, K+1] (last = void), mask probs [Q, H, W] ->
    (int32 id map [H, W], 0 = unassigned; segments_info [{id, isthing, category_id, score}]).

    Queries whose best class is not void and scores above `object_mask_threshold` are kept; each
    pixel goes to the kept query maximising score x mask prob. A query's segment is the pixels it
    owns with mask prob >= 0.5; it is dropped when empty or when it owns less than
    `overlap_threshold` of its own mask. Stuff classes merge into one segment per class.
    """
    scores, labels = probs.max(dim=-1)
    n_classes = probs.shape[-1] - 1
    keep = (labels != n_classes) & (scores > object_mask_threshold)
    scores, labels, masks = scores[keep], labels[keep], mask_probs[keep]
    h, w = mask_probs.shape[-2:]
    id_map = torch.zeros((h, w), dtype=torch.int32, device=mask_probs.device)
    segments: list[dict] = []
    if len(masks) == 0:
        return id_map, segments
    owner = (scores[:, None, None] * masks).argmax(dim=0)  # [H, W]
    stuff_ids: dict[int, int] = {}
    for k in range(len(masks)):
        label = int(labels[k])
        thing = bool(is_thing[label])
        owned = owner == k
        original = masks[k] >= 0.5
        segment = owned & original
        area, original_area, segment_area = (
            int(owned.sum()),
            int(original.sum()),
            int(segment.sum()),
        )
        if area == 0 or original_area == 0 or segment_area == 0:
            continue
        if area / original_area < overlap_threshold:
            continue
        if not thing and label in stuff_ids:
            id_map[segment] = stuff_ids[label]
            continue
        segment_id = len(segments) + 1
        if not thing:
            stuff_ids[label] = segment_id
        id_map[segment] = segment_id
        segments.append(
            {"id": segment_id, "isthing": thing, "category_id": label, "score": float(scores[k])}
        )
    return id_map, segments
