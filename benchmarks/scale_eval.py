"""Sharded evaluation throughput: `eval fss` with the tiny SINE on 1 and 2 processes (CPU).

Each setting is a fresh `python -m torch.distributed.run --nproc_per_node N -m promptseg eval fss`
(N = 1: plain `python -m promptseg`) on the miniature PASCAL-5i (`--fold all`), one thread per
process; the seconds are the eval loops' (result.json `timing.total_s`, the slowest rank's, summed
over folds), the wall column includes start-up (imports, model build, process group). Prints a
markdown table.

    python benchmarks/scale_eval.py [--episodes 500] [--shots 5] [--procs 1,2] [--data-root mini]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_eval(
    data_root: Path, out: Path, procs: int, episodes: int, shots: int
) -> tuple[float, float]:
    """(eval-loop seconds, wall seconds) of `eval fss --fold all` (4 folds) on `procs`
    processes."""
    argv = ["-m", "promptseg", "eval", "fss", "--dataset", "pascal5i", "--model"]
    argv += ["sine_test_tiny", "--random-weights", "--data-root", str(data_root)]
    argv += ["--splits-dir", str(data_root / "splits"), "--trust-pickle"]
    argv += ["--episodes", str(episodes), "--shots", str(shots), "--fold", "all"]
    argv += ["--out", str(out), "--device", "cpu"]
    launcher = [sys.executable]
    if procs > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(procs)]
        launcher += ["--master_port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    subprocess.run([*launcher, *argv], env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    results = out.glob("fss/pascal5i/*/*/sine_test_tiny/result.json")
    return sum(float(json.loads(r.read_text())["timing"]["total_s"]) for r in results), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=500, help="per fold (4 folds)")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--procs", default="1,2", help="comma list of process counts")
    parser.add_argument("--data-root", help="miniature data root (default: written to a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_root) if args.data_root else Path(tmp) / "mini"
        if not args.data_root:
            from promptseg.testing import make_mini

            make_mini(root, ["pascal5i"])
        rows = []
        for procs in (int(p) for p in args.procs.split(",")):
            out = Path(tmp) / f"runs{procs}"
            rows.append((procs, *run_eval(root, out, procs, args.episodes, args.shots)))
    base = min(rows)[1]  # speed-up against the fewest processes (1 by default)
    rows = [(procs, seconds, wall, base / seconds) for procs, seconds, wall in rows]
    cores = os.cpu_count()
    print(
        f"eval fss pascal5i (mini, 4 folds, {args.shots}-shot), sine_test_tiny, CPU, "
        f"1 thread/process, {cores} cores"
    )
    print("| processes | episodes | seconds | wall s | episodes/s | speedup |")
    print("|---|---|---|---|---|---|")
    for procs, seconds, wall, speedup in rows:
        n = 4 * args.episodes
        line = f"| {procs} | {n} | {seconds:.1f} | {wall:.1f} | {n / seconds:.1f} | "
        print(line + f"{speedup:.2f}x |")


if __name__ == "__main__":
    main()
