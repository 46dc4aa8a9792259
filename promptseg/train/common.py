"""Pieces every family's trainer shares: the YAML config, COCO instance data, AdamW with a
warmup / linear-decay schedule, gradient clipping, mixed precision, training on several
processes, and running a trainer from a config file.

Several processes (`torchrun --nproc_per_node N -m promptseg train FAMILY --config FILE`):
`start_distributed` initialises torch.distributed (env://; NCCL and device cuda:LOCAL_RANK on
CUDA, gloo on CPU) when WORLD_SIZE > 1. `batch_size` stays the number of samples of one optimiser
step, whatever N: the global batch of step t is the same list of samples at any N, and rank r
loads, augments and runs forward and backward for samples r, r + N, ... only (DistributedSampler's
split), so each rank accumulates batch_size / N samples. Sample j of step t is drawn and augmented
with `sample_rng(seed, t, j)` (ODISE's images come from one epoch order every rank follows), and
the randomness inside its loss (criterion points, latent samples) comes from
`sample_generator(seed, t, j)`: neither depends on which rank runs it. The trainable parameters
are wrapped in DistributedDataParallel (`GradientAccumulator`; the frozen encoders are not wrapped
and have no gradient), which starts every rank from rank 0's values and all-reduces the gradients
in the last backward of the step's accumulation, so every rank takes the same optimiser step: N
processes give the updates of one.
Only rank 0 shows progress and writes files; the printed loss is the mean over the global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from PIL import Image
from timm.layers import LayerNorm2d
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

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
    "Distributed",
    "start_distributed",
    "stop_distributed",
    "GradientAccumulator",
    "resume_point",
    "run_steps",
    "sample_generator",
    "sample_rng",
    "autocast",
    "grad_scaler",
    "rank_states",
]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
    amp: str | bool | None = None  # null | bf16 | fp16: CUDA autocast (fp16 with a GradScaler)
    resume: bool = False  # continue from out/train_state.pt when it exists

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
        if self.amp not in (None, False, True, *AMP_DTYPES):
            problems.append(f"amp ({self.amp!r}) must be null, bf16 or fp16")
        return problems

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype `amp` names (true: fp16, ODISE's older spelling), or None."""
        if self.amp is True:
            return torch.float16
        return AMP_DTYPES.get(self.amp) if isinstance(self.amp, str) else None

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
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """Clip the accumulated gradients' global norm to `max_norm`, step; returns the norm before.

    With an enabled `scaler` (fp16) the gradients are unscaled first and the step is skipped on
    overflow. The clipped gradients stay on the parameters until the next `zero_grad`.
    """
    scaled = scaler is not None and scaler.is_enabled()
    if scaled:
        scaler.unscale_(optimiser)
    params = [p for g in optimiser.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, math.inf if max_norm is None else max_norm)
    if scaled:
        scaler.step(optimiser)
        scaler.update()
    else:
        optimiser.step()
    schedule.step()
    return float(norm)


def autocast(config: TrainConfig, device: torch.device) -> torch.autocast:
    """torch.autocast in `config.amp`'s dtype (disabled without `amp`); amp needs CUDA."""
    dtype = config.amp_dtype
    if dtype is not None and device.type != "cuda":
        scaler = " with a gradient scaler" if dtype == torch.float16 else ""
        raise ValueError(
            f"amp: {config.amp} runs autocast{scaler}, which needs CUDA; the model is on "
            f"{device}: set device: cuda or amp: null"
        )
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def grad_scaler(config: TrainConfig, device: torch.device) -> torch.amp.GradScaler:
    """The gradient scaler of fp16 autocast (disabled for bf16 and without amp)."""
    return torch.amp.GradScaler(device.type, enabled=config.amp_dtype == torch.float16)


