"""Test models for the benchmark harness: exact answers on the miniature datasets, no weights.

    ColorKey           finds the colour a prompt stands for (a class name's `class_color`, or the
                       dominant colour under a reference mask) -> perfect scores on mini datasets
    Empty              finds nothing -> the metrics' documented edge values (see `Empty`)
    ShiftedOracle(dx)  ColorKey with every mask shifted right by `dx` pixels (left if dx < 0)
                       -> hand-computable scores

They take every prompt kind and produce every output level, so one command can drive every
`promptseg eval` path end to end in seconds. The zoo names `test_colorkey`, `test_empty` and
`test_shifted` (dx 8) build them through the `testing` family, whose card's `config.mode`
(colorkey | empty | shifted) picks the class.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

import numpy as np
import torch
from scipy import ndimage

from ..imageio import ImageInput, MaskInput, load_image, load_label_map, load_mask
from ..prompts import MixedPrompt, Prompt, SupportSet, TextPrompt, Vocabulary, reference_label
from ..registry import register_model
from ..result import SegmentationResult
from ..testing.colors import class_color
from ..transforms import resize_mask
from ..zoo import ModelCard, model_info
from .base import ImageEmbedding, PromptSegModel, check_frames

__all__ = ["ColorKey", "Empty", "ShiftedOracle"]

TOLERANCE = 6  # JPEG keeps flat 8x8-aligned blocks within a few levels of their colour


def dominant_color(image: torch.Tensor, mask: torch.Tensor) -> tuple[int, int, int]:
    """Most frequent RGB colour of `image` [3, H, W] under a bool mask [H, W]."""
    pixels = image[:, mask].T.to(torch.int64)  # [P, 3]
    codes = (pixels[:, 0] << 16) | (pixels[:, 1] << 8) | pixels[:, 2]
    values, counts = torch.unique(codes, return_counts=True)
    code = int(values[counts.argmax()])
    return (code >> 16) & 255, (code >> 8) & 255, code & 255


def color_mask(image: torch.Tensor, colors: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """Pixels of `image` [3, H, W] within TOLERANCE of any of `colors` -> bool [H, W]."""
    img = image.to(torch.int16)
    out = torch.zeros(image.shape[1:], dtype=torch.bool)
    for c in colors:
        ref = torch.tensor(c, dtype=torch.int16).view(3, 1, 1)
        out |= (img - ref).abs().amax(dim=0) <= TOLERANCE
    return out


class ColorKey(PromptSegModel):
    """Segments by colour: perfect masks on the miniature datasets (mIoU, PQ, AP, J&F = 100).

    A text prompt or vocabulary class finds `class_color(name)`; a visual prompt finds the
    dominant colour under its reference mask; a video follows the frame-0 colour of each object.
    Without a card it is the zoo's `test_colorkey`. Smoothed metrics stay just below 100:
    PerSeg gives 100 ΣI / (ΣI + 1e-10) per object, CLIPSeg (`eval refer`) |GT| / (|GT| + 1)
    per phrase.
    """

    levels = ("semantic", "instance", "panoptic", "identity", "all")
    zoo_name = "test_colorkey"

    def __init__(self, card: ModelCard | None = None) -> None:
        super().__init__(card if card is not None else model_info(self.zoo_name))
        self.register_buffer("_anchor", torch.zeros(1))  # gives the model a device and dtype

    def finish(self, mask: torch.Tensor) -> torch.Tensor:
        """The mask [H, W] this model reports for an exact colour mask (ColorKey: unchanged)."""
        return mask

    def preprocess(self, image: torch.Tensor, input: str = "default") -> torch.Tensor:
        return image

    def encode_image(self, pixels: torch.Tensor, input: str = "default") -> torch.Tensor:
        return pixels

    def encode_prompt(self, prompts: list[Prompt], level: str | None = None) -> list[list[dict]]:
        """Per prompt, the entries to find: {label, class_id, object_id, colors, isthing}."""
        return [self._entries(p) for p in prompts]

    def _entries(self, p: Prompt) -> list[dict]:
        if isinstance(p, TextPrompt):
            return [dict(label=p.text, class_id=0, object_id=None, colors=[class_color(p.text)])]
        if isinstance(p, MixedPrompt):
            return self._entries(p.text)
        if isinstance(p, Vocabulary):
            return [
                dict(
                    label=syn[0],
                    class_id=k,
                    object_id=None,
                    isthing=thing,
                    colors=[class_color(s) for s in syn],
                )
                for k, (syn, thing) in enumerate(zip(p.classes, p.is_thing, strict=True))
            ]
        shots = p.shots if isinstance(p, SupportSet) else (p,)
        groups: dict[tuple, dict] = {}
        for shot in shots:
            image = load_image(shot.image)
            mask = load_mask(shot.mask, size=tuple(image.shape[-2:]))
            if not mask.any():
                raise ValueError("a reference mask has no foreground pixel")
            key = (shot.class_id, shot.object_id)
            entry = groups.setdefault(
                key,
                dict(
                    label=None,  # a reference: labelled by its prompt's position (postprocess)
                    class_id=shot.class_id,
                    object_id=shot.object_id,
                    colors=[],
                ),
            )
            color = dominant_color(image, mask)
            if color not in entry["colors"]:
                entry["colors"].append(color)
        return list(groups.values())

    def decode(
        self, features: dict[str, torch.Tensor], prompt_embeddings: list[list[dict]], level: str
    ) -> list:
        """Per prompt and entry, the bool mask [H, W] of the entry's colours."""
        image = features["default"]
        out = []
        for entries in prompt_embeddings:
            masks = []
            for e in entries:
                masks.append(self.finish(color_mask(image, e["colors"])))
            out.append(list(zip(entries, masks, strict=True)))
        return out

    def postprocess(
        self,
        raw: list,
        embedding: ImageEmbedding,
        prompts: list[Prompt],
        *,
        level: str,
        threshold: float | None,
        size: tuple[int, int],
        return_logits: bool,
    ) -> SegmentationResult:
        """Masks of every entry at one level, or at every level ("all"; panoptic id map set)."""
        levels = [lvl for lvl in self.levels if lvl != "all"] if level == "all" else [level]
        masks, labels, index, classes, level_of = [], [], [], [], []
        for lvl in levels:
            for i, pairs in enumerate(raw):
                several_classes = len({e["class_id"] for e, _ in pairs}) > 1
                several_objects = len({e["object_id"] for e, _ in pairs}) > 1
                for entry, mask in pairs:
                    label = entry["label"] or reference_label(
                        i,
                        class_id=entry["class_id"] if several_classes else None,
                        object_id=entry["object_id"]
                        if lvl == "identity" and several_objects
                        else None,
                    )
                    parts = [mask]
                    if lvl == "instance" or (lvl == "panoptic" and entry.get("isthing", True)):
                        parts = _components(mask)
                    for part in parts:
                        if lvl != "semantic" and not part.any():
                            continue
                        masks.append(part)
                        labels.append(label)
                        index.append(i)
                        level_of.append(lvl)
                        classes.append(
                            entry["object_id"]
                            if lvl == "identity" and entry["object_id"] is not None
                            else entry["class_id"]
                        )
        h, w = embedding.image_size
        stack = torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.bool)
        stack = resize_mask(stack, size)
        result = SegmentationResult(
            masks=stack,
            scores=stack.flatten(1).any(dim=1).float(),
            labels=labels,
            prompt_index=torch.tensor(index, dtype=torch.int64),
            level=level_of,
            class_ids=torch.tensor(classes, dtype=torch.int64),
            logits=(stack.float() * 20 - 10) if return_logits else None,
        )
        if "panoptic" in levels:
            result.panoptic = _panoptic(result, raw)
        return result

    def segment_video(
        self, frames: Sequence[ImageInput], first_mask: MaskInput
    ) -> Iterator[torch.Tensor]:
        """Label map int64 [H, W] per frame: object k = the colour under label k in frame 0.

        The frames and the first mask are checked when called, before the first frame is yielded.
        """
        frames = check_frames(frames)
        first = load_image(frames[0])
        labels = load_label_map(first_mask, size=tuple(first.shape[-2:]))
        objects = [int(k) for k in torch.unique(labels) if 0 < int(k) < 255]
        colors = {k: dominant_color(first, labels == k) for k in objects}
        return self._video_frames(frames, colors)

    def _video_frames(
        self, frames: Sequence[ImageInput], colors: dict[int, tuple[int, int, int]]
    ) -> Iterator[torch.Tensor]:
        """The frame loop of `segment_video` (a generator: one label map per frame)."""
        for frame in frames:
            image = load_image(frame)
            out = torch.zeros(image.shape[1:], dtype=torch.int64)
            for k in colors:  # overlaps go to the larger id, as SINE resolves them
                out[self.finish(color_mask(image, [colors[k]]))] = k
            yield out


