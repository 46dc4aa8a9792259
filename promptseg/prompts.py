"""Typed prompts, and `as_prompt()` that turns whatever a user passes into a batch of them.

A prompt says *what* to segment; models translate prompts into tensors, backbones and heads never
see these types. Images and masks stay as the user gave them until a model loads them, so a prompt
is cheap to build and a bad file fails with the file's name when it is read.
"""

from __future__ import annotations

import math
import numbers
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from .imageio import ImageInput, MaskInput
from .vocabularies import DEMO_PRESETS, read_preset

__all__ = [
    "TextPrompt",
    "VisualPrompt",
    "MixedPrompt",
    "SupportSet",
    "Vocabulary",
    "Prompt",
    "as_prompt",
    "prompt_kind",
    "reference_label",
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


@dataclass(frozen=True, repr=False)
class Vocabulary:
    """An open vocabulary: classes, each a tuple of synonyms (the first is the display name).

    Give `"cat,kitty;dog"` (`;` between classes, `,` between synonyms) or a list whose items are
    a str (a one-synonym class) or a list of str synonyms. Synonyms are stripped and otherwise kept
    verbatim; models score every synonym and take the best per class, so a repeated synonym is
    harmless. Different classes may share synonyms and even a display name (ADE20K-847 has three
    "bag" classes, with different synonyms); two classes with the same set of synonyms are an
    error, as they would split one class's score, unless `allow_duplicates=True` (COCO, ADE20K
    and LVIS overlap: the official demo's label set repeats 42 classes, see `with_presets`).
    `is_thing` flags countable objects (one panoptic segment per instance) against stuff;
    default: all things. Frozen and hashable, so models can cache text embeddings per vocabulary.
    """

    classes: tuple[tuple[str, ...], ...]
    is_thing: tuple[bool, ...] = field(default=())

    def __init__(
        self,
        classes: Sequence[str | Sequence[str]] | str,
        is_thing: Iterable[bool] | None = None,
        *,
        allow_duplicates: bool = False,
    ) -> None:
        parsed = _parse_classes(classes)
        things = _parse_thing_flags(is_thing, len(parsed))
        if not allow_duplicates:
            _check_distinct(parsed)
        object.__setattr__(self, "classes", parsed)
        object.__setattr__(self, "is_thing", things)

    @classmethod
    def preset(cls, name: str) -> Vocabulary:
        """A built-in vocabulary (`promptseg.vocabularies.PRESETS`, e.g. "ade20k_150").

        ODISE's prompt-engineered synonym lists with the dataset's thing flags (COCO and ADE20K-150
        panoptic metadata; LVIS all things; the semantic-only datasets all stuff).
        """
        classes, things = read_preset(name)
        return cls(classes, things)

    @classmethod
    def with_presets(
        cls,
        user: Vocabulary | Sequence[str | Sequence[str]] | str | None = None,
        presets: Sequence[str] = DEMO_PRESETS,
    ) -> Vocabulary:
        """The user's classes plus built-in ones, ordered as ODISE's demo orders them.

        Things first, then stuff, each in the order [user, *presets]: with the default presets
        that is user classes, COCO things, ADE things, LVIS, COCO stuff, ADE stuff. User classes
        given as text are things (as in the demo); a `Vocabulary` keeps its flags. Classes found
        in several presets (e.g. "person") are kept every time, as the demo keeps them, so class
        indices and scores match the official demo; `presets=()` gives the user's classes only.
        """
        if isinstance(presets, str):
            presets = (presets,)
        repeated = [name for name, n in Counter(presets).items() if n > 1]
        if repeated:
            raise ValueError(f"presets repeats {repeated}; name each preset once")
        parts = [cls.preset(name) for name in presets]
        if user is not None:
            parts.insert(0, user if isinstance(user, Vocabulary) else Vocabulary(user))
        if not parts:
            raise ValueError("with_presets got no user classes and no presets; give at least one")
        ordered = [
            (synonyms, thing)
            for want in (True, False)
            for part in parts
            for synonyms, thing in zip(part.classes, part.is_thing, strict=True)
            if thing is want
        ]
        classes, things = zip(*ordered, strict=True)
        return cls(classes, things, allow_duplicates=True)

    def __len__(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        names = ", ".join(repr(n) for n in self.names[:_REPR_NAMES])
        more = ", ..." if len(self) > _REPR_NAMES else ""
        return f"Vocabulary({len(self)} classes, {sum(self.is_thing)} things: {names}{more})"

    @property
    def names(self) -> list[str]:
        """Display name of each class."""
        return [c[0] for c in self.classes]


_REPR_NAMES = 6
VOCABULARY_FORMS = "e.g. 'cat,kitty;dog' or [['cat', 'kitty'], 'dog']"


def _parse_classes(classes: Any) -> tuple[tuple[str, ...], ...]:
    """Classes from the `;`/`,` text form or a list of str / lists of str, checked."""
    if isinstance(classes, str):
        classes = [c.split(",") for c in classes.split(";")] if classes.strip() else []
    elif isinstance(classes, bytes) or not isinstance(classes, Sequence):
        raise TypeError(
            f"Vocabulary classes must be a str or a list, got {type(classes).__name__}; "
            f"{VOCABULARY_FORMS}"
        )
    if not classes:
        raise ValueError(f"Vocabulary has no class; give at least one, {VOCABULARY_FORMS}")
    return tuple(_parse_class(entry, k) for k, entry in enumerate(classes))


def _parse_class(entry: Any, k: int) -> tuple[str, ...]:
    synonyms = [entry] if isinstance(entry, str) else entry
    if isinstance(synonyms, bytes) or not isinstance(synonyms, Sequence):
        raise TypeError(
            f"Vocabulary class {k} is a {type(entry).__name__}; give a str or a list of str "
            f"synonyms, {VOCABULARY_FORMS}"
        )
    for j, s in enumerate(synonyms):
        if not isinstance(s, str):
            raise TypeError(
                f"Vocabulary class {k}, synonym {j} is a {type(s).__name__} ({s!r}); "
                "synonyms must be str"
            )
    stripped = tuple(s.strip() for s in synonyms)
    if not any(stripped):
        raise ValueError(
            f"Vocabulary class {k} is empty; remove it (in text, drop the extra ';') or name it"
        )
    if not all(stripped):
        raise ValueError(
            f"Vocabulary class {k} ({next(s for s in stripped if s)!r}) has an empty synonym at "
            f"position {stripped.index('')}; remove it (in text, drop the extra ',')"
        )
    return stripped


def _parse_thing_flags(is_thing: Any, n: int) -> tuple[bool, ...]:
    """One bool per class (numpy bools and 0/1 ints accepted); all things when None."""
    if is_thing is None:
        return (True,) * n
    if isinstance(is_thing, (str, bytes)) or not isinstance(is_thing, Iterable):
        raise TypeError(
            f"is_thing must be a list of bools, one per class, got {type(is_thing).__name__}"
        )
    flags = tuple(is_thing)
    if len(flags) != n:
        raise ValueError(
            f"is_thing has {len(flags)} flags for {n} classes; give one per class "
            "(True = thing, False = stuff)"
        )
    for k, flag in enumerate(flags):
        if not isinstance(flag, (bool, np.bool_)) and not (
            isinstance(flag, numbers.Integral) and flag in (0, 1)
        ):
            raise TypeError(f"is_thing[{k}] is {flag!r}; expected True (thing) or False (stuff)")
    return tuple(bool(flag) for flag in flags)


def _check_distinct(classes: tuple[tuple[str, ...], ...]) -> None:
    """Two classes with the same synonyms (in any order) would split one class's score."""
    first: dict[frozenset[str], int] = {}
    for k, synonyms in enumerate(classes):
        j = first.setdefault(frozenset(synonyms), k)
        if j != k:
            raise ValueError(
                f"Vocabulary classes {j} ({classes[j][0]!r}) and {k} ({synonyms[0]!r}) have the "
                "same synonyms; remove one (or pass allow_duplicates=True to keep both, which "
                "splits that class's score between them)"
            )


Prompt = TextPrompt | VisualPrompt | MixedPrompt | SupportSet | Vocabulary
_PROMPT_TYPES = (TextPrompt, VisualPrompt, MixedPrompt, SupportSet, Vocabulary)
_ARRAYS = (np.ndarray, torch.Tensor, Image.Image)

ACCEPTED = (
    "a str, TextPrompt, VisualPrompt, MixedPrompt, SupportSet, Vocabulary, an (image, mask) pair, "
    "or a non-empty list of these (a list of (image, mask) pairs is one k-shot SupportSet)"
)


def reference_label(
    index: int, *, class_id: int | None = None, object_id: int | None = None
) -> str:
    """The label of masks segmented from the reference prompt (VisualPrompt or SupportSet) at
    position `index` of a call, the same in every family: "reference 2"; "reference 2 class 5"
    when that prompt's references hold several classes; "... object 3" for one of several
    objects. Text prompts are labelled by their text, vocabulary classes by their first name."""
    label = f"reference {index}"
    if class_id is not None:
        label += f" class {class_id}"
    if object_id is not None:
        label += f" object {object_id}"
    return label


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
