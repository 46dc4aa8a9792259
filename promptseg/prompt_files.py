"""Prompt embeddings saved as safetensors: tensors plus string metadata, never a pickle.

Every family that saves prompt embeddings reads them back through `read_prompt_file` (the file,
its container and its format checked at once) and warns with `warn_other_model` when a file was
encoded by another model; the family then checks its own tensors.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import safetensors
import torch

__all__ = ["read_prompt_file", "tensors_sha256", "warn_other_model"]


def read_prompt_file(
    path: str | os.PathLike[str], family: str, fmt: str, how_to_write: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a `family` prompt file whose metadata `format` is `fmt`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {family} prompt file at {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for foreign files
        raise ValueError(f"{path} is not a safetensors file ({exc}); {how_to_write}") from exc
    if meta.get("format") != fmt:
        raise ValueError(
            f"{path} is not a {family} prompt file (metadata format {meta.get('format')!r}, "
            f"expected {fmt!r}); {how_to_write}"
        )
    return tensors, meta


def warn_other_model(meta: dict[str, str], model: str, path: str | os.PathLike[str]) -> None:
    """Warn when a prompt file's metadata names another model than `model`."""
    if meta.get("model", model) != model:
        warnings.warn(
            f"{path} was encoded by {meta['model']}, not {model}: its embeddings only fit the "
            "weights that made them; encode the references again with this model",
            stacklevel=3,
        )


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (prompt-file integrity)."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
