"""DiffewS speed: a cached support bank against recomputing the support side per query.

Both run in the same process on the same weights and give the same masks:
- cached (promptseg): the support set is encoded once (VAE latents; the first query's fused UNet
  call keeps the references' keys and values); every later query costs one VAE encode, one UNet
  pass of the query alone and one VAE decode;
- official-style: every query re-encodes the K support images and masks and runs the two UNet
  calls of the official code (supports, then the query), then the decode.
Peak memory is the peak resident set of a fresh process per path (CPU) or the CUDA peak.

    python benchmarks/speed_diffews.py [--shots 1 5] [--queries 4]        # tiny config
    python benchmarks/speed_diffews.py --full --queries 2 [--shots 1]     # SD 2.1 size, 512 px
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

import promptseg
from promptseg.models.diffews import SupportBank, quantized_map


def episode(shots: int, queries: int, size: int) -> tuple[list, list]:
    """Random support pairs (image, box mask) and query images."""
    rng = np.random.default_rng(0)
    supports = []
    for _ in range(shots):
        mask = np.zeros((size, size), bool)
        mask[size // 4 : 3 * size // 4, size // 5 : 4 * size // 5] = True
        supports.append((rng.integers(0, 256, (size, size, 3), dtype=np.uint8), mask))
    return supports, [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(queries)]


def official_query(model, supports: list, query: np.ndarray) -> torch.Tensor:
    """Everything recomputed for one query: support latents, support pass, query pass, decode."""
    prompt = promptseg.SupportSet(supports)
    (bank,) = model.encode_prompt([prompt])  # 2K VAE encodes
    model.support_pass(bank)  # the official first UNet call
    z_q = model.encode_image(model.preprocess(promptseg.imageio.load_image(query)))
    v = model.query_pass(z_q, bank)  # the official second UNet call
    return quantized_map(model.vae.decode(-v.float() / model.scaling).sample)


def run(path: str, full: bool, shots: int, queries: int) -> dict:
    """Time one path in this process: per-query seconds (median) and the masks' checksum."""
    torch.manual_seed(0)
    name = "diffews_sd21" if full else "diffews_test_tiny"
    model = promptseg.create_model(name, pretrained=False)
    size = 512 if full else 32
    supports, images = episode(shots, queries, size)
    times, maps = [], []
    with torch.inference_mode():
        if path == "cached":
            (bank,) = model.encode_prompt([promptseg.SupportSet(supports)])
            bank = SupportBank(bank.latents)
            for image in images:
                start = time.perf_counter()
                emb = model.embed_image(image)
                maps.append(model.decode(emb.features, [bank], "semantic"))
                times.append(time.perf_counter() - start)
                model.clear_caches()
        else:
            for image in images:
                start = time.perf_counter()
                maps.append(official_query(model, supports, image))
                times.append(time.perf_counter() - start)
    later = times[1:] or times  # the cached path's first query also fills the bank
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "seconds": statistics.median(later),
        "first": times[0],
        "peak_mib": peak,
        "maps": [m.flatten().tolist()[:64] for m in maps],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="SD 2.1 size at 512 (slow on CPU)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--path", choices=["cached", "official"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.path:  # child process: one path, JSON on stdout
        print(json.dumps(run(args.path, args.full, args.shots[0], args.queries)))
        return
    print("| config | shots | cached s/query | official-style s/query | ratio | "
          "peak MiB cached / official | same maps |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---|")
    for shots in args.shots:
        out = {}
        for path in ("cached", "official"):
            cmd = [sys.executable, __file__, "--path", path, "--shots", str(shots)]
            cmd += ["--queries", str(args.queries), "--threads", str(args.threads)]
            cmd += ["--full"] if args.full else []
            out[path] = json.loads(subprocess.run(cmd, check=True, capture_output=True).stdout)
        c, o = out["cached"], out["official"]
        same = np.allclose(c["maps"], o["maps"], atol=1.01 / 255)
        print(
            f"| {'SD 2.1, 512' if args.full else 'tiny, 32'} | {shots} | {c['seconds']:.3f} | "
            f"{o['seconds']:.3f} | {c['seconds'] / o['seconds']:.2f}x | "
            f"{c['peak_mib']:.0f} / {o['peak_mib']:.0f} | {'yes' if same else 'NO'} |"
        )


if __name__ == "__main__":
    main()
