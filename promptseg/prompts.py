"""Typed prompts, and `as_prompt()` that turns whatever a user passes into a batch of them.

A prompt says *what* to segment; models translate prompts into tensors, backbones and heads never
see these types. Images and masks stay as the user gave them until a model loads them, so a prompt
is cheap to build and a bad file fails with the file's name when it is read.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from .imageio import ImageInput, MaskInput

__all__ = [
    "TextPrompt",
    "VisualPrompt",
    "MixedPrompt",
    "SupportSet",
    "Vocabulary",
    "Prompt",
    "as_prompt",
    "prompt_kind",
]


@dataclass(frozen=True)
class TextPrompt:
    """A free-text description of what to segment ("a cup", "something to fill")."""

    text: str

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"TextPrompt.text must be a str, got {type(self.text).__name__}")
        if not self.text.strip():
            raise ValueError("TextPrompt.text is empty; describe what to segment, e.g. 'a cup'")


@dataclass(frozen=True, eq=False)
class VisualPrompt:
    """A reference image and a binary mask of the object to find in the target image.

    `class_id` groups masks of the same class and `object_id` names one object across several
    references (video memory, multi-instance references); `None` means "a new object". Both are
    ints in 0..2**31 - 1 (numpy integers are converted), checked here so a bad id fails at once.
    """

    image: ImageInput
    mask: MaskInput
    class_id: int = 0
    object_id: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_id", _check_id(self.class_id, "class_id"))
        if self.object_id is not None:
            object.__setattr__(self, "object_id", _check_id(self.object_id, "object_id"))


@dataclass(frozen=True)
class MixedPrompt:
    """A linear mix of a text and a visual prompt: `w * text + (1 - w) * visual` (CLIPSeg)."""

    text: TextPrompt
    visual: VisualPrompt
    text_weight: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.text, str):
            object.__setattr__(self, "text", TextPrompt(self.text))
        if not isinstance(self.text, TextPrompt):
            raise TypeError(
                f"MixedPrompt.text must be a str or TextPrompt, got {type(self.text).__name__}; "
                "e.g. MixedPrompt('a cup', VisualPrompt(image, mask), 0.5)"
            )
        if _is_pair(self.visual):
            object.__setattr__(self, "visual", _as_visual(self.visual, where="MixedPrompt.visual"))
        if not isinstance(self.visual, VisualPrompt):
            raise TypeError(
                "MixedPrompt.visual must be a VisualPrompt or an (image, mask) pair, got "
                f"{type(self.visual).__name__}"
            )
        w = self.text_weight
        if (
            isinstance(w, bool)
            or not isinstance(w, numbers.Real)
            or not math.isfinite(w)
            or not 0.0 <= w <= 1.0
        ):
            raise ValueError(f"MixedPrompt.text_weight must be a number in [0, 1], got {w!r}")
        object.__setattr__(self, "text_weight", float(w))


@dataclass(frozen=True, eq=False)
class SupportSet:
    """Several references (k shots) that together define what to segment.

    Built from `VisualPrompt`s or `(image, mask)` pairs; one image may appear several times with
    different masks (several objects or classes in one reference).
    """

    shots: tuple[VisualPrompt, ...]

    def __init__(self, shots: Iterable[VisualPrompt | tuple[Any, Any]]) -> None:
        if isinstance(shots, (str, bytes, VisualPrompt)) or not isinstance(shots, Iterable):
            raise TypeError(
                f"SupportSet takes a list of VisualPrompts or (image, mask) pairs, got "
                f"{type(shots).__name__}; wrap a single shot in a list"
            )
        items = tuple(_as_visual(s, where="SupportSet") for s in shots)
        if not items:
            raise ValueError("SupportSet is empty; give at least one (image, mask) pair")
        object.__setattr__(self, "shots", items)

    def __len__(self) -> int:
        return len(self.shots)

    def __iter__(self):
        return iter(self.shots)

    @property
    def class_ids(self) -> list[int]:
        """Distinct class ids in first-seen order."""
        return list(dict.fromkeys(s.class_id for s in self.shots))


@dataclass(frozen=True)
class Vocabulary:
    """An open vocabulary: classes, each a list of synonyms (the first is the display name)."""

    classes: tuple[tuple[str, ...], ...]
    is_thing: tuple[bool, ...] = field(default=())

    def __init__(
        self, classes: Sequence[str | Sequence[str]] | str, is_thing: Sequence[bool] | None = None
    ) -> None:
        if isinstance(classes, str):
            classes = [c.split(",") for c in classes.split(";")]
        parsed = tuple(
            tuple(s.strip() for s in ([c] if isinstance(c, str) else c) if s.strip())
            for c in classes
        )
        if not parsed or any(not c for c in parsed):
            raise ValueError(
                "Vocabulary needs at least one class and no empty class; "
                "pass e.g. ['cat', ['dog', 'puppy']] or 'cat;dog,puppy'"
            )
        things = tuple(bool(t) for t in is_thing) if is_thing is not None else (True,) * len(parsed)
        if len(things) != len(parsed):
            raise ValueError(f"is_thing has {len(things)} flags for {len(parsed)} classes")
        object.__setattr__(self, "classes", parsed)
        object.__setattr__(self, "is_thing", things)

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        """Display name of each class."""
        return [c[0] for c in self.classes]


Prompt = TextPrompt | VisualPrompt | MixedPrompt | SupportSet | Vocabulary
_PROMPT_TYPES = (TextPrompt, VisualPrompt, MixedPrompt, SupportSet, Vocabulary)
_ARRAYS = (np.ndarray, torch.Tensor, Image.Image)

ACCEPTED = (
    "a str, TextPrompt, VisualPrompt, MixedPrompt, SupportSet, Vocabulary, an (image, mask) pair, "
    "or a non-empty list of these (a list of (image, mask) pairs is one k-shot SupportSet)"
)


def prompt_kind(prompt: Prompt) -> str:
    """The capability a prompt needs: text, visual, few_shot or open_vocab."""
    if isinstance(prompt, TextPrompt):
        return "text"
    if isinstance(prompt, VisualPrompt):
        return "visual"
    if isinstance(prompt, MixedPrompt):
        return "mixed"
    if isinstance(prompt, SupportSet):
        return "visual" if len(prompt) == 1 else "few_shot"
    return "open_vocab"


def as_prompt(obj: Any) -> list[Prompt]:
    """Normalise anything a user passes as a prompt into a non-empty batch of typed prompts.

    `str` -> one TextPrompt; `list[str]` -> one TextPrompt each (decoded together);
    `(image, mask)` -> one VisualPrompt; a list of `(image, mask)` pairs -> one k-shot SupportSet.
    """
    if isinstance(obj, _PROMPT_TYPES):
        return [obj]
    if isinstance(obj, str):
        return [TextPrompt(obj)]
    if _is_pair(obj):
        return [_as_visual(obj, where="prompt")]
    if isinstance(obj, (list, tuple)):
        if not obj:
            raise ValueError(f"the prompt list is empty; pass {ACCEPTED}")
        if all(_is_pair(x) for x in obj):
            return [SupportSet(obj)]
        out: list[Prompt] = []
        for i, item in enumerate(obj):
            if isinstance(item, str):
                out.append(TextPrompt(item))
            elif isinstance(item, _PROMPT_TYPES):
                out.append(item)
            elif _is_pair(item):
                raise TypeError(
                    f"prompt item {i} is an (image, mask) pair in a list with other prompts; "
                    "wrap it as VisualPrompt(image, mask) (a list of pairs only is one k-shot "
                    "SupportSet)"
                )
            else:
                raise TypeError(f"prompt item {i} is a {type(item).__name__}; expected {ACCEPTED}")
        return out
    raise TypeError(f"cannot use a {type(obj).__name__} as a prompt; expected {ACCEPTED}")


def _is_pair(obj: Any) -> bool:
    """True for an (image, mask) tuple: two items, the first not a str prompt."""
    return (
        isinstance(obj, tuple)
        and len(obj) == 2
        and not all(isinstance(x, str) and not _looks_like_path(x) for x in obj)
        and (isinstance(obj[0], _ARRAYS) or _looks_like_path(obj[0]))
    )


def _looks_like_path(x: Any) -> bool:
    return isinstance(x, os.PathLike) or (
        isinstance(x, str) and os.path.splitext(x)[1].lower() in _IMAGE_SUFFIXES
    )


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


MAX_ID = 2**31 - 1


def _check_id(value: Any, name: str) -> int:
    """A class / object id as an int in 0..MAX_ID, else an error saying what was given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"VisualPrompt.{name} must be an int, got {value!r}")
    if not 0 <= int(value) <= MAX_ID:
        raise ValueError(f"VisualPrompt.{name} must be in 0..{MAX_ID}, got {value}")
    return int(value)


def _as_visual(obj: Any, *, where: str) -> VisualPrompt:
    if isinstance(obj, VisualPrompt):
        return obj
    if isinstance(obj, tuple) and len(obj) == 2:
        return VisualPrompt(obj[0], obj[1])
    raise TypeError(
        f"{where} expects VisualPrompt or (image, mask) pairs, got {type(obj).__name__}"
    )
