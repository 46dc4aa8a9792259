"""Pieces every family's trainer shares: the YAML config, COCO instance data, AdamW with a
warmup / linear-decay schedule, gradient clipping, and running a trainer from a config file."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from timm.layers import LayerNorm2d
from torch import nn

from ..data.fewshot import segmentation_to_mask
from ..errors import DatasetLayoutError
from ..overrides import merge

__all__ = [
    "TrainConfig",
    "CocoInstances",
    "pil_resize",
    "parameter_groups",
    "lr_factor",
    "build_optimiser",
    "optimiser_step",
    "run_from_file",
    "trainable_model",
]


@dataclass
class TrainConfig:
    """Keys every `promptseg train FAMILY --config FILE.yaml` reads; families add their own."""

    model: str = ""
    annotations: str = ""  # COCO instances json (with segmentation masks)
    images: str = ""  # folder the json's file_name entries are relative to
    pretrained: bool = True
    checkpoint: str | None = None
    steps: int = 1000  # optimiser steps; the learning rate reaches its end value at the last one
    batch_size: int = 1  # samples accumulated per optimiser step
    lr: float = 1e-4
    lr_end: float = 0.0  # learning rate at the last step (linear decay after the warmup)
    weight_decay: float = 0.05
    warmup_steps: int = 0  # linear warmup from 0 to lr
    grad_clip: float | None = 1.0  # max global gradient norm; null: no clipping
    seed: int = 0
    device: str | None = None
    out: str = "runs/train"
    save_every: int = 500
    model_config: dict[str, Any] = field(default_factory=dict)  # create_model(config=) overrides

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a YAML mapping of the fields; unknown keys are an error, lists become tuples
        where the field is a tuple."""
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a training config is a YAML mapping of keys to values")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
        for key, value in data.items():
            if isinstance(value, list) and str(known[key].type).startswith("tuple"):
                data[key] = tuple(value)
        return cls(**data)

    def problems(self) -> list[str]:
        """What is wrong with the shared keys (families add their own checks)."""
        problems = []
        if self.steps < 1 or self.batch_size < 1:
            problems.append(f"steps ({self.steps}) and batch_size ({self.batch_size}) must be >= 1")
        if not 0 <= self.warmup_steps < self.steps:
            problems.append(
                f"warmup_steps ({self.warmup_steps}) must be in [0, steps = {self.steps}); "
                "lower warmup_steps or raise steps"
            )
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f"grad_clip ({self.grad_clip}) must be > 0, or null for no clipping")
        if not 0 <= self.lr_end <= self.lr:
            problems.append(f"lr_end ({self.lr_end}) must be in [0, lr = {self.lr}]")
        return problems

    def check(self) -> None:
        """Raise ValueError naming the keys to fix if the values cannot train."""
        problems = self.problems()
        if problems:
            raise ValueError("bad training config: " + "; ".join(problems))


class CocoInstances:
    """Images of a COCO instances json that have at least one non-crowd mask."""

    def __init__(self, annotations: str | os.PathLike, images: str | os.PathLike) -> None:
        path, self.root = Path(annotations), Path(images)
        if not path.is_file():
            raise DatasetLayoutError(f"COCO annotations not found: {path} (a COCO instances json)")
        coco = json.loads(path.read_text(encoding="utf-8"))
        anns: dict[int, list[dict]] = {}
        for a in coco.get("annotations", []):
            if not a.get("iscrowd", 0) and a.get("segmentation"):
                anns.setdefault(a["image_id"], []).append(a)
        self.images = [im for im in coco.get("images", []) if im["id"] in anns]
        self.anns = {k: sorted(v, key=lambda a: a["category_id"]) for k, v in anns.items()}
        if not self.images:
            raise DatasetLayoutError(f"{path}: no image has a non-crowd segmentation annotation")
        by_class: dict[int, list[int]] = {}
        for i, im in enumerate(self.images):
            for cat in sorted({a["category_id"] for a in self.anns[im["id"]]}):
                by_class.setdefault(cat, []).append(i)
        self.by_class = dict(sorted(by_class.items()))  # category id -> image indices

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(image uint8 [H, W, 3], masks bool [T, H, W], category ids [T], annotation ids [T])."""
        info = self.images[i]
        image = np.array(Image.open(self.root / info["file_name"]).convert("RGB"))
        h, w = image.shape[:2]
        anns = self.anns[info["id"]]
        masks = np.stack([segmentation_to_mask(a["segmentation"], h, w) for a in anns])
        return (
            image,
            masks,
            np.array([a["category_id"] for a in anns]),
            np.array([a["id"] for a in anns]),
        )


def pil_resize(array: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """PIL resize of a uint8 [H, W, 3] image or a bool [H, W] mask to `size` (h, w), same dtype."""
    pil = Image.fromarray(np.ascontiguousarray(array).astype(np.uint8))
    return np.asarray(pil.resize(size[::-1], resample)).astype(array.dtype)


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed and not decayed (nn.LayerNorm, nn.Embedding;
    timm's channel-first LayerNorm2d, a LayerNorm subclass, is decayed as officially)."""
    groups = {
        True: {"params": [], "names": [], "weight_decay": weight_decay},
        False: {"params": [], "names": [], "weight_decay": 0.0},
    }
    for prefix, sub in module.named_modules():
        decay = isinstance(sub, LayerNorm2d) or not isinstance(sub, nn.LayerNorm | nn.Embedding)
        for name, p in sub.named_parameters(recurse=False):
            if p.requires_grad:
                groups[decay]["params"].append(p)
                groups[decay]["names"].append(f"{prefix}.{name}" if prefix else name)
    return [g for g in groups.values() if g["params"]]


