"""Few-shot segmentation mIoU and FB-IoU with HSNet's protocol.

Per-class integer accumulators of foreground/background intersection and union, keyed by the
episode's class (not by episode). Pure numpy, int64; shards can be merged exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ._arrays import as_binary, as_int

__all__ = ["FewShotSegEvaluator"]


class FewShotSegEvaluator:
    """HSNet-style few-shot mIoU / FB-IoU over a fixed list of fold classes.

    `inter[b, k]` / `union[b, k]` (b = 0 background, 1 foreground; k = position of the class in
    `class_ids`) are summed over all episodes of that class. Class IoU is
    inter_fg / max(union_fg, 1), so a class never sampled (or never foreground in GT or prediction)
    scores 0 and still counts in the mean. Returned metrics are percentages (×100).
    """

    def __init__(self, class_ids: Iterable[int]) -> None:
        if isinstance(class_ids, str | bytes) or not isinstance(class_ids, Iterable):
            raise TypeError(f"class_ids must be an iterable of ints, got {class_ids!r}")
        ids = [as_int(c, "each class id") for c in class_ids]
        if not ids:
            raise ValueError("class_ids must not be empty")
        if len(set(ids)) != len(ids):
            raise ValueError(f"class_ids contains duplicates: {ids}")
        self.class_ids: list[int] = ids
        self._index: dict[int, int] = {c: i for i, c in enumerate(ids)}
        self.inter = np.zeros((2, len(ids)), dtype=np.int64)
        self.union = np.zeros((2, len(ids)), dtype=np.int64)
        self.n_episodes = np.zeros(len(ids), dtype=np.int64)

    def update(self, pred: Any, gt: Any, class_id: int, ignore: Any | None = None) -> None:
        """Add one episode: binary `pred` and `gt` (same shape) of class `class_id`.

        `ignore` (bool, True = excluded) removes pixels from every count, e.g. PASCAL's 255 boundary
        on the query. Like the reference, an ignored pixel must not be GT foreground (ValueError
        otherwise).
        """
        p = as_binary(pred, "pred")
        g = as_binary(gt, "gt")
        if p.shape != g.shape:
            raise ValueError(f"pred shape {p.shape} != gt shape {g.shape}")
        try:
            k = self._index[as_int(class_id, "class_id")]
        except KeyError:
            raise ValueError(f"class_id {class_id} is not one of {self.class_ids}") from None
        if ignore is None:
            n_valid = p.size
        else:
            ign = as_binary(ignore, "ignore")
            if ign.shape != g.shape:
                raise ValueError(f"ignore shape {ign.shape} != gt shape {g.shape}")
            if np.any(ign & g):
                raise ValueError("ignored pixels must not be GT foreground")
            valid = ~ign
            p = p & valid
            n_valid = int(np.count_nonzero(valid))
        inter_fg = int(np.count_nonzero(p & g))
        pred_fg = int(np.count_nonzero(p))
        gt_fg = int(np.count_nonzero(g))
        union_fg = pred_fg + gt_fg - inter_fg
        # Background = valid pixels that are 0 in pred (resp. gt): inclusion-exclusion on the
        # complement.
        inter_bg = n_valid - union_fg
        union_bg = n_valid - inter_fg
        self.inter[:, k] += (inter_bg, inter_fg)
        self.union[:, k] += (union_bg, union_fg)
        self.n_episodes[k] += 1

    def class_iou(self) -> np.ndarray:
        """Foreground IoU per class (fraction, `class_ids` order); unsampled classes give 0."""
        return self.inter[1] / np.maximum(self.union[1], 1)

    def per_class(self) -> dict[int, float]:
        """Class id -> foreground IoU in percent."""
        return {c: float(100.0 * v) for c, v in zip(self.class_ids, self.class_iou(), strict=True)}

    def miou(self) -> float:
        """Mean foreground IoU over ALL fold classes (unsampled ones count as 0), in percent."""
        return float(100.0 * np.mean(self.class_iou()))

    def fbiou(self) -> float:
        """Mean of background and foreground IoU pooled over the fold classes, in percent."""
        inter = self.inter.sum(axis=1).astype(np.float64)
        union = self.union.sum(axis=1).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, inter / np.where(union > 0, union, 1), np.nan)
        return float(100.0 * np.mean(iou))

    def records(self) -> list[dict[str, int | float]]:
        """Per-class rows for the result JSON: class_id, iou (%), raw counts, n_episodes."""
        iou = self.class_iou()
        return [
            {
                "class_id": c,
                "iou": float(100.0 * iou[k]),
                "inter_fg": int(self.inter[1, k]),
                "union_fg": int(self.union[1, k]),
                "inter_bg": int(self.inter[0, k]),
                "union_bg": int(self.union[0, k]),
                "n_episodes": int(self.n_episodes[k]),
            }
            for k, c in enumerate(self.class_ids)
        ]

    def state_dict(self) -> dict[str, list]:
        """Raw int accumulators as JSON-ready lists (inter/union rows: background, foreground)."""
        return {
            "class_ids": list(self.class_ids),
            "inter": self.inter.tolist(),
            "union": self.union.tolist(),
            "n_episodes": self.n_episodes.tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the accumulators by those of `state` (class_ids must match exactly, in order)."""
        ids = [int(c) for c in state["class_ids"]]
        if ids != self.class_ids:
            raise ValueError(f"state class_ids {ids} != evaluator class_ids {self.class_ids}")
        inter = np.asarray(state["inter"], dtype=np.int64)
        union = np.asarray(state["union"], dtype=np.int64)
        n_ep = np.asarray(state["n_episodes"], dtype=np.int64)
        shape = (2, len(ids))
        if inter.shape != shape or union.shape != shape or n_ep.shape != (len(ids),):
            raise ValueError("state accumulators have the wrong shape")
        self.inter, self.union, self.n_episodes = inter.copy(), union.copy(), n_ep.copy()

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> FewShotSegEvaluator:
        """Build an evaluator holding the accumulators of `state`."""
        ev = cls(state["class_ids"])
        ev.load_state_dict(state)
        return ev

    def merge(self, other: FewShotSegEvaluator) -> FewShotSegEvaluator:
        """Add the accumulators of `other` (e.g. another shard) into self; returns self."""
        if other.class_ids != self.class_ids:
            raise ValueError("cannot merge evaluators with different class_ids")
        self.inter += other.inter
        self.union += other.union
        self.n_episodes += other.n_episodes
        return self
