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

from ..heads.mformer import PooledTokens

__all__ = ["SINEPrompt", "save_prompts", "load_prompts", "PROMPT_FORMAT"]

PROMPT_FORMAT = "promptseg.sine_prompt"
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
    """Read prompts written by `save_prompts` -> (prompts, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no SINE prompt file at {path}")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for foreign files
        raise ValueError(
            f"{path} is not a safetensors file ({exc}); save prompts with "
            "SINEPrompt.save or model.save_prompt_embedding"
        ) from exc
    if meta.get("format") != PROMPT_FORMAT:
        raise ValueError(
            f"{path} is not a SINE prompt file (metadata format {meta.get('format')!r}, expected "
            f"{PROMPT_FORMAT!r}); write one with SINEPrompt.save or model.save_prompt_embedding"
        )
    prompts = []
    for i in range(int(meta["prompts"])):
        protos = sorted({k.split(".")[1] for k in tensors if k.split(".")[0] == str(i)})
        prompts.append(
            SINEPrompt(
                {
                    proto: PooledTokens(*(tensors[f"{i}.{proto}.{n}"] for n in _TOKEN_FIELDS))
                    for proto in protos
                }
            )
        )
    return prompts, meta
