"""ODISE's memory: resident weights and the peak of one forward for a 1024 x 1365 image.

Full-size `odise_sd13_m2f` with random weights (seeded, `pretrained=False`: the same shapes as
the released weights). Weights resident = parameter + buffer bytes of the built model (one CLIP,
no Stable Diffusion text encoder). Peak of one `segment(level="all")` call with the COCO
vocabulary: on CUDA `torch.cuda.max_memory_allocated`; on CPU the process's peak resident set
(`ru_maxrss`) minus the resident set before the call (an upper bound of tensor memory: it also
counts the allocator's caches; one dtype per run).

    python benchmarks/memory_odise.py [--device cpu|cuda] [--dtypes fp32 bf16] [--threads 2]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

import promptseg

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZE = (1024, 1365)  # the image: 2 x 3 windows of 512 after padding to 1024 x 1408
GIB = 2**30


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def rss_bytes() -> int:
    """This process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """This process's resident set now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(dtype: torch.dtype, device: str) -> dict[str, float]:
    torch.manual_seed(0)
    model = promptseg.create_model(
        "odise_sd13_m2f", pretrained=False, device=device, dtype=dtype
    ).eval()
    image = np.random.default_rng(0).integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    vocabulary = promptseg.Vocabulary.preset("coco_panoptic")
    model.encode_prompt([vocabulary])  # text embeddings are the prompt's cost, not the image's
    weights = resident_bytes(model)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = current_rss_bytes()
    start = time.perf_counter()
    with torch.inference_mode():
        res = model.segment(image, vocabulary, level="all")
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = rss_bytes()
    seconds = time.perf_counter() - start
    return {
        "weights": weights / GIB,
        "peak": peak / GIB,
        "forward": (peak - before) / GIB,
        "seconds": seconds,
        "masks": len(res),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.device == "cpu" and len(args.dtypes) > 1:
        parser.error("on CPU the peak is the process's: give one --dtypes value per run")
    torch.set_num_threads(args.threads)
    print(f"ODISE odise_sd13_m2f, one {SIZE[0]} x {SIZE[1]} image, {args.device}")
    print("| dtype | weights resident (GiB) | peak (GiB) | forward's own (GiB) | seconds |")
    print("|---|---|---|---|---|")
    for name in args.dtypes:
        r = measure(DTYPES[name], args.device)
        print(
            f"| {name} | {r['weights']:.2f} | {r['peak']:.2f} | {r['forward']:.2f} "
            f"| {r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
