"""CLIPSeg speed: promptseg vs transformers on one image, 1 and 8 prompts (CPU, 352x352).

Both models get the same random full-size weights (rd64-refined). transformers needs the image
repeated once per prompt; promptseg encodes the image once and decodes the prompts in a batch.
promptseg is timed end to end (`segment()` from a uint8 image: preprocessing, tokenisation,
masks at the original size); transformers from ready pixel tensors and token ids.

    python benchmarks/speed_clipseg.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from promptseg.testing.clipseg import FULL, hf_model, ours_from

PROMPTS = ["a cup", "a plate", "a fork", "a glass", "a bottle", "a knife", "a spoon", "a bowl"]


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    hf = hf_model(FULL, refined=True, reduce_dim=64)
    ours = ours_from(hf, "clipseg_vitb16_rd64.refined")
    image = np.random.default_rng(0).integers(0, 256, (352, 352, 3), dtype=np.uint8)
    pixels = ours.preprocess(torch.from_numpy(image).permute(2, 0, 1))

    rows = []
    for n in (1, 8):
        prompts = PROMPTS[:n]
        ids = ours.text_encoder.tokenize(prompts)

        def theirs(ids=ids, n=n):
            with torch.inference_mode():
                hf(input_ids=ids, pixel_values=pixels.expand(n, -1, -1, -1))

        def promptseg(prompts=prompts):
            ours.segment(image, prompts)

        t_theirs = median_seconds(theirs, args.repeats)
        t_ours = median_seconds(promptseg, args.repeats)
        rows.append((n, t_ours, t_theirs))

    print(f"CLIPSeg rd64-refined, CPU, {args.threads} threads, 352x352, median of {args.repeats}")
    print("| prompts | promptseg (ms) | transformers (ms) | ours / theirs |")
    print("|---:|---:|---:|---:|")
    for n, t_ours, t_theirs in rows:
        print(f"| {n} | {1000 * t_ours:.0f} | {1000 * t_theirs:.0f} | {t_ours / t_theirs:.2f}x |")


if __name__ == "__main__":
    main()
