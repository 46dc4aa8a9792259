"""PerSeg one-shot personalised segmentation mIoU / mAcc.

Personalize-SAM `eval_miou.py`: per object, the intersection I, union U and GT area T are summed
over its query images (every image but the reference `00`); IoU_obj = ΣI / (ΣU + 1e-10),
Acc_obj = ΣI / (ΣT + 1e-10); mIoU / mAcc = 100 × the mean over objects. Masks are binarised
`> 0` after grayscale conversion. Two reference quirks are deliberately not reproduced (P21):
prediction files are matched to GT files by exact file stem (the reference pairs sorted lists by
position) and only the stem `00` is the reference image (the reference skips every path that
contains `00`); a missing prediction is an error instead of a silently shifted pairing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from promptseg.errors import PromptsegError

from ._arrays import as_binary, first_few

__all__ = [
    "EPS",
    "REFERENCE_STEM",
    "MissingPredictionsError",
    "PerSegEvaluator",
    "evaluate_perseg",
    "read_mask",
]

EPS = 1e-10  # eval_miou.py adds it to every denominator
REFERENCE_STEM = "00"  # Personalize-SAM's default --ref_idx


class MissingPredictionsError(PromptsegError, FileNotFoundError):
    """Prediction PNGs are missing for some GT query images; the message lists them."""


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Bool [H, W] of a mask image: grayscale (ITU-R 601 luma, as cv2's BGR2GRAY) `> 0`."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L")) > 0
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable mask image: {exc}") from exc


class PerSegEvaluator:
    """Per-object int64 sums of intersection, union and GT area; object-mean IoU and accuracy.

    Objects are fixed up front (sorted by name, as the reference lists its folders); an object
    never updated scores 0 and still counts in the means, like one without query images in the
    reference. Returned metrics are percentages (×100).
    """

    def __init__(self, objects: Iterable[str]) -> None:
        if isinstance(objects, str) or not isinstance(objects, Iterable):
            raise TypeError(f"objects must be a list of object names, got {objects!r}")
        names = sorted(str(o) for o in objects)
        if not names:
            raise ValueError("objects must not be empty")
        if len(set(names)) != len(names):
            raise ValueError(f"objects contains duplicates: {names}")
        self.objects: list[str] = names
        self._index: dict[str, int] = {o: i for i, o in enumerate(names)}
        self.inter = np.zeros(len(names), dtype=np.int64)
        self.union = np.zeros(len(names), dtype=np.int64)
        self.target = np.zeros(len(names), dtype=np.int64)
        self.n_images = np.zeros(len(names), dtype=np.int64)

    def update(self, obj: str, pred: Any, gt: Any) -> None:
        """Add one query image of object `obj`: binary `pred` and `gt` of the same shape."""
        p = as_binary(pred, "pred")
        g = as_binary(gt, "gt")
        if p.shape != g.shape:
            raise ValueError(f"pred shape {p.shape} != gt shape {g.shape} (object {obj!r})")
        if not isinstance(obj, str):
            raise TypeError(f"obj must be an object name (str), got {obj!r}")
        try:
            k = self._index[obj]
        except KeyError:
            raise ValueError(f"object {obj!r} is not one of {self.objects}") from None
        self.inter[k] += int(np.count_nonzero(p & g))
        self.union[k] += int(np.count_nonzero(p | g))
        self.target[k] += int(np.count_nonzero(g))
        self.n_images[k] += 1

    def object_iou(self) -> np.ndarray:
        """ΣI / (ΣU + 1e-10) per object (fraction, `objects` order)."""
        return self.inter / (self.union + EPS)

    def object_acc(self) -> np.ndarray:
        """ΣI / (ΣT + 1e-10) per object (fraction, `objects` order)."""
        return self.inter / (self.target + EPS)

    def miou(self) -> float:
        """Mean object IoU in percent (summed in object order, as the reference)."""
        return 100.0 * (sum(self.object_iou().tolist()) / len(self.objects))

    def macc(self) -> float:
        """Mean object accuracy (foreground recall) in percent."""
        return 100.0 * (sum(self.object_acc().tolist()) / len(self.objects))

    def records(self) -> list[dict[str, Any]]:
        """Per-object rows for the result JSON: object, iou and acc (%), raw counts, n_images."""
        iou, acc = self.object_iou(), self.object_acc()
        return [
            {
                "object": o,
                "iou": float(100.0 * iou[k]),
                "acc": float(100.0 * acc[k]),
                "inter": int(self.inter[k]),
                "union": int(self.union[k]),
                "target": int(self.target[k]),
                "n_images": int(self.n_images[k]),
            }
            for k, o in enumerate(self.objects)
        ]

    def state_dict(self) -> dict[str, list]:
        """Raw int accumulators as JSON-ready lists."""
        return {
            "objects": list(self.objects),
            "inter": self.inter.tolist(),
            "union": self.union.tolist(),
            "target": self.target.tolist(),
            "n_images": self.n_images.tolist(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the accumulators by those of `state` (objects must match exactly, in order)."""
        if list(state["objects"]) != self.objects:
            raise ValueError(f"state objects {state['objects']} != evaluator's {self.objects}")
        arrays = [
            np.asarray(state[k], dtype=np.int64) for k in ("inter", "union", "target", "n_images")
        ]
        if any(a.shape != (len(self.objects),) for a in arrays):
            raise ValueError("state accumulators have the wrong shape")
        self.inter, self.union, self.target, self.n_images = (a.copy() for a in arrays)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PerSegEvaluator:
        """Build an evaluator holding the accumulators of `state`."""
        ev = cls(state["objects"])
        ev.load_state_dict(state)
        return ev

    def merge(self, other: PerSegEvaluator) -> PerSegEvaluator:
        """Add the accumulators of `other` (e.g. another shard) into self; returns self."""
        if other.objects != self.objects:
            raise ValueError("cannot merge evaluators with different objects")
        self.inter += other.inter
        self.union += other.union
        self.target += other.target
        self.n_images += other.n_images
        return self


