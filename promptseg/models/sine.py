"""SINE (Liu et al., 2024): in-context segmentation at three levels from one forward pass.

    backbone = dinov2   (backbones/dinov2.py; frozen, last block before its final norm)
    head     = mformer  (heads/mformer.py; neck, mask pooling, in-context fusion, M-Former)

Both are zoo.yaml `config.backbone` / `config.head` entries built through the registry: any
backbone that provides a single-scale feature map can replace DINOv2 (e.g. a CLIP ViT-B/16,
`open_clip_vit`). References (k shots, each a mask with a class and optionally an object id) are
pooled into ID tokens (one per object) and semantic tokens (one per class). The target is decoded
into `identity` masks (the same objects), `instance` masks (top-k, scored and classed) and
`semantic` masks (one per class, semantic map > 0.7). Pre-processing follows the official
protocol of each level: semantic and identity use the FSS one (the default data config: squash to
`input_size`, RGB, pad to `canvas`), instance the FSOD one (the `instance` data config: longer
side to 896 keeping the aspect, BGR, pad to 896), video the VOS one (sine_video.py).

Caching: a reference is used only through mask pooling, so the pooled (sum, pixel count) of every
(reference image, token mask, protocol) is kept in an LRU; tokens of any shot combination are
exact sums of those. Whole target features are kept per (image, input) for the last few images.
Prompt files: sine_prompts.py.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from typing import Any

import torch
import torch.nn.functional as F

from ..heads.mask_inference import instance_topk, semantic_map, semantic_scores
from ..heads.mformer import (
    PooledTokens,
    id_scores,
    tokens_from_sums,
    unbatch,
)
from ..imageio import content_hash, load_image, load_mask
from ..prompt_files import warn_other_model
from ..prompts import Prompt, SupportSet, VisualPrompt, reference_label
from ..registry import register_model
from ..result import SegmentationResult
from ..transforms import crop_resize, resize_logits, resize_mask
from .base import ImageEmbedding, PromptSegModel, compose
from .sine_prompts import SINEPrompt, load_prompts, save_prompts
from .sine_video import SINEVideo

__all__ = ["SINE"]

PROTOCOL = {"semantic": "fss", "identity": "fss", "instance": "fsod"}  # level -> pre-processing
INPUT = {"fss": "default", "fsod": "instance"}  # protocol -> named data config


def protocols_for(level: str) -> tuple[str, ...]:
    """Pre-processing protocols an output level needs ("all": every protocol)."""
    levels = tuple(PROTOCOL) if level == "all" else (level,)
    return tuple(dict.fromkeys(PROTOCOL[lvl] for lvl in levels))


@register_model("sine")
class SINE(SINEVideo, PromptSegModel):
    """k-shot references -> identity / instance / semantic masks of a target image.

    Classes are the distinct `class_id`s of the shots, so every class has at least one shot by
    construction (an empty SupportSet is rejected). Identity masks: one per object id, however
    many; the decoder's S instance queries do not bound them (ID queries are extra rows). Instance
    masks: at most `instance_topk` (100) (query, class) pairs of the S x M, those with score > 0 —
    an empty mask scores 0, so no instance mask is empty (the official [0, 0, 1, 1] box for empty
    masks never arises). Reference masks of any size are resized nearest to their image.

    Scores: identity and instance masks score class prob x mean mask prob, in [0, 1]; a semantic
    mask scores the peak of its semantic map, a sum over the `head.num_queries` queries of class
    prob x mask prob, so it lies in [0, num_queries] and may exceed 1 (official threshold 0.7).
    """

    levels = ("semantic", "instance", "identity", "all")
    default_threshold = 0.7  # official semantic-map threshold
    threshold_meaning = "minimum of the semantic map (class x mask probability summed over queries)"
    image_cache_size = 2  # whole target features (~72 MB each for ViT-L at 896)
    reference_cache_size = 4096  # pooled (sum, count) entries, ~1 KB each at C = 256

    def __init__(self, card: Any) -> None:
        super().__init__(card)
        cfg = card.config
        self.backbone, self.head = compose(cfg["backbone"], cfg["head"])
        self.instance_topk = int(cfg.get("instance_topk", 100))
        self.video = self.data_configs["video"]  # short_side, canvas, memory (+ mean, std)
        self._pooled = self.add_cache(self.reference_cache_size)  # (proto, image, mask) -> pool

    def input_names(self, level: str) -> tuple[str, ...]:
        """The named data configs of the protocols a level needs."""
        return tuple(INPUT[p] for p in protocols_for(level))

    def canvas(self, protocol: str) -> int:
        """Side of the zero-padded square a protocol's images are placed on."""
        return int(self.data_configs[INPUT[protocol]]["canvas"])

    # -- images --------------------------------------------------------------------------------
    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Neck features [B, C, g, g] of canvas pixels (frozen encoder + trainable neck)."""
        return self.head.neck(self.backbone.forward_features(pixels)["map"])

    def encode_image(self, pixels: torch.Tensor, input: str = "default") -> dict[str, torch.Tensor]:
        """Target-only parts (cached per image): neck features, mask features, fusion SA."""
        feats = self.features(pixels)
        return {
            "feats": feats,
            "mfeat": self.head.mask_features(feats),
            "image_sa": self.head.image_self_attention(feats),
        }

    def _reference_features(self, image: torch.Tensor, key: str, protocol: str) -> torch.Tensor:
        """Neck features [C, g, g] of a reference (reusing a cached target's when it is one)."""
        hit = self._image_cache.get((key, INPUT[protocol]))
        if hit is not None:
            return hit["feats"][0]
        return self.features(self.preprocess(image, INPUT[protocol]))[0]

    def _canvas_mask(self, mask: torch.Tensor, protocol: str = "fss") -> torch.Tensor:
        """bool [H, W] (at its image's size) -> float [canvas, canvas]: nearest, zero padding."""
        m = resize_mask(mask, self.input_size(tuple(mask.shape[-2:]), INPUT[protocol])).float()
        canvas = self.canvas(protocol)
        return F.pad(m, (0, canvas - m.shape[1], 0, canvas - m.shape[0]))

    # -- prompts -------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_prompt(self, prompts: list[Prompt], level: str | None = None) -> list[SINEPrompt]:
        """One SINEPrompt per prompt with the tokens `level` needs (None: every level's).

        Inference only (cached pools must not hold autograd graphs); training pools with
        `head.pool_tokens` directly.
        """
        protocols = tuple(INPUT) if level is None else protocols_for(level)
        return [self._encode_references(_shots(p), protocols) for p in prompts]

    def as_prompt_embedding(self, obj: Any) -> list[SINEPrompt] | None:
        """A SINEPrompt or a list of them (encode_prompt / load_prompt_embedding) as a batch."""
        if isinstance(obj, SINEPrompt):
            obj = [obj]
        if isinstance(obj, (list, tuple)) and obj and all(isinstance(p, SINEPrompt) for p in obj):
            return [self._to_model(p) for p in obj]
        return None

    def _to_model(self, prompt: SINEPrompt) -> SINEPrompt:
        """The prompt with its tensors on this model's device (tokens in its dtype)."""
        for t in prompt.tokens.values():
            if t.sem_tokens.shape[-1] != self.head.dim:
                raise ValueError(
                    f"the prompt embedding has {t.sem_tokens.shape[-1]}-d tokens but "
                    f"{self.card.name} uses {self.head.dim}-d ones; encode the references with "
                    "this model (model.encode_prompt)"
                )
        return SINEPrompt(
            {
                proto: PooledTokens(
                    t.id_tokens.to(self.device, self.dtype),
                    t.sem_tokens.to(self.device, self.dtype),
                    t.ids.to(self.device),
                    t.classes.to(self.device),
                )
                for proto, t in prompt.tokens.items()
            }
        )

    def save_prompt_embedding(self, embeddings: Any, path: str | os.PathLike[str]) -> None:
        """Write encode_prompt's SINEPrompts to a safetensors file (tensors + metadata only)."""
        prompts = self.as_prompt_embedding(embeddings)
        if prompts is None:
            raise TypeError(
                f"expected what encode_prompt returned (a SINEPrompt or a list of them), "
                f"got {type(embeddings).__name__}"
            )
        save_prompts(prompts, path, {"model": self.card.name, "dim": str(self.head.dim)})

    def load_prompt_embedding(self, path: str | os.PathLike[str]) -> list[SINEPrompt]:
        """Read SINEPrompts saved by save_prompt_embedding / SINEPrompt.save, on this device."""
        prompts, meta = load_prompts(path)
        warn_other_model(meta, self.card.name, path)
        return [self._to_model(p) for p in prompts]

    def _encode_references(
        self, shots: tuple[VisualPrompt, ...], protocols: tuple[str, ...]
    ) -> SINEPrompt:
        """Group shots by image content, give unnamed objects fresh ids, pool per protocol."""
        groups: dict[str, dict[str, Any]] = {}
        next_id = max([s.object_id for s in shots if s.object_id is not None], default=-1) + 1
        for shot in shots:
            image = load_image(shot.image)
            mask = load_mask(shot.mask, size=tuple(image.shape[-2:]))  # nearest to its image
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
            g["masks"].append(mask)
            g["ids"].append(object_id)
            g["classes"].append(int(shot.class_id))
        ids = torch.tensor(sorted({i for g in groups.values() for i in g["ids"]}))
        classes = torch.tensor(sorted({c for g in groups.values() for c in g["classes"]}))
        return SINEPrompt({p: self._pool(groups, ids, classes, p) for p in protocols})

    def _pool(
        self, groups: dict[str, dict[str, Any]], ids: torch.Tensor, classes: torch.Tensor, protocol
    ) -> PooledTokens:
        """Tokens [ID (fss only); semantic]: per token, the union of its masks in each image,
        pooled (cached per (image, union mask)), summed over images / total pixel count."""
        rows = [("ids", int(i)) for i in ids] if protocol == "fss" else []
        rows += [("classes", int(c)) for c in classes]
        row_of = {row: r for r, row in enumerate(rows)}
        sums = torch.zeros(len(rows), self.head.dim, device=self.device)  # [N + M, C], fp32
        counts = torch.zeros(len(rows), device=self.device)  # [N + M]
        for key, g in groups.items():
            masks = torch.stack(g["masks"])  # bool [K, H, W]
            found: dict[int, tuple[Hashable, torch.Tensor]] = {}  # row -> (cache key, canvas)
            for kind in ("ids", "classes"):
                labels = torch.tensor(g[kind])  # [K]
                for value in dict.fromkeys(g[kind]):  # the tokens this image has masks for
                    if (kind, value) in row_of:
                        canvas = self._canvas_mask(masks[labels == value].any(0), protocol)
                        found[row_of[kind, value]] = ((protocol, key, content_hash(canvas)), canvas)
            pooled = {r: self._pooled.get(k) for r, (k, _) in found.items()}
            missing = [r for r, v in pooled.items() if v is None]
            if missing:
                feats = self._reference_features(g["image"], key, protocol)  # [C, g, g]
                stacked = torch.stack([found[r][1] for r in missing]).to(self.device)
                (s,), (n,) = self.head.pool_sums(feats[None], [stacked])  # [K', C], [K']
                for r, s_r, n_r in zip(missing, s, n, strict=True):
                    pooled[r] = (s_r, n_r)
                    self._pooled.put(found[r][0], pooled[r])
            for r, (s_r, n_r) in pooled.items():
                sums[r] += s_r.float()
                counts[r] += n_r.float()
        tokens = tokens_from_sums(sums, counts).to(self.dtype)
        n = len(ids) if protocol == "fss" else 0
        return PooledTokens(
            tokens[:n], tokens[n:], ids.to(self.device)[:n], classes.to(self.device)
        )

    # -- decode and postprocess ----------------------------------------------------------------
    def decode(
        self,
        features: dict[str, dict[str, torch.Tensor]],
        prompt_embeddings: list[SINEPrompt],
        level: str,
    ) -> list[tuple[SINEPrompt, dict[str, dict]]]:
        """Head outputs (final stage, one target) per prompt and per protocol the level needs.

        The instance level decodes without ID tokens, as the official few-shot instance
        segmentation does (`use_id_query: False`); tokens interact, so this changes the result.
        """
        raw = []
        for p in prompt_embeddings:
            outs = {}
            for proto in protocols_for(level):
                tokens, f = _tokens(p, proto), features[INPUT[proto]]
                out = self.head(
                    f["feats"],
                    f["mfeat"],
                    None if proto == "fsod" else tokens.id_tokens,
                    tokens.sem_tokens,
                    image_sa=f["image_sa"],
                    aux=False,
                )
                outs[proto] = unbatch(out)[0]
            raw.append((p, outs))
        return raw

    def postprocess(
        self,
        raw: list[tuple[SINEPrompt, dict[str, dict]]],
        embedding: ImageEmbedding,
        prompts: list[Prompt],
        *,
        level: str,
        threshold: float,
        size: tuple[int, int],
        return_logits: bool,
    ) -> SegmentationResult:
        """Masks per requested level (or all three), at the output size."""
        parts = []
        for i, (prompt, outs) in enumerate(raw):
            for lvl in tuple(PROTOCOL) if level == "all" else (level,):
                proto = PROTOCOL[lvl]
                frame = (
                    self.canvas(proto),
                    self.input_size(embedding.image_size, INPUT[proto]),
                    size,
                )
                parts.append(
                    self._level(lvl, prompt.tokens[proto], outs[proto], frame, threshold, i)
                )
        masks = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, *size, dtype=bool)
        return SegmentationResult(
            masks=masks.cpu(),
            scores=torch.cat([p[1] for p in parts]).float().cpu(),
            labels=[lab for p in parts for lab in p[2]],
            prompt_index=torch.cat([p[3] for p in parts]),
            level=[lvl for p in parts for lvl in p[4]],
            class_ids=torch.cat([p[5] for p in parts]).cpu(),
        )

    def _level(
        self, level: str, tokens: PooledTokens, out: dict, frame: tuple, thr: float, index: int
    ) -> tuple:
        """(masks, scores, labels, prompt_index, levels, class_ids) of one level of one prompt.

        `frame` = (canvas, valid (h', w'), output size): logits go to the canvas, are cropped to
        the image region and resized to the output.
        """
        canvas, valid, size = frame
        if level == "semantic":  # official order: logits to the canvas, then sigmoid and sum
            sem = semantic_map(
                out["pred_logits"],
                out["pred_masks"],
                resize=lambda m: resize_logits(m, (canvas,) * 2),
            )  # [M, canvas, canvas]
            sem = crop_resize(sem, valid, size)
            masks, classes = sem > thr, tokens.classes
            scores = semantic_scores(sem, masks)
        elif level == "instance":
            scores, cls, _, logits = instance_topk(
                out["pred_logits"],
                out["pred_masks"],
                self.instance_topk,
                resize=lambda m: crop_resize(resize_logits(m, (canvas, canvas)), valid, size),
            )
            keep = scores > 0.0  # an empty mask scores 0: never returned
            masks, scores, classes = logits[keep] > 0, scores[keep], tokens.classes[cls[keep]]
        else:
            logits = crop_resize(resize_logits(out["pred_id_masks"], (canvas, canvas)), valid, size)
            masks, classes = logits > 0, tokens.ids
            scores = id_scores(out["pred_id_logits"], logits)
        if level == "identity":
            several = tokens.ids.unique().numel() > 1
            labels = [
                reference_label(index, object_id=int(c) if several else None) for c in classes
            ]
        else:
            several = tokens.classes.unique().numel() > 1
            labels = [reference_label(index, class_id=int(c) if several else None) for c in classes]
        n = len(masks)
        return (
            masks,
            scores,
            labels,
            torch.full((n,), index, dtype=torch.int64),
            [level] * n,
            classes.long(),
        )


def _tokens(prompt: SINEPrompt, protocol: str) -> PooledTokens:
    """A prompt's tokens for one protocol, or an error saying how to get them."""
    if protocol not in prompt.tokens:
        levels = [lvl for lvl, p in PROTOCOL.items() if p == protocol]
        raise ValueError(
            f"this SINE prompt embedding has no tokens for the {levels} level(s) (protocol "
            f"{protocol!r}; it has {sorted(prompt.tokens)}); encode the references with "
            "model.encode_prompt(prompts) (no level: every level) or with that level"
        )
    return prompt.tokens[protocol]


def _shots(p: Prompt) -> tuple[VisualPrompt, ...]:
    if isinstance(p, SupportSet):
        return p.shots
    if isinstance(p, VisualPrompt):
        return (p,)
    raise TypeError(f"SINE takes reference images with masks, not {type(p).__name__}")
