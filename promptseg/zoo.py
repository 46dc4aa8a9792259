"""The model zoo: reads zoo.yaml, lists models, describes them, and builds them by name.

`create_model("clipseg_vitb16_rd64.refined")` = look up the card (with any overrides merged in),
build the family registered under the card's `family` from it, then load weights (weights.py)
unless `pretrained=False`. Families, backbones, heads and converters are found through the
registry by the names zoo.yaml gives them.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import UnknownModelError
from .overrides import merge, merge_checked
from .registry import lookup
from .transforms import DATA_CONFIG_KEYS
from .weights import (
    WeightSource,
    checkpoint_architecture,
    load_native_state_dict,
    pretrained_state,
)

__all__ = [
    "ModelCard",
    "WeightRoute",
    "list_models",
    "model_info",
    "create_model",
    "build_model",
    "card_for_checkpoint",
    "components",
]

ZOO_FILE = Path(__file__).with_name("zoo.yaml")
PARTS = ("backbone", "head")  # config sections naming a registered component
WHOLE_CONFIG_KEYS = ("unet", "vae", "clip")
"""Config keys holding another library's model config (diffusers, open_clip): an override
replaces them whole and that library validates it when the model is built."""


@dataclass(frozen=True)
class WeightRoute:
    """One way to obtain a model's weights: files (alternatives) read by one converter."""

    converter: str
    files: tuple[WeightSource, ...]
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelCard:
    """Everything zoo.yaml says about one `arch.tag` (or a bare arch with no released weights),
    with the overrides `create_model` was given merged in."""

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
    converter: str | None = None  # reads any checkpoint layout of the family (checkpoint_path=)
    components: dict[str, tuple[WeightSource, ...]] = field(default_factory=dict)  # shared files
    replaced: tuple[str, ...] = ()  # parts (backbone/head) swapped for other registered ones
    weights_sha256: str | None = None  # of the weights loaded (pretrained_state); None: random

    @property
    def pretrained(self) -> bool:
        """True when released weights exist for this name."""
        return bool(self.weights)


@functools.lru_cache(maxsize=1)
def _zoo() -> dict[str, Any]:
    with open(ZOO_FILE, encoding="utf-8") as f:
        return yaml.safe_load(f)


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


def components() -> dict[str, tuple[WeightSource, ...]]:
    """Weight files of the shared components (e.g. a CLIP backbone) named in zoo.yaml."""
    return {
        name: tuple(WeightSource.from_dict(f) for f in spec["files"])
        for name, spec in (_zoo().get("components") or {}).items()
    }


def _card(name: Any) -> ModelCard:
    if not isinstance(name, str):
        raise TypeError(
            f"a model name is a string like 'clipseg_vitb16_rd64.refined', got "
            f"{type(name).__name__} {name!r} (promptseg.list_models() shows all names)"
        )
    archs = _zoo()["architectures"]
    arch, _, tag = name.partition(".")
    if arch not in archs or (tag and tag not in (archs[arch].get("tags") or {})):
        close = difflib.get_close_matches(name, _all_names(), n=3, cutoff=0.4)
        lowered = [n for n in _all_names() if name.lower() in n.lower() and n not in close]
        hint = close + lowered[: 3 - len(close)]
        hint_text = f"; did you mean {', '.join(hint)}?" if hint else ""
        raise UnknownModelError(
            f"unknown model {name!r}{hint_text} (promptseg.list_models() shows all names)"
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
        config=merge(spec.get("config", {}), tag_spec.get("config", {})),
        data_config=dict(spec.get("data_config", {})),
        default_threshold=tag_spec.get("default_threshold"),
        license=tag_spec.get("license"),
        weights=_routes(tag_spec.get("weights", [])),
        reported=tag_spec.get("reported") or {},
        paper=spec.get("paper"),
        converter=spec.get("converter"),
        components=components(),
    )


def _params(cls: Any) -> list[str]:
    """Constructor parameter names of a registered backbone or head, minus those the family or
    the backbone's features set (features, in_channels, output)."""
    return [
        p
        for p in inspect.signature(cls).parameters
        if p not in ("self", "features", "in_channels", "output", "args", "kwargs")
    ]


def _with_part(config: dict[str, Any], part: str, override: Any, what: str) -> tuple[dict, bool]:
    """Config with one part (backbone / head) merged or replaced -> (config, replaced?)."""
    if not isinstance(override, Mapping):
        raise TypeError(
            f"{part}= must be a dict like {{'name': ..., ...}}, got {type(override).__name__}"
        )
    current = config.get(part)
    if current is None:
        raise ValueError(f"{what} has no {part} to override")
    kind = "backbone" if part == "backbone" else "head"
    name = override.get("name", current["name"])
    cls = lookup(kind, name)
    accepted = {"name", *_params(cls)}
    signature = inspect.signature(cls).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature):
        accepted |= set(override)  # e.g. timm keyword arguments passed through
    if name != current["name"]:
        unknown = sorted(set(override) - accepted)
        if unknown:
            raise ValueError(
                f"{part} {name!r} takes no {', '.join(map(repr, unknown))}; valid keys: "
                f"{', '.join(sorted(accepted))}"
            )
        return {**config, part: dict(override)}, True
    merged = merge_checked(
        {part: current}, {part: dict(override)}, f"{what} config", open_keys={part: accepted}
    )[part]
    return {**config, part: merged}, False


def _data_config_keys(data_config: Mapping[str, Any]) -> dict[str, set[str]]:
    """Keys valid at the top of a data config and in each named sub-config."""
    keys = set(DATA_CONFIG_KEYS)
    return {"": keys, **{k: keys for k, v in data_config.items() if isinstance(v, Mapping)}}


