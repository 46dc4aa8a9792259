"""Semantic-segmentation mIoU with detectron2's SemSegEvaluator conventions.

A dataset-level (K+1)×(K+1) int64 confusion matrix (rows = prediction, columns = GT, last index =
ignore); classes absent from the GT are excluded from every mean. Pure numpy; shards merge exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._arrays import as_int, as_numeric

__all__ = ["SemSegEvaluator"]


class SemSegEvaluator:
    """Dataset-level confusion matrix and detectron2's metric dict (×100, NaN where undefined).

    `update` takes an integer prediction map (argmax, values 0..K-1) and an integer GT map where
    `ignore_label` (255, or 65535 for 16-bit GT) marks pixels that are not scored.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_label: int = 255,
        class_names: Sequence[str] | None = None,
    ) -> None:
        num_classes = as_int(num_classes, "num_classes")
        ignore_label = as_int(ignore_label, "ignore_label")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_label < num_classes:
            raise ValueError(f"ignore_label {ignore_label} collides with a class index")
        if class_names is not None and (
            isinstance(class_names, str) or not isinstance(class_names, Sequence)
        ):
            raise TypeError(f"class_names must be a list of names, got {class_names!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.class_names = (
            [str(n) for n in class_names]
            if class_names is not None
            else [str(i) for i in range(num_classes)]
        )
        k1 = self.num_classes + 1
        self.confusion_matrix = np.zeros((k1, k1), dtype=np.int64)

    def update(self, pred: Any, gt: Any) -> None:
        """Add one image: integer label maps `pred` and `gt` (same shape, original resolution)."""
        p = as_numeric(pred, "pred")
        g = as_numeric(gt, "gt")
        if p.shape != g.shape:
            raise ValueError(f"pred shape {p.shape} != gt shape {g.shape}")
        if not (np.issubdtype(p.dtype, np.integer) and np.issubdtype(g.dtype, np.integer)):
            raise TypeError(
                f"pred and gt must be integer label maps, got dtypes {p.dtype} and {g.dtype}"
            )
        k = self.num_classes
        p = p.astype(np.int64, copy=False).ravel()
        g = g.astype(np.int64).ravel()
        if p.size and (p.min() < 0 or p.max() >= k):
            raise ValueError(f"pred values must lie in [0, {k})")
        ignored = g == self.ignore_label
        g[ignored] = k
        if g.size and (g.min() < 0 or g.max() > k):
            raise ValueError(
                f"gt values must lie in [0, {k}) or equal ignore_label {self.ignore_label}"
            )
        counts = np.bincount((k + 1) * p + g, minlength=(k + 1) ** 2)
        self.confusion_matrix += counts.reshape(k + 1, k + 1)

    def compute(self) -> dict[str, float]:
        """detectron2's result dict: mIoU, fwIoU, IoU-<name>, mACC, pACC, ACC-<name> (percent).

        Per-class IoU/ACC are NaN for classes without GT pixels; those classes are left out of mIoU,
        fwIoU and mACC (their false positives still lower the IoU of the true class). All NaN if no
        GT at all.
        """
        cm = self.confusion_matrix[:-1, :-1].astype(np.float64)
        tp = np.diagonal(cm)
        pos_gt = cm.sum(axis=0)
        pos_pred = cm.sum(axis=1)
        union = pos_gt + pos_pred - tp
        acc_valid = pos_gt > 0
        iou_valid = acc_valid & (union > 0)
        acc = np.full(self.num_classes, np.nan)
        iou = np.full(self.num_classes, np.nan)
        acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
        iou[iou_valid] = tp[iou_valid] / union[iou_valid]
        total_gt = pos_gt.sum()
        n_acc = int(acc_valid.sum())
        n_iou = int(iou_valid.sum())
        macc = acc[acc_valid].sum() / n_acc if n_acc else np.nan
        miou = iou[iou_valid].sum() / n_iou if n_iou else np.nan
        if total_gt > 0:
            weights = pos_gt / total_gt
            fwiou = float(np.sum(iou[iou_valid] * weights[iou_valid]))
            pacc = tp.sum() / total_gt
        else:
            fwiou = pacc = np.nan
        res: dict[str, float] = {"mIoU": 100.0 * float(miou), "fwIoU": 100.0 * fwiou}
        for name, v in zip(self.class_names, iou, strict=True):
            res[f"IoU-{name}"] = 100.0 * float(v)
        res["mACC"] = 100.0 * float(macc)
        res["pACC"] = 100.0 * float(pacc)
        for name, v in zip(self.class_names, acc, strict=True):
            res[f"ACC-{name}"] = 100.0 * float(v)
        return res

    def state_dict(self) -> dict[str, Any]:
        """Raw accumulators: the int64 confusion matrix (numpy; save it as .npy) plus metadata."""
        return {
            "num_classes": self.num_classes,
            "ignore_label": self.ignore_label,
            "class_names": list(self.class_names),
            "confusion_matrix": self.confusion_matrix.copy(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the confusion matrix by that of `state` (array or nested list, same size)."""
        if int(state["num_classes"]) != self.num_classes:
            raise ValueError("state num_classes differs from this evaluator's")
        if int(state.get("ignore_label", self.ignore_label)) != self.ignore_label:
            raise ValueError("state ignore_label differs from this evaluator's")
        cm = np.asarray(state["confusion_matrix"], dtype=np.int64)
        if cm.shape != self.confusion_matrix.shape:
            raise ValueError(f"confusion matrix shape {cm.shape} != {self.confusion_matrix.shape}")
        self.confusion_matrix = cm.copy()

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> SemSegEvaluator:
        """Build an evaluator holding the confusion matrix of `state`."""
        ev = cls(
            int(state["num_classes"]),
            int(state.get("ignore_label", 255)),
            state.get("class_names"),
        )
        ev.load_state_dict(state)
        return ev

    def merge(self, other: SemSegEvaluator) -> SemSegEvaluator:
        """Add another shard's confusion matrix into self; returns self."""
        if other.num_classes != self.num_classes or other.ignore_label != self.ignore_label:
            raise ValueError("cannot merge evaluators with different num_classes / ignore_label")
        self.confusion_matrix += other.confusion_matrix
        return self
