"""SINE (Liu et al., 2024): in-context segmentation at three levels from one forward pass.

    backbone = DINOv2        (backbones/dinov2.py; frozen, last block before its final norm)
    head     = MFormerHead   (heads/mformer.py; neck, mask pooling, in-context fusion, M-Former)

References (k shots, each a mask with a class and optionally an object id) are pooled into ID
tokens (one per object) and semantic tokens (one per class). The target is decoded into
`identity` masks (the same objects), `instance` masks (top-k, scored and classed) and `semantic`
masks (one per class, semantic map > 0.7). Images are squashed to `image_size`, normalised, and
zero-padded bottom/right to the square `canvas` (sine.md §1.3, FSS protocol).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..backbones.dinov2 import DINOv2
from ..heads.mformer import MFormerHead, PooledTokens, id_scores, instance_topk, semantic_map
from ..imageio import ImageInput, MaskInput, content_hash, load_image, load_label_map, load_mask
from ..prompts import Prompt, SupportSet, VisualPrompt
from ..registry import register_model
from ..result import SegmentationResult
from ..transforms import resize_mask
from .base import ImageEmbedding, PromptSegModel

__all__ = ["SINE", "SINEPrompt", "MemoryBank", "decayed_score"]

LEVELS = ("semantic", "instance", "identity")


@dataclass
class SINEPrompt:
    """Pooled reference tokens of one prompt, reusable for any number of targets."""

    tokens: PooledTokens  # id_tokens [N, C], sem_tokens [M, C], ids [N], classes [M]


def decayed_score(score: float, age: int, ratio: int = 20) -> float:
    """Linear decay of a memory frame's score with its age in frames (0 from `ratio` on)."""
    return score * max(0.0, 1.0 - age / ratio) if age < ratio else 0.0


@dataclass
class MemoryEntry:
    """One memory frame of one object: its neck features, canvas mask, score and frame index."""

    feats: torch.Tensor  # [C, g, g]
    mask: torch.Tensor  # float [canvas, canvas]
    score: float
    frame: int


@dataclass
class MemoryBank:
    """Per-object VOS memory: the first-frame GT always kept, plus the best `capacity - 1` frames
    by (decayed score, score, frame index); the lowest is evicted (sine.md §4.3)."""

    capacity: int
    fixed: MemoryEntry
    entries: list[MemoryEntry] = field(default_factory=list)

    def push(self, entry: MemoryEntry, now: int) -> None:
        self.entries.append(entry)
        self.entries.sort(
            key=lambda e: (decayed_score(e.score, now - e.frame), e.score, e.frame), reverse=True
        )
        del self.entries[max(self.capacity - 1, 0) :]

    def frames(self) -> list[MemoryEntry]:
        return [self.fixed, *self.entries]


