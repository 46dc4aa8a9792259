"""`SegmentationResult`: what every model's ``segment()`` returns.

One container for all prompt types and output levels (binary, instance, semantic, panoptic,
identity), so downstream code (metrics, CLI, visualisation, export) handles every model alike.
All tensors are kept on the CPU.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.ops import masks_to_boxes

from promptseg.imageio import ImageInput, load_image
from promptseg.jsonable import to_jsonable
from promptseg.viz import draw_overlay, palette

__all__ = ["LEVELS", "SegmentationResult", "palette"]

LEVELS: tuple[str, ...] = ("identity", "instance", "semantic", "panoptic", "binary")
"""Allowed values of `SegmentationResult.level`."""


def _shape(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)} and dtype {t.dtype}"


def _cpu(t: torch.Tensor) -> torch.Tensor:
    """Detached CPU tensor; the same object when it already is one (no copy)."""
    if t.device.type == "cpu" and not t.requires_grad:
        return t
    return t.detach().cpu()


def _int64(name: str, t: Any, n: int) -> torch.Tensor:
    """Validate an integer [N] tensor and return it as int64."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int64 torch.Tensor [N], got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor [N], got {_shape(t)}")
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape [N] = [{n}] (one per mask), got {_shape(t)}")
    return _cpu(t).to(torch.int64)


def _slug(text: str, max_len: int = 40) -> str:
    """File-name-safe lowercase version of a label."""
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:max_len].strip("_")
    return s or "mask"


