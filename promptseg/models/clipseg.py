"""CLIPSeg (Lüddecke & Ecker, CVPR 2022): CLIP ViT-B/16 backbone + FiLM transformer decoder.

    backbone     = open_clip_vit  (backbones/open_clip_vit.py; frozen, taps blocks 3, 6, 9)
    text_encoder = OpenCLIPText   (backbones/open_clip_vit.py; CLIP's text tower, frozen)
    head         = film_decoder   (heads/film_decoder.py; needs ViT token taps)

The backbone and head are zoo.yaml `config.backbone` / `config.head` entries built through the
registry: any backbone that provides ViT token taps can replace CLIP's image tower (the paper's
ViTSeg baseline: an ImageNet ViT, `timm_vit`), CLIP's text tower staying the prompt encoder.
Visual prompts need a CLIP image tower as the backbone (its image embedding).

A prompt becomes one 512-d conditional vector: the CLIP text embedding of a text, the CLIP image
embedding of an "engineered" reference (object kept, background blurred and darkened, cropped
around the object), or a linear mix of both. The image is encoded once per call whatever the
number of prompts; each prompt then costs one small decoder pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..backbones.open_clip_vit import OpenCLIPText
from ..imageio import load_image, load_mask
from ..prompts import MixedPrompt, Prompt, SupportSet, TextPrompt, VisualPrompt, reference_label
from ..registry import register_model
from ..result import SegmentationResult
from ..transforms import resize_logits, resize_mask
from .base import ImageEmbedding, PromptSegModel, compose

__all__ = ["CLIPSeg", "engineer_visual_prompt", "gaussian_blur"]


# -- visual prompt engineering ("crop + background blur + intensity 10%") --------------------------
def gaussian_blur(x: torch.Tensor, kernel_size: int = 15, sigma: float = 3.0) -> torch.Tensor:
    """Separable Gaussian blur of [C, H, W] with reflect-101 borders (= cv2.GaussianBlur)."""
    r = kernel_size // 2
    t = torch.arange(kernel_size, dtype=torch.float64) - r
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[0]
    y = F.pad(x[None], (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return y[0]


def _mask_box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1), end-exclusive, of the mask's pixels with 10% context per axis.

    An empty mask gives the whole image.
    """
    h, w = mask.shape
    if not mask.any():
        return 0, h, 0, w
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    dy, dx = 0.1 * (y1 - y0), 0.1 * (x1 - x0)
    return int(max(0, y0 - dy)), int(min(h, y1 + dy)), int(max(0, x0 - dx)), int(min(w, x1 + dx))


