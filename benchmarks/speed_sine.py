"""SINE speed: promptseg's caching against the official recompute-everything loops, both measured.

Baselines run in the same process with the same modules, recomputing as the official scripts do:
- VOS (`tools/eval_vos.py`): every step re-encodes every memory frame of every object (batches of
  4) and the target; promptseg encodes each frame once and reuses it as memory.
- few-shot (`tools/eval_fss.py`): every call re-encodes the references and the target;
  promptseg pools each (reference, mask) once and caches it, so later targets cost one pass.
Both paths must give the same masks; the table says whether they do.

    python benchmarks/speed_sine.py [--frames 20] [--shots 5 --targets 4]   # tiny config
    python benchmarks/speed_sine.py --full [--shots 5]   # ViT-L, real canvases, 1 frame, 1 target
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

import promptseg
from promptseg.imageio import content_hash, load_image, load_label_map, load_mask
from promptseg.models.base import ImageEmbedding
from promptseg.models.sine import SINE
from promptseg.models.sine_prompts import SINEPrompt
from promptseg.models.sine_video import MemoryBank, MemoryEntry, merge_objects
from promptseg.transforms import resize_mask


def official_vos(model: SINE, frames: Sequence[np.ndarray], first: np.ndarray) -> Iterator:
    """The official VOS loop: memory holds canvas pixels, re-encoded at every step."""
    banks: dict[int, MemoryBank] = {}
    capacity = int(model.video["memory"])
    for t, frame in enumerate(frames):
        image = load_image(frame)
        size = tuple(image.shape[-2:])
        small, big = model._video_geometry(*size)
        with model._vos_autocast():
            pixels = model._video_pixels(image)  # [1, 3, canvas, canvas]
            target = model.encode_image(pixels)
            if t == 0:
                labels = load_label_map(first, size=size)
                for k in [int(k) for k in torch.unique(labels) if 0 < int(k) < 255]:
                    mask = model._video_mask(labels == k, small, big)
                    banks[k] = MemoryBank(capacity, MemoryEntry(pixels[0], mask, 1.0, 0))
            entries = [(k, e) for k in sorted(banks) for e in banks[k].frames()]
            stacked = torch.stack([e.feats for _, e in entries])  # stored pixels [R, 3, c, c]
            feats = torch.cat(
                [model.features(stacked[i : i + 4]) for i in range(0, len(stacked), 4)]
            )
            refs = [(k, f, e.mask) for (k, e), f in zip(entries, feats, strict=True)]
            ids, logits, scores = model.vos_decode(target, refs, small, big)
            masks = logits > 0
            for k, mask, score in zip(ids.tolist(), masks, scores.tolist(), strict=True):
                entry = MemoryEntry(
                    pixels[0], model._video_mask(mask, small, big), score if mask.any() else 0.0, t
                )
                banks[k].push(entry, t)
        yield resize_mask(merge_objects(masks, ids).cpu(), size)


def official_fewshot(model: SINE, target: np.ndarray, shots: Sequence[tuple]) -> Any:
    """The official FSS episode: encode the k shots (one batch) and the target, decode."""
    image = load_image(target)
    refs = [load_image(img) for img, _ in shots]
    feats = model.features(torch.cat([model.preprocess(r) for r in refs]))  # [k, C, g, g]
    masks = [
        model._canvas_mask(load_mask(m, size=tuple(r.shape[-2:])))[None].to(model.device)
        for r, (_, m) in zip(refs, shots, strict=True)
    ]
    tokens = model.head.pool_tokens(
        feats,
        masks,
        ids=[torch.tensor([i]) for i in range(len(shots))],
        classes=[torch.tensor([0]) for _ in shots],
    )
    embedding = ImageEmbedding(
        {"fss": model.encode_image(model.preprocess(image))}, image, content_hash(image)
    )
    return model.run(embedding, [], [SINEPrompt({"fss": tokens})], level="semantic")


def agreement(ours: Sequence[torch.Tensor], theirs: Sequence[torch.Tensor]) -> float:
    """Fraction of equal pixels over paired masks / label maps."""
    equal = sum(int((a == b).sum()) for a, b in zip(ours, theirs, strict=True))
    return equal / max(sum(a.numel() for a in ours), 1)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


class PassCounter:
    """Counts images through the encoder (batch sizes summed)."""

    def __init__(self, model: SINE) -> None:
        self.images = 0
        original = model.backbone.forward_features

        def counting(pixels: torch.Tensor) -> dict:
            self.images += len(pixels)
            return original(pixels)

        model.backbone.forward_features = counting

    def take(self) -> int:
        """Images encoded since the last call."""
        n, self.images = self.images, 0
        return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20, help="VOS clip length (tiny config)")
    parser.add_argument("--objects", type=int, default=2)
    parser.add_argument("--shots", type=int, default=5, help="few-shot references")
    parser.add_argument("--targets", type=int, default=4, help="few-shot targets (tiny config)")
    parser.add_argument("--full", action="store_true", help="ViT-L, 1 frame and 1 target")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name = "sine_dinov2l" if args.full else "sine_test_tiny"
    torch.manual_seed(0)
    model = promptseg.create_model(name, pretrained=False)
    n_frames, n_targets = (1, 1) if args.full else (args.frames, args.targets)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (480, 854, 3), dtype=np.uint8) for _ in range(n_frames)]
    first = np.zeros((480, 854), np.uint8)
    for k in range(1, args.objects + 1):
        first[40 * k : 40 * k + 100, 100 * k : 100 * k + 150] = k
    shots = []
    for i in range(args.shots):
        mask = np.zeros((480, 640), bool)
        mask[50 + 20 * i : 250 + 20 * i, 100:400] = True
        shots.append((rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), mask))
    support = promptseg.SupportSet(shots)
    targets = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(n_targets)]
    passes = PassCounter(model)
    rows = []

    with torch.inference_mode():  # warm-up (allocator, kernels): one pass at the largest canvas
        canvas = int(model.video["canvas"])
        model.features(torch.zeros(1, 3, canvas, canvas, dtype=model.dtype))
    if not args.full:  # and, where it is cheap, every path once
        list(model.segment_video(frames[:1], first))
        model.segment(targets[0], support)
        model.clear_caches()
    passes.take()

    t_ours, ours = timed(lambda: list(model.segment_video(frames, first)))
    p_ours = passes.take()
    with torch.inference_mode():
        t_off, off = timed(lambda: list(official_vos(model, frames, first)))
    p_off = passes.take()
    label = f"VOS, {n_frames} frame(s), {args.objects} objects"
    rows.append((label, t_ours, t_off, p_ours, p_off, agreement(ours, off)))

    model.clear_caches()
    t_cold, cold = timed(lambda: model.segment(targets[0], support))
    p_cold = passes.take()
    with torch.inference_mode():
        t_off1, off1 = timed(lambda: official_fewshot(model, targets[0], shots))
    p_off1 = passes.take()
    label = f"few-shot {args.shots}-shot, 1st target"
    rows.append((label, t_cold, t_off1, p_cold, p_off1, agreement([cold.masks], [off1.masks])))

    model._image_cache.clear()  # as a new target would be: only the references are cached
    t_warm, warm = timed(lambda: model.segment(targets[0], support))
    p_warm = passes.take()
    label = "few-shot, next target (refs cached)"
    rows.append((label, t_warm, t_off1, p_warm, p_off1, agreement([warm.masks], [off1.masks])))
    if n_targets > 1:
        model.clear_caches()
        t_all, all_ours = timed(lambda: [model.segment(t, support).masks for t in targets])
        p_all = passes.take()
        with torch.inference_mode():
            t_off_all, all_off = timed(
                lambda: [official_fewshot(model, t, shots).masks for t in targets]
            )
        p_off_all = passes.take()
        label = f"few-shot {args.shots}-shot, {n_targets} targets"
        rows.append((label, t_all, t_off_all, p_all, p_off_all, agreement(all_ours, all_off)))

    print(f"{name}, {args.threads} threads, VOS frames 480x854, few-shot images 480x640")
    print(
        "| case | promptseg (s) | official loop (s) | ours / official "
        "| encoder images ours / official | mask pixels equal |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for label, t_a, t_b, p_a, p_b, same in rows:
        print(
            f"| {label} | {t_a:.2f} | {t_b:.2f} | {t_a / t_b:.3f}x | {p_a} / {p_b} "
            f"| {100 * same:.3f} % |"
        )


if __name__ == "__main__":
    main()
