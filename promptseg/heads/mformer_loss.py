"""SINE's set loss: identity matching of ID queries and the criterion.

Instance queries are matched per target image by the Hungarian matcher (layers/matching.py) on
2 x (-class prob) + 5 x point BCE + 5 x point dice; ID queries are matched by identity.
Losses: instance CE (no-object weight 0.1), ID CE (weights [1, 0.1]), Mask2Former
importance-sampled point BCE + dice(+1) normalised by the number of matched masks; the same
losses on every auxiliary stage. Pass a `torch.Generator` for reproducible point sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.matching import (
    HungarianMatcher,
    Match,
    dice_loss,
    point_sample,
    sigmoid_ce_loss,
    uncertain_point_coords,
)
from .mformer import unbatch

__all__ = ["SINECriterion", "match_ids"]


def match_ids(ref_ids: Tensor, target_ids: Tensor) -> Match:
    """Fixed ID matching: ID query i <-> the target instance whose id equals ref_ids[i] (if any)."""
    eq = ref_ids[:, None].to(target_ids.device) == target_ids[None, :]  # [N, T]
    src = torch.nonzero(eq.any(1)).flatten()
    tgt = eq.int().argmax(1)[src]  # first target with that id
    return src.cpu().long(), tgt.cpu().long()


def _world_mean(x: Tensor) -> Tensor:
    """Average over distributed workers when torch.distributed is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(x)
        x = x / torch.distributed.get_world_size()
    return x


