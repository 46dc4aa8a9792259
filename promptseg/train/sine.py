"""`promptseg train sine`: fine-tune SINE's trainable parts on a COCO-format instance dataset.

Pairs: draw a class uniformly among the dataset's categories and a reference image containing it;
with probability `crop_pair_prob` the target is the same image ("crop pair", so ID queries find
their instances by annotation id), otherwise a different image containing the class (no ID matches).
Each view gets its own augmentation: horizontal flip with p 0.5, resize to a uniform `jitter_scale`
x canvas (aspect kept, PIL bilinear; masks nearest) and a random crop to at most canvas x canvas
(large-scale jitter), then normalisation and zero padding to the canvas (no squash). The reference
keeps all instances; the target keeps those of the reference's classes; empty views are redrawn.
Pair j of step t comes from `sample_rng(seed, t, j)`.

Optimisation: AdamW (decoupled decay) with betas (0.9, 0.999), eps 1e-8, `weight_decay` on every
parameter except those of `nn.LayerNorm` and `nn.Embedding` modules (LayerNorm2d, biases of
linear/conv layers, `temp` and `logit_scale` are decayed, as officially); learning rate lr x step /
warmup_steps during warmup, then linear decay to 0 at `steps`; global gradient norm clipped to
`grad_clip`; `batch_size` pairs accumulated per step. Losses: SINECriterion; its random points come
from `sample_generator(seed, step, j)` of the pair's position j in the step. The frozen DINOv2
encoder gets no gradient. `amp: bf16 | fp16`: CUDA autocast (fp16 with a gradient scaler). `resume:
true` continues from `out/train_state.pt` (head, optimiser, schedule, scaler, step, every rank's
random states).

Several processes (torchrun, see promptseg.train.common): rank r draws, loads and trains on
pairs r, r + N, ... of each step, and the head (in DistributedDataParallel) all-reduces its
gradients before the step: N processes x batch_size / N pairs give the updates of one process x
batch_size pairs.

Not reproduced: the official data mix (COCO/ADE20K panoptic and COCO/Objects365 instance pairs; only
one COCO instances json here, so no panoptic stuff segments), ZeRO-2 sharding and the per-GPU
normalisation of the mask losses (here each pair is normalised by its own number of matched masks
and the pairs of a step are averaged). The official description does not say how the class of a pair
is drawn (uniformly over categories here), and a class found in one image only always gives a crop
pair. Masks are rasterised at the original size, then resized nearest-neighbour with the image (a
detectron2 mapper may transform the polygons instead): boundary pixels can differ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DatasetLayoutError
from ..heads.mformer_loss import SINECriterion
from ..registry import register_trainer
from ..transforms import preprocess
from .common import (
    CocoInstances,
    GradientAccumulator,
    TrainConfig,
    autocast,
    build_optimiser,
    grad_scaler,
    pil_resize,
    resume_point,
    run_from_file,
    run_steps,
    sample_generator,
    sample_rng,
    start_distributed,
    trainable_model,
)

__all__ = [
    "SINETrainConfig",
    "View",
    "PairSampler",
    "large_scale_jitter",
    "train_sine",
    "train_from_file",
]


@dataclass
class SINETrainConfig(TrainConfig):
    """What `promptseg train sine --config FILE.yaml` reads: the shared keys plus the pairs'."""

    model: str = "sine_dinov2l.coco_ade_o365"
    warmup_steps: int = 100  # linear warmup from 0 to lr, then linear decay to 0 at `steps`
    crop_pair_prob: float = 0.5  # probability that the target is the reference image itself
    jitter_scale: tuple[float, float] = (0.1, 2.0)  # large-scale jitter range (x canvas)
    out: str = "runs/train_sine"

    def problems(self) -> list[str]:
        problems = super().problems()
        if not 0 <= self.crop_pair_prob <= 1:
            problems.append(f"crop_pair_prob ({self.crop_pair_prob}) must be in [0, 1]")
        scale = self.jitter_scale
        if not (isinstance(scale, tuple) and len(scale) == 2 and 0 < scale[0] <= scale[1]):
            problems.append(f"jitter_scale ({scale}) must be [min, max] with 0 < min <= max")
        return problems


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


