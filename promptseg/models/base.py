"""`PromptSegModel`: the four steps every family implements, and `segment()` that chains them.

encode_image (cacheable per image) -> encode_prompt (cacheable per prompt) -> decode -> postprocess.
The Predictor calls the same steps, keeping the first two between calls. Families whose prompt
embeddings are tensors only (SINE) can also save them to disk and take them back in `segment`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedPromptError
from ..imageio import ImageInput, MaskInput, content_hash, load_image
from ..prompts import Prompt, as_prompt, prompt_kind
from ..result import SegmentationResult
from ..transforms import preprocess

__all__ = ["PromptSegModel", "ImageEmbedding", "OutputSize"]

OutputSize = str | tuple[int, int]
_KIND_NEEDS = {
    "text": {"text"},
    "visual": {"visual"},
    "mixed": {"text", "visual"},
    "few_shot": {"few_shot"},
    "open_vocab": {"open_vocab"},
}


@dataclass
class ImageEmbedding:
    """What `encode_image` computed for one image, plus what postprocessing needs of the image."""

    features: Any
    image: torch.Tensor  # uint8 [3, H, W], the original image
    key: str  # content hash of `image`, so a cache is never stale
    seconds: float = 0.0
    model: str = ""  # name of the model that computed it: features of another model do not fit

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.image.shape[-2]), int(self.image.shape[-1])


def check_threshold(threshold: Any) -> float:
    """A probability threshold as a float in [0, 1], or a ValueError saying what was given."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold must be in [0, 1] (a probability), got {value}")
    return value