class SINECriterion(nn.Module):
    """SINE set loss over the final stage and every auxiliary stage -> weighted loss dict.

    outputs: the head's batched output dict (tensors [B, ...], `aux_outputs` likewise).
    targets: one dict per batch item (a lone dict when B = 1) with `labels` [T] (index of the
    class in the reference's sorted class list, 0..M-1), `masks` [T, H, W] (padded canvas), and
    optionally `ids` [T] and `ref_ids` [N] (identity of each ID token) for the ID matching.
    Matching and the stage losses work per item (`stage` = one head dict per item, no batch
    axis). The training loss is `sum(losses.values())`. `world_mean`: the mask losses' count is
    averaged over torch.distributed's ranks when initialised (the official per-GPU
    normalisation); False keeps each call's own count (promptseg's trainer, whose ranks split
    one step's pairs and must match a single process).
    """

    def __init__(
        self,
        matcher: HungarianMatcher | None = None,
        weight_ce_ins: float = 2.0,
        weight_ce_id: float = 2.0,
        weight_mask: float = 5.0,
        weight_dice: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        deep_supervision: bool = True,
        world_mean: bool = True,
    ) -> None:
        super().__init__()
        self.world_mean = world_mean
        self.matcher = matcher or HungarianMatcher(
            weight_ce_ins, weight_mask, weight_dice, num_points
        )
        self.weights = {
            "loss_ce_ins": weight_ce_ins,
            "loss_ce_id": weight_ce_id,
            "loss_mask": weight_mask,
            "loss_dice": weight_dice,
        }
        self.no_object_weight = no_object_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.deep_supervision = deep_supervision

    def match(
        self, stage: list[dict], targets: list[dict], generator: torch.Generator | None
    ) -> tuple[list[Match], list[Match]]:
        """Per target: (ID matches by identity, instance matches by Hungarian assignment)."""
        id_matches, ins_matches = [], []
        for out, tgt in zip(stage, targets, strict=True):
            ins_matches.append(
                self.matcher(
                    out["pred_logits"], out["pred_masks"], tgt["labels"], tgt["masks"], generator
                )
            )
            n_id = out["pred_id_logits"].shape[0]
            if "ref_ids" in tgt and "ids" in tgt and n_id > 0:
                id_matches.append(match_ids(tgt["ref_ids"], tgt["ids"]))
            else:
                id_matches.append((torch.zeros(0, dtype=torch.long),) * 2)
        return id_matches, ins_matches

    def loss_labels(
        self, stage: list[dict], targets: list[dict], id_m: list[Match], ins_m: list[Match]
    ) -> dict[str, Tensor]:
        """Instance CE over M+1 (last = no-object, weight 0.1), mean over targets; ID CE over the
        batch's concatenated ID queries (class 0 = matched, 1 = no-object, weights [1, 0.1])."""
        ce_ins = []
        for out, tgt, (src, j) in zip(stage, targets, ins_m, strict=True):
            logits = out["pred_logits"].float()  # [S, M+1]
            n_cls = logits.shape[-1] - 1
            target = torch.full((logits.shape[0],), n_cls, dtype=torch.long, device=logits.device)
            target[src.to(logits.device)] = tgt["labels"].to(logits.device)[j.to(logits.device)]
            weight = torch.ones(n_cls + 1, device=logits.device)
            weight[-1] = self.no_object_weight
            ce_ins.append(F.cross_entropy(logits, target, weight))

        id_logits = torch.cat([out["pred_id_logits"].float() for out in stage])  # [sum N, 2]
        id_target = torch.ones(id_logits.shape[0], dtype=torch.long, device=id_logits.device)
        offset = 0
        for out, (src, _) in zip(stage, id_m, strict=True):
            id_target[offset + src.to(id_logits.device)] = 0
            offset += out["pred_id_logits"].shape[0]
        if id_logits.shape[0] == 0:  # e.g. FSOD-style training without ID tokens
            ce_id = stage[0]["pred_logits"].sum() * 0.0
        else:
            weight = torch.tensor([1.0, self.no_object_weight], device=id_logits.device)
            ce_id = F.cross_entropy(id_logits, id_target, weight)
        return {"loss_ce_ins": sum(ce_ins) / len(ce_ins), "loss_ce_id": ce_id}

    def loss_masks(
        self,
        stage: list[dict],
        targets: list[dict],
        id_m: list[Match],
        ins_m: list[Match],
        num_masks: float,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        """Importance-sampled point BCE and dice over matched [instance; ID] masks / num_masks."""
        src, tgt = [], []  # order as official: all instance pairs, then all ID pairs
        for key, matches in (("pred_masks", ins_m), ("pred_id_masks", id_m)):
            for out, t, (i, j) in zip(stage, targets, matches, strict=True):
                src.append(out[key][i.to(out[key].device)])  # [k, h, w]
                tgt.append(t["masks"][j.to(t["masks"].device)])  # [k, H, W]
        src_masks = torch.cat(src)[:, None]  # [K, 1, h, w]
        if src_masks.shape[0] == 0:
            zero = stage[0]["pred_masks"].sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero}
        with torch.no_grad():
            coords = uncertain_point_coords(
                src_masks.float(),
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
                generator,
            )  # [K, P, 2]
            labels, start = [], 0
            for t in tgt:  # each target frame sampled in its own normalised coordinates
                c = coords[start : start + len(t)]
                labels.append(point_sample(t[:, None].to(c), c)[:, 0])
                start += len(t)
            point_labels = torch.cat(labels)  # [K, P]
        point_logits = point_sample(src_masks, coords.to(src_masks.dtype))[:, 0]  # [K, P]
        return {
            "loss_mask": sigmoid_ce_loss(point_logits, point_labels, num_masks),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks),
        }

    def stage_losses(
        self,
        stage: list[dict],
        targets: list[dict],
        num_masks: float | None = None,
        generator: torch.Generator | None = None,
        matches: tuple[list[Match], list[Match]] | None = None,
    ) -> tuple[dict[str, Tensor], float]:
        """Unweighted losses of one decoder stage (matching done here unless given) + num_masks."""
        id_m, ins_m = matches or self.match(stage, targets, generator)
        if num_masks is None:
            n = sum(len(i) for i, _ in id_m) + sum(len(i) for i, _ in ins_m)
            device = stage[0]["pred_logits"].device
            n = torch.tensor([float(n)], device=device)
            n = _world_mean(n) if self.world_mean else n
            num_masks = torch.clamp(n, min=1).item()
        losses = self.loss_labels(stage, targets, id_m, ins_m)
        losses.update(self.loss_masks(stage, targets, id_m, ins_m, num_masks, generator))
        return losses, num_masks

    def forward(
        self,
        outputs: dict,
        targets: dict | list[dict],
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Weighted losses `loss_*` (final stage) and `loss_*_{i}` (auxiliary stage i)."""
        items = unbatch(outputs)
        targets = [targets] if isinstance(targets, dict) else list(targets)
        if len(targets) != len(items):
            raise ValueError(
                f"the head output holds {len(items)} targets but {len(targets)} target dicts "
                "were given; pass one per batch item"
            )
        final = [{k: v for k, v in o.items() if k != "aux_outputs"} for o in items]
        raw, num_masks = self.stage_losses(final, targets, generator=generator)
        losses = {k: v * self.weights[k] for k, v in raw.items()}
        if self.deep_supervision:
            for i in range(len(outputs["aux_outputs"])):
                aux = [o["aux_outputs"][i] for o in items]
                raw, _ = self.stage_losses(aux, targets, num_masks, generator)
                losses.update({f"{k}_{i}": v * self.weights[k] for k, v in raw.items()})
        return losses
