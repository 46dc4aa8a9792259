"""`promptseg train diffews`: fine-tune DiffewS's UNet (and reference conv) on COCO-format data.

Episodes as the official few-shot training: a class drawn uniformly, a query image containing it
and 1..`shots` other images containing it as supports (drawn anew every step); masks are the
union of the class's instances; images squashed to the input size (no augmentation), masks
nearest. Loss (official): the UNet at t = 1 on [query ; supports] (one fused call, the supports'
keys and values feeding the query's self-attention), MSE between the query's output and the
negated latent of its mask drawn as +-1 RGB; latents are posterior samples; the supports' output
enters the loss times 0. AdamW (lr 1e-5, weight decay 1e-2 on every parameter), linear decay to
`lr_end`, gradient clipping, `batch_size` episodes accumulated per step. The VAE is frozen.
`resume: true` continues from `out/train_state.pt` (optimiser, schedule, scaler, step, every
rank's RNGs). Episode j of step t is drawn from `sample_rng(seed, t, j)`, and its latents'
posterior samples come from `sample_generator(seed, t, j)`. `amp: bf16 | fp16`: CUDA autocast of
the episode's passes (fp16 with a gradient scaler; the official recipe trained in fp16).

Several processes (torchrun, see promptseg.train.common): rank r draws, loads and trains on
episodes r, r + N, ... of each step, and DistributedDataParallel all-reduces the UNet's gradients
before the step (batch_size / N episodes per rank, the same updates as one process).

Text context: the official training conditioned on the empty prompt padded to 77 tokens, while
evaluation uses the 2 unpadded tokens the model holds. `text_context: FILE` (the
`empty_prompt_embedding.safetensors` that `promptseg.convert.diffews.write_empty_prompt_embedding`
writes, key `padded`) trains as the official code did; without it training uses the 2-token
context and says so. Not reproduced: the official episode lists of the in-context setting.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DatasetLayoutError
from ..registry import register_trainer
from .common import (
    CocoInstances,
    GradientAccumulator,
    TrainConfig,
    autocast,
    grad_scaler,
    lr_factor,
    resume_point,
    run_from_file,
    run_steps,
    sample_generator,
    sample_rng,
    start_distributed,
    trainable_model,
)

__all__ = ["DiffewSTrainConfig", "EpisodeSampler", "episode_loss", "train_diffews"]


@dataclass
class DiffewSTrainConfig(TrainConfig):
    """What `promptseg train diffews --config FILE.yaml` reads: the shared keys plus `shots`."""

    model: str = "diffews_sd21"
    shots: int = 2  # each episode draws 1..shots supports (official: 2)
    batch_size: int = 4  # episodes accumulated per step (official: 4)
    lr: float = 1e-5
    lr_end: float = 1e-7
    weight_decay: float = 1e-2
    steps: int = 20000
    out: str = "runs/train_diffews"
    text_context: str | None = None  # empty_prompt_embedding.safetensors with key `padded`

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.shots < 1:
            problems.append(f"shots ({self.shots}) must be >= 1")
        if self.text_context is not None and not Path(self.text_context).is_file():
            problems.append(
                f"text_context ({self.text_context}) is not a file; give the "
                "empty_prompt_embedding.safetensors written by write_empty_prompt_embedding"
            )
        return problems


def training_text_context(config: DiffewSTrainConfig, model: Any) -> torch.Tensor | None:
    """The official 77-token training context [1, 77, C] from `config.text_context`, or None
    (train with the model's 2-token evaluation context, with a warning saying so)."""
    if config.text_context is None:
        warnings.warn(
            "training with the 2-token empty-prompt context of evaluation; the official training "
            "used it padded to 77 tokens: set text_context to an empty_prompt_embedding."
            "safetensors holding `padded` (write_empty_prompt_embedding writes one)",
            stacklevel=2,
        )
        return None
    from ..weights import load_state_dict_file

    tensors = load_state_dict_file(config.text_context)
    width = model.empty_prompt_embedding.shape[-1]
    context = tensors.get("padded")
    if context is None or context.ndim != 3 or context.shape[0] != 1 or context.shape[2] != width:
        got = (
            "no `padded` tensor" if context is None else f"`padded` of shape {list(context.shape)}"
        )
        raise ValueError(
            f"text_context {config.text_context} has {got}; expected `padded` [1, L, {width}] "
            "as written by promptseg.convert.diffews.write_empty_prompt_embedding"
        )
    return context.float()


class EpisodeSampler:
    """(query image, query mask, support images, support masks) of one class: a call draws one
    episode from the generator it is given, so an episode is reproducible from it."""

    def __init__(self, data: CocoInstances, shots: int) -> None:
        self.data, self.shots = data, shots
        self.classes = [c for c, images in data.by_class.items() if len(images) > 1]
        if not self.classes:
            raise DatasetLayoutError(
                "no class appears in two images: a DiffewS episode needs a query and at least "
                "one other image of its class as a support"
            )

    def _class_mask(self, index: int, cat: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 image [3, H, W] and the union of the class's instance masks, bool [H, W]."""
        image, masks, cats, _ = self.data[index]
        mask = masks[cats == cat].any(axis=0)
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), torch.from_numpy(
            mask
        )

    def __call__(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, list, list]:
        cat = self.classes[rng.integers(len(self.classes))]
        images = self.data.by_class[cat]
        query = images[rng.integers(len(images))]
        others = [i for i in images if i != query]
        k = min(int(rng.integers(1, self.shots + 1)), len(others))
        chosen = rng.choice(others, size=k, replace=False)
        q_image, q_mask = self._class_mask(query, cat)
        supports = [self._class_mask(int(i), cat) for i in chosen]
        return q_image, q_mask, [s[0] for s in supports], [s[1] for s in supports]


def episode_loss(
    model: Any,
    episode: tuple,
    generator: torch.Generator | None = None,
    text_context: torch.Tensor | None = None,
) -> torch.Tensor:
    """The official loss of one episode (one fused UNet call of batch 1 + K)."""
    q_image, q_mask, s_images, s_masks = episode
    sample = {"sample": True, "generator": generator}
    with torch.no_grad():  # the VAE is frozen
        refs = model.support_latents(s_images, s_masks, **sample)  # [K, 8, h, w]
        pixels = model.preprocess(q_image)
        z_q = model.latents(pixels, **sample)
        target = -model.latents(model.mask_pixels(q_mask, tuple(pixels.shape[-2:])), **sample)
    query = F.pad(z_q, (0, 0, 0, 0, 0, refs.shape[1] - z_q.shape[1]))
    with model.bank_mode("fused", n_query=1):
        out = model.unet_pass(torch.cat([query, refs]), n_query=1, text_context=text_context)
    return F.mse_loss(out[:1].float(), target.float()) + 0.0 * out[1:].sum()


def step_episode_loss(
    model: Any,
    config: DiffewSTrainConfig,
    step: int,
    episodes: dict[int, tuple],
    text_context: torch.Tensor | None,
    j: int,
) -> torch.Tensor:
    """The loss of episode `j` of step `step` (its latent noise keyed by step and position)."""
    generator = sample_generator(config.seed, step, j)
    with autocast(config, model.device):
        return episode_loss(model, episodes[j], generator, text_context)


def train_diffews(config: DiffewSTrainConfig, *, progress: bool = True) -> list[float]:
    """Run the optimiser steps (resuming if asked); returns the loss of every step run (the mean
    over the step's episodes, all ranks); rank 0 saves the weights and the training state."""

    config.check()
    ctx = start_distributed(config)
    torch.manual_seed(config.seed)
    data = CocoInstances(config.annotations, config.images)
    model = trainable_model(config, "vae")
    text_context = training_text_context(config, model)
    autocast(config, model.device)  # amp needs CUDA: say so before training
    params = [p for p in model.parameters() if p.requires_grad]
    accumulator = GradientAccumulator(params, ctx)
    optimiser = torch.optim.AdamW(
        params, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay
    )
    end = config.lr_end / config.lr if config.lr else 0.0
    factor = partial(lr_factor, warmup=config.warmup_steps, total=config.steps, end=end)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
    scaler = grad_scaler(config, model.device)
    start, _ = resume_point(
        config, ctx, model=model, optimiser=optimiser, schedule=schedule, scaler=scaler
    )
    model.train()
    model.vae.eval()
    sampler = EpisodeSampler(data, config.shots)

    def step_loss(step: int, positions: range) -> partial:
        episodes = {j: sampler(sample_rng(config.seed, step, j)) for j in positions}
        return partial(step_episode_loss, model, config, step, episodes, text_context)

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
        desc="train diffews",
        progress=progress,
        model=model,
    )


@register_trainer("diffews")
def train_from_file(path: str | os.PathLike, **overrides: Any) -> str:
    """`promptseg train diffews --config FILE`: train, return the summary line."""
    return run_from_file(DiffewSTrainConfig, train_diffews, path, overrides)
