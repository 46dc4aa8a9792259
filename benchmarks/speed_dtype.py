"""segment() time in fp32, bf16 and fp16 for CLIPSeg and SINE, on the same full-size weights.

Each family is built once with random weights (seeded, `pretrained=False`); each dtype is a copy
of those weights cast with `.to(dtype)`. Every timed call segments a new image, so no image
features are reused; SINE's reference is pooled once during the warm-up and reused, as its
caching intends. The mask IoU vs fp32 is the pooled IoU over every mask of every timed image.
A dtype whose ops the device lacks shows "n/a". fp16 on a CPU is slow (no fast half kernels).

    python benchmarks/speed_dtype.py [--device cpu|cuda] [--repeats 3] [--threads 2]
        [--families clipseg sine] [--dtypes fp32 bf16 fp16] [--sine-level semantic]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch

import promptseg

MODELS = {"clipseg": "clipseg_vitb16_rd64", "sine": "sine_dinov2s"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZE = (480, 640)
TEXTS = ["a cup", "a dog on a sofa"]


def images(n: int) -> list[np.ndarray]:
    """`n` distinct random uint8 images of SIZE (distinct content: no feature-cache hits)."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8) for _ in range(n)]


def prompt_for(family: str) -> object:
    """Two texts for CLIPSeg; one reference image with a box mask for SINE."""
    if family == "clipseg":
        return TEXTS
    ref = np.random.default_rng(1).integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    mask = np.zeros(SIZE, dtype=bool)
    mask[120:360, 160:480] = True
    return promptseg.VisualPrompt(ref, mask)


def timed_masks(
    model: torch.nn.Module, prompt: object, imgs: list[np.ndarray], device: str, level: str
) -> tuple[float, list[torch.Tensor]]:
    """(median seconds of segment() over imgs[1:], masks of every image); imgs[0] warms up."""
    masks = [model.segment(imgs[0], prompt, level=level).masks]
    times = []
    for img in imgs[1:]:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        masks.append(model.segment(img, prompt, level=level).masks)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), masks


def pooled_iou(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Intersection over union summed over every mask of every image."""
    inter = sum(int((x & y).sum()) for x, y in zip(a, b, strict=True))
    union = sum(int((x | y).sum()) for x, y in zip(a, b, strict=True))
    return inter / union if union else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--families", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument(
        "--sine-level", choices=["semantic", "instance", "identity"], default="semantic"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtypes = ["fp32", *[d for d in args.dtypes if d != "fp32"]]  # fp32 is the reference
    imgs = images(args.repeats + 1)

    rows = []
    for family in args.families:
        torch.manual_seed(0)
        base = promptseg.create_model(MODELS[family], pretrained=False)
        prompt = prompt_for(family)
        level = args.sine_level if family == "sine" else None
        fp32: tuple[float, list[torch.Tensor]] | None = None
        for name in dtypes:
            model = copy.deepcopy(base).to(device=args.device, dtype=DTYPES[name])
            try:
                seconds, masks = timed_masks(model, prompt, imgs, args.device, level)
            except RuntimeError as exc:  # an op without a kernel for this dtype on this device
                rows.append((family, name, None, None, None, str(exc).splitlines()[0]))
                continue
            finally:
                del model
            fp32 = fp32 or (seconds, masks)
            coverage = torch.cat([m.flatten(1).float().mean(dim=1) for m in masks])
            note = f"mask coverage {float(coverage.min()):.2f}-{float(coverage.max()):.2f}"
            if bool(((coverage < 0.01) | (coverage > 0.99)).any()):
                note += " (degenerate masks: the IoU says little)"
            rows.append(
                (family, name, seconds, seconds / fp32[0], pooled_iou(masks, fp32[1]), note)
            )

    device = args.device if args.device == "cuda" else f"CPU, {args.threads} threads"
    print(f"segment() by dtype, {device}, {SIZE[0]}x{SIZE[1]} images, median of {args.repeats}")
    print("| family | model | dtype | median (ms) | vs fp32 | mask IoU vs fp32 | note |")
    print("|---|---|---|---:|---:|---:|---|")
    for family, name, seconds, ratio, iou, note in rows:
        ms = f"{1000 * seconds:.0f}" if seconds is not None else "n/a"
        ratio_s = f"{ratio:.2f}x" if ratio is not None else "n/a"
        iou_s = f"{iou:.4f}" if iou is not None else "n/a"
        label = MODELS[family] + (f" ({args.sine_level})" if family == "sine" else "")
        print(f"| {family} | {label} | {name} | {ms} | {ratio_s} | {iou_s} | {note} |")


if __name__ == "__main__":
    main()
