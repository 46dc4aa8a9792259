"""The model zoo: reads zoo.yaml, lists models, describes them, and builds them by name.

`create_model("clipseg_vitb16_rd64.refined")` = look up the card, build the family's module from
the card's config, then load weights (weights.py) unless `pretrained=False`.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import functools
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import UnknownModelError
from .registry import MODELS
from .weights import WeightSource

__all__ = ["ModelCard", "WeightRoute", "list_models", "model_info", "create_model", "component"]

ZOO_FILE = Path(__file__).with_name("zoo.yaml")
# family -> does it have a checkpoint converter module (promptseg/convert/<family>.py)?
FAMILIES = {"clipseg": True, "sine": True, "testing": False}


@dataclass(frozen=True)
class WeightRoute:
    """One way to obtain a model's weights: files (alternatives) read by one converter."""

    converter: str
    files: tuple[WeightSource, ...]
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelCard:
    """Everything zoo.yaml says about one `arch.tag` (or a bare arch with no released weights)."""

    name: str
    arch: str
    tag: str | None
    family: str
    description: str
    capabilities: frozenset[str]
    config: dict[str, Any]
    data_config: dict[str, Any]
    default_threshold: float | None = None
    license: str | None = None
    weights: tuple[WeightRoute, ...] = ()
    reported: dict[str, Any] = field(default_factory=dict)
    paper: str | None = None

    @property
    def pretrained(self) -> bool:
        """True when released weights exist for this name."""
        return bool(self.weights)


@functools.lru_cache(maxsize=1)
def _zoo() -> dict[str, Any]:
    with open(ZOO_FILE, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _merge(base: dict, override: dict) -> dict:
    """Recursive dict update (tag config over arch config) returning a new dict."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _routes(entries: list[dict]) -> tuple[WeightRoute, ...]:
    return tuple(
        WeightRoute(
            converter=e["converter"],
            files=tuple(WeightSource.from_dict(f) for f in e["files"]),
            requires=tuple(e.get("requires", ())),
        )
        for e in entries
    )


def _all_names() -> list[str]:
    names = []
    for arch, spec in _zoo()["architectures"].items():
        names.append(arch)
        names.extend(f"{arch}.{tag}" for tag in spec.get("tags") or {})
    return names


def _card(name: str) -> ModelCard:
    archs = _zoo()["architectures"]
    arch, _, tag = name.partition(".")
    if arch not in archs or (tag and tag not in (archs[arch].get("tags") or {})):
        close = difflib.get_close_matches(name, _all_names(), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}{hint} (promptseg.list_models() shows all names)"
        )
    spec = archs[arch]
    tag = tag or spec.get("default_tag")
    tag_spec = (spec.get("tags") or {}).get(tag, {}) if tag else {}
    return ModelCard(
        name=f"{arch}.{tag}" if tag else arch,
        arch=arch,
        tag=tag,
        family=spec["family"],
        description=tag_spec.get("description") or spec.get("description", ""),
        capabilities=frozenset(spec.get("capabilities", ())),
        config=_merge(spec.get("config", {}), tag_spec.get("config", {})),
        data_config=dict(spec.get("data_config", {})),
        default_threshold=tag_spec.get("default_threshold"),
        license=tag_spec.get("license"),
        weights=_routes(tag_spec.get("weights", [])),
        reported=tag_spec.get("reported") or {},
        paper=spec.get("paper"),
    )


def component(name: str) -> tuple[WeightSource, ...]:
    """Weight files of a shared component (e.g. a CLIP backbone) named in zoo.yaml."""
    comps = _zoo().get("components", {})
    if name not in comps:
        raise UnknownModelError(f"zoo.yaml names no component {name!r}")
    return tuple(WeightSource.from_dict(f) for f in comps[name]["files"])


def list_models(
    filter: str = "", *, pretrained: bool = False, capability: str | None = None
) -> list[str]:
    """Names matching an fnmatch `filter`; `pretrained` keeps released `arch.tag` names only."""
    names = []
    for name in _all_names():
        if filter and not fnmatch.fnmatch(name, filter):
            continue
        card = _card(name)
        if pretrained and (card.tag is None or "." not in name):
            continue
        if capability and capability not in card.capabilities:
            continue
        names.append(name)
    return names


def model_info(name: str) -> ModelCard:
    """The card of `name` (`arch` alone means its default tag)."""
    return _card(name)


def import_family(family: str) -> None:
    """Import a family's model and converter modules, which register themselves."""
    if family not in FAMILIES:
        raise UnknownModelError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    importlib.import_module(f"promptseg.models.{family}")
    if FAMILIES[family]:
        importlib.import_module(f"promptseg.convert.{family}")


def build_model(card: ModelCard) -> torch.nn.Module:
    """Instantiate the family's module with random weights from a card."""
    if card.family not in MODELS:
        import_family(card.family)
    return MODELS[card.family](card)


def check_device(device: str | torch.device | None) -> torch.device | None:
    """Parse a device and make sure this machine has it, before any weights are loaded."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device {device!r} is not a device name torch knows; use 'cpu', 'cuda', 'cuda:1'"
        ) from exc
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index or 0) >= count:
            raise ValueError(
                f"device {device!r} was requested but this machine has {count} usable CUDA "
                "device(s); use device='cpu' (or a CUDA index below the count)"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} was requested but MPS is not available; use 'cpu'")
    elif dev.type not in {"cpu", "cuda", "mps"}:
        raise ValueError(f"device {device!r}: promptseg runs on 'cpu', 'cuda' or 'mps'")
    return dev


def create_model(
    name: str,
    pretrained: bool = True,
    *,
    checkpoint_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """Build a model by name and load its weights (random init when `pretrained=False`).

    `checkpoint_path` (a file or a save_pretrained directory, in any layout a converter knows)
    takes precedence over the cache, the Hugging Face hub and URLs.
    """
    card = _card(name)
    device = check_device(device)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            f"dtype must be a floating torch.dtype (torch.float32, torch.float16, torch.bfloat16), "
            f"got {dtype!r}"
        )
    model = build_model(card)
    if checkpoint_path is not None or pretrained:
        from .weights import load_pretrained

        load_pretrained(model, card, checkpoint_path=checkpoint_path, cache_dir=cache_dir)
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model
