"""ODISE: open-vocabulary panoptic, instance and semantic segmentation from diffusion features.

    backbone  diffusion_pyramid  Stable Diffusion v1.3 UNet + VAE taps over 512 windows, with the
                                 implicit captioner (CLIP image embedding -> text conditioning)
    head      mask2former        MSDeformAttn pixel decoder + masked-attention decoder: 100 masks
                                 and one mask embedding per query
    clip      open_clip CLIP     ONE copy for the captioner, MaskCLIP and the text embeddings

The image side (everything up to the masks, their embeddings and their MaskCLIP embeddings) does
not depend on the vocabulary and is cached per image; a vocabulary's text embeddings are its prompt
embedding, cached and reusable. Classification fuses the diffusion branch (cosine against projected
text embeddings) and the CLIP branch (MaskCLIP) by a geometric mean weighted per seen (COCO) and
unseen class; one forward yields every level: panoptic, instance, semantic ("all": the three).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.open_clip_vit import clip_input_tokens
from ..heads.mask_inference import instance_topk, panoptic_inference
from ..prompt_files import read_prompt_file, tensors_sha256, warn_other_model
from ..prompts import Prompt, TextPrompt, Vocabulary
from ..registry import register_model
from ..result import SegmentationResult
from ..transforms import crop_resize
from ..vocabularies import seen_flags
from .base import ImageEmbedding, PromptSegModel, compose

__all__ = ["ODISE", "VocabularyEmbedding", "ImageFeatures", "ensemble_class_scores"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PHOTO_TEMPLATE = "a photo of a {}."
TEXT_BATCH = 256  # synonyms per CLIP text call (vocabularies of 1,000+ classes)
SEMANTIC_CHUNK = 64  # classes per step of the semantic argmax at the output size
PROMPT_FORMAT = "promptseg.odise.vocabulary"


@dataclass
class VocabularyEmbedding:
    """A vocabulary's text side, computed once and reused for every image (the prompt embedding).

    diffusion_text [S, D]: projected, L2-normalised text embedding of each synonym (raw synonym for
    the label model, "a photo of a {}." for the caption model); clip_text [S, E]: normalised CLIP
    text embedding of "a photo of a {}."; synonym_class [S]: class index; seen [K]: COCO-seen.
    """

    vocabulary: Vocabulary
    diffusion_text: Tensor
    clip_text: Tensor
    synonym_class: Tensor
    seen: Tensor


@dataclass
class ImageFeatures:
    """Prompt-independent outputs for one image: mask logits [Q, Hp/4, Wp/4] over the padded
    input, mask embeddings [Q, D] and MaskCLIP embeddings [Q, E] (normalised), the diffusion
    branch's logit scale, the caption model's fg/void logits [Q, 2] (None for the label model)."""

    mask_logits: Tensor
    mask_embed: Tensor
    clip_embed: Tensor
    logit_scale: Tensor
    class_logits: Tensor | None
    padded_size: tuple[int, int]
    valid_size: tuple[int, int]


# ----------------------------------------------------------------------------------------------
# small pure functions


def max_over_synonyms(logits: Tensor, synonym_class: Tensor, n_classes: int) -> Tensor:
    """Per-synonym logits [Q, S] -> per-class maximum [Q, K]."""
    out = logits.new_full((logits.shape[0], n_classes), float("-inf"))
    index = synonym_class.to(logits.device).expand_as(logits)
    return out.scatter_reduce(1, index, logits, reduce="amax", include_self=True)


def ensemble_class_scores(
    diffusion: Tensor,
    clip: Tensor,
    void: Tensor,
    seen: Tensor,
    alpha: float,
    beta: float,
    foreground: Tensor | None = None,
) -> Tensor:
    """ODISE's fusion: class logits of both branches [Q, K], void probability [Q], seen [K] ->
    K+1 log-probabilities [Q, K+1] (softmaxed again by the post-processing, as the reference does).

    p, q = softmax of each branch; e_k = log(p^(1-w) q^w) with w = alpha for seen classes, beta
    for unseen ones (a `where`, not the reference's masked sum: an underflow gives -inf, not NaN);
    final = log([softmax(e) foreground, void] + 1e-8) with foreground = 1 - void unless given.
    The caption model's class head gives both probabilities and the reference scales by its
    foreground softmax, not by 1 - void (in float32 they differ when void is near 1).
    """
    p, q = diffusion.float().softmax(-1), clip.float().softmax(-1)
    seen_term = torch.log(p ** (1 - alpha) * q**alpha)
    unseen_term = torch.log(p ** (1 - beta) * q**beta)
    fused = torch.where(seen.to(p.device), seen_term, unseen_term).softmax(-1)
    void = void.float()[:, None]
    keep = 1 - void if foreground is None else foreground.float()[:, None]
    return torch.log(torch.cat([fused * keep, void], dim=-1) + 1e-8)


def mask_clip_attention(visible: Tensor, n_masks: int, heads: int) -> Tensor:
    """Additive attention mask [B*heads, L, L] over [mask tokens; cls; patches] from patch
    visibility [B, Q, G]: no token attends to a mask token; mask token q attends to cls and to
    the patches its mask covers; cls and patches attend as usual (their outputs are unchanged)."""
    b, q, g = visible.shape
    length = q + 1 + g
    blocked = torch.zeros(b, length, length, dtype=torch.bool, device=visible.device)
    blocked[:, :, :q] = True
    blocked[:, :q, q + 1 :] = ~visible
    additive = torch.zeros(blocked.shape, device=visible.device).masked_fill(blocked, float("-inf"))
    return additive.repeat_interleave(heads, dim=0)


class TextHead(nn.Module):
    """Projection of CLIP text embeddings into the mask-embedding space; the label model's learned
    void text (`null_embed`, official `category_head` / `word_head`)."""

    def __init__(self, clip_dim: int, dim: int, null: bool) -> None:
        super().__init__()
        self.text_proj = nn.Linear(clip_dim, dim)
        self.null_embed = nn.Parameter(torch.zeros(1, clip_dim)) if null else None


# ----------------------------------------------------------------------------------------------
# the model


@register_model("odise")
class ODISE(PromptSegModel):
    """Stable Diffusion features + Mask2Former + CLIP, open vocabulary (see the module doc)."""

    levels = ("panoptic", "instance", "semantic", "all")
    threshold_meaning = "minimum class probability of a query kept for the panoptic output"
    image_cache_size = 4

    def __init__(self, card: Any) -> None:
        super().__init__(card)
        cfg = card.config
        self.classifier = cfg["classifier"]
        if self.classifier not in ("label", "caption"):
            raise ValueError(f"classifier must be 'label' or 'caption', got {self.classifier!r}")
        self.clip = open_clip.model.CLIP(**dict(cfg["clip"])).requires_grad_(False).eval()
        clip_dim = int(cfg["clip"]["embed_dim"])
        self.backbone, self.head = compose(
            cfg["backbone"],
            {**cfg["head"], **cfg["mask2former"], "class_head": self.classifier == "caption"},
            unet=cfg["unet"],
            vae=cfg["vae"],
            caption_dim=clip_dim,
        )
        self.text_head = TextHead(clip_dim, int(cfg["mask2former"]["mask_dim"]), null=self.label)
        context = int(cfg["unet"].get("cross_attention_dim", 768))
        self.register_buffer("empty_prompt_embedding", torch.zeros(1, cfg["text_tokens"], context))
        self.alpha, self.beta = float(cfg["alpha"]), float(cfg["beta"])
        self.overlap_threshold = float(cfg["overlap_threshold"])
        self.object_mask_threshold = float(cfg["object_mask_threshold"])
        self.instances_per_image = int(cfg["instances_per_image"])
        self._text_cache = self.add_cache(8)

    @property
    def label(self) -> bool:
        """The label-supervised model (void from a learned text); else the caption model."""
        return self.classifier == "label"

    def train(self, mode: bool = True) -> ODISE:
        super().train(mode)
        self.clip.eval()  # frozen, and open_clip has no dropout to switch anyway
        return self

    # -- CLIP ------------------------------------------------------------------------------------
    def clip_pixels(self, images: Tensor) -> Tensor:
        """Images in [0, 1] [N, 3, h, w] -> CLIP input: bilinear (no antialias) to the CLIP size
        (square, aspect ratio not kept), CLIP normalisation."""
        size = self.clip.visual.image_size
        size = tuple(size) if isinstance(size, tuple | list) else (size, size)
        x = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.dtype)

    def caption_embedding(self, windows: Tensor) -> Tensor:
        """The implicit captioner's input: CLIP image embedding (projected CLS, not normalised) of
        512 windows [N, 3, w, w] in [0, 1], resized bicubic without antialias to the CLIP size."""
        size = self.clip.visual.image_size
        size = tuple(size) if isinstance(size, tuple | list) else (size, size)
        x = F.interpolate(windows.float(), size=size, mode="bicubic", align_corners=False)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return self.clip.encode_image(((x - mean) / std).to(self.dtype))

    def mask_clip(self, image: Tensor, mask_logits: Tensor) -> Tensor:
        """MaskCLIP: one embedding per mask [B, Q, E] from the unpadded image [B, 3, h, w] in
        [0, 1] and mask logits [B, Q, Hm, Wm] over the padded extent (both squashed to the CLIP
        size, so the masks are slightly stretched as in the reference). Mask tokens start as the
        class token and attend to it and to the patches their mask covers (max-pooled p >= 0.5)."""
        visual = self.clip.visual
        pixels = self.clip_pixels(image)
        tokens = clip_input_tokens(visual, pixels)  # [B, 1 + G, C]
        patch = visual.conv1.kernel_size[0]
        probs = F.interpolate(
            mask_logits.float(), size=pixels.shape[-2:], mode="bilinear", align_corners=False
        ).sigmoid()
        visible = F.max_pool2d(probs, patch, stride=patch).flatten(2) >= 0.5  # [B, Q, G]
        q = mask_logits.shape[1]
        sequence = torch.cat([tokens[:, :1].expand(-1, q, -1), tokens], dim=1)
        heads = visual.transformer.resblocks[0].attn.num_heads
        attention = mask_clip_attention(visible, q, heads).to(sequence.dtype)
        out = visual.transformer(sequence, attn_mask=attention)
        return visual.ln_post(out[:, :q]) @ visual.proj

    def encode_texts(self, texts: list[str]) -> Tensor:
        """CLIP text embeddings [N, E] (EOT features @ text_projection, not normalised), batched."""
        context = self.clip.context_length
        out = []
        for i in range(0, len(texts), TEXT_BATCH):
            tokens = open_clip.tokenize(texts[i : i + TEXT_BATCH], context_length=context)
            out.append(self.clip.encode_text(tokens.to(self.device)).float())
        return torch.cat(out)

    # -- the four steps ----------------------------------------------------------------------------
    def encoded(self, image: Tensor, key: str, input: str) -> ImageFeatures:
        """encode_image of one image, cached; MaskCLIP needs the unpadded size besides pixels."""
        hit = self._image_cache.get((key, input))
        if hit is None:
            valid = self.input_size(tuple(image.shape[-2:]), input)
            hit = self.encode_image(self.preprocess(image, input), input, valid_size=valid)
            self._image_cache.put((key, input), hit)
        return hit

    def encode_image(
        self, pixels: Tensor, input: str = "default", valid_size: tuple[int, int] | None = None
    ) -> ImageFeatures:
        """Padded pixels [1, 3, Hp, Wp] in [0, 1] -> masks, mask embeddings, MaskCLIP embeddings."""
        padded = tuple(pixels.shape[-2:])
        valid = tuple(valid_size) if valid_size is not None else padded
        features = self.backbone(
            pixels,
            image_embedder=self.caption_embedding,
            text_embedding=self.empty_prompt_embedding,
        )
        out = self.head(features, aux=False)
        mask_logits = out["pred_masks"]  # [1, Q, Hp/4, Wp/4]
        clip_embed = self.mask_clip(pixels[..., : valid[0], : valid[1]], mask_logits)
        class_logits = out["pred_logits"]
        return ImageFeatures(
            mask_logits=mask_logits[0],
            mask_embed=F.normalize(out["mask_embed"][0].float(), dim=-1),
            clip_embed=F.normalize(clip_embed[0].float(), dim=-1),
            logit_scale=out["logit_scale"].float(),
            class_logits=None if class_logits is None else class_logits[0].float(),
            padded_size=padded,
            valid_size=valid,
        )

    def vocabulary_of(self, prompts: list[Prompt]) -> Vocabulary:
        """The one vocabulary of a prompt list: a Vocabulary, or texts (one class each, things)."""
        if len(prompts) == 1 and isinstance(prompts[0], Vocabulary):
            return prompts[0]
        if prompts and all(isinstance(p, TextPrompt) for p in prompts):
            return Vocabulary([p.text for p in prompts])
        raise ValueError(
            f"{self.card.name} takes one Vocabulary (e.g. Vocabulary('cat,kitty;dog') or "
            "Vocabulary.preset('ade20k_150')) or a list of class names, not "
            f"{[type(p).__name__ for p in prompts]}"
        )

    def encode_prompt(
        self, prompts: list[Prompt], level: str | None = None
    ) -> list[VocabularyEmbedding]:
        """The vocabulary's text embeddings (cached per vocabulary)."""
        vocabulary = self.vocabulary_of(prompts)
        hit = self._text_cache.get(vocabulary)
        if hit is None:
            synonyms = [s for c in vocabulary.classes for s in c]
            photo = [PHOTO_TEMPLATE.format(s) for s in synonyms]
            clip_text = self.encode_texts(photo)
            diffusion = clip_text if not self.label else self.encode_texts(synonyms)
            projected = self.text_head.text_proj(diffusion.to(self.dtype)).float()
            owner = [k for k, c in enumerate(vocabulary.classes) for _ in c]
            hit = VocabularyEmbedding(
                vocabulary=vocabulary,
                diffusion_text=F.normalize(projected, dim=-1),
                clip_text=F.normalize(clip_text, dim=-1),
                synonym_class=torch.tensor(owner, device=self.device),
                seen=torch.tensor(seen_flags(vocabulary), device=self.device),
            )
            self._text_cache.put(vocabulary, hit)
        return [hit]

    def decode(
        self, features: dict[str, ImageFeatures], prompt_embeddings: Any, level: str
    ) -> tuple[Tensor, ImageFeatures, Vocabulary]:
        """Per-query class log-probabilities [Q, K+1] (last = void), the image features and the
        vocabulary they score."""
        f = features["default"]
        (text,) = self.as_prompt_embedding(prompt_embeddings) or prompt_embeddings
        k = len(text.vocabulary)
        diffusion = f.logit_scale * f.mask_embed @ text.diffusion_text.T  # [Q, S]
        diffusion = max_over_synonyms(diffusion, text.synonym_class, k)
        clip_scale = self.clip.logit_scale.exp().clamp(max=100).float()
        clip = max_over_synonyms(
            clip_scale * f.clip_embed @ text.clip_text.T, text.synonym_class, k
        )
        foreground = None
        if self.label:
            null = F.normalize(self.text_head.text_proj(self.text_head.null_embed).float(), dim=-1)
            void_logit = f.logit_scale * f.mask_embed @ null.T  # [Q, 1]
            void = torch.cat([diffusion, void_logit], dim=-1).softmax(-1)[:, -1]
        else:
            foreground, void = f.class_logits.softmax(-1).unbind(-1)
        scores = ensemble_class_scores(
            diffusion, clip, void, text.seen, self.alpha, self.beta, foreground=foreground
        )
        return scores, f, text.vocabulary

    def postprocess(
        self,
        raw: tuple[Tensor, ImageFeatures, Vocabulary],
        embedding: ImageEmbedding,
        prompts: list[Prompt],
        *,
        level: str,
        threshold: float | None,
        size: tuple[int, int],
        return_logits: bool,
    ) -> SegmentationResult:
        """Masks at `size` for one level or all three; `threshold` is the minimum class
        probability of a query kept for panoptic (default: the config's object_mask_threshold)."""
        scores, f, vocabulary = raw
        probs = scores.softmax(-1)  # [Q, K+1]
        canvas = F.interpolate(
            f.mask_logits[None].float(), size=f.padded_size, mode="bilinear", align_corners=False
        )[0]
        mask_logits = crop_resize(canvas, f.valid_size, size)  # [Q, H, W]
        mask_probs = mask_logits.sigmoid()
        levels = ("panoptic", "instance", "semantic") if level == "all" else (level,)
        parts: list[dict[str, Any]] = []
        panoptic = None
        for lvl in levels:
            if lvl == "panoptic":
                part, panoptic = self._panoptic(probs, mask_probs, vocabulary, threshold)
            elif lvl == "instance":
                part = self._instances(scores, mask_logits, vocabulary)
            else:
                part = self._semantic(probs, mask_probs, vocabulary, return_logits)
            parts.append(part)
        h, w = size
        masks = torch.cat([p["masks"] for p in parts]) if parts else torch.zeros(0, h, w)
        logits = None
        if return_logits:
            logits = torch.cat([p["logits"] for p in parts])
        return SegmentationResult(
            masks=masks.bool().cpu(),
            scores=torch.cat([p["scores"] for p in parts]).float().cpu(),
            labels=[label for p in parts for label in p["labels"]],
            prompt_index=torch.zeros(len(masks), dtype=torch.int64),
            level=[lvl for p, lvl in zip(parts, levels, strict=True) for _ in p["labels"]],
            class_ids=torch.cat([p["class_ids"] for p in parts]).to(torch.int64).cpu(),
            logits=None if logits is None else logits.float().cpu(),
            panoptic=panoptic,
            meta={"vocabulary_size": len(vocabulary), "classifier": self.classifier},
        )

    # -- the three levels --------------------------------------------------------------------------
    def _panoptic(
        self, probs: Tensor, mask_probs: Tensor, vocabulary: Vocabulary, threshold: float | None
    ) -> tuple[dict[str, Any], dict]:
        minimum = self.object_mask_threshold if threshold is None else threshold
        id_map, segments = panoptic_inference(
            probs,
            mask_probs,
            vocabulary.is_thing,
            overlap_threshold=self.overlap_threshold,
            object_mask_threshold=minimum,
        )
        ids = torch.tensor([s["id"] for s in segments], dtype=torch.int32, device=id_map.device)
        masks = id_map[None] == ids[:, None, None]
        names = vocabulary.names
        part = {
            "masks": masks.cpu(),
            "scores": torch.tensor([s["score"] for s in segments]),
            "labels": [names[s["category_id"]] for s in segments],
            "class_ids": torch.tensor([s["category_id"] for s in segments], dtype=torch.int64),
            "logits": torch.where(masks, 1.0, -1.0).float().cpu(),
        }
        return part, {"id_map": id_map.cpu(), "segments_info": segments}

    def _instances(
        self, scores: Tensor, mask_logits: Tensor, vocabulary: Vocabulary
    ) -> dict[str, Any]:
        """Top-k (query, class) pairs of thing classes; score = class prob x mean mask prob."""
        instance_scores, classes, _, logits = instance_topk(
            scores, mask_logits, self.instances_per_image
        )
        things = torch.tensor(vocabulary.is_thing, device=classes.device)[classes]
        instance_scores, classes, logits = instance_scores[things], classes[things], logits[things]
        names = vocabulary.names
        return {
            "masks": (logits > 0).cpu(),
            "scores": instance_scores.cpu(),
            "labels": [names[c] for c in classes.tolist()],
            "class_ids": classes.cpu(),
            "logits": logits.cpu(),
        }

    def _semantic(
        self, probs: Tensor, mask_probs: Tensor, vocabulary: Vocabulary, full: bool
    ) -> dict[str, Any]:
        """One mask per class: the argmax regions of sum_q prob(q, k) mask_prob(q) (possibly
        empty); score = that map capped at 1 and averaged over the region (`semantic_scores`).
        Computed class chunk by class chunk, so a 1,000-class vocabulary never holds the
        [K, H, W] map unless asked for."""
        k = probs.shape[1] - 1
        best = torch.full(mask_probs.shape[1:], -1.0, device=mask_probs.device)
        label = torch.zeros(mask_probs.shape[1:], dtype=torch.int64, device=mask_probs.device)
        chunks = []
        for start in range(0, k, SEMANTIC_CHUNK):
            stop = min(start + SEMANTIC_CHUNK, k)  # never the void column K
            part = torch.einsum("qk,qhw->khw", probs[:, start:stop], mask_probs)
            value, index = part.max(dim=0)
            better = value > best
            best = torch.where(better, value, best)
            label = torch.where(better, index + start, label)
            if full:
                chunks.append(part.cpu())
        classes = torch.arange(k, device=label.device)
        masks = label[None] == classes[:, None, None]  # [K, H, W]
        area = masks.flatten(1).sum(1)
        capped = best.clamp(max=1).flatten()  # each pixel's map value of its own class
        sums = torch.zeros(k, device=label.device).index_add_(0, label.flatten(), capped)
        return {
            "masks": masks.cpu(),
            "scores": torch.where(area > 0, sums / area.clamp(min=1), 0.0).cpu(),
            "labels": vocabulary.names,
            "class_ids": classes.cpu(),
            "logits": torch.cat(chunks) if full else None,
        }

    # -- prompt embeddings, reused without re-encoding -------------------------------------------
    def as_prompt_embedding(self, obj: Any) -> list[VocabularyEmbedding] | None:
        """A VocabularyEmbedding (or a one-item list of it) as this family's prompt embedding."""
        if isinstance(obj, list | tuple) and len(obj) == 1:
            obj = obj[0]
        if isinstance(obj, VocabularyEmbedding):
            return [obj]
        return None

    def save_prompt_embedding(self, embeddings: Any, path: str | os.PathLike[str]) -> None:
        """Write a vocabulary's text embeddings (and the vocabulary itself) as safetensors."""
        found = self.as_prompt_embedding(embeddings)
        if found is None:
            raise TypeError(
                "expected what encode_prompt returned (a VocabularyEmbedding), got "
                f"{type(embeddings).__name__}"
            )
        (e,) = found
        tensors = {
            "diffusion_text": e.diffusion_text.float().cpu().contiguous(),
            "clip_text": e.clip_text.float().cpu().contiguous(),
            "synonym_class": e.synonym_class.cpu().contiguous(),
            "seen": e.seen.to(torch.uint8).cpu().contiguous(),
        }
        vocabulary = {"classes": e.vocabulary.classes, "is_thing": e.vocabulary.is_thing}
        meta = {
            "format": PROMPT_FORMAT,
            "version": "1",
            "model": self.card.name,
            "prompts": json.dumps(vocabulary),  # the vocabulary these embeddings encode
            "sha256": tensors_sha256(tensors),
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(tensors, str(path), metadata=meta)

    def load_prompt_embedding(self, path: str | os.PathLike[str]) -> list[VocabularyEmbedding]:
        """Read a file of save_prompt_embedding (checked) onto this model's device."""
        tensors, meta = read_prompt_file(
            path, "ODISE", PROMPT_FORMAT, "write one with model.save_prompt_embedding"
        )
        if meta.get("version") != "1" or meta.get("sha256") != tensors_sha256(tensors):
            raise ValueError(
                f"{path}: unknown version or tensors that do not match their checksum (the file "
                "was changed or damaged); encode the vocabulary again"
            )
        try:
            stored = json.loads(meta["prompts"])
            vocabulary = Vocabulary(stored["classes"], stored["is_thing"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: its vocabulary metadata is unreadable ({exc})") from exc
        synonyms = sum(len(c) for c in vocabulary.classes)
        dim = self.text_head.text_proj.out_features
        expected = {
            "diffusion_text": (synonyms, dim),
            "clip_text": (synonyms, int(self.card.config["clip"]["embed_dim"])),
            "synonym_class": (synonyms,),
            "seen": (len(vocabulary),),
        }
        for key, shape in expected.items():
            if key not in tensors or tuple(tensors[key].shape) != shape:
                got = tuple(tensors[key].shape) if key in tensors else "missing"
                raise ValueError(f"{path}: {key} must have shape {shape}, got {got}")
        warn_other_model(meta, self.card.name, path)
        embedding = VocabularyEmbedding(
            vocabulary=vocabulary,
            diffusion_text=tensors["diffusion_text"].to(self.device),
            clip_text=tensors["clip_text"].to(self.device),
            synonym_class=tensors["synonym_class"].to(self.device),
            seen=tensors["seen"].bool().to(self.device),
        )
        return self.as_prompt_embedding([embedding])
