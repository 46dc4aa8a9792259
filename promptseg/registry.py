"""Name -> builder registries for backbones, heads, model families and checkpoint converters.

Modules register themselves at import (`@register_model("clipseg")`); zoo.yaml then refers to
families and converters by these names, so adding a family never touches the core.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = [
    "BACKBONES",
    "HEADS",
    "MODELS",
    "CONVERTERS",
    "register_backbone",
    "register_head",
    "register_model",
    "register_converter",
]

T = TypeVar("T")

BACKBONES: dict[str, Callable] = {}
HEADS: dict[str, Callable] = {}
MODELS: dict[str, Callable] = {}
CONVERTERS: dict[str, Callable] = {}


def _register(table: dict[str, Callable], kind: str, name: str) -> Callable[[T], T]:
    def add(obj: T) -> T:
        if name in table and table[name] is not obj:
            raise ValueError(f"{kind} {name!r} is registered twice")
        table[name] = obj  # type: ignore[assignment]
        return obj

    return add


def register_backbone(name: str) -> Callable[[T], T]:
    """Register a backbone adapter class under `name`."""
    return _register(BACKBONES, "backbone", name)


def register_head(name: str) -> Callable[[T], T]:
    """Register a decoder head class under `name`."""
    return _register(HEADS, "head", name)


def register_model(name: str) -> Callable[[T], T]:
    """Register a model family (a PromptSegModel subclass built from a config dict)."""
    return _register(MODELS, "model family", name)


def register_converter(name: str) -> Callable[[T], T]:
    """Register a checkpoint converter: official/other layout -> promptseg's native layout."""
    return _register(CONVERTERS, "converter", name)
