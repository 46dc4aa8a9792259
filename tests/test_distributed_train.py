"""Training on several processes (torchrun; here 2 CPU processes on gloo): N processes x batch b
take the same steps as 1 process x batch N b, only rank 0 writes, and a 2-process run resumes
where it stopped with the same weights."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from promptseg.testing.mini_dense import make_mini_dense
from promptseg.train.common import (
    Distributed,
    GradientAccumulator,
    autocast,
    grad_scaler,
    start_distributed,
    stop_distributed,
)
from promptseg.train.diffews import DiffewSTrainConfig, train_diffews
from promptseg.train.odise import train_odise
from promptseg.train.sine import SINETrainConfig, train_sine
from promptseg.weights import load_state_dict_file
from tests.test_sine_train import write_coco

STEPS = 4


def config(root: Path, out: str, **kw: object) -> SINETrainConfig:
    """The tiny SINE run of these tests (random weights, the miniature COCO in `root`)."""
    base = {
        "model": "sine_test_tiny",
        "pretrained": False,
        "annotations": str(root / "instances.json"),
        "images": str(root),
        "steps": STEPS,
        "batch_size": 2,
        "lr": 2e-3,
        "warmup_steps": 1,
        "jitter_scale": (0.8, 1.25),
        "out": str(root / out),
    }
    return SINETrainConfig(**{**base, **kw})


def as_rank(rank: int, world: int, port: int) -> None:
    """Make this spawned process rank `rank` of `world` for torchrun's env:// start, one thread."""
    os.environ.update(
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)


def worker(rank: int, world: int, port: int, root: str) -> None:
    """One rank: the full run, then a run stopped after 2 steps and resumed to STEPS."""
    as_rank(rank, world, port)
    base = Path(root)
    try:
        full = train_sine(config(base, "full", device="cpu"), progress=False)
        train_sine(config(base, "part", device="cpu", steps=2), progress=False)
        rest = train_sine(config(base, "part", device="cpu", resume=True), progress=False)
        (base / f"losses{rank}.json").write_text(json.dumps({"full": full, "rest": rest}))
    finally:
        stop_distributed()


def other_families(root: Path, out: str) -> dict[str, object]:
    """DiffewS and ODISE (label model), 2 steps of a global batch of 4: with 2 processes each
    rank loads and accumulates 2 samples, the first without synchronising (DDP's no_sync).
    Returns the losses, the first step's gradients (after DDP's all-reduce) and the number of
    samples this process loaded."""
    from promptseg.train import common
    from promptseg.train import diffews as diffews_trainer
    from promptseg.train import odise as odise_trainer
    from tests.test_odise_train import tiny as odise_tiny

    ann = write_coco(root)
    diffews = DiffewSTrainConfig(
        model="diffews_test_tiny", pretrained=False, annotations=str(ann), images=str(root),
        steps=2, batch_size=4, lr=3e-3, weight_decay=0.0, out=str(root / out / "diffews"),
        device="cpu",
    )  # fmt: skip
    make_mini_dense(root / "mini", ["coco-panoptic"])
    odise = odise_tiny(root / "mini" / "coco", root / out / "odise", steps=2, batch_size=4)
    odise.device = "cpu"
    grads: dict[str, list] = {}
    step = common.optimiser_step
    loaded = {"diffews": 0, "odise": 0}  # samples this process drew and loaded

    def counted(family: str, load: object) -> object:
        def spy(*args, **kwargs):
            loaded[family] += 1
            return load(*args, **kwargs)

        return spy

    losses = {}
    with pytest.MonkeyPatch.context() as patch:
        sampler = diffews_trainer.EpisodeSampler
        patch.setattr(sampler, "__call__", counted("diffews", sampler.__call__))
        patch.setattr(
            odise_trainer, "training_sample", counted("odise", odise_trainer.training_sample)
        )
        for family, train, run in (("diffews", train_diffews, diffews),
                                   ("odise", train_odise, odise)):  # fmt: skip
            patch.setattr(common, "optimiser_step", first_gradient_spy(step, family, grads))
            losses[family] = train(run, progress=False)
    return {"losses": losses, "grads": grads, "loaded": loaded}


def first_gradient_spy(step: object, family: str, into: dict[str, list]) -> object:
    """`step` (the trainers' optimiser step) keeping the gradients of its first call, in
    optimiser order, as into[family]."""

    def spy(optimiser, *args):
        grads = [p.grad for g in optimiser.param_groups for p in g["params"]]
        into.setdefault(family, [None if x is None else x.clone() for x in grads])
        return step(optimiser, *args)

    return spy