def sample_rng(seed: int, step: int, index: int) -> np.random.Generator:
    """The numpy generator of the sample at global position `index` of step `step` (what it
    draws and its augmentation): only the rank that trains on the sample loads it, and it is
    the same sample whichever rank that is, and with nothing to save for resuming."""
    return np.random.default_rng([seed, step, index, 1])  # 1: apart from sample_generator


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The torch generator of the sample at global position `index` of step `step`: the same
    draws whichever rank runs the sample, and no state to save for resuming."""
    word = np.random.SeedSequence([seed, step, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(word >> np.uint64(1)))


@dataclass
class Distributed:
    """This process's place in the run: rank, world size and the device of the collectives."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """Rank 0: the process that shows progress and writes files."""
        return self.rank == 0

    def positions(self, count: int) -> range:
        """Global positions of this rank's samples among a step's `count`: r, r + N, ..."""
        return range(self.rank, count, self.world)

    def sum(self, value: float) -> float:
        """`value` summed over the ranks (itself in one process)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)


def start_distributed(config: TrainConfig, *, divisor: int = 1) -> Distributed:
    """Initialise torch.distributed when WORLD_SIZE > 1 (env://: torchrun's variables; NCCL
    and config.device = cuda:LOCAL_RANK when CUDA is used, gloo otherwise); once per process.
    `batch_size` must split into WORLD_SIZE x `divisor` (ODISE's micro_batch) equal parts."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    if config.batch_size % (world * divisor):
        per = f" x micro_batch ({divisor})" if divisor > 1 else ""
        raise ValueError(
            f"batch_size ({config.batch_size}, the samples of one optimiser step over all "
            f"processes) must be divisible by the number of processes (WORLD_SIZE = {world}, "
            f"torchrun --nnodes x --nproc_per_node){per}: each process accumulates batch_size / "
            f"{world} samples; change batch_size (--config key) or the process count"
        )
    local = int(os.environ.get("LOCAL_RANK", "0"))
    wanted = config.device
    cuda = torch.cuda.is_available() and (wanted is None or str(wanted).startswith("cuda"))
    if cuda:
        config.device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://")
    device = torch.device(config.device if cuda else "cpu")
    return Distributed(rank=dist.get_rank(), world=dist.get_world_size(), device=device)


def stop_distributed() -> None:
    """Tear down the process group start_distributed initialised (nothing in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class TrainableParts(nn.Module):
    """The trainable parameters as one module, the one DistributedDataParallel wraps (the frozen
    encoders stay outside it): its forward runs a sample's loss function, so that DDP sees every
    forward and reduces the gradients of these parameters in the backward."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.params = nn.ParameterList(params)  # the model's own Parameter objects, not copies

    def forward(self, loss: Callable[[int], torch.Tensor], position: int) -> torch.Tensor:
        return loss(position)


class GradientAccumulator:
    """Forward and backward of a step's samples on this rank, gradients accumulated; with several
    processes the trainable parts are wrapped in DistributedDataParallel, which copies rank 0's
    values to every rank when built and all-reduces the gradients in the step's last backward
    (`no_sync` before it). DDP averages over the N ranks, so each backward is of
    loss x N / divisor: the reduced gradient is the sum over the global batch / divisor, the
    gradient one process accumulating every sample gets."""

    def __init__(self, params: list[nn.Parameter], ctx: Distributed) -> None:
        self.ctx = ctx
        self.ddp: DistributedDataParallel | None = None
        if ctx.world > 1:
            cuda = ctx.device.type == "cuda"
            self.ddp = DistributedDataParallel(
                TrainableParts(params),
                device_ids=[ctx.device] if cuda else None,
                find_unused_parameters=True,
            )

    def backward(
        self,
        positions: range,
        loss: Callable[[int], torch.Tensor],
        divisor: float,
        scaler: torch.amp.GradScaler,
    ) -> float:
        """Backward of `loss(j) / divisor` for this rank's global positions j (every rank the
        same count, see start_distributed); returns this rank's sum of those quotients."""
        total = 0.0
        for j in positions:
            if self.ddp is None:
                value = loss(j)
                scaler.scale(value / divisor).backward()
            else:
                last = j == positions[-1]
                with contextlib.nullcontext() if last else self.ddp.no_sync():
                    value = self.ddp(loss, j)
                    scaler.scale(value * self.ctx.world / divisor).backward()
            total += float(value.detach()) / divisor
        return total


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


def _rng_state(
    rng: np.random.Generator | None, generator: torch.Generator | None
) -> dict[str, Any]:
    """This process's random states: the data stream (if the trainer has one beside the
    per-sample generators), a torch generator, torch's global RNG."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if rng is not None:
        state["rng"] = rng.bit_generator.state
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def rank_states(
    ctx: Distributed, rng: np.random.Generator | None, generator: torch.Generator | None = None
) -> list[dict[str, Any]]:
    """Every rank's random states, gathered (a collective: all ranks call it), rank order."""
    own = _rng_state(rng, generator)
    if ctx.world == 1:
        return [own]
    gathered: list[Any] = [None] * ctx.world
    dist.all_gather_object(gathered, own)
    return gathered


def save_train_state(
    path: Path,
    *,
    step: int,
    rng: np.random.Generator | None = None,
    generator: torch.Generator | None = None,
    ranks: list[dict[str, Any]] | None = None,
    **parts: Any,
) -> None:
    """What `resume: true` continues from: each part's state_dict (optimiser, schedule, ...; a
    plain dict is stored as it is), the next step and the random states of every rank (`ranks`
    from rank_states; this process's alone without it; rank 0's also at the top level)."""
    state = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in parts.items()}
    ranks = ranks or [_rng_state(rng, generator)]
    state.update(ranks[0], ranks=ranks, step=step)
    torch.save(state, path)