class PromptSegModel(nn.Module):
    """Base of every family; subclasses implement encode_image/encode_prompt/decode/postprocess."""

    levels: tuple[str, ...] = ()

    def __init__(self, card: Any) -> None:
        super().__init__()
        self.card = card

    @property
    def capabilities(self) -> frozenset[str]:
        return self.card.capabilities

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # -- the four steps -------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> Any:
        raise NotImplementedError

    def encode_prompt(self, prompts: list[Prompt]) -> Any:
        raise NotImplementedError

    def decode(self, features: Any, prompt_embeddings: Any, level: str | None = None) -> Any:
        raise NotImplementedError

    def postprocess(self, raw: Any, embedding: ImageEmbedding, prompts: list[Prompt], **kw: Any):
        raise NotImplementedError

    # -- shared plumbing ------------------------------------------------------------------
    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 [3, H, W] -> model input [1, 3, h, w] on the model's device and dtype."""
        return preprocess(image, self.card.data_config, self.dtype).to(self.device)

    def embed_image(self, image: ImageInput, level: str | None = None) -> ImageEmbedding:
        """Load an image and run the prompt-independent part of the model on it.

        `level` is for families whose preprocessing depends on the output level (SINE).
        """
        img = load_image(image)
        start = time.perf_counter()
        with torch.inference_mode():
            features = self.encode_image(self.preprocess(img))
        seconds = time.perf_counter() - start
        return ImageEmbedding(features, img, content_hash(img), seconds, self.card.name)

    def embed_prompt(self, prompts: list[Prompt], level: str | None = None) -> Any:
        """encode_prompt for one output level (families whose prompt encoding depends on it
        override this; others encode the same way for every level)."""
        return self.encode_prompt(prompts)

    # -- prompt embeddings, reused without re-encoding ---------------------------------------------
    def as_prompt_embedding(self, obj: Any) -> Any:
        """`obj` as this family's prompt embedding (what encode_prompt returned), or None."""
        return None

    def save_prompt_embedding(self, embeddings: Any, path: str | os.PathLike[str]) -> None:
        """Write what encode_prompt returned to a tensor-only file, to reuse it later."""
        raise UnsupportedPromptError(self._no_prompt_files())

    def load_prompt_embedding(self, path: str | os.PathLike[str]) -> Any:
        """Read a file of save_prompt_embedding; pass the result to segment() or a Predictor."""
        raise UnsupportedPromptError(self._no_prompt_files())

    def _no_prompt_files(self) -> str:
        """Error text: this family cannot save/load prompt embeddings; which families can."""
        from ..registry import MODELS
        from ..zoo import FAMILIES, import_family

        for family in FAMILIES:
            import_family(family)
        able = sorted(
            name
            for name, cls in MODELS.items()
            if cls.save_prompt_embedding is not PromptSegModel.save_prompt_embedding
        )
        return (
            f"{self.card.name} ({self.card.family}) cannot save or load prompt embeddings; "
            f"pass the prompt itself to segment(). Families that can: {', '.join(able) or 'none'}"
        )

    def prepare_prompts(self, prompt: Any) -> list[Prompt]:
        """Normalise a user prompt and check this model can take every item of it."""
        prompts = as_prompt(prompt)
        for p in prompts:
            kind = prompt_kind(p)
            missing = _KIND_NEEDS[kind] - self.capabilities
            if missing:
                from ..zoo import list_models, model_info

                able = [
                    n for n in list_models(pretrained=True) if missing <= model_info(n).capabilities
                ]
                raise UnsupportedPromptError(
                    f"{self.card.name} cannot take a {type(p).__name__} ({kind} prompt); "
                    "it supports "
                    f"{sorted(self.capabilities & set().union(*_KIND_NEEDS.values()))}. "
                    f"Models that take {kind} prompts: {', '.join(able) or 'none yet'}"
                )
        return prompts

    def segment_video(
        self, frames: Sequence[ImageInput], first_mask: MaskInput
    ) -> Iterator[torch.Tensor]:
        """Label maps int64 [H, W] per frame, objects numbered as in `first_mask` (frame 0)."""
        from ..zoo import list_models

        able = ", ".join(list_models(pretrained=True, capability="video")) or "none yet"
        raise UnsupportedPromptError(
            f"{self.card.name} does not segment videos; models that do: {able}"
        )

    def check_level(self, level: str | None) -> str:
        """The output level to produce: `level` if this family has it, else its default."""
        if level is None:
            return self.levels[0]
        if level not in self.levels:
            raise ValueError(
                f"{self.card.name} has no output level {level!r}; choose from {list(self.levels)}"
            )
        return level

    def run(
        self,
        embedding: ImageEmbedding,
        prompts: list[Prompt],
        prompt_embeddings: Any = None,
        **kw: Any,
    ) -> SegmentationResult:
        """Decode prompts against a cached image embedding and postprocess to a result."""
        if kw.get("threshold") is not None:
            kw["threshold"] = check_threshold(kw["threshold"])
        timings = {"encode_image": embedding.seconds}
        with torch.inference_mode():
            start = time.perf_counter()
            if prompt_embeddings is None:
                prompt_embeddings = self.embed_prompt(prompts, kw.get("level"))
            timings["encode_prompt"] = time.perf_counter() - start
            start = time.perf_counter()
            raw = self.decode(embedding.features, prompt_embeddings, kw.get("level"))
            timings["decode"] = time.perf_counter() - start
            start = time.perf_counter()
            result = self.postprocess(raw, embedding, prompts, **kw)
            timings["postprocess"] = time.perf_counter() - start
        result.meta.setdefault("timings", {}).update(timings)
        return result

    def segment(
        self,
        image: ImageInput,
        prompt: Any,
        *,
        level: str | None = None,
        threshold: float | None = None,
        output_size: OutputSize = "original",
        return_logits: bool = False,
        prompt_embeddings: Any = None,
    ) -> SegmentationResult:
        """Segment what `prompt` describes in `image`; masks come back at the original size.

        `prompt` may also be a prompt embedding (what encode_prompt or load_prompt_embedding
        returned, for families that have them): it is used as is, without re-encoding. Any
        family takes `prompt_embeddings=` (what `embed_prompt(prompts)` returned) with the
        prompts they encode, so a prompt encoded once serves many images.
        """
        level = self.check_level(level)
        if prompt_embeddings is None and (stored := self.as_prompt_embedding(prompt)) is not None:
            prompt, prompt_embeddings = None, stored
        prompts = [] if prompt is None else self.prepare_prompts(prompt)
        return self.run(
            self.embed_image(image, level),
            prompts,
            prompt_embeddings,
            level=level,
            threshold=threshold,
            output_size=output_size,
            return_logits=return_logits,
        )
