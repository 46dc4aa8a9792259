"""Sharded `promptseg eval` (torchrun, gloo on CPU): 2 processes give the 1-process result.json."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from promptseg.bench.distributed import Shard, interleave, ordered
from promptseg.cli import main
from promptseg.testing import make_mini

MINI = ["pascal5i", "coco-novel", "davis", "phrasecut", "coco-panoptic", "perseg"]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini_dist")
    make_mini(root, MINI)
    return root


def _jobs(mini: Path, out: Path) -> dict[str, list[str]]:
    """One eval per protocol (argv), keyed by the run folder its result.json lands in."""
    data, o = ["--data-root", str(mini)], ["--out", str(out)]
    fss = ["--splits-dir", str(mini / "splits"), "--trust-pickle", "--episodes", "40"]
    return {
        "fss/pascal5i/0/1/test_shifted": [
            *["eval", "fss", "--dataset", "pascal5i", "--model", "test_shifted", *fss],
            *["--save-preds", *data, *o],
        ],
        "perseg/perseg/-/1/test_shifted": [
            *["eval", "perseg", "--model", "test_shifted", "--save-preds", *data, *o]
        ],
        "refer/phrasecut-test/-/-/test_shifted": [
            *["eval", "refer", "--dataset", "phrasecut-test", "--model", "test_shifted", *data, *o]
        ],
        "vos/davis17-val/-/-/test_shifted": [
            *["eval", "vos", "--dataset", "davis17-val", "--model", "test_shifted", *data, *o],
            "--save-pngs",
        ],
        "ovseg/coco-panoptic/-/-/test_shifted": [
            *["eval", "ovseg", "--dataset", "coco-panoptic", "--model", "test_shifted", *data, *o]
        ],
        "fsis/coco-novel/-/1/test_shifted": [
            *["eval", "fsis", "--dataset", "coco-novel", "--model", "test_shifted", *data, *o],
            *["--shots", "1", "--seeds", "0-1"],
        ],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, jobs: list[list[str]], die_after: int) -> None:
    """One rank of a gloo group: run `jobs`, record the indices it scored; with `die_after` > 0
    rank 1 exits abruptly (a crash) once it scored that many items (progress saved every 2)."""
    import torch
    import torch.distributed as dist

    from promptseg.bench import runner

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), OMP_NUM_THREADS="1"
    )
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="env://")
    original, scored, record = runner.Progress.iterate, [0], []

    def iterate(self, *args, **kwargs):
        if die_after:
            self.every = 2
        for item in original(self, *args, **kwargs):
            if die_after and rank == 1 and scored[0] == die_after:
                os._exit(3)
            scored[0] += 1
            yield item
        record.append(sorted(self.done))

    runner.Progress.iterate = iterate
    out = Path(jobs[0][jobs[0].index("--out") + 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for argv in jobs:
            assert main(argv) == 0, argv
    (out / f"scored.rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def _spawn(jobs: list[list[str]], die_after: int = 0) -> None:
    mp.spawn(_worker, args=(2, _free_port(), jobs, die_after), nprocs=2, join=True)


def _single(jobs: list[list[str]]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for argv in jobs:
            assert main(argv) == 0, argv


def _result(out: Path, run: str) -> dict:
    return json.loads((out / run / "result.json").read_text())


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*.png")}


def test_two_processes_give_the_single_process_results(mini, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    jobs_one, jobs_two = _jobs(mini, one), _jobs(mini, two)
    _single(list(jobs_one.values()))
    _spawn(list(jobs_two.values()))
    for run in jobs_one:
        a, b = _result(one, run), _result(two, run)
        assert b["metrics"] == a["metrics"], run
        if run.startswith("fsis"):  # results files hold the timing: their sha256 differ
            for acc in (a["accumulators"], b["accumulators"]):
                acc["seeds"] = [{k: v for k, v in f.items() if k != "sha256"} for f in acc["seeds"]]
        if not run.startswith("ovseg"):  # ovseg: per-category PQ iou sums are floats (~1e-12)
            assert b["accumulators"] == a["accumulators"], run
        assert _files(one / run) == _files(two / run), run  # preds, PNGs, panoptic predictions
        assert not list((two / run).rglob("progress*.json"))
    for name in ("panoptic_pred.json", "confusion_matrix.npy", "instances_results.json"):
        run = "ovseg/coco-panoptic/-/-/test_shifted"
        if (one / run / name).exists():
            assert (one / run / name).read_bytes() == (two / run / name).read_bytes(), name
    run = "ovseg/coco-panoptic/-/-/test_shifted"
    for ra, rb in zip(
        _result(one, run)["per_class"]["pq"], _result(two, run)["per_class"]["pq"], strict=True
    ):
        assert ra.keys() == rb.keys()
        assert all(rb[k] == pytest.approx(ra[k], rel=1e-12, abs=1e-12) for k in ra)
    fsis = "fsis/coco-novel/-/1/test_shifted/seed1/segm_results.json"
    a, b = json.loads((one / fsis).read_text()), json.loads((two / fsis).read_text())
    assert a["results"] == b["results"]
    # every rank scored a disjoint share; together exactly the single-process items
    ranks = [json.loads((two / f"scored.rank{r}.json").read_text()) for r in range(2)]
    for loop, (mine0, mine1) in enumerate(zip(*ranks, strict=True)):
        assert not set(mine0) & set(mine1), loop
        assert sorted(mine0 + mine1) == list(range(len(mine0) + len(mine1))), loop
    assert len(ranks[0][0]) + len(ranks[1][0]) == _result(one, next(iter(jobs_one)))["n_episodes"]


def test_a_crashed_rank_is_redone_on_resume(mini, tmp_path):
    full, res = tmp_path / "full", tmp_path / "res"
    run = "fss/pascal5i/0/1/test_shifted"
    _single([_jobs(mini, full)[run]])
    argv = _jobs(mini, res)[run]
    with pytest.raises(mp.ProcessExitedException):
        _spawn([argv], die_after=7)
    saved = json.loads((res / run / "progress.rank1.json").read_text())
    assert saved["done"] == [1, 3, 5, 7, 9, 11] and saved["world_size"] == 2
    assert not (res / run / "result.json").exists()
    _spawn([[*argv, "--resume"]])
    resumed = _result(res, run)
    assert resumed["accumulators"] == _result(full, run)["accumulators"]
    assert resumed["metrics"] == _result(full, run)["metrics"]
    assert not list((res / run).glob("progress*.json"))


def test_torchrun_launch_with_sine(mini, tmp_path):
    """`python -m torch.distributed.run --nproc_per_node 2 -m promptseg eval fss` (tiny SINE)."""
    run = "fss/pascal5i/0/1/sine_test_tiny"
    fss = ["--dataset", "pascal5i", "--model", "sine_test_tiny", "--random-weights"]
    fss += ["--splits-dir", str(mini / "splits"), "--trust-pickle", "--episodes", "6"]
    fss += ["--data-root", str(mini)]
    _single([["eval", "fss", *fss, "--out", str(tmp_path / "one")]])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_port", str(_free_port()), "-m", "promptseg", "eval", "fss", *fss]
    done = subprocess.run(
        [*launch, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("fss pascal5i fold 0 1-shot sine_test_tiny") == 1  # rank 0 only
    one, two = _result(tmp_path / "one", run), _result(tmp_path / "two", run)
    assert two["metrics"] == one["metrics"] and two["accumulators"] == one["accumulators"]


def test_resume_refuses_another_number_of_processes(mini, tmp_path):
    run = tmp_path / "fss/pascal5i/0/1/test_shifted"
    run.mkdir(parents=True)
    (run / "progress.rank0.json").write_text(json.dumps({"world_size": 2}))
    argv = _jobs(mini, tmp_path)["fss/pascal5i/0/1/test_shifted"]
    assert main([*argv, "--resume"]) == 2


def test_shards_and_merge_order():
    for n in (1, 2, 3, 8):
        shards = [Shard(r, n).indices(23) for r in range(n)]
        assert sorted(i for s in shards for i in s) == list(range(23))
    sizes = [2, 0, 1, 3, 1]
    parts = [["a0", "a1", "c0", "e0"], ["d0", "d1", "d2"]]  # rank 0: items 0, 2, 4; 1: 1, 3
    assert interleave(parts, sizes) == ["a0", "a1", "c0", "d0", "d1", "d2", "e0"]
    rows = [[(0, "x"), (0, "y"), (2, "z")], [(1, "w")]]
    assert ordered(rows, lambda r: r[0]) == [(0, "x"), (0, "y"), (1, "w"), (2, "z")]


def test_bench_run_launches_torchrun(tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_text("runs:\n  - promptseg eval perseg --model test_empty --data-root X\n")
    argv = ["bench", "run", str(suite), "--launcher", "torchrun", "--nproc-per-node", "4"]
    assert main([*argv, "--dry-run"]) == 0
    assert "-m torch.distributed.run --nproc_per_node 4 -m promptseg eval perseg" in (
        capsys.readouterr().out
    )
    assert main(["bench", "run", str(suite), "--nproc-per-node", "2", "--dry-run"]) == 2


class _Bar:
    """tqdm's counting part: the values rank 0's bar showed."""

    def __init__(self, *, total: int, initial: int, disable: bool | None, **kwargs) -> None:
        self.n, self.shown, self.main = initial, [initial], disable is None

    def update(self, k: int) -> None:
        self.n += k
        self.shown.append(self.n)

    def close(self) -> None:
        pass


def test_one_bar_counts_the_items_of_every_rank(tmp_path, monkeypatch):
    """Rank 0 (4 quick items of 7) keeps its bar going with rank 1's items (slow) until rank 1
    finishes; the count lives in the group's key-value store (here a HashStore, two threads)."""
    import threading
    import time

    import torch.distributed as dist

    from promptseg.bench import runner
    from promptseg.bench.distributed import SharedCount

    store, bars = dist.HashStore(), []
    monkeypatch.setattr(Shard, "shared_count", lambda self: SharedCount(store, 0))

    def bar(**kwargs):
        bars.append(_Bar(**kwargs))
        return bars[-1]

    monkeypatch.setattr(runner, "tqdm", bar)
    seen = {0: [], 1: []}

    def rank(r: int) -> None:
        progress = runner.Progress(tmp_path / str(r), resume=False, key="k", shard=Shard(r, 2))
        for item in progress.iterate(range(7), 7, dict, desc="x"):
            time.sleep(0.05 * r)
            seen[r].append(item)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert seen == {0: [0, 2, 4, 6], 1: [1, 3, 5]}
    (main_bar,) = [b for b in bars if b.main]  # rank 0's, the one shown
    assert main_bar.n == 7 and main_bar.shown == sorted(main_bar.shown)
    assert int(store.add("promptseg/progress/0/finished", 0)) == 2