def checkpoint(
    ctx: Distributed,
    config: TrainConfig,
    step: int,
    model: nn.Module,
    /,
    *,
    rng: np.random.Generator | None = None,
    **parts: Any,
) -> None:
    """After optimiser step `step` (0-based), every `save_every` steps and at the last: rank 0
    writes the weights (`out`/promptseg.safetensors) and what `resume: true` continues from
    (`out`/train_state.pt: `parts`' states and every rank's random states). All ranks call it."""
    if (step + 1) % config.save_every and step + 1 != config.steps:
        return
    from ..weights import save_state_dict_file

    ranks = rank_states(ctx, rng)  # a collective
    if ctx.main:
        out_dir = Path(config.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_state_dict_file(model.state_dict(), out_dir / "promptseg.safetensors")
        save_train_state(out_dir / STATE_FILE, step=step + 1, rng=rng, ranks=ranks, **parts)


def load_train_state(
    path: Path,
    *,
    rng: np.random.Generator | None = None,
    generator: torch.Generator | None = None,
    rank: int = 0,
    **parts: Any,
) -> tuple[int, dict[str, Any]]:
    """Restore a save_train_state file into `parts` (objects with load_state_dict) and the
    random states saved for `rank` (rank 0's for a rank the file lacks: the data stream is the
    same on every rank); returns (the step to continue from, the whole state for the rest).
    A restored optimiser and LambdaLR schedule continue on this run's schedule: the config's
    `steps` may have changed since the save, so each group's lr is recomputed for the step."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for name, part in parts.items():
        part.load_state_dict(state[name])
    step = int(state["step"])
    optimiser, schedule = parts.get("optimiser"), parts.get("schedule")
    if isinstance(schedule, torch.optim.lr_scheduler.LambdaLR) and optimiser is not None:
        for group, factor in zip(optimiser.param_groups, schedule.lr_lambdas, strict=True):
            group["lr"] = group["initial_lr"] * factor(step)
    ranks = state.get("ranks") or [state]
    own = ranks[rank] if rank < len(ranks) else ranks[0]
    if rng is not None:
        rng.bit_generator.state = own["rng"]
    if generator is not None and "generator" in own:
        generator.set_state(own["generator"])
    if "torch" in own and rank < len(ranks):
        torch.set_rng_state(own["torch"])
    return step, state


def resume_point(config: TrainConfig, ctx: Distributed, **parts: Any) -> tuple[int, dict[str, Any]]:
    """With `resume: true` and a saved `out`/train_state.pt: load_train_state into `parts` (and
    `rng=`), returning (step to continue from, saved state); otherwise (0, {}): a fresh start."""
    path = Path(config.out) / STATE_FILE
    if not (config.resume and path.is_file()):
        return 0, {}
    return load_train_state(path, rank=ctx.rank, **parts)


def run_steps(
    ctx: Distributed,
    config: TrainConfig,
    model: nn.Module,
    /,
    *,
    start: int,
    units: int,
    step_loss: Callable[[int, range], Callable[[int], torch.Tensor]],
    accumulator: GradientAccumulator,
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    desc: str,
    progress: bool,
    rng: np.random.Generator | None = None,
    **saved: Any,
) -> list[float]:
    """Optimiser steps `start`..`config.steps` - 1, the loop every trainer shares: each step
    splits its `units` (samples or micro-batches) over the ranks, accumulates the losses
    `step_loss(step, this rank's positions)` gives by position, takes the clipped optimiser step
    and checkpoints `saved` (and `rng`'s state); rank 0 shows the bar. Returns every step's loss,
    the mean over the global batch; leaves the model in eval mode."""
    losses = []
    bar = tqdm(range(start, config.steps), desc=desc, disable=not (progress and ctx.main) or None)
    for step in bar:
        lr = optimiser.param_groups[0]["lr"]
        optimiser.zero_grad(set_to_none=True)
        positions = ctx.positions(units)
        total = accumulator.backward(positions, step_loss(step, positions), units, scaler)
        norm = optimiser_step(optimiser, schedule, config.grad_clip, scaler)
        total = ctx.sum(total)
        losses.append(total)
        bar.set_postfix(loss=f"{total:.4g}", lr=f"{lr:.2e}", grad_norm=f"{norm:.3g}")
        checkpoint(
            ctx,
            config,
            step,
            model,
            rng=rng,
            optimiser=optimiser,
            schedule=schedule,
            scaler=scaler,
            **saved,
        )
    model.eval()
    return losses


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
    try:
        losses = train(config)
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return ""  # rank 0 alone reports
    finally:
        stop_distributed()
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