def other_worker(rank: int, world: int, port: int, root: str) -> None:
    """One rank of the DiffewS and ODISE runs."""
    as_rank(rank, world, port)
    try:
        torch.save(other_families(Path(root), "two"), Path(root) / f"other{rank}.pt")
    finally:
        stop_distributed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The head's weights without attention's key biases: their true gradient is 0 (softmax
    ignores a shift), so AdamW turns rounding noise (summation order) into lr-sized steps."""
    out = {}
    for k, v in load_state_dict_file(path).items():
        if k.startswith("head."):
            if k.endswith("in_proj_bias"):
                width = len(v) // 3
                v = torch.cat([v[:width], v[2 * width :]])
            out[k] = v
    return out


@pytest.mark.skipif(sys.platform == "win32", reason="gloo spawn test on POSIX")
def test_two_processes_match_one_process_with_twice_the_batch(tmp_path, monkeypatch):
    write_coco(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    single = train_sine(config(tmp_path, "single", batch_size=2), progress=False)
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)

    ranks = [json.loads((tmp_path / f"losses{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank reports the global mean
    np.testing.assert_allclose(ranks[0]["full"], single, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ranks[0]["rest"], single[2:], rtol=1e-4, atol=1e-6)
    one = weights(tmp_path / "single" / "promptseg.safetensors")
    full = weights(tmp_path / "full" / "promptseg.safetensors")
    part = weights(tmp_path / "part" / "promptseg.safetensors")
    assert all(torch.equal(full[k], part[k]) for k in full)  # resuming changes nothing
    for two in (full, part):
        assert one.keys() == two.keys()
        for name in one:
            torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    state = torch.load(tmp_path / "part" / "train_state.pt", weights_only=True)
    assert state["step"] == STEPS and len(state["ranks"]) == 2  # every rank's random states


@pytest.mark.skipif(sys.platform == "win32", reason="gloo spawn test on POSIX")
def test_diffews_and_odise_two_processes_match_one(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = other_families(tmp_path, "one")
    finally:
        torch.set_num_threads(threads)
    mp.spawn(other_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"other{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # every rank reports the global mean
    assert single["loaded"] == {"diffews": 8, "odise": 8}  # 2 steps x 4
    assert all(r["loaded"] == {"diffews": 4, "odise": 4} for r in ranks)  # each its half only
    for family in ("diffews", "odise"):
        np.testing.assert_allclose(
            ranks[0]["losses"][family], single["losses"][family], rtol=1e-4, err_msg=family
        )
        one = single["grads"][family]
        assert sum(g is not None for g in one) > 10, family
        for rank in ranks:  # the all-reduced gradient: every rank has the one-process gradient
            two = rank["grads"][family]
            assert len(two) == len(one)
            for i, (a, b) in enumerate(zip(two, one, strict=True)):
                assert (a is None) == (b is None), (family, i)
                if b is not None:
                    scale = float(b.abs().max()) or 1.0
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale, msg=family)


def test_batch_must_split_evenly_and_one_process_needs_no_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"batch_size \(3.*WORLD_SIZE = 2"):
        start_distributed(SINETrainConfig(batch_size=3))
    monkeypatch.setenv("WORLD_SIZE", "1")
    ctx = start_distributed(SINETrainConfig(batch_size=3))
    assert (ctx.rank, ctx.world, list(ctx.positions(3))) == (0, 1, [0, 1, 2])
    assert list(Distributed(rank=1, world=2).positions(6)) == [1, 3, 5]
    p = torch.nn.Parameter(torch.ones(2))
    accumulator = GradientAccumulator([p], ctx)
    assert accumulator.ddp is None  # one process: no DDP, plain accumulation
    total = accumulator.backward(
        ctx.positions(3),
        lambda j: (p * (j + 1)).sum(),
        3,
        grad_scaler(SINETrainConfig(), torch.device("cpu")),
    )
    assert total == pytest.approx(4.0) and p.grad.tolist() == [2.0, 2.0]
    assert ctx.sum(1.5) == 1.5


def test_amp_key_names_its_values_and_needs_cuda():
    with pytest.raises(ValueError, match="amp"):
        SINETrainConfig(amp="fp8").check()
    assert SINETrainConfig(amp="bf16").amp_dtype == torch.bfloat16
    assert SINETrainConfig(amp=True).amp_dtype == torch.float16  # ODISE's older spelling
    assert SINETrainConfig().amp_dtype is None
    with pytest.raises(ValueError, match="needs CUDA"):
        autocast(SINETrainConfig(amp="bf16"), torch.device("cpu"))
    assert not grad_scaler(SINETrainConfig(amp="bf16"), torch.device("cpu")).is_enabled()
