"""`promptseg train sine`: fine-tune SINE's trainable parts on a COCO-format instance dataset.

Pairs (sine.md §7): draw a class uniformly among the dataset's categories and a reference image
containing it; with probability `crop_pair_prob` the target is the same image ("crop pair", so ID
queries find their instances by annotation id), otherwise a different image containing the class
(no ID matches). Each view gets its own augmentation (sine.md §1.3): horizontal flip with p 0.5,
resize to a uniform `jitter_scale` x canvas (aspect kept, PIL bilinear; masks nearest) and a random
crop to at most canvas x canvas (large-scale jitter), then normalisation and zero padding to the
canvas (no squash). The reference keeps all instances; the target keeps those of the reference's
classes; empty views are redrawn. All draws come from one generator seeded by `seed`.

Optimisation (sine.md §7): AdamW (decoupled decay) with betas (0.9, 0.999), eps 1e-8,
`weight_decay` on every parameter except those of `nn.LayerNorm` and `nn.Embedding` modules
(LayerNorm2d, biases of linear/conv layers, `temp` and `logit_scale` are decayed, as officially);
learning rate lr x step / warmup_steps during warmup, then linear decay to 0 at `steps`; global
gradient norm clipped to `grad_clip`; `batch_size` pairs accumulated per step. Losses:
SINECriterion (sine.md §3). The frozen DINOv2 encoder gets no gradient.

Not reproduced: the official data mix (COCO/ADE20K panoptic and COCO/Objects365 instance pairs;
only one COCO instances json here, so no panoptic stuff segments), multi-GPU ZeRO-2 training
and the per-GPU normalisation of the mask losses (here each pair is normalised by its own number
of matched masks and the pairs of a step are averaged). The spec does not say how the class of a
pair is drawn (uniformly over categories here), and a class found in one image only always gives a
crop pair. Masks are rasterised at the original size, then resized nearest-neighbour with the
image (a detectron2 mapper may transform the polygons instead): boundary pixels can differ.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from timm.layers import LayerNorm2d
from torch import nn
from tqdm import tqdm

from .data.fewshot import segmentation_to_mask
from .errors import DatasetLayoutError
from .heads.mformer_loss import SINECriterion
from .overrides import merge
from .registry import register_trainer
from .transforms import preprocess

__all__ = [
    "TrainConfig",
    "CocoInstances",
    "View",
    "PairSampler",
    "large_scale_jitter",
    "parameter_groups",
    "lr_factor",
    "build_optimiser",
    "optimiser_step",
    "trainable_model",
    "train_sine",
    "train_from_file",
]


@dataclass
class TrainConfig:
    """What `promptseg train sine --config FILE.yaml` reads (keys as below)."""

    model: str = "sine_dinov2l.coco_ade_o365"
    annotations: str = ""  # COCO instances json (with segmentation masks)
    images: str = ""  # folder the json's file_name entries are relative to
    pretrained: bool = True
    checkpoint: str | None = None
    steps: int = 1000  # optimiser steps; the learning rate reaches 0 at the last one
    batch_size: int = 1  # pairs accumulated per optimiser step (official: 64)
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100  # linear warmup from 0 to lr, then linear decay to 0 at `steps`
    grad_clip: float | None = 1.0  # max global gradient norm; null: no clipping
    crop_pair_prob: float = 0.5  # probability that the target is the reference image itself
    jitter_scale: tuple[float, float] = (0.1, 2.0)  # large-scale jitter range (x canvas)
    seed: int = 0
    device: str | None = None
    out: str = "runs/train_sine"
    save_every: int = 500
    model_config: dict[str, Any] = field(default_factory=dict)  # create_model(config=) overrides

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a YAML mapping of the fields above; unknown keys are an error."""
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"{path}: unknown keys {unknown}; known: {sorted(cls.__dataclass_fields__)}"
            )
        if isinstance(data.get("jitter_scale"), list):
            data["jitter_scale"] = tuple(data["jitter_scale"])
        return cls(**data)

    def check(self) -> None:
        """Raise ValueError naming the key to fix if the values cannot train."""
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
        if not 0 <= self.crop_pair_prob <= 1:
            problems.append(f"crop_pair_prob ({self.crop_pair_prob}) must be in [0, 1]")
        scale = self.jitter_scale
        if not (isinstance(scale, tuple) and len(scale) == 2 and 0 < scale[0] <= scale[1]):
            problems.append(f"jitter_scale ({scale}) must be [min, max] with 0 < min <= max")
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


