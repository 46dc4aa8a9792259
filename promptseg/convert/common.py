"""Key-mapping helpers shared by every converter: regex renames, q/k/v packing, strict checks."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from ..errors import CheckpointFormatError

__all__ = ["rename_keys", "pack_qkv", "expect_no_leftovers", "strip_prefix"]

StateDict = dict[str, torch.Tensor]


def rename_keys(
    state_dict: Mapping[str, torch.Tensor], rules: Iterable[tuple[str, str]]
) -> tuple[StateDict, list[str]]:
    """Apply the first matching (regex, replacement) rule to each key; return (renamed, unmatched).

    Rules are full-match regexes; a replacement of "" drops the key on purpose.
    """
    compiled = [(re.compile(p), r) for p, r in rules]
    out: StateDict = {}
    unmatched: list[str] = []
    for key, value in state_dict.items():
        for pattern, repl in compiled:
            if pattern.fullmatch(key):
                if repl:
                    out[pattern.sub(repl, key)] = value
                break
        else:
            unmatched.append(key)
    return out, unmatched


def pack_qkv(state_dict: StateDict, q_pattern: str, target: str) -> StateDict:
    """Concatenate split `...q_proj...` / `k_proj` / `v_proj` tensors into one packed qkv tensor.

    `q_pattern` is a regex whose group 2 is the letter q, e.g. `(.*)\\.(q)_proj\\.(weight|bias)`;
    `target` is the replacement for the packed key, e.g. `\\1.qkv.\\3`.
    """
    pattern = re.compile(q_pattern)
    out = dict(state_dict)
    for key in [k for k in state_dict if pattern.fullmatch(k)]:
        m = pattern.fullmatch(key)
        start, end = m.span(2)
        parts = [key[:start] + letter + key[end:] for letter in "qkv"]
        missing = [p for p in parts if p not in state_dict]
        if missing:
            raise CheckpointFormatError(f"cannot pack q/k/v: missing {missing}")
        shapes = [tuple(state_dict[p].shape) for p in parts]
        if len(set(shapes)) != 1 or not shapes[0]:
            raise CheckpointFormatError(
                f"cannot pack q/k/v: {', '.join(parts)} have shapes {shapes}; "
                "they must be equal and at least 1-d"
            )
        out[pattern.sub(target, key)] = torch.cat([state_dict[p] for p in parts])
        for p in parts:
            del out[p]
    return out


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """Keys starting with `prefix`, without it."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def expect_no_leftovers(unmatched: list[str], what: str) -> None:
    """Raise naming the keys a converter does not know (never load a checkpoint half-way)."""
    if unmatched:
        shown = ", ".join(sorted(unmatched)[:10])
        more = f" (+{len(unmatched) - 10} more)" if len(unmatched) > 10 else ""
        raise CheckpointFormatError(
            f"{what}: {len(unmatched)} unexpected key(s): {shown}{more}. "
            "Is this a checkpoint of another model or variant?"
        )