@register_model("sine")
class SINE(PromptSegModel):
    """k-shot references -> identity / instance / semantic masks of a target image."""

    levels = ("semantic", "instance", "identity", "all")

    def __init__(self, card: Any) -> None:
        super().__init__(card)
        cfg = card.config
        vit = cfg["backbone"]
        self.backbone = DINOv2(
            vit.get("arch"),
            embed_dim=vit.get("embed_dim"),
            depth=vit.get("depth"),
            num_heads=vit.get("num_heads"),
            data_config=card.data_config,
        )
        self.head = MFormerHead(in_channels=self.backbone.out_channels, **cfg["head"])
        self.canvas = int(card.data_config["canvas"])
        self.image_size = tuple(card.data_config["input_size"])
        self.instance_topk = int(cfg.get("instance_topk", 100))
        self.video = dict(card.data_config["video"])  # short_side, canvas, memory
        self._reference_cache: dict[str, torch.Tensor] = {}

    # -- images --------------------------------------------------------------------------------
    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 [3, H, W] -> squashed, normalised, zero-padded canvas [1, 3, canvas, canvas]."""
        x = super().preprocess(image)  # [1, 3, *image_size], normalised
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.canvas - w, 0, self.canvas - h))

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Neck features [B, C, g, g] of canvas pixels (frozen encoder + trainable neck)."""
        return self.head.neck(self.backbone.forward_features(pixels)["tokens"])

    def encode_image(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Target-only parts (cached per image): neck features, mask features, fusion SA."""
        feats = self.features(pixels)
        return {
            "feats": feats,
            "mfeat": self.head.mask_features(feats),
            "image_sa": self.head.image_self_attention(feats),
        }

    def _reference_features(self, image: torch.Tensor) -> torch.Tensor:
        """Neck features of a reference image, cached by content (a reference is reused often)."""
        key = content_hash(image)
        if key not in self._reference_cache:
            if len(self._reference_cache) >= 64:
                self._reference_cache.clear()
            self._reference_cache[key] = self.features(self.preprocess(image))[0]
        return self._reference_cache[key]

    def _canvas_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """bool [H, W] -> float [canvas, canvas]: nearest to image_size, zero padding."""
        m = resize_mask(mask, self.image_size).float()
        return F.pad(m, (0, self.canvas - m.shape[1], 0, self.canvas - m.shape[0]))

    # -- prompts -------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[Prompt]) -> list[SINEPrompt]:
        """One SINEPrompt per prompt; shots of the same image are pooled from one feature map."""
        return [self._encode_references(_shots(p)) for p in prompts]

    def _encode_references(self, shots: tuple[VisualPrompt, ...]) -> SINEPrompt:
        groups: dict[str, dict[str, Any]] = {}
        next_id = max([s.object_id for s in shots if s.object_id is not None], default=-1) + 1
        for shot in shots:
            image = load_image(shot.image)
            mask = load_mask(shot.mask, size=tuple(image.shape[-2:]))
            if not mask.any():
                raise ValueError(
                    "a reference mask has no foreground pixel; SINE needs each reference object "
                    "marked in its mask"
                )
            object_id = shot.object_id
            if object_id is None:
                object_id, next_id = next_id, next_id + 1
            g = groups.setdefault(
                content_hash(image), {"image": image, "masks": [], "ids": [], "classes": []}
            )
            g["masks"].append(self._canvas_mask(mask).to(self.device))
            g["ids"].append(object_id)
            g["classes"].append(int(shot.class_id))
        feats = torch.stack([self._reference_features(g["image"]) for g in groups.values()])
        tokens = self.head.pool_tokens(
            feats,
            [torch.stack(g["masks"]) for g in groups.values()],
            ids=[torch.tensor(g["ids"]) for g in groups.values()],
            classes=[torch.tensor(g["classes"]) for g in groups.values()],
        )
        return SINEPrompt(tokens)

    # -- video ---------------------------------------------------------------------------------
    def _video_geometry(self, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(frame size with the short side at `short_side`, its size on the canvas)."""
        short, canvas = self.video["short_side"], self.video["canvas"]
        if h <= w:
            small = (short, int(short * w / h))
        else:
            small = (int(short * h / w), short)
        if small[0] >= small[1]:
            big = (canvas, int(canvas / (small[0] / small[1])))
        else:
            big = (int(canvas / (small[1] / small[0])), canvas)
        return small, big

    def _video_pixels(self, image: torch.Tensor) -> torch.Tensor:
        """Frame -> short side resized, long side to the canvas, normalised, zero-padded."""
        small, big = self._video_geometry(*image.shape[-2:])
        x = image[None].float().to(self.device) / 255.0
        x = F.interpolate(x, size=small, mode="bilinear", align_corners=False, antialias=False)
        x = F.interpolate(x, size=big, mode="bilinear", align_corners=False)
        cfg = self.card.data_config
        mean = torch.tensor(cfg["mean"], device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(cfg["std"], device=x.device).view(1, 3, 1, 1)
        x = ((x - mean) / std).to(self.dtype)
        canvas = self.video["canvas"]
        return F.pad(x, (0, canvas - big[1], 0, canvas - big[0]))

    def _video_mask(self, mask: torch.Tensor, small, big) -> torch.Tensor:
        """bool mask (any size) -> float [canvas, canvas], nearest at each resize step."""
        m = resize_mask(resize_mask(mask, small), big).float()
        canvas = self.video["canvas"]
        return F.pad(m, (0, canvas - big[1], 0, canvas - big[0])).to(self.device)

    @torch.inference_mode()
    def segment_video(
        self,
        frames: Sequence[ImageInput],
        first_mask: MaskInput,
        *,
        memory: int | None = None,
    ) -> Iterator[torch.Tensor]:
        """Label maps int64 [H, W] per frame; objects are the labels of `first_mask` (frame 0).

        Official memory: first-frame GT fixed, `memory - 1` best predicted frames by decayed score;
        each frame's features are computed once and reused when it becomes a memory frame.
        """
        capacity = int(memory or self.video["memory"])
        banks: dict[int, MemoryBank] = {}
        for t, frame in enumerate(frames):
            image = load_image(frame)
            size = tuple(image.shape[-2:])
            small, big = self._video_geometry(*size)
            feats = self.encode_image(self._video_pixels(image))
            if t == 0:
                labels = load_label_map(first_mask, size=size)
                objects = [int(k) for k in torch.unique(labels) if 0 < int(k) < 255]
                if not objects:
                    raise ValueError("the first-frame mask has no object (labels 1..254)")
                for k in objects:
                    gt = MemoryEntry(
                        feats["feats"][0], self._video_mask(labels == k, small, big), 1.0, 0
                    )
                    banks[k] = MemoryBank(capacity, gt)
            ids = sorted(banks)
            refs = [(k, e) for k in ids for e in banks[k].frames()]
            tokens = self.head.pool_tokens(
                torch.stack([e.feats for _, e in refs]),
                [e.mask[None] for _, e in refs],
                ids=[torch.tensor([k]) for k, _ in refs],
                classes=[torch.tensor([k]) for k, _ in refs],
            )
            out = self.head(
                feats["feats"],
                feats["mfeat"],
                tokens.id_tokens,
                tokens.sem_tokens,
                image_sa=feats["image_sa"],
                aux=False,
            )
            logits = self._crop_resize(out["pred_id_masks"], self.video["canvas"], big, small)
            masks = logits > 0
            scores = id_scores(out["pred_id_logits"], logits)
            for k, mask, score in zip(tokens.ids.tolist(), masks, scores.tolist(), strict=True):
                entry = MemoryEntry(
                    feats["feats"][0],
                    self._video_mask(mask, small, big),
                    score if mask.any() else 0.0,
                    t,
                )
                banks[k].push(entry, t)
            ids_t = tokens.ids.view(-1, 1, 1).to(masks.device)
            label_map = (masks.long() * ids_t).amax(dim=0)  # overlaps: the largest object id
            yield resize_mask(label_map.cpu(), size)

    # -- decode and postprocess ----------------------------------------------------------------
    def decode(
        self,
        features: dict[str, torch.Tensor],
        prompt_embeddings: list[SINEPrompt],
        level: str | None = None,
    ):
        """Head outputs per prompt (final stage only).

        `level="instance"` decodes without ID tokens, as the official few-shot instance
        segmentation does (`use_id_query: False`); tokens interact, so this changes the result.
        """
        keep_ids = level != "instance"
        return [
            (
                p,
                self.head(
                    features["feats"],
                    features["mfeat"],
                    p.tokens.id_tokens if keep_ids else None,
                    p.tokens.sem_tokens,
                    image_sa=features["image_sa"],
                    aux=False,
                ),
            )
            for p in prompt_embeddings
        ]

    def to_output(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[K, 4g, 4g] -> bilinear to the canvas, crop the image region, bilinear to `size`."""
        return self._crop_resize(logits, self.canvas, self.image_size, size)

    @staticmethod
    def _crop_resize(logits: torch.Tensor, canvas: int, valid, size) -> torch.Tensor:
        """detectron2's sem_seg_postprocess: canvas -> crop `valid` (h, w) -> bilinear to `size`."""
        x = F.interpolate(
            logits[None].float(), size=(canvas, canvas), mode="bilinear", align_corners=False
        )
        x = x[..., : valid[0], : valid[1]]
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return x[0]

    def postprocess(
        self,
        raw: list,
        embedding: ImageEmbedding,
        prompts: list[Prompt],
        *,
        level: str = "semantic",
        threshold: float | None = None,
        output_size: Any = "original",
        return_logits: bool = False,
    ) -> SegmentationResult:
        """Masks per requested level (or all three), at the output size."""
        size = embedding.image_size if output_size == "original" else tuple(output_size)
        thr = self.card.default_threshold if threshold is None else float(threshold)
        parts = []
        for i, (prompt, out) in enumerate(raw):
            for lvl in LEVELS if level == "all" else (level,):
                parts.append(self._level(lvl, prompt.tokens, out, size, thr, i))
        masks = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, *size, dtype=bool)
        return SegmentationResult(
            masks=masks.cpu(),
            scores=torch.cat([p[1] for p in parts]).float().cpu(),
            labels=[lab for p in parts for lab in p[2]],
            prompt_index=torch.cat([p[3] for p in parts]),
            level=[lvl for p in parts for lvl in p[4]],
            class_ids=torch.cat([p[5] for p in parts]).cpu(),
            image=embedding.image if size == embedding.image_size else None,
            meta={
                "model": self.card.name,
                "tag": self.card.tag,
                "threshold": thr,
                "input_size": (self.canvas, self.canvas),
                "output_size": size,
            },
        )

    def _level(self, level, tokens: PooledTokens, out: dict, size, thr: float, index: int):
        """(masks, scores, labels, prompt_index, levels, class_ids) of one level of one prompt."""
        if level == "semantic":
            sem = self.to_output(semantic_map(out["pred_logits"], out["pred_masks"]), size)
            masks, classes = sem > thr, tokens.classes
            scores = sem.flatten(1).amax(dim=1)
            labels = [f"class {int(c)}" for c in classes]
        elif level == "instance":
            scores, cls, _, logits = instance_topk(
                out["pred_logits"],
                out["pred_masks"],
                self.instance_topk,
                resize=lambda m: self.to_output(m, size),
            )
            keep = scores > 0.0
            masks, scores, classes = logits[keep] > 0, scores[keep], tokens.classes[cls[keep]]
            labels = [f"class {int(c)}" for c in classes]
        else:
            logits = self.to_output(out["pred_id_masks"], size)
            masks, classes = logits > 0, tokens.ids
            scores = id_scores(out["pred_id_logits"], logits)
            labels = [f"object {int(c)}" for c in classes]
        n = len(masks)
        return (
            masks,
            scores,
            labels,
            torch.full((n,), index, dtype=torch.int64),
            [level] * n,
            classes.long(),
        )


def _shots(p: Prompt) -> tuple[VisualPrompt, ...]:
    if isinstance(p, SupportSet):
        return p.shots
    if isinstance(p, VisualPrompt):
        return (p,)
    raise TypeError(f"SINE takes reference images with masks, not {type(p).__name__}")
