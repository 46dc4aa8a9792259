"""SINE prompt embeddings: pooled reference tokens per protocol, saved as safetensors files.

Tensors only, so `save` / `load` never unpickle anything; a file records the model that encoded
it, so loading it into another model warns.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from ..heads.mformer import PooledTokens
from ..prompt_files import read_prompt_file
from ..prompts import MAX_ID

__all__ = ["SINEPrompt", "save_prompts", "load_prompts", "PROMPT_FORMAT", "PROTOCOLS"]

PROMPT_FORMAT = "promptseg.sine_prompt"
PROTOCOLS = ("fss", "fsod")  # pre-processing protocols a prompt has tokens for (sine.py)
_TOKEN_FIELDS = PooledTokens._fields  # id_tokens, sem_tokens, ids, classes


@dataclass
class SINEPrompt:
    """Pooled reference tokens of one prompt per protocol, reusable for any number of targets.

    `tokens["fss"]` feeds the semantic and identity levels, `tokens["fsod"]` the instance level
    (no ID tokens: the official few-shot instance segmentation decodes without them). Tensors
    only, so `save` / `load` go through safetensors and never unpickle anything.
    """

    tokens: dict[str, PooledTokens]  # id_tokens [N, C], sem_tokens [M, C], ids [N], classes [M]

    def save(self, path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> None:
        """Write this prompt as safetensors (tensors + small string metadata)."""
        save_prompts([self], path, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SINEPrompt:
        """Read a prompt written by `save` (CPU tensors; segment() moves them to the model)."""
        prompts, _ = load_prompts(path)
        if len(prompts) != 1:
            raise ValueError(
                f"{path} holds {len(prompts)} prompts; read it with model.load_prompt_embedding()"
            )
        return prompts[0]


def save_prompts(
    prompts: Sequence[SINEPrompt], path: str | os.PathLike[str], metadata: dict[str, str] | None
) -> None:
    """Write prompts as `{index}.{protocol}.{field}` tensors plus format metadata."""
    tensors = {
        f"{i}.{proto}.{name}": value.detach().cpu().clone()  # no shared storage
        for i, p in enumerate(prompts)
        for proto, tokens in p.tokens.items()
        for name, value in zip(_TOKEN_FIELDS, tokens, strict=True)
    }
    meta = {"format": PROMPT_FORMAT, "version": "1", "prompts": str(len(prompts))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, path, metadata={**(metadata or {}), **meta})


def load_prompts(path: str | os.PathLike[str]) -> tuple[list[SINEPrompt], dict[str, str]]:
    """Read prompts written by `save_prompts` -> (prompts, metadata), checked in full.

    Metadata, tensor names, shapes (id_tokens [N, C], sem_tokens [M, C], ids [N], classes [M]),
    dtypes and values (finite tokens, distinct ids 0..2**31 - 1) are validated here, so a
    damaged or hand-made file fails at load with its name instead of later inside the model.
    """
    path = Path(path)
    tensors, meta = read_prompt_file(
        path, "SINE", PROMPT_FORMAT, "write one with SINEPrompt.save or model.save_prompt_embedding"
    )
    n_prompts = _count(path, meta)
    grouped: dict[int, dict[str, dict[str, torch.Tensor]]] = {i: {} for i in range(n_prompts)}
    for key, value in tensors.items():
        parts = key.split(".")
        if (
            len(parts) != 3
            or not parts[0].isdigit()
            or int(parts[0]) >= n_prompts
            or parts[1] not in PROTOCOLS
            or parts[2] not in _TOKEN_FIELDS
        ):
            raise ValueError(
                f"{path}: unexpected tensor {key!r}; a SINE prompt file of {n_prompts} prompt(s) "
                f"holds INDEX.PROTOCOL.FIELD tensors, INDEX < {n_prompts}, PROTOCOL in "
                f"{list(PROTOCOLS)}, FIELD in {list(_TOKEN_FIELDS)}; write it with "
                "model.save_prompt_embedding"
            )
        grouped[int(parts[0])].setdefault(parts[1], {})[parts[2]] = value
    prompts = []
    for i, protos in grouped.items():
        if not protos:
            raise ValueError(f"{path}: prompt {i} has no tensors (metadata says {n_prompts})")
        prompts.append(
            SINEPrompt({p: _checked_tokens(path, f"{i}.{p}", protos[p]) for p in sorted(protos)})
        )
    return prompts, meta


def _count(path: Path, meta: dict[str, str]) -> int:
    """The metadata's prompt count (a positive integer) and a known version, else ValueError."""
    if meta.get("version") != "1":
        raise ValueError(
            f"{path}: unsupported SINE prompt file version {meta.get('version')!r} (this "
            "promptseg reads version '1'); encode the references again with this version"
        )
    count = meta.get("prompts", "")
    if not count.isdigit() or int(count) < 1:
        raise ValueError(
            f"{path}: metadata 'prompts' must be a positive integer, got {meta.get('prompts')!r}; "
            "write the file with model.save_prompt_embedding"
        )
    return int(count)


def _checked_tokens(path: Path, name: str, fields: dict[str, torch.Tensor]) -> PooledTokens:
    """The four tensors of one prompt and protocol as PooledTokens, after checking them."""
    missing = [f for f in _TOKEN_FIELDS if f not in fields]
    if missing:
        raise ValueError(f"{path}: {name} lacks the tensor(s) {missing}")
    tokens = PooledTokens(*(fields[f] for f in _TOKEN_FIELDS))
    for field_name in ("id_tokens", "sem_tokens"):
        t = getattr(tokens, field_name)
        if t.ndim != 2 or not t.is_floating_point():
            raise ValueError(
                f"{path}: {name}.{field_name} must be a float tensor [rows, C], got shape "
                f"{tuple(t.shape)} and dtype {t.dtype}"
            )
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path}: {name}.{field_name} has NaN or infinite values")
    dim_id, dim_sem = tokens.id_tokens.shape[1], tokens.sem_tokens.shape[1]
    if dim_id != dim_sem or dim_sem == 0:
        raise ValueError(
            f"{path}: {name} has {dim_id}-d ID tokens and {dim_sem}-d semantic tokens; "
            "both must have the same, positive width"
        )
    for field_name, rows_of in (("ids", "id_tokens"), ("classes", "sem_tokens")):
        t, rows = getattr(tokens, field_name), getattr(tokens, rows_of).shape[0]
        if t.ndim != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(
                f"{path}: {name}.{field_name} must be an integer tensor [{rows}], got shape "
                f"{tuple(t.shape)} and dtype {t.dtype}"
            )
        if len(t) != rows:
            raise ValueError(
                f"{path}: {name} has {len(t)} {field_name} for {rows} {rows_of}; they must match"
            )
        if len(t) and (int(t.min()) < 0 or int(t.max()) > MAX_ID or len(t.unique()) != len(t)):
            raise ValueError(f"{path}: {name}.{field_name} must be distinct ints in 0..{MAX_ID}")
    if len(tokens.classes) == 0:
        raise ValueError(f"{path}: {name} has no semantic token; a prompt has at least one class")
    return tokens._replace(ids=tokens.ids.long(), classes=tokens.classes.long())