def evaluate_perseg(
    annotations_dir: str | os.PathLike[str],
    predictions_dir: str | os.PathLike[str],
    reference: str = REFERENCE_STEM,
) -> PerSegEvaluator:
    """Score `<predictions_dir>/<object>/<stem>.png` against `<annotations_dir>/<object>/*.png`.

    Objects are the sub-folders of `annotations_dir` (hidden ones skipped); every GT PNG whose stem
    is not `reference` needs a prediction of the same stem (extra predictions, such as the
    reference's own, are ignored). Raises MissingPredictionsError listing what is missing.
    """
    gt_root, pred_root = Path(annotations_dir), Path(predictions_dir)
    if not gt_root.is_dir():
        raise FileNotFoundError(f"PerSeg annotations folder {gt_root} not found")
    objects = sorted(p.name for p in gt_root.iterdir() if p.is_dir() and p.name[:1] != ".")
    if not objects:
        raise FileNotFoundError(f"{gt_root} has no object folders (<object>/<nn>.png)")
    pairs: list[tuple[str, Path, Path]] = []
    missing: list[str] = []
    for obj in objects:
        for gt in sorted((gt_root / obj).glob("*.png")):
            if gt.stem == reference:
                continue
            pred = pred_root / obj / gt.name
            if pred.is_file():
                pairs.append((obj, gt, pred))
            else:
                missing.append(f"{obj}/{gt.name}")
    if missing:
        shown = first_few(missing)
        raise MissingPredictionsError(
            f"{len(missing)} prediction PNG(s) missing under {pred_root}: {shown}; write one "
            "<object>/<stem>.png per GT query image, named like its annotation"
        )
    evaluator = PerSegEvaluator(objects)
    for obj, gt, pred in pairs:
        g, p = read_mask(gt), read_mask(pred)
        if p.shape != g.shape:
            raise ValueError(
                f"{pred}: prediction size {p.shape} differs from GT {g.shape} ({gt}); "
                "write predictions at the image size"
            )
        evaluator.update(obj, p, g)
    return evaluator