@dataclass(eq=False, repr=False)
class SegmentationResult:
    """Masks, scores and labels predicted for one image, plus optional extras.

    ``masks`` are bool [N, H, W] at the original image size; every per-mask field has length
    N. N may be 0: an empty result is not an error. Tensors are moved to the CPU and detached
    on construction; integer fields are cast to int64 and scores to float32.
    """

    masks: torch.Tensor
    """bool [N, H, W] at the original image size."""
    scores: torch.Tensor
    """float32 [N] confidence per mask, in [0, 1], one meaning per level: binary = mean foreground
    probability over the mask; identity = the object token's match probability x mean mask
    probability over the mask; instance = class probability x mean mask probability over the
    mask; semantic = the class's semantic map (class x mask probability summed over queries,
    capped at 1) averaged over the mask; panoptic = the class probability of the segment's
    query."""
    labels: list[str]
    """Label per mask, one rule for every family: a text prompt's text; a vocabulary class's
    first name; "reference i" for the reference prompt at position i of the call (with " class
    c" / " object k" when its references hold several classes / objects)."""
    prompt_index: torch.Tensor
    """int64 [N]: index of the prompt in the batch that produced the mask."""
    level: list[str]
    """Per mask, one of `LEVELS`."""
    class_ids: torch.Tensor | None = None
    """int64 [N] class index per mask (vocabulary / support class), or None."""
    logits: torch.Tensor | None = None
    """float [N, h, w] low-resolution logits, or None."""
    logits_valid: tuple[int, int] | None = None
    """(h', w'): top-left part of `logits` covering the image (rest is padding); None = all."""
    panoptic: dict | None = None
    """{"id_map": int32 [H, W], "segments_info": [{id, category_id, isthing, score?}, ...]}."""
    image: torch.Tensor | None = None
    """uint8 [3, H, W] original image, for overlays."""
    meta: dict = field(default_factory=dict)
    """model, tag, input_size, timings (seconds per stage), threshold, ..."""

    # ----------------------------------------------------------------------------------------
    # validation
    # ----------------------------------------------------------------------------------------

    def __post_init__(self) -> None:
        m = self.masks
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"masks must be a bool torch.Tensor [N, H, W], got {type(m).__name__}")
        if m.dtype != torch.bool or m.ndim != 3:
            hint = " (threshold it, e.g. logits > 0)" if m.dtype != torch.bool else ""
            raise ValueError(f"masks must be a bool tensor [N, H, W], got {_shape(m)}{hint}")
        self.masks = _cpu(m)
        n, h, w = self.masks.shape

        s = self.scores
        if not isinstance(s, torch.Tensor) or not s.is_floating_point():
            got = _shape(s) if isinstance(s, torch.Tensor) else type(s).__name__
            raise TypeError(f"scores must be a float torch.Tensor [N], got {got}")
        if s.ndim != 1 or s.shape[0] != n:
            raise ValueError(f"scores must have shape [N] = [{n}] (one per mask), got {_shape(s)}")
        self.scores = _cpu(s).to(torch.float32)

        self.labels = self._str_list("labels", self.labels, n)
        self.level = self._str_list("level", self.level, n)
        bad = sorted({lv for lv in self.level if lv not in LEVELS})
        if bad:
            raise ValueError(f"level values must be in {LEVELS}, got {bad}")

        self.prompt_index = _int64("prompt_index", self.prompt_index, n)
        if self.class_ids is not None:
            self.class_ids = _int64("class_ids", self.class_ids, n)

        if self.logits is not None:
            lg = self.logits
            if not isinstance(lg, torch.Tensor) or not lg.is_floating_point() or lg.ndim != 3:
                got = _shape(lg) if isinstance(lg, torch.Tensor) else type(lg).__name__
                raise ValueError(f"logits must be a float tensor [N, h, w], got {got}")
            if lg.shape[0] != n:
                raise ValueError(f"logits must have N = {n} maps (one per mask), got {_shape(lg)}")
            self.logits = _cpu(lg)
        if self.logits_valid is not None:
            if self.logits is None:
                raise ValueError("logits_valid is given but logits is None")
            lv = self.logits_valid
            lh, lw = self.logits.shape[-2:]
            if (
                not isinstance(lv, (tuple, list))
                or len(lv) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in lv)
                or not (1 <= lv[0] <= lh and 1 <= lv[1] <= lw)
            ):
                raise ValueError(
                    f"logits_valid must be (h', w') with 1 <= h' <= {lh} and 1 <= w' <= {lw} "
                    f"(logits are {lh}x{lw}), got {lv!r}"
                )
            self.logits_valid = (int(lv[0]), int(lv[1]))

        if self.image is not None:
            im = self.image
            if not isinstance(im, torch.Tensor) or im.dtype != torch.uint8 or im.ndim != 3:
                got = _shape(im) if isinstance(im, torch.Tensor) else type(im).__name__
                raise ValueError(f"image must be a uint8 tensor [3, H, W], got {got}")
            if tuple(im.shape) != (3, h, w):
                raise ValueError(
                    f"image must have shape (3, {h}, {w}) to match masks, got {_shape(im)}"
                )
            self.image = _cpu(im)

        if self.panoptic is not None:
            self.panoptic = self._check_panoptic(self.panoptic, (h, w))

        if not isinstance(self.meta, dict):
            raise TypeError(f"meta must be a dict, got {type(self.meta).__name__}")

    @staticmethod
    def _str_list(name: str, values: Any, n: int) -> list[str]:
        if isinstance(values, str) or not isinstance(values, Sequence):
            raise TypeError(f"{name} must be a list of str (one per mask), got {values!r:.80}")
        if len(values) != n:
            raise ValueError(f"{name} must have {n} entries (one per mask), got {len(values)}")
        if not all(isinstance(v, str) for v in values):
            kinds = sorted({type(v).__name__ for v in values})
            raise TypeError(f"{name} must be a list of str, got element types {kinds}")
        return list(values)

    @staticmethod
    def _check_panoptic(p: Any, hw: tuple[int, int]) -> dict:
        if not isinstance(p, dict) or "id_map" not in p or "segments_info" not in p:
            raise ValueError(
                "panoptic must be a dict with keys 'id_map' (int32 [H, W]) and 'segments_info' "
                f"(list of dicts), got {type(p).__name__} with keys "
                f"{sorted(p) if isinstance(p, dict) else None}"
            )
        idm = p["id_map"]
        if not isinstance(idm, torch.Tensor) or idm.is_floating_point() or idm.dtype == torch.bool:
            got = _shape(idm) if isinstance(idm, torch.Tensor) else type(idm).__name__
            raise ValueError(f"panoptic['id_map'] must be an int32 tensor [H, W], got {got}")
        if tuple(idm.shape) != hw:
            raise ValueError(
                f"panoptic['id_map'] must have shape {hw} to match masks, got {_shape(idm)}"
            )
        infos = p["segments_info"]
        if not isinstance(infos, (list, tuple)):
            raise ValueError(
                f"panoptic['segments_info'] must be a list, got {type(infos).__name__}"
            )
        for i, seg in enumerate(infos):
            missing = {"id", "category_id", "isthing"} - set(seg) if isinstance(seg, dict) else {}
            if not isinstance(seg, dict) or missing:
                raise ValueError(
                    f"panoptic['segments_info'][{i}] must be a dict with keys id, category_id, "
                    f"isthing (and optionally score), got {seg!r:.120}"
                )
        return {**p, "id_map": _cpu(idm).to(torch.int32), "segments_info": list(infos)}

    # ----------------------------------------------------------------------------------------
    # basics
    # ----------------------------------------------------------------------------------------

    @classmethod
    def empty(
        cls,
        image_size: tuple[int, int],
        *,
        image: torch.Tensor | None = None,
        meta: dict | None = None,
        logits_size: tuple[int, int] | None = None,
        with_class_ids: bool = False,
    ) -> SegmentationResult:
        """A result with zero masks (shape [0, H, W]); nothing found is not an error."""
        h, w = image_size
        logits = None if logits_size is None else torch.zeros(0, *logits_size)
        return cls(
            masks=torch.zeros(0, h, w, dtype=torch.bool),
            scores=torch.zeros(0, dtype=torch.float32),
            labels=[],
            prompt_index=torch.zeros(0, dtype=torch.int64),
            level=[],
            class_ids=torch.zeros(0, dtype=torch.int64) if with_class_ids else None,
            logits=logits,
            image=image,
            meta=dict(meta or {}),
        )

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the original image."""
        return int(self.masks.shape[1]), int(self.masks.shape[2])

    def __repr__(self) -> str:
        items = ", ".join(
            f"{lab!r}: {s:.3f}"
            for lab, s in zip(self.labels[:5], self.scores[:5].tolist(), strict=True)
        )
        more = ", ..." if len(self) > 5 else ""
        extras = [
            k for k in ("class_ids", "logits", "panoptic", "image") if getattr(self, k) is not None
        ]
        return (
            f"SegmentationResult(n={len(self)}, image_size={self.image_size}, "
            f"masks={{{items}{more}}}, levels={sorted(set(self.level))}, with={extras})"
        )

    # ----------------------------------------------------------------------------------------
    # logits
    # ----------------------------------------------------------------------------------------

    def upsample(self, size: tuple[int, int] | None = None, mode: str = "bilinear") -> torch.Tensor:
        """Logits cropped to `logits_valid` and resized to `size` (default: the image size).

        Returns float32 [N, H, W]. Uses ``F.interpolate`` with ``align_corners=False`` for the
        linear modes.
        """
        if self.logits is None:
            raise ValueError(
                "this result has no logits; pass return_logits=True to segment() to keep them"
            )
        size = self.image_size if size is None else (int(size[0]), int(size[1]))
        lg = self.logits.float()
        if self.logits_valid is not None:
            lg = lg[:, : self.logits_valid[0], : self.logits_valid[1]]
        if lg.shape[0] == 0:
            return torch.zeros(0, *size, dtype=torch.float32)
        align = False if mode in ("linear", "bilinear", "bicubic", "trilinear") else None
        return F.interpolate(lg[None], size=size, mode=mode, align_corners=align)[0]

    # ----------------------------------------------------------------------------------------
    # subsets
    # ----------------------------------------------------------------------------------------

    def select(
        self, index: torch.Tensor | Sequence[int] | Sequence[bool] | int
    ) -> SegmentationResult:
        """Subset of the masks, by integer indices or a bool mask of length N.

        Every per-mask field (scores, labels, logits, class_ids, ...) follows; `image`,
        `panoptic` (a whole-image view) and `meta` are kept as they are.
        """
        n = len(self)
        idx = torch.as_tensor(index)
        if idx.numel() == 0 and idx.dtype != torch.bool:
            idx = idx.to(torch.int64)  # torch.as_tensor([]) is float32
        if idx.dtype == torch.bool:
            if idx.shape != (n,):
                raise ValueError(f"a bool index must have shape ({n},), got {tuple(idx.shape)}")
            idx = idx.nonzero().flatten()
        elif idx.is_floating_point() or idx.is_complex():
            raise TypeError(f"index must be integer or bool, got dtype {idx.dtype}")
        idx = idx.reshape(-1).to(torch.int64)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"index out of range for a result with {n} masks: {idx.tolist()}")
        idx = idx % max(n, 1)
        pos = idx.tolist()
        return replace(
            self,
            masks=self.masks[idx],
            scores=self.scores[idx],
            labels=[self.labels[i] for i in pos],
            prompt_index=self.prompt_index[idx],
            level=[self.level[i] for i in pos],
            class_ids=None if self.class_ids is None else self.class_ids[idx],
            logits=None if self.logits is None else self.logits[idx],
            meta=dict(self.meta),
        )

    def best(self) -> SegmentationResult:
        """The single highest-scoring mask (an empty result stays empty)."""
        if len(self) == 0:
            return self.select(torch.zeros(0, dtype=torch.int64))
        return self.select([int(self.scores.argmax())])

    def per_prompt(self, i: int) -> SegmentationResult:
        """The masks produced by prompt `i` of the batch."""
        return self.select(self.prompt_index == i)

    # ----------------------------------------------------------------------------------------
    # export
    # ----------------------------------------------------------------------------------------

    def boxes(self) -> torch.Tensor:
        """float [N, 4] xyxy boxes of the masks (torchvision convention: x2, y2 inclusive).

        Empty masks get all-zero boxes.
        """
        out = torch.zeros(len(self), 4, dtype=torch.float32)
        nonempty = self.masks.flatten(1).any(1)
        if bool(nonempty.any()):
            out[nonempty] = masks_to_boxes(self.masks[nonempty]).float()
        return out

    def to_coco_rle(self) -> list[dict]:
        """COCO-style records, one per mask, with RLE counts as str (JSON-ready)."""
        if len(self) == 0:
            return []
        arr = np.asfortranarray(self.masks.permute(1, 2, 0).numpy().astype(np.uint8))
        rles = mask_utils.encode(arr)
        areas = mask_utils.area(rles)
        bboxes = mask_utils.toBbox(rles)
        h, w = self.image_size
        cids = [None] * len(self) if self.class_ids is None else self.class_ids.tolist()
        records = []
        for i, rle in enumerate(rles):
            counts = rle["counts"]
            records.append(
                {
                    "segmentation": {
                        "size": [h, w],
                        "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
                    },
                    "score": float(self.scores[i]),
                    "label": self.labels[i],
                    "category_id": cids[i],
                    "area": int(areas[i]),
                    "bbox": [float(v) for v in bboxes[i]],
                }
            )
        return records

    def overlay(self, alpha: float = 0.5, image: ImageInput | None = None) -> Image.Image:
        """RGB image, of the image's size, with each mask tinted, outlined, and labelled.

        The base is `image` if given (anything `load_image` accepts, of the result's size),
        else `self.image`, else a black canvas. Colours come from the fixed `palette`. Each
        "label score" sits on a box inside its mask, sized to the image; labels that do not fit
        go to a legend in a corner, and their masks get its row number (`promptseg.viz`).
        """
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        h, w = self.image_size
        if image is not None:
            base = load_image(image)
            if tuple(base.shape[1:]) != (h, w):
                raise ValueError(
                    f"overlay image has size {tuple(base.shape[1:])} (H, W), but the result is "
                    f"for an image of size {(h, w)}"
                )
        elif self.image is not None:
            base = self.image
        else:
            base = torch.zeros(3, h, w, dtype=torch.uint8)
        return draw_overlay(
            base.permute(1, 2, 0).numpy(), self.masks.numpy(), self.labels, self.scores, alpha
        )

    def save(self, directory: str | Path, prefix: str = "mask") -> list[Path]:
        """Write masks, overlay and metadata to `directory` (created); return the paths written.

        Files: ``{prefix}_{i:03d}_{label}.png`` per mask (mode L, 0/255), ``overlay.png``,
        ``panoptic.png`` and ``segments.json`` if there is a panoptic result (panopticapi RGB
        encoding, id = R + 256 G + 256^2 B, and its segments_info), and ``result.json``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        mask_files: list[str] = []
        masks_u8 = self.masks.to(torch.uint8).mul_(255).numpy()
        for i in range(len(self)):
            path = directory / f"{prefix}_{i:03d}_{_slug(self.labels[i])}.png"
            Image.fromarray(masks_u8[i]).save(path)
            mask_files.append(path.name)
            written.append(path)

        path = directory / "overlay.png"
        self.overlay().save(path)
        written.append(path)

        record: dict[str, Any] = {
            "image_size": list(self.image_size),
            "labels": self.labels,
            "scores": self.scores.tolist(),
            "prompt_index": self.prompt_index.tolist(),
            "level": self.level,
            "class_ids": None if self.class_ids is None else self.class_ids.tolist(),
            "boxes": self.boxes().tolist(),
            "mask_files": mask_files,
            "meta": to_jsonable(self.meta, finite_only=True),
        }
        if self.panoptic is not None:
            ids = self.panoptic["id_map"].to(torch.int64)
            rgb = torch.stack([ids % 256, (ids // 256) % 256, (ids // 65536) % 256], dim=-1)
            path = directory / "panoptic.png"
            Image.fromarray(rgb.to(torch.uint8).numpy()).save(path)
            written.append(path)
            record["panoptic"] = {
                "file": path.name,
                "segments_info": to_jsonable(self.panoptic["segments_info"], finite_only=True),
            }
            path = directory / "segments.json"  # panopticapi's annotation record of the PNG
            path.write_text(json.dumps(record["panoptic"], indent=2))
            written.append(path)

        path = directory / "result.json"
        path.write_text(json.dumps(record, indent=2))
        written.append(path)
        return written