@dataclass
class View:
    """One augmented image of a pair: image uint8 [h, w, 3], masks bool [T, h, w], ids [T]."""

    image: np.ndarray
    masks: np.ndarray
    cats: np.ndarray  # category ids [T]
    ids: np.ndarray  # annotation ids [T]
    index: int  # dataset index of the source image

    def keep(self, rows: np.ndarray) -> View:
        """The view restricted to the instances selected by bool `rows` [T]."""
        return View(self.image, self.masks[rows], self.cats[rows], self.ids[rows], self.index)


def pil_resize(array: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """PIL resize of a uint8 [H, W, 3] image or a bool [H, W] mask to `size` (h, w), same dtype."""
    pil = Image.fromarray(np.ascontiguousarray(array).astype(np.uint8))
    return np.asarray(pil.resize(size[::-1], resample)).astype(array.dtype)


def large_scale_jitter(
    image: np.ndarray,
    masks: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.1, 2.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Flip (p 0.5), resize to scale x `size` (aspect kept), crop to <= size x size (§1.3)."""
    if rng.random() < 0.5:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
    h, w = image.shape[:2]
    s = rng.uniform(*scale) * min(size / h, size / w)
    oh, ow = max(1, round(h * s)), max(1, round(w * s))
    image = pil_resize(image, (oh, ow), Image.Resampling.BILINEAR)
    masks = np.stack([pil_resize(m, (oh, ow), Image.Resampling.NEAREST) for m in masks])
    u = rng.random()  # one offset fraction for both axes (detectron2 FixedSizeCrop)
    y0, x0 = round(max(oh - size, 0) * u), round(max(ow - size, 0) * u)
    return image[y0 : y0 + size, x0 : x0 + size], masks[:, y0 : y0 + size, x0 : x0 + size]


class PairSampler:
    """Official (reference, target) pairs from a CocoInstances dataset, reproducible under `rng`."""

    def __init__(
        self,
        data: CocoInstances,
        size: int,
        rng: np.random.Generator,
        crop_pair_prob: float = 0.5,
        scale: tuple[float, float] = (0.1, 2.0),
        max_tries: int = 100,
    ) -> None:
        self.data, self.size, self.rng = data, size, rng
        self.crop_pair_prob, self.scale, self.max_tries = crop_pair_prob, scale, max_tries
        self.classes = list(data.by_class)

    def view(self, index: int) -> View:
        """Dataset image `index`, jittered, without the instances the crop removed."""
        image, masks, cats, ids = self.data[index]
        image, masks = large_scale_jitter(image, masks, self.size, self.rng, self.scale)
        return View(image, masks, cats, ids, index).keep(masks.reshape(len(masks), -1).any(1))

    def __call__(self) -> tuple[View, View]:
        """One pair: reference with all its instances, target with the reference's classes."""
        for _ in range(self.max_tries):
            cat = self.classes[self.rng.integers(len(self.classes))]
            images = self.data.by_class[cat]
            ref_index = images[self.rng.integers(len(images))]
            others = [i for i in images if i != ref_index]
            crop = self.rng.random() < self.crop_pair_prob or not others
            tgt_index = ref_index if crop else others[self.rng.integers(len(others))]
            ref, tgt = self.view(ref_index), self.view(tgt_index)
            tgt = tgt.keep(np.isin(tgt.cats, ref.cats))
            if len(ref.ids) and len(tgt.ids):
                return ref, tgt
        raise DatasetLayoutError(
            f"no pair with instances in both images after {self.max_tries} draws: large-scale "
            f"jitter to {self.size} px at scale {self.scale} removed every mask; use larger "
            "objects or raise the lower bound of `jitter_scale` in the config"
        )


def canvas_pixels(model: Any, image: np.ndarray) -> torch.Tensor:
    """RGB uint8 [h, w, 3] (h, w <= canvas) -> normalised [1, 3, canvas, canvas], zero-padded."""
    h, w = image.shape[:2]
    pixels = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    x = preprocess(pixels, {**model.data_configs["default"], "input_size": (h, w)}, model.dtype)
    return x.to(model.device)


def canvas_masks(model: Any, masks: np.ndarray) -> torch.Tensor:
    """bool [T, h, w] -> float [T, canvas, canvas] on the model's device, zero-padded."""
    m = torch.from_numpy(np.ascontiguousarray(masks)).float()
    h, w = m.shape[-2:]
    canvas = model.canvas("fss")
    return F.pad(m, (0, canvas - w, 0, canvas - h)).to(model.device)


def training_pair(model: Any, ref: View, tgt: View) -> tuple[dict, dict]:
    """Head outputs for one (reference, target) pair and the criterion's targets."""
    classes = np.unique(ref.cats)  # GT class index = position in the sorted unique class list
    labels = torch.from_numpy(np.searchsorted(classes, ref.cats)).long()
    tokens = model.head.pool_tokens(
        model.features(canvas_pixels(model, ref.image)),
        [canvas_masks(model, ref.masks)],
        ids=[torch.from_numpy(ref.ids)],
        classes=[labels],
    )
    feats = model.features(canvas_pixels(model, tgt.image))
    out = model.head(feats, model.head.mask_features(feats), tokens.id_tokens, tokens.sem_tokens)
    target = {
        "labels": torch.from_numpy(np.searchsorted(classes, tgt.cats)).long().to(model.device),
        "masks": canvas_masks(model, tgt.masks),
        "ids": torch.from_numpy(tgt.ids).to(model.device),
        "ref_ids": tokens.ids,
    }
    return out, target


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


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Learning rate of optimiser step `step` (0-based) as a fraction of lr (WarmupDecayLR)."""
    if step < warmup:
        return step / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def build_optimiser(
    module: nn.Module, config: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over `module`'s parameter groups and its per-step warmup-decay schedule."""
    optimiser = torch.optim.AdamW(
        parameter_groups(module, config.weight_decay), lr=config.lr, betas=(0.9, 0.999), eps=1e-8
    )
    factor = partial(lr_factor, warmup=config.warmup_steps, total=config.steps)
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


def trainable_model(config: TrainConfig) -> Any:
    """The configured model in training mode with its encoder frozen (no grad, eval mode)."""
    from .zoo import create_model

    model = create_model(
        config.model,
        pretrained=config.pretrained,
        checkpoint_path=config.checkpoint,
        device=config.device,
        config=config.model_config or None,
    )
    model.train()
    model.backbone.requires_grad_(False)
    model.backbone.eval()
    return model


def train_sine(config: TrainConfig, *, progress: bool = True) -> list[float]:
    """Run `config.steps` optimiser steps; returns the loss of every step; saves checkpoints."""
    from .weights import save_state_dict_file

    config.check()
    torch.manual_seed(config.seed)
    data = CocoInstances(config.annotations, config.images)
    model = trainable_model(config)
    optimiser, schedule = build_optimiser(model.head, config)
    criterion = SINECriterion()
    sampler = PairSampler(
        data,
        model.canvas("fss"),
        np.random.default_rng(config.seed),
        config.crop_pair_prob,
        config.jitter_scale,
    )
    generator = torch.Generator().manual_seed(config.seed)
    out_dir = Path(config.out)
    losses = []
    bar = tqdm(range(config.steps), desc="train sine", disable=not progress or None)
    for step in bar:
        lr = optimiser.param_groups[0]["lr"]
        optimiser.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(config.batch_size):
            output, target = training_pair(model, *sampler())
            loss = sum(criterion(output, target, generator=generator).values())
            (loss / config.batch_size).backward()
            total += float(loss.detach()) / config.batch_size
        norm = optimiser_step(optimiser, schedule, config.grad_clip)
        losses.append(total)
        bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.2e}", grad_norm=f"{norm:.2f}")
        if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
            save_state_dict_file(model.state_dict(), out_dir / "promptseg.safetensors")
    model.eval()
    return losses


@register_trainer("sine")
def train_from_file(path: str | os.PathLike, **overrides: Any) -> str:
    """`promptseg train sine --config FILE`: the YAML's TrainConfig, `overrides` (CLI flags that
    were given) on top; returns the summary line the CLI prints."""
    config = TrainConfig.from_yaml(path)
    for key, value in overrides.items():
        if key == "model_config" and value:
            value = merge(config.model_config, value)
        if value is not None:
            setattr(config, key, value)
    losses = train_sine(config)
    return f"{len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}; weights in {config.out}"