def lr_factor(step: int, warmup: int, total: int, end: float = 0.0) -> float:
    """Learning rate of optimiser step `step` (0-based) as a fraction of lr: linear warmup from 0,
    then linear decay to the fraction `end` at `total` (WarmupDecayLR; polynomial power 1)."""
    if step < warmup:
        return step / warmup
    return end + (1.0 - end) * max(0.0, (total - step) / max(1, total - warmup))


def build_optimiser(
    module: nn.Module, config: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over `module`'s parameter groups and its per-step warmup-decay schedule."""
    optimiser = torch.optim.AdamW(
        parameter_groups(module, config.weight_decay), lr=config.lr, betas=(0.9, 0.999), eps=1e-8
    )
    end = config.lr_end / config.lr if config.lr else 0.0
    factor = partial(lr_factor, warmup=config.warmup_steps, total=config.steps, end=end)
    return optimiser, torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


def optimiser_step(
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    max_norm: float | None,
) -> float:
    """Clip the accumulated gradients' global norm to `max_norm`, step; returns the norm before.

    The clipped gradients stay on the parameters until the next `zero_grad`.
    """
    params = [p for g in optimiser.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, math.inf if max_norm is None else max_norm)
    optimiser.step()
    schedule.step()
    return float(norm)


def configured_model(config: TrainConfig) -> Any:
    """The model a training config names (its weights, device and config overrides)."""
    from ..zoo import create_model

    return create_model(
        config.model,
        pretrained=config.pretrained,
        checkpoint_path=config.checkpoint,
        device=config.device,
        config=config.model_config or None,
    )


def trainable_model(config: TrainConfig, frozen: str) -> Any:
    """The configured model in training mode, its submodule `frozen` (an encoder, a VAE) without
    gradients and in eval mode."""
    model = configured_model(config)
    model.train()
    getattr(model, frozen).requires_grad_(False).eval()
    return model


STATE_FILE = "train_state.pt"  # in the run's `out` folder: what `resume: true` continues from


def save_train_state(
    path: Path, *, step: int, rng: np.random.Generator, generator: torch.Generator, **parts: Any
) -> None:
    """What `resume: true` continues from: each part's state_dict (optimiser, schedule, ...; a
    plain dict is stored as it is), the numpy and torch random states and the next step."""
    state = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in parts.items()}
    state.update(rng=rng.bit_generator.state, generator=generator.get_state(), step=step)
    torch.save(state, path)


def load_train_state(
    path: Path, *, rng: np.random.Generator, generator: torch.Generator, **parts: Any
) -> tuple[int, dict[str, Any]]:
    """Restore a save_train_state file into `parts` (objects with load_state_dict) and the
    random states; returns (the step to continue from, the whole state for the rest)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for name, part in parts.items():
        part.load_state_dict(state[name])
    rng.bit_generator.state = state["rng"]
    generator.set_state(state["generator"])
    return int(state["step"]), state


def run_from_file(
    config_class: type[TrainConfig], train: Any, path: str | os.PathLike, overrides: dict[str, Any]
) -> str:
    """`promptseg train FAMILY --config FILE`: the YAML's config with the CLI flags that were
    given on top (model_config merged), trained; returns the summary line the CLI prints."""
    config = config_class.from_yaml(path)
    for key, value in overrides.items():
        if key == "model_config" and value:
            value = merge(config.model_config, value)
        if value is not None:
            setattr(config, key, value)
    losses = train(config)
    if not losses:
        return f"nothing to train: already at step {config.steps}; weights in {config.out}"
    return f"{len(losses)} steps, {loss_trend(losses)}; weights in {config.out}"


def loss_trend(losses: list[float], window: int = 5) -> str:
    """'loss A -> B' with A, B the means of the first and last `window` steps (one step's loss
    is noisy: a single pair or episode)."""
    n = max(1, min(window, len(losses) // 2))  # the two windows never overlap
    first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n
    span = f" (mean of the first / last {n} steps)" if n > 1 else ""
    return f"loss {first:.3f} -> {last:.3f}{span}"