def large_scale_jitter(
    image: np.ndarray,
    masks: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.1, 2.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Flip (p 0.5), resize to scale x `size` (aspect kept), crop to <= size x size."""
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
    """Official (reference, target) pairs from a CocoInstances dataset: a call draws one pair
    (images and jitter) from the generator it is given, so a pair is reproducible from it."""

    def __init__(
        self,
        data: CocoInstances,
        size: int,
        crop_pair_prob: float = 0.5,
        scale: tuple[float, float] = (0.1, 2.0),
        max_tries: int = 100,
    ) -> None:
        self.data, self.size = data, size
        self.crop_pair_prob, self.scale, self.max_tries = crop_pair_prob, scale, max_tries
        self.classes = list(data.by_class)

    def view(self, index: int, rng: np.random.Generator) -> View:
        """Dataset image `index`, jittered, without the instances the crop removed."""
        image, masks, cats, ids = self.data[index]
        image, masks = large_scale_jitter(image, masks, self.size, rng, self.scale)
        return View(image, masks, cats, ids, index).keep(masks.reshape(len(masks), -1).any(1))

    def __call__(self, rng: np.random.Generator) -> tuple[View, View]:
        """One pair: reference with all its instances, target with the reference's classes."""
        for _ in range(self.max_tries):
            cat = self.classes[rng.integers(len(self.classes))]
            images = self.data.by_class[cat]
            ref_index = images[rng.integers(len(images))]
            others = [i for i in images if i != ref_index]
            crop = rng.random() < self.crop_pair_prob or not others
            tgt_index = ref_index if crop else others[rng.integers(len(others))]
            ref, tgt = self.view(ref_index, rng), self.view(tgt_index, rng)
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


def pair_loss(
    model: Any,
    criterion: SINECriterion,
    config: SINETrainConfig,
    step: int,
    pairs: dict[int, tuple[View, View]],
    j: int,
) -> torch.Tensor:
    """The loss of pair `j` of step `step` (its random points keyed by step and position)."""
    with autocast(config, model.device):
        output, target = training_pair(model, *pairs[j])
        generator = sample_generator(config.seed, step, j)
        return sum(criterion(output, target, generator=generator).values())


def train_sine(config: SINETrainConfig, *, progress: bool = True) -> list[float]:
    """Run the optimiser steps (resuming if asked); returns the loss of every step run (the mean
    over the step's pairs, all ranks); rank 0 saves the weights and the training state."""

    config.check()
    ctx = start_distributed(config)
    torch.manual_seed(config.seed)
    data = CocoInstances(config.annotations, config.images)
    model = trainable_model(config, "backbone")
    params = [p for p in model.head.parameters() if p.requires_grad]
    accumulator = GradientAccumulator(params, ctx)
    optimiser, schedule = build_optimiser(model.head, config)
    scaler = grad_scaler(config, model.device)
    criterion = SINECriterion(world_mean=False)  # per-pair counts, whatever the ranks
    sampler = PairSampler(data, model.canvas("fss"), config.crop_pair_prob, config.jitter_scale)
    start, _ = resume_point(
        config, ctx, head=model.head, optimiser=optimiser, schedule=schedule, scaler=scaler
    )
    model.train()
    model.backbone.eval()

    def step_loss(step: int, positions: range) -> partial:
        pairs = {j: sampler(sample_rng(config.seed, step, j)) for j in positions}
        return partial(pair_loss, model, criterion, config, step, pairs)

    return run_steps(
        ctx,
        config,
        model,
        start=start,
        units=config.batch_size,
        step_loss=step_loss,
        accumulator=accumulator,
        optimiser=optimiser,
        schedule=schedule,
        scaler=scaler,
        desc="train sine",
        progress=progress,
        head=model.head,
    )


@register_trainer("sine")
def train_from_file(path: str | os.PathLike, **overrides: Any) -> str:
    """`promptseg train sine --config FILE`: train, return the summary line."""
    return run_from_file(SINETrainConfig, train_sine, path, overrides)