def engineer_visual_prompt(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalised support [3, S, S] + bool mask [S, S] -> the image CLIP embeds as the prompt.

    Operates on the *normalised* image, so darkening pulls the background to the mean colour.
    """
    m = mask.to(image.dtype)
    u = image * m + 0.1 * gaussian_blur(image) * (1 - m)
    y0, y1, x0, x1 = _mask_box(mask)
    crop = u[:, y0:y1, x0:x1]
    h, w = crop.shape[-2:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    crop = F.pad(crop, (left, side - w - left, top, side - h - top))
    return F.interpolate(crop[None], size=image.shape[-2:], mode="nearest")[0]


# -- the model ----------------------------------------------------------------------------------
@register_model("clipseg")
class CLIPSeg(PromptSegModel):
    """Text / visual / mixed prompts -> one binary mask per prompt."""

    levels = ("semantic",)
    default_threshold = 0.3

    def __init__(self, card: Any) -> None:
        super().__init__(card)
        cfg = card.config
        self.backbone, self.head = compose(
            cfg["backbone"], cfg["head"], taps=tuple(cfg["extract_layers"])
        )
        self.text_encoder = OpenCLIPText(**cfg["text_encoder"])

    @property
    def capabilities(self) -> frozenset[str]:
        """The card's, without visual prompts when the backbone has no CLIP image embedding."""
        if hasattr(self.backbone, "encode_image"):
            return self.card.capabilities
        return self.card.capabilities - {"visual"}

    # -- image side (cacheable) -----------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor, input: str = "default") -> torch.Tensor:
        """[B, 3, S, S] -> reduced taps [n_taps, B, 1 + g*g, D], deepest first."""
        taps = self.backbone.forward_features(pixels)
        return self.head.project([taps[k] for k in self.backbone.feature_info.keys])

    # -- prompt side (cacheable) ----------------------------------------------------------------
    def encode_prompt(self, prompts: list[Prompt], level: str | None = None) -> torch.Tensor:
        """Conditional vectors [P, embed_dim], texts and references each embedded in one batch."""
        texts = [_text_of(p) for p in prompts if isinstance(p, (TextPrompt, MixedPrompt))]
        refs = [_single_reference(p) for p in prompts if not isinstance(p, TextPrompt)]
        text_emb = iter(self.embed_texts(texts)) if texts else iter(())
        visual_emb = iter(self.embed_references(refs)) if refs else iter(())
        rows = []
        for p in prompts:  # consumes both iterators in the order the lists were built
            if isinstance(p, TextPrompt):
                rows.append(next(text_emb))
            elif isinstance(p, MixedPrompt):
                w = float(p.text_weight)
                rows.append(w * next(text_emb) + (1 - w) * next(visual_emb))
            else:
                rows.append(next(visual_emb))
        return torch.stack(rows)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """CLIP text embeddings [T, embed_dim] (raw strings, no template, unnormalised)."""
        ids = self.text_encoder.tokenize(texts).to(self.device)
        return self.text_encoder(ids)

    def embed_references(self, refs: list[VisualPrompt]) -> torch.Tensor:
        """CLIP image embeddings [R, embed_dim] of engineered references at the input size."""
        batch = []
        for ref in refs:
            img = load_image(ref.image)
            mask = load_mask(ref.mask, size=tuple(img.shape[-2:]))
            pixels = self.preprocess(img)[0]
            mask = resize_mask(mask, tuple(pixels.shape[-2:]))
            if not mask.any():
                raise ValueError(
                    f"the reference mask marks no pixel at the model's input size "
                    f"{tuple(pixels.shape[-2:])}: it is empty, or its object is too small to "
                    "survive the (nearest) resize. Mark the object (an all-ones mask means the "
                    "whole image), or crop the reference image around a small object."
                )
            batch.append(engineer_visual_prompt(pixels, mask.to(pixels.device)))
        return self.backbone.encode_image(torch.stack(batch))

    # -- decode and postprocess -----------------------------------------------------------------
    def decode(
        self,
        features: dict[str, torch.Tensor],
        prompt_embeddings: torch.Tensor,
        level: str = "semantic",
    ) -> torch.Tensor:
        """Logits [P, S, S] of every prompt against the (single) cached image."""
        reduced = features["default"]
        return self.head(reduced, prompt_embeddings.to(reduced.dtype))

    def postprocess(
        self,
        raw: torch.Tensor,
        embedding: ImageEmbedding,
        prompts: list[Prompt],
        *,
        level: str,
        threshold: float,
        size: tuple[int, int],
        return_logits: bool,
    ) -> SegmentationResult:
        """Resize logits (bilinear) to the output size, then sigmoid > threshold per prompt."""
        probs = torch.sigmoid(resize_logits(raw, size)).cpu()
        masks = probs > threshold
        area = masks.sum(dim=(1, 2))
        scores = torch.where(area > 0, (probs * masks).sum(dim=(1, 2)) / area.clamp(min=1), 0.0)
        return SegmentationResult(
            masks=masks,
            scores=scores.float(),
            labels=[_label(p, i) for i, p in enumerate(prompts)],
            prompt_index=torch.arange(len(prompts)),
            level=[level] * len(prompts),
            logits=raw.float().cpu() if return_logits else None,
            meta={"score": "mean foreground probability inside the mask"},
        )


def _text_of(p: TextPrompt | MixedPrompt) -> str:
    return p.text if isinstance(p, TextPrompt) else p.text.text


def _single_reference(p: Prompt) -> VisualPrompt:
    if isinstance(p, MixedPrompt):
        return p.visual
    if isinstance(p, SupportSet):
        return p.shots[0]  # prepare_prompts admits one-shot sets only
    return p


def _label(p: Prompt, i: int) -> str:
    if isinstance(p, TextPrompt):
        return p.text
    if isinstance(p, MixedPrompt):
        return f"{p.text.text} + {reference_label(i)}"
    return reference_label(i)
