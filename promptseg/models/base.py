"""`PromptSegModel`: the four steps every family implements, and `segment()` that chains them.

encode_image (cacheable per image) -> encode_prompt (cacheable per prompt) -> decode -> postprocess.
The Predictor calls the same steps, keeping the first two between calls. Shared here, once for
every family: composing a backbone and a head from the registry, named preprocessing configs
(one per model input), dtype and device, caches that follow the weights, validation of
`level` / `threshold` / `output_size`, the output size and the result's metadata.
"""

from __future__ import annotations

import inspect
import numbers
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..backbones.base import Backbone
from ..cache import LRUCache
from ..contracts import check_compatible
from ..errors import UnsupportedPromptError
from ..heads.base import Head
from ..imageio import ImageInput, MaskInput, content_hash, load_image
from ..prompts import Prompt, as_prompt, prompt_kind
from ..registry import lookup, registered
from ..result import SegmentationResult
from ..transforms import named_data_configs, preprocess, resized_size

__all__ = [
    "PromptSegModel",
    "ImageEmbedding",
    "OutputSize",
    "compose",
    "check_frames",
    "check_output_size",
    "check_threshold",
]

OutputSize = str | tuple[int, int]
MAX_OUTPUT_SIDE = 65536
_KIND_NEEDS = {
    "text": {"text"},
    "visual": {"visual"},
    "mixed": {"text", "visual"},
    "few_shot": {"few_shot"},
    "open_vocab": {"open_vocab"},
}


@dataclass
class ImageEmbedding:
    """What `encode_image` computed for one image (per model input), plus the original image."""

    features: dict[str, Any]  # input name ("default", ...) -> encode_image output
    image: torch.Tensor  # uint8 [3, H, W], the original image
    key: str  # content hash of `image`, so a cache is never stale
    seconds: float = 0.0
    model: str = ""  # name of the model that computed it: features of another model do not fit

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.image.shape[-2]), int(self.image.shape[-1])


# -- composition --------------------------------------------------------------------------------
def _build(kind: str, config: Mapping[str, Any], **fixed: Any) -> Any:
    """Instantiate a registered class from {name: ..., **kwargs} plus fixed keyword arguments."""
    config = dict(config)
    cls = lookup(kind, config.pop("name"))
    factory = cls.from_features if kind == "head" else cls
    try:
        return factory(**fixed, **config)
    except TypeError as exc:
        accepted = sorted(
            p for p in inspect.signature(cls).parameters if p not in ("self", "output", "features")
        )
        raise TypeError(f"{kind} {cls.__name__}: {exc}; it takes {', '.join(accepted)}") from None


def compose(
    backbone: Mapping[str, Any], head: Mapping[str, Any], **requests: Any
) -> tuple[Backbone, Head]:
    """Build a backbone and a head from their zoo.yaml entries ({name, **config}).

    The head states the feature kind it needs; the backbone is built for that kind (an
    incompatible pair raises naming both contracts). `requests` are extra backbone arguments the
    family asks for (e.g. which blocks to tap), passed where the backbone takes them.
    """
    head_cls = lookup("head", head["name"])
    backbone_cls = lookup("backbone", backbone["name"])
    check_compatible(backbone["name"], backbone_cls.provides, head["name"], head_cls.needs)
    accepted = inspect.signature(backbone_cls).parameters
    extra = {k: v for k, v in requests.items() if k in accepted and k not in backbone}
    built = _build("backbone", backbone, output=head_cls.needs, **extra)
    return built, _build("head", head, features=built.feature_info)


# -- argument checks (at the edge, before any heavy work) ------------------------------------
def check_threshold(threshold: Any) -> float:
    """A probability threshold as a float in [0, 1], or a ValueError saying what was given."""
    if isinstance(threshold, bool):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold must be in [0, 1] (a probability), got {value}")
    return value


def check_output_size(output_size: Any) -> str | tuple[int, int]:
    """'original' | 'input' | (H, W) of positive ints (tuple, list or array), else ValueError."""
    if isinstance(output_size, str):
        if output_size in ("original", "input"):
            return output_size
    elif isinstance(output_size, Sequence | torch.Tensor) or hasattr(output_size, "__array__"):
        sides = list(output_size) if len(output_size) == 2 else []
        if len(sides) == 2 and all(_is_int(s) and 0 < int(s) <= MAX_OUTPUT_SIDE for s in sides):
            return int(sides[0]), int(sides[1])
    raise ValueError(
        f"output_size must be 'original', 'input' or (H, W) with integer sides in "
        f"1..{MAX_OUTPUT_SIDE}, got {output_size!r}"
    )


