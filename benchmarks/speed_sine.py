"""SINE video: what caching frame features saves against the official recompute-every-step loop.

The official VOS loop re-encodes every memory frame of every object at every step; promptseg
encodes each frame once (as the target) and reuses those features when it becomes memory. This
script times promptseg's `segment_video` and the encoder alone in the same run, counts the encoder
passes the official loop makes for the same clip, and reports both totals and their ratio.

    python benchmarks/speed_sine.py [--frames 20] [--full]   # --full: ViT-L at the 1036 canvas
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import promptseg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--objects", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="full-size config, one frame step")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name = "sine_dinov2l" if args.full else "sine_test_tiny"
    model = promptseg.create_model(name, pretrained=False)
    memory = model.video["memory"]
    frames_n = 2 if args.full else args.frames
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (480, 854, 3), dtype=np.uint8) for _ in range(frames_n)]
    labels = np.zeros((480, 854), np.uint8)
    for k in range(1, args.objects + 1):
        labels[40 * k : 40 * k + 100, 100 * k : 100 * k + 150] = k

    list(model.segment_video(frames[:1], labels))  # warm-up
    start = time.perf_counter()
    list(model.segment_video(frames, labels))
    ours = time.perf_counter() - start

    with torch.inference_mode():
        batch = [model._video_pixels(promptseg.imageio.load_image(f)) for f in frames]
        model.features(batch[0])  # warm-up
        start = time.perf_counter()
        for pixels in batch:
            model.features(pixels)
        encode = (time.perf_counter() - start) / len(batch)

    # official: per frame t, one target pass + one pass per memory frame of every object
    extra = sum(args.objects * min(t + 1, memory) for t in range(frames_n))
    official = ours + extra * encode
    print(
        f"{name}, {frames_n} frames 480x854, {args.objects} objects, memory {memory}, "
        f"{args.threads} threads"
    )
    print("| | promptseg (s) | official loop (s) | ours / official |")
    print("|---|---:|---:|---:|")
    print(f"| clip | {ours:.2f} | {official:.2f} | {ours / official:.3f}x |")
    print(f"encoder pass {1000 * encode:.0f} ms; official makes {extra} extra passes")


if __name__ == "__main__":
    main()
