"""Name -> class registries for backbones, heads, model families, converters and trainers.

Modules register themselves at import (`@register_model("clipseg")`); zoo.yaml then refers to
families, backbones, heads and converters by these names. A lookup of a name not registered yet
imports every module of the matching package first, so adding a family (a module under
`promptseg/models/`, its parts under `backbones/`, `heads/`, `convert/`, and its zoo.yaml
entries) touches no core file.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import UnknownModelError

__all__ = [
    "BACKBONES",
    "HEADS",
    "MODELS",
    "CONVERTERS",
    "TRAINERS",
    "register_backbone",
    "register_head",
    "register_model",
    "register_converter",
    "register_trainer",
    "lookup",
    "registered",
]

T = TypeVar("T")

BACKBONES: dict[str, Any] = {}
HEADS: dict[str, Any] = {}
MODELS: dict[str, Any] = {}
CONVERTERS: dict[str, Callable] = {}
TRAINERS: dict[str, Callable] = {}

# kind -> (its table, the packages whose modules register entries of that kind)
_KINDS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "backbone": (BACKBONES, ("promptseg.backbones",)),
    "head": (HEADS, ("promptseg.heads",)),
    "model family": (MODELS, ("promptseg.models",)),
    "converter": (CONVERTERS, ("promptseg.convert",)),
    "trainer": (TRAINERS, ("promptseg.train", "promptseg.models")),
}


def _register(kind: str, name: str) -> Callable[[T], T]:
    table = _KINDS[kind][0]

    def add(obj: T) -> T:
        if name in table and table[name] is not obj:
            raise ValueError(f"{kind} {name!r} is registered twice")
        table[name] = obj
        return obj

    return add


def register_backbone(name: str) -> Callable[[T], T]:
    """Register a backbone adapter class (a `promptseg.backbones.Backbone`) under `name`."""
    return _register("backbone", name)


def register_head(name: str) -> Callable[[T], T]:
    """Register a decoder head class (a `promptseg.heads.Head`) under `name`."""
    return _register("head", name)


def register_model(name: str) -> Callable[[T], T]:
    """Register a model family (a PromptSegModel subclass built from a ModelCard)."""
    return _register("model family", name)


def register_converter(name: str) -> Callable[[T], T]:
    """Register a checkpoint converter: official/other layout -> promptseg's native layout."""
    return _register("converter", name)


def register_trainer(name: str) -> Callable[[T], T]:
    """Register a family's training entry point `train(config_path_or_dict, **overrides)`."""
    return _register("trainer", name)


def _import_all(package: str) -> None:
    """Import `package` and every module in it (each registers what it defines)."""
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(getattr(module, "__path__", ())):
        importlib.import_module(f"{package}.{info.name}")


def registered(kind: str) -> dict[str, Any]:
    """Every entry of one kind ('backbone', 'head', 'model family', 'converter', 'trainer')."""
    table, packages = _KINDS[kind]
    for package in packages:
        _import_all(package)
    return dict(sorted(table.items()))


def lookup(kind: str, name: Any) -> Any:
    """The registered entry `name` of `kind`, importing its package on a miss."""
    table, _ = _KINDS[kind]
    if not isinstance(name, str):
        raise TypeError(f"a {kind} name must be a string, got {type(name).__name__} {name!r}")
    if name not in table:
        known = registered(kind)
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UnknownModelError(
                f"unknown {kind} {name!r}{hint} (registered: {', '.join(known) or 'none'})"
            )
    return table[name]