class Empty(ColorKey):
    """Finds nothing: every mask is empty, so each eval path gives its documented edge value.

    fss       mIoU 0; FB-IoU = 50 x the pooled background IoU (= the share of scored pixels that
              are GT background), strictly between 0 and 50 when any GT is foreground
    fsis      segm / box AP 0 with `empty_predictions: true` (pycocotools is not run)
    vos       J = F = 0 on frames showing the object, 1 on frames where GT is empty too (DAVIS:
              empty union = 1); J&F = 100 x the per-object mean share of evaluated frames in
              which the object is absent (0 when every object is always visible)
    ovseg     PQ = SQ = RQ = 0 (every GT segment a false negative), AP 0 with
              `empty_predictions: true`, mIoU = pACC = 0
    refer     mIoU, IoU_FG and AP 0 (CLIPSeg's +1 denominators: 0 / (|GT| + 1)); IoU_BIN = half
              the smoothed background IoU, strictly between 0 and 50
    perseg    mIoU = mAcc = 0 (ΣI = 0 for every object)
    """

    zoo_name = "test_empty"

    def finish(self, mask: torch.Tensor) -> torch.Tensor:
        """An empty mask of the same size."""
        return torch.zeros_like(mask)


class ShiftedOracle(ColorKey):
    """ColorKey with every mask shifted `dx` pixels to the right (left if dx < 0), zero-filled.

    A w x h rectangle shifted by 0 <= dx <= w inside the image scores IoU (w - dx) / (w + dx), so
    every metric is computable by hand (e.g. DAVIS DV-1). Without a card it is the zoo's
    `test_shifted` with `config.dx` set to `dx`.
    """

    zoo_name = "test_shifted"

    def __init__(self, dx: int = 8, card: ModelCard | None = None) -> None:
        base = card if card is not None else model_info(self.zoo_name)
        super().__init__(replace(base, config={**base.config, "dx": int(dx)}))
        self.dx = int(dx)

    def finish(self, mask: torch.Tensor) -> torch.Tensor:
        """`mask` moved `dx` columns; pixels moved out of the image are dropped."""
        w = mask.shape[-1]
        out = torch.zeros_like(mask)
        if self.dx >= 0:
            out[..., self.dx :] = mask[..., : max(w - self.dx, 0)]
        else:
            out[..., : max(w + self.dx, 0)] = mask[..., min(-self.dx, w) :]
        return out


