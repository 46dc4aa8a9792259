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

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..backbones.dinov2 import DINOv2
from ..heads.mformer import MFormerHead, PooledTokens, id_scores, instance_topk, semantic_map
from ..imageio import content_hash, load_image, load_mask
from ..prompts import Prompt, SupportSet, VisualPrompt
from ..registry import register_model
from ..result import SegmentationResult
from ..transforms import resize_mask
from .base import ImageEmbedding, PromptSegModel

__all__ = ["SINE", "SINEPrompt"]

LEVELS = ("semantic", "instance", "identity")


@dataclass
class SINEPrompt:
    """Pooled reference tokens of one prompt, reusable for any number of targets."""

    tokens: PooledTokens  # id_tokens [N, C], sem_tokens [M, C], ids [N], classes [M]


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

    # -- decode and postprocess ----------------------------------------------------------------
    def decode(self, features: dict[str, torch.Tensor], prompt_embeddings: list[SINEPrompt]):
        """Head outputs per prompt (final stage only)."""
        return [
            (
                p,
                self.head(
                    features["feats"],
                    features["mfeat"],
                    p.tokens.id_tokens,
                    p.tokens.sem_tokens,
                    image_sa=features["image_sa"],
                    aux=False,
                ),
            )
            for p in prompt_embeddings
        ]

    def to_output(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[K, 4g, 4g] -> bilinear to the canvas, crop the image region, bilinear to `size`."""
        x = F.interpolate(
            logits[None].float(), size=(self.canvas,) * 2, mode="bilinear", align_corners=False
        )
        x = x[..., : self.image_size[0], : self.image_size[1]]
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
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
