"""Config overrides: `--config KEY=VALUE` parsing and recursive merges that refuse unknown keys.

`create_model(..., config={...}, data_config={...})` and the CLI's `--config head.layers=2` end up
here: dicts are merged recursively into a model's zoo.yaml entries; a key the entry does not have
is an error that names the keys it does have.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

__all__ = ["merge", "merge_checked", "parse_key_values"]


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict update returning a new dict (`override` wins; dicts merge key by key)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merge_checked(
    base: Mapping[str, Any],
    override: Mapping[str, Any],
    what: str,
    *,
    open_keys: Mapping[str, Iterable[str]] | None = None,
) -> dict[str, Any]:
    """`merge`, but every key of `override` must exist in `base` (at any depth).

    `open_keys` maps a dotted path to extra keys valid there although `base` lacks them (e.g. a
    backbone's constructor arguments that zoo.yaml leaves at their defaults).
    """
    if not isinstance(override, Mapping):
        raise TypeError(f"{what} must be a dict of overrides, got {type(override).__name__}")
    _check(base, override, what, "", open_keys or {})
    return merge(base, override)


def _check(
    base: Mapping[str, Any],
    override: Mapping[str, Any],
    what: str,
    path: str,
    open_keys: Mapping[str, Iterable[str]],
) -> None:
    valid = set(base) | set(open_keys.get(path, ()))
    for key, value in override.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in valid:
            raise ValueError(
                f"{what} has no key {dotted!r}; valid keys"
                f"{' under ' + repr(path) if path else ''}: {', '.join(sorted(map(str, valid)))}"
            )
        if isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            _check(base[key], value, what, dotted, open_keys)


def parse_key_values(items: Iterable[str] | None, flag: str = "--config") -> dict[str, Any]:
    """["head.layers=2", "input_size=[224, 224]"] -> nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = str(item).partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise ValueError(
                f"{flag} takes KEY=VALUE with a dotted key, e.g. {flag} head.layers=2; got {item!r}"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ValueError(f"{flag} {item!r}: the value is not valid YAML ({exc})") from None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"{flag} sets {part!r} both to a value and to sub-keys")
            node = child
        node[parts[-1]] = value
    return out