@register_model("testing")
class ZooTestModel(ColorKey):
    """The `testing` family of zoo.yaml: `config.mode` picks ColorKey, Empty or ShiftedOracle."""

    def __new__(cls, card: ModelCard) -> ColorKey:  # type: ignore[misc]
        mode = card.config.get("mode", "colorkey")
        if mode == "colorkey":
            return ColorKey(card)
        if mode == "empty":
            return Empty(card)
        if mode == "shifted":
            return ShiftedOracle(int(card.config.get("dx", 8)), card)
        raise ValueError(
            f"{card.name}: config.mode of a 'testing' model must be colorkey, empty or shifted, "
            f"got {mode!r}"
        )


def _components(mask: torch.Tensor) -> list[torch.Tensor]:
    """Connected components (8-connectivity) of a bool mask, as separate masks."""
    labels, n = ndimage.label(mask.numpy(), structure=np.ones((3, 3)))
    labels = torch.from_numpy(labels)
    return [labels == k for k in range(1, n + 1)]


def _panoptic(result: SegmentationResult, raw: list) -> dict:
    """panopticapi-shaped id map + segments_info from the panoptic-level masks."""
    id_map = torch.zeros(result.image_size, dtype=torch.int32)
    segments = []
    thing = {e["class_id"]: e.get("isthing", True) for pairs in raw for e, _ in pairs}
    panoptic = [k for k, lvl in enumerate(result.level) if lvl == "panoptic"]
    for k, row in enumerate(panoptic):
        cls = int(result.class_ids[row])
        id_map[result.masks[row]] = k + 1
        segments.append({"id": k + 1, "category_id": cls, "isthing": thing[cls], "score": 1.0})
    return {"id_map": id_map, "segments_info": segments}
