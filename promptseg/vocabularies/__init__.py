"""Built-in open vocabularies (ODISE's prompt-engineered label lists) and COCO-seen flags.

The label files under `labels/` are verbatim upstream data (see `labels/README.md`); the thing
flags are data too (`labels/thing_ids.json`). Build a vocabulary with `Vocabulary.preset(name)`;
this module only reads the files, so it does not depend on `promptseg.prompts`.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Protocol

__all__ = ["PRESETS", "DEMO_PRESETS", "Classes", "read_preset", "seen_flags"]

PRESETS = (
    "coco_panoptic",
    "ade20k_150",
    "ade20k_847",
    "pascal_context_59",
    "pascal_context_459",
    "pascal_voc_21",
    "lvis_1203",
)
"""Names accepted by `Vocabulary.preset`."""

DEMO_PRESETS = ("coco_panoptic", "ade20k_150", "lvis_1203")
"""The label sets of ODISE's demo (`--label COCO ADE LVIS`), in its order."""

Classes = tuple[tuple[str, ...], ...]
"""Classes of a vocabulary, each a tuple of synonyms (the first is the display name)."""

_UNUSED_ID = "invalid_class_id"


def read_preset(name: str) -> tuple[Classes, tuple[bool, ...]]:
    """Classes (synonyms verbatim from the label file) and thing flags of a built-in vocabulary."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown vocabulary preset {name!r}; choose one of {', '.join(PRESETS)}")
    return _read_preset(name)


@functools.cache
def _read_preset(name: str) -> tuple[Classes, tuple[bool, ...]]:
    labels = resources.files(__package__) / "labels"
    text = (labels / f"{name}_with_prompt_eng.txt").read_text(encoding="utf-8")
    thing_ids = set(_thing_ids()[name])
    classes, things = [], []
    for line in text.splitlines():
        class_id, _, synonyms = line.partition(":")
        if synonyms != _UNUSED_ID:
            classes.append(tuple(synonyms.split(",")))
            things.append(int(class_id) in thing_ids)
    return tuple(classes), tuple(things)


class HasClasses(Protocol):
    """Anything with `classes` (a `promptseg.Vocabulary`): synonym tuples, one per class."""

    classes: Classes


def seen_flags(
    vocabulary: HasClasses, reference: str | HasClasses = "coco_panoptic"
) -> tuple[bool, ...]:
    """Per class, whether any of its synonyms is verbatim a synonym of `reference`.

    ODISE fuses its two classifiers with one weight for classes seen in training (COCO) and another
    for unseen ones; "seen" is this pure string match, so "pickup truck" is unseen though "truck"
    is seen. `reference` is a preset name or a vocabulary.
    """
    seen = _synonyms(reference) if isinstance(reference, str) else _all_synonyms(reference.classes)
    return tuple(not seen.isdisjoint(synonyms) for synonyms in vocabulary.classes)


@functools.cache
def _thing_ids() -> dict[str, list[int]]:
    return json.loads((resources.files(__package__) / "labels" / "thing_ids.json").read_text())


@functools.cache
def _synonyms(preset: str) -> frozenset[str]:
    return _all_synonyms(read_preset(preset)[0])


def _all_synonyms(classes: Classes) -> frozenset[str]:
    return frozenset(s for synonyms in classes for s in synonyms)