def apply_overrides(
    card: ModelCard,
    *,
    config: Mapping[str, Any] | None = None,
    data_config: Mapping[str, Any] | None = None,
    backbone: Mapping[str, Any] | None = None,
    head: Mapping[str, Any] | None = None,
) -> ModelCard:
    """The card with overrides merged into its config / data config (unknown keys raise)."""
    given = {"config": config, "data_config": data_config, "backbone": backbone, "head": head}
    for arg, value in given.items():
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(
                f"{arg}= must be a dict of overrides (or None), got {type(value).__name__} "
                f"{value!r}; `promptseg info {card.name}` shows the keys"
            )
    new_config, replaced = dict(card.config), list(card.replaced)
    if config:
        config = dict(config)
        parts = {p: config.pop(p) for p in PARTS if p in config}
        whole = {k: config.pop(k) for k in WHOLE_CONFIG_KEYS if k in config and k in new_config}
        new_config = merge_checked(new_config, config, f"{card.name} config")
        for key, value in whole.items():
            if not isinstance(value, Mapping):
                raise TypeError(f"config[{key!r}] must be a dict (a whole model config)")
            new_config[key] = dict(value)
        backbone = merge(parts.get("backbone", {}), backbone or {}) or None
        head = merge(parts.get("head", {}), head or {}) or None
    for part, override in (("backbone", backbone), ("head", head)):
        if override:
            new_config, swapped = _with_part(new_config, part, override, card.name)
            if swapped and part not in replaced:
                replaced.append(part)
    new_data = card.data_config
    if data_config:
        new_data = merge_checked(
            card.data_config,
            data_config,
            f"{card.name} data_config",
            open_keys=_data_config_keys(card.data_config),
        )
    return dataclasses.replace(
        card, config=new_config, data_config=new_data, replaced=tuple(replaced)
    )


def list_models(
    filter: str = "", *, pretrained: bool = False, capability: str | None = None
) -> list[str]:
    """Names matching `filter` (fnmatch; a pattern without wildcards matches as a substring);
    `pretrained` keeps released `arch.tag` names only."""
    if filter and not any(c in filter for c in "*?["):
        filter = f"*{filter}*"
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


def model_info(name: str, **overrides: Any) -> ModelCard:
    """The card of `name` (`arch` alone means its default tag), with `create_model`'s overrides
    (config=, data_config=, backbone=, head=) merged in when given."""
    card = _card(name)
    return apply_overrides(card, **overrides) if any(overrides.values()) else card


def card_for_checkpoint(card: ModelCard, path: str | os.PathLike) -> ModelCard:
    """The card with the architecture a checkpoint states (recorded in a converted file, or read
    by the family's converter, e.g. from the diffusers config.json files of a pipeline folder)."""
    if card.converter is None:
        return card
    architecture = checkpoint_architecture(card, path)
    if not architecture:
        return card
    return dataclasses.replace(card, config={**card.config, **architecture})


def build_model(card: ModelCard) -> torch.nn.Module:
    """Instantiate the family's module with random weights from a card."""
    return lookup("model family", card.family)(card)


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
    config: Mapping[str, Any] | None = None,
    data_config: Mapping[str, Any] | None = None,
    backbone: Mapping[str, Any] | None = None,
    head: Mapping[str, Any] | None = None,
) -> torch.nn.Module:
    """Build a model by name and load its weights (random init when `pretrained=False`).

    `checkpoint_path` (a file or a save_pretrained directory, in any layout a converter knows,
    or a folder of a family's official files, e.g. ODISE's .pth + sd-v1-3.ckpt + CLIP) takes
    precedence over the cache, the Hugging Face hub and URLs. `model.card.weights_sha256`
    (and every result's `meta`) records the sha256 of the weights read (`weights.read_checkpoint`).
    `config` and `data_config` are merged recursively into the architecture's zoo.yaml entries
    (unknown keys raise).
    `backbone` / `head` merge into those parts, or replace them when they name another
    registered one (`{"name": "timm_vit", "arch": ...}`): a replaced part takes its weights from
    its own source (its `pretrained` option) or random init, and the checkpoint's keys for it
    are skipped with a warning.
    """
    card = model_info(name, config=config, data_config=data_config, backbone=backbone, head=head)
    if not isinstance(pretrained, bool):
        raise TypeError(f"pretrained must be True or False, got {type(pretrained).__name__}")
    device = check_device(device)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(
            f"dtype must be a floating torch.dtype (torch.float32, torch.float16, torch.bfloat16), "
            f"got {dtype!r}"
        )
    if checkpoint_path is not None and not isinstance(checkpoint_path, str | os.PathLike):
        raise TypeError(
            f"checkpoint_path must be a path (str or os.PathLike), got "
            f"{type(checkpoint_path).__name__} {checkpoint_path!r}"
        )
    if checkpoint_path is not None and card.converter is None:
        raise ValueError(
            f"{card.name} takes no weights (its family {card.family!r} has no checkpoint "
            "converter); leave checkpoint_path out"
        )
    if cache_dir is not None and not isinstance(cache_dir, str | os.PathLike):
        raise TypeError(
            f"cache_dir must be a path (str or os.PathLike), got {type(cache_dir).__name__} "
            f"{cache_dir!r}"
        )
    weights = None
    if checkpoint_path is not None or pretrained:  # found (or a clear miss) before building
        weights = pretrained_state(card, checkpoint_path=checkpoint_path, cache_dir=cache_dir)
        card = card_for_checkpoint(card, weights[1])  # the architecture the weights state
    model = build_model(card)
    if weights is not None:
        state, origin, digest = weights
        load_native_state_dict(model, state, origin, skip=card.replaced)
        model.card = dataclasses.replace(model.card, weights_sha256=digest)
    model.eval()
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model