def check_frames(frames: Any) -> Sequence[ImageInput]:
    """`segment_video`'s frames as a non-empty sequence, else an error saying what to pass."""
    if isinstance(frames, (str, bytes, os.PathLike)) or not isinstance(frames, Sequence):
        raise TypeError(
            f"frames must be a list of images (paths, arrays, ...), got {type(frames).__name__}; "
            "for a folder pass sorted(Path(folder).glob('*.jpg'))"
        )
    if len(frames) == 0:
        raise ValueError("frames is empty; pass at least the first frame")
    return frames


def _is_int(value: Any) -> bool:
    """True for Python / numpy / 0-d torch integers (not bools, not floats)."""
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def models_with(capabilities: set[str]) -> str:
    """The architectures that have every one of `capabilities`, those with released weights
    marked, for error messages (test models left out)."""
    from ..zoo import list_models, model_info

    names = []
    for name in list_models():
        card = model_info(name)
        if "." in name or name.startswith("test_") or not capabilities <= card.capabilities:
            continue
        names.append(f"{name} (released weights)" if card.weights else name)
    return ", ".join(names) or "none yet"


class PromptSegModel(nn.Module, ABC):
    """Base of every family; subclasses implement encode_image/encode_prompt/decode/postprocess.

    Class attributes a family sets: `levels` (its output levels, default first; "all" = every
    one from one pass), `default_threshold` (when the card has none) and `threshold_meaning` (what
    it is compared with, in words), `fp32_modules` (submodules kept in float32 whatever dtype the
    model is cast to), `image_cache_size` (encoded images kept per (image, input), 0 = none),
    `input_component` (input name -> the submodule its pixels feed, whose dtype they take).
    """

    levels: ClassVar[tuple[str, ...]] = ()
    default_threshold: ClassVar[float | None] = None
    threshold_meaning: ClassVar[str] = "minimum mask probability of a pixel"
    fp32_modules: ClassVar[tuple[str, ...]] = ()
    image_cache_size: ClassVar[int] = 0
    input_component: ClassVar[dict[str, str]] = {}

    def __init__(self, card: Any) -> None:
        super().__init__()
        self.card = card
        self.data_configs = named_data_configs(card.data_config)
        # follows .to()/.half(): the model's device and compute dtype, whatever its parameters
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)
        self._caches: list[LRUCache] = []
        self._image_cache = self.add_cache(self.image_cache_size)

    @property
    def capabilities(self) -> frozenset[str]:
        return self.card.capabilities

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (modules in `fp32_modules` stay float32 beside it)."""
        return self._anchor.dtype

    def component_dtype(self, name: str) -> torch.dtype:
        """dtype of the submodule `name` (float32 for `fp32_modules`, else the model's)."""
        return torch.float32 if name in self.fp32_modules else self.dtype

    # -- caches that follow the weights ---------------------------------------------------------
    def add_cache(self, capacity: int) -> LRUCache:
        """An LRU cache dropped whenever the weights, device, dtype or mode change."""
        cache = LRUCache(capacity)
        self._caches.append(cache)
        return cache

    def clear_caches(self) -> None:
        """Forget cached image features and prompt pieces (valid only for the current weights)."""
        for cache in self._caches:
            cache.clear()

    def train(self, mode: bool = True) -> PromptSegModel:
        """Switch mode; caches are dropped, since training changes the weights they came from."""
        self.clear_caches()
        return super().train(mode)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """nn.Module.load_state_dict, dropping caches computed with the old weights."""
        self.clear_caches()
        return super().load_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> PromptSegModel:
        """Every .to() / .cuda() / .half() passes here: caches keep the old device and dtype, so
        they are dropped, and `fp32_modules` are put back to float32."""
        self.clear_caches()
        super()._apply(fn, *args, **kwargs)
        for name in self.fp32_modules:
            getattr(self, name).float()
        return self

    # -- the four steps -------------------------------------------------------------------------
    def input_names(self, level: str) -> tuple[str, ...]:
        """Named preprocessing configs (model inputs) an output level needs."""
        return ("default",)

    @abstractmethod
    def encode_image(self, pixels: torch.Tensor, input: str = "default") -> Any:
        """Prompt-independent features of preprocessed pixels [1, 3, h, w] of one input."""

    @abstractmethod
    def encode_prompt(self, prompts: list[Prompt], level: str | None = None) -> Any:
        """Prompt embeddings of a batch of prompts (for one level; None: every level's)."""

    @abstractmethod
    def decode(self, features: dict[str, Any], prompt_embeddings: Any, level: str) -> Any:
        """Raw outputs of every prompt against one image's features {input name: features}."""

    @abstractmethod
    def postprocess(
        self,
        raw: Any,
        embedding: ImageEmbedding,
        prompts: list[Prompt],
        *,
        level: str,
        threshold: float,
        size: tuple[int, int],
        return_logits: bool,
    ) -> SegmentationResult:
        """Masks at `size` (already resolved from output_size) from the raw outputs."""

    # -- shared plumbing ------------------------------------------------------------------------
    def preprocess(self, image: torch.Tensor, input: str = "default") -> torch.Tensor:
        """uint8 [3, H, W] -> normalised (padded) model input [1, 3, h, w] of a named config."""
        dtype = self.component_dtype(self.input_component.get(input, "backbone"))
        return preprocess(image, self.data_configs[input], dtype).to(self.device)

    def input_size(self, image_size: tuple[int, int], input: str = "default") -> tuple[int, int]:
        """(h', w') the image occupies at an input's resolution, without padding."""
        return resized_size(image_size, self.data_configs[input])

    def encoded(self, image: torch.Tensor, key: str, input: str) -> Any:
        """encode_image of one image for one input, from the image cache when possible."""
        hit = self._image_cache.get((key, input))
        if hit is None:
            hit = self.encode_image(self.preprocess(image, input), input)
            self._image_cache.put((key, input), hit)
        return hit

    def embed_image(self, image: ImageInput, level: str | None = None) -> ImageEmbedding:
        """Load an image and run the prompt-independent part of the model for `level`'s inputs."""
        img = load_image(image)
        key = content_hash(img)
        start = time.perf_counter()
        with torch.inference_mode():
            features = {
                n: self.encoded(img, key, n) for n in self.input_names(self.check_level(level))
            }
        return ImageEmbedding(features, img, key, time.perf_counter() - start, self.card.name)

    # -- prompt embeddings, reused without re-encoding ------------------------------------------
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
        able = sorted(
            name
            for name, cls in registered("model family").items()
            if isinstance(cls, type)
            and cls.save_prompt_embedding is not PromptSegModel.save_prompt_embedding
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
                raise UnsupportedPromptError(
                    f"{self.card.name} cannot take a {type(p).__name__} ({kind} prompt); "
                    "it supports "
                    f"{sorted(self.capabilities & set().union(*_KIND_NEEDS.values()))}. "
                    f"Models that take {kind} prompts: {models_with(missing)}"
                )
        return prompts

    def segment_video(
        self, frames: Sequence[ImageInput], first_mask: MaskInput
    ) -> Iterator[torch.Tensor]:
        """Label maps int64 [H, W] per frame, objects numbered as in `first_mask` (frame 0)."""
        raise UnsupportedPromptError(
            f"{self.card.name} does not segment videos; models that do: {models_with({'video'})}"
        )

    def check_level(self, level: Any) -> str:
        """The output level to produce: `level` if this family has it, else its default."""
        if level is None:
            return self.levels[0]
        if not isinstance(level, str) or level not in self.levels:
            raise ValueError(
                f"{self.card.name} has no output level {level!r}; choose from {list(self.levels)}"
            )
        return level

    def output_size(
        self, output_size: Any, embedding: ImageEmbedding, level: str
    ) -> tuple[int, int]:
        """'original' -> the image's size, 'input' -> its size at the level's first input, or
        (H, W) itself."""
        output_size = check_output_size(output_size)
        if output_size == "original":
            return embedding.image_size
        if output_size == "input":
            return self.input_size(embedding.image_size, self.input_names(level)[0])
        return output_size

    def decode_many(
        self, features: list[dict[str, Any]], prompt_embeddings: Any, level: str
    ) -> list[Any]:
        """`decode` of several images against the same prompt embeddings; families that can
        batch the images into one call (DiffewS) override it."""
        return [self.decode(f, prompt_embeddings, level) for f in features]

    def run(
        self,
        embedding: ImageEmbedding,
        prompts: list[Prompt],
        prompt_embeddings: Any = None,
        **options: Any,
    ) -> SegmentationResult:
        """Decode prompts against an image embedding and postprocess to a result (see run_many)."""
        return self.run_many([embedding], prompts, prompt_embeddings, **options)[0]

    def run_many(
        self,
        embeddings: Sequence[ImageEmbedding],
        prompts: list[Prompt],
        prompt_embeddings: Any = None,
        *,
        level: str | None = None,
        threshold: float | None = None,
        output_size: Any = "original",
        return_logits: bool = False,
    ) -> list[SegmentationResult]:
        """Decode prompts (encoded once) against image embeddings and postprocess each.

        Inputs the level needs that an embedding lacks (a Predictor image set before the level
        was chosen) are encoded here first. `meta["timings"]["decode"]` is the time of the
        images' decode call divided by their number.
        """
        level = self.check_level(level)
        threshold = self.card.default_threshold if threshold is None else threshold
        threshold = self.default_threshold if threshold is None else threshold
        threshold = None if threshold is None else check_threshold(threshold)
        n = len(embeddings)
        timings = {}
        with torch.inference_mode():
            start = time.perf_counter()
            for embedding in embeddings:
                for name in self.input_names(level):
                    if name not in embedding.features:
                        embedding.features[name] = self.encoded(
                            embedding.image, embedding.key, name
                        )
            extra_encode = (time.perf_counter() - start) / max(n, 1)
            start = time.perf_counter()
            if prompt_embeddings is None:
                prompt_embeddings = self.encode_prompt(prompts, level)
            timings["encode_prompt"] = time.perf_counter() - start
            start = time.perf_counter()
            raws = self.decode_many([e.features for e in embeddings], prompt_embeddings, level)
            timings["decode"] = (time.perf_counter() - start) / max(n, 1)
            results = []
            for embedding, raw in zip(embeddings, raws, strict=True):
                size = self.output_size(output_size, embedding, level)
                start = time.perf_counter()
                result = self.postprocess(
                    raw,
                    embedding,
                    prompts,
                    level=level,
                    threshold=threshold,
                    size=size,
                    return_logits=bool(return_logits),
                )
                own = {
                    **timings,
                    "encode_image": embedding.seconds + extra_encode,
                    "postprocess": time.perf_counter() - start,
                }
                results.append(self._finish(result, embedding, level, threshold, size, own))
        return results

    def _finish(
        self,
        result: SegmentationResult,
        embedding: ImageEmbedding,
        level: str,
        threshold: float | None,
        size: tuple[int, int],
        timings: dict[str, float],
    ) -> SegmentationResult:
        """Fill a result's meta (model, level, sizes, weights, timings) and its image."""
        first_input = self.input_names(level)[0]
        result.meta = {
            "model": self.card.name,
            "tag": self.card.tag,
            "level": level,
            "threshold": threshold,
            "input_size": self.input_size(embedding.image_size, first_input),
            "output_size": size,
            "weights_sha256": self.card.weights_sha256,
            **result.meta,
            "timings": {**result.meta.get("timings", {}), **timings},
        }
        if result.image is None and size == embedding.image_size:
            result.image = embedding.image
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
        family takes `prompt_embeddings=` (what `encode_prompt(prompts, level)` returned) with
        the prompts they encode, so a prompt encoded once serves many images.
        """
        return self.segment_many(
            [image],
            prompt,
            level=level,
            threshold=threshold,
            output_size=output_size,
            return_logits=return_logits,
            prompt_embeddings=prompt_embeddings,
        )[0]

    def segment_many(
        self,
        images: Sequence[ImageInput],
        prompt: Any,
        *,
        level: str | None = None,
        threshold: float | None = None,
        output_size: OutputSize = "original",
        return_logits: bool = False,
        prompt_embeddings: Any = None,
    ) -> list[SegmentationResult]:
        """`segment` of several images with one prompt, encoded once: one result per image.

        Families that batch queries decode the images together (DiffewS: one UNet call for all
        of them against the support bank); the others decode them one after another.
        """
        if isinstance(images, str | os.PathLike) or not isinstance(images, Sequence) or not images:
            raise TypeError(
                "images must be a non-empty list of images (paths, PIL images, HxWx3 arrays); "
                f"got {type(images).__name__}. For one image use segment(image, prompt)"
            )
        level = self.check_level(level)
        if threshold is not None:
            check_threshold(threshold)
        check_output_size(output_size)
        if prompt is None and prompt_embeddings is None:
            raise TypeError(
                "prompt is None; give a text, a VisualPrompt(image, mask), a SupportSet, a "
                "Vocabulary, a list of them, or prompt_embeddings="
            )
        if prompt_embeddings is None and (stored := self.as_prompt_embedding(prompt)) is not None:
            prompt, prompt_embeddings = None, stored
        prompts = [] if prompt is None else self.prepare_prompts(prompt)
        return self.run_many(
            [self.embed_image(image, level) for image in images],
            prompts,
            prompt_embeddings,
            level=level,
            threshold=threshold,
            output_size=output_size,
            return_logits=return_logits,
        )
