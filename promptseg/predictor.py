"""`Predictor`: keep what does not depend on the prompt, so each new prompt costs only a decode.

    pred = Predictor(model)
    pred.set_image("kitchen.jpg")        # backbone runs once
    pred.predict("a cup"); pred.predict(["a plate", "a fork"])   # decoder only

The image cache is keyed by the image's content hash: setting the same pixels again is free,
setting other pixels always recomputes, so a prediction never comes from a stale image.
A prompt can be set once (`set_prompt`) or as an embedding saved earlier
(`set_prompt_embedding(model.load_prompt_embedding(path))`), then reused for every image.
"""

from __future__ import annotations

from typing import Any

import torch

from .imageio import ImageInput, content_hash, load_image
from .models.base import ImageEmbedding, PromptSegModel
from .prompts import Prompt
from .result import SegmentationResult

__all__ = ["Predictor"]


class Predictor:
    """Image-feature (and prompt-embedding) cache around a PromptSegModel."""

    def __init__(self, model: PromptSegModel) -> None:
        if not isinstance(model, PromptSegModel):
            raise TypeError(f"Predictor needs a promptseg model, got {type(model).__name__}")
        self.model = model
        self._embedding: ImageEmbedding | None = None
        self._prompts: list[Prompt] | None = None
        self._prompt_embeddings: Any = None

    @property
    def is_image_set(self) -> bool:
        return self._embedding is not None

    def set_image(self, image: ImageInput) -> None:
        """Encode `image` unless the cached embedding is of identical pixels."""
        img = load_image(image)
        if self._embedding is not None and self._embedding.key == content_hash(img):
            return
        self._embedding = self.model.embed_image(img)

    def reset_image(self) -> None:
        """Forget the cached image embedding."""
        self._embedding = None

    def get_image_embedding(self) -> ImageEmbedding:
        """The cached embedding (features + original image), e.g. to store and reuse later."""
        if self._embedding is None:
            raise RuntimeError("no image is set; call set_image(image) first")
        return self._embedding

    def set_image_embedding(self, embedding: ImageEmbedding) -> None:
        """Reuse an embedding from get_image_embedding() (same model) without re-encoding."""
        if not isinstance(embedding, ImageEmbedding):
            raise TypeError(f"expected an ImageEmbedding, got {type(embedding).__name__}")
        if embedding.model and embedding.model != self.model.card.name:
            raise ValueError(
                f"this embedding was computed by {embedding.model}, not {self.model.card.name}; "
                "image features of one model do not fit another: call set_image(image) instead"
            )
        self._embedding = embedding

    def set_prompt(self, prompt: Any) -> None:
        """Encode a prompt once; later `predict()` calls without a prompt reuse it."""
        self._prompts = self.model.prepare_prompts(prompt)
        with torch.inference_mode():
            self._prompt_embeddings = self.model.encode_prompt(self._prompts)

    def set_prompt_embedding(self, embeddings: Any) -> None:
        """Reuse a prompt embedding (model.encode_prompt / load_prompt_embedding) as the prompt."""
        prompt_embeddings = self.model.as_prompt_embedding(embeddings)
        if prompt_embeddings is None:
            raise TypeError(
                f"{self.model.card.name} cannot use a {type(embeddings).__name__} as a prompt "
                "embedding; pass what its encode_prompt() or load_prompt_embedding() returned"
            )
        self._prompts, self._prompt_embeddings = [], prompt_embeddings

    def predict(self, prompt: Any = None, **kwargs: Any) -> SegmentationResult:
        """Segment the set image; `prompt=None` uses the prompt given to set_prompt().

        `prompt` may also be a prompt embedding (encode_prompt / load_prompt_embedding).
        """
        embedding = self.get_image_embedding()
        if prompt is None:
            if self._prompts is None:
                raise RuntimeError("no prompt given and none set; pass one or call set_prompt()")
            prompts, cached = self._prompts, self._prompt_embeddings
        elif (cached := self.model.as_prompt_embedding(prompt)) is not None:
            prompts = []
        else:
            prompts = self.model.prepare_prompts(prompt)
        kwargs["level"] = self.model.check_level(kwargs.get("level"))
        return self.model.run(embedding, prompts, cached, **kwargs)
