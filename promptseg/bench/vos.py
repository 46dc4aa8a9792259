"""`promptseg eval vos`: semi-supervised video object segmentation on DAVIS-2017 / DAVIS-2016 val.

Sequences run in ImageSets order; the model gets every frame and the frame-0 label map
(void -> background) and returns one label map per frame, written as indexed palette PNGs
`<run>/pngs/<seq>/<frame>.png` at GT size. Scoring: DAVIS-2017 with
`promptseg.metrics.davis.evaluate_davis` (per object); DAVIS-2016 is SINE's toolkit variant: the
2016 sequence list, GT = union of the DAVIS-2017 objects, prediction binarised `> 0`,
one object per sequence — the model still receives the multi-object 2017 frame-0 mask.
Models with a video memory get the per-dataset memory size of SINE's evaluation.
`--resume` skips sequences whose PNGs were all written by the interrupted run.
"""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.dense import DAVIS_VOID, DavisDataset, load_label_png
from ..imageio import save_label_png
from ..metrics.davis import MEASURES, evaluate_davis, object_scores, summarize
from ..transforms import resize_mask
from .distributed import Shard
from .runner import (
    SCHEMA_VERSION,
    Progress,
    environment,
    model_record,
    prepare_run_dir,
    run_dir,
    write_result,
)

__all__ = ["VOS_DATASETS", "eval_vos"]

VOS_DATASETS = {"davis17-val": "2017", "davis16-val": "2016"}
VOS_MEMORY = {"davis17-val": 6, "davis16-val": 2}
"""Frames per object memory (first-frame GT included), SINE `eval_vos.py` `num_frame`."""
PER_FRAME = ("frames", "J", "F")
"""Per-object per-frame scores (frames 1 .. n-2): the accumulators every measure derives from."""


def _first_mask_2017(data: DavisDataset, seq: str) -> np.ndarray:
    """Frame-0 DAVIS-2017 objects (unmerged, void -> 0), the prompt for both variants."""
    labels = load_label_png(data.annotation_path(seq, 0))
    return np.where(labels == DAVIS_VOID, 0, labels).astype(np.uint8)


def _gt_size(data: DavisDataset, seq: str, index: int) -> tuple[int, int]:
    with Image.open(data.annotation_path(seq, index)) as im:
        return im.height, im.width


def _video_options(model: Any, dataset: str) -> dict[str, Any]:
    """Keyword arguments of `segment_video`: the dataset's memory size if the model has one."""
    takes_memory = "memory" in inspect.signature(model.segment_video).parameters
    return {"memory": VOS_MEMORY[dataset]} if takes_memory else {}


def _run_sequence(
    model: Any,
    data: DavisDataset,
    seq: str,
    out_dir: Path,
    merge: bool,
    options: dict[str, Any],
) -> None:
    frames = data.frames(seq)
    first = _first_mask_2017(data, seq)
    written = 0
    preds = model.segment_video([str(f) for f in frames], first, **options)
    for frame, pred in zip(frames, preds, strict=False):
        labels = torch.as_tensor(pred).to(torch.int64)
        size = _gt_size(data, seq, written)
        if tuple(labels.shape[-2:]) != size:
            labels = resize_mask(labels, size)
        arr = labels.cpu().numpy()
        if merge:
            arr = (arr > 0).astype(np.uint8)
        save_label_png(out_dir / seq / f"{frame.stem}.png", arr)
        written += 1
    if written != len(frames):
        raise RuntimeError(
            f"{model.card.name}.segment_video returned {written} label maps for the "
            f"{len(frames)} frames of {seq}"
        )


def _evaluate_merged(data: DavisDataset, res_dir: Path, sequences: list[str]) -> dict[str, Any]:
    """SINE's DAVIS-16 scoring: per sequence one object, GT label > 0 (void = background),
    prediction > 0; frames 1 .. n-2; statistics as evaluate_davis."""
    rows = []
    for seq in sequences:
        n = len(data.frames(seq))
        if n < 3:
            raise ValueError(f"DAVIS {seq}: need at least 3 annotated frames, found {n}")
        frames = [data.frames(seq)[i].stem for i in range(1, n - 1)]
        gt = np.stack(
            [load_label_png(data.annotation_path(seq, i)) for i in range(1, n - 1)]
        ).astype(np.int64)
        gt = (gt > 0) & (gt != DAVIS_VOID)
        res = np.stack([load_label_png(res_dir / seq / f"{f}.png") for f in frames]) > 0
        if res.shape != gt.shape:
            raise ValueError(f"{seq}: result size {res.shape[1:]} differs from GT {gt.shape[1:]}")
        rows.append(object_scores(seq, 1, frames, gt, res))
    return summarize(rows, sequences)


def eval_vos(
    model: Any,
    *,
    dataset: str,
    data_root: str | Path,
    out: str | Path = "runs",
    resume: bool = False,
    overwrite: bool = False,
    save_pngs: bool = False,
) -> dict[str, Any]:
    """Run one DAVIS variant, score it and write result.json; returns the result dict.

    Metrics are reported x100 (J&F-Mean, J/F Mean, Recall, Decay, means over objects); the
    per-object rows keep the toolkit's fractions, `accumulators` the per-frame J and F of every
    object (name -> frames, J, F). The PNGs stay under `<run>/pngs` with `save_pngs`, else they
    are removed once scored.
    """
    if dataset not in VOS_DATASETS:
        raise ValueError(f"unknown VOS dataset {dataset!r}; choose from {sorted(VOS_DATASETS)}")
    year = VOS_DATASETS[dataset]
    data = DavisDataset(data_root, year=year)
    merge = data.merge_objects
    sequences = data.sequences()
    directory = run_dir(out, "vos", dataset, None, None, model.card.name)
    png_dir = directory / "pngs"
    prepare_run_dir(directory, resume=resume, overwrite=overwrite)
    key = f"vos|{dataset}|{model.card.name}|{','.join(sequences)}"
    shard = Shard.current()
    progress = Progress(directory, resume=resume, key=key, every=1, shard=shard)
    if not resume and png_dir.exists() and shard.main:
        shutil.rmtree(png_dir)
    shard.barrier()  # no rank writes PNGs before rank 0 cleared the old ones
    n_frames = {s: len(data.frames(s)) for s in sequences}
    options = _video_options(model, dataset)
    with torch.inference_mode():
        for seq in progress.iterate(sequences, len(sequences), dict, desc=f"vos {dataset}"):
            if (png_dir / seq).exists():
                shutil.rmtree(png_dir / seq)  # a sequence interrupted half-way is redone
            _run_sequence(model, data, seq, png_dir, merge, options)
    progress.save({})
    timing_total = shard.max(progress.elapsed)
    mine = [s for i, s in enumerate(sequences) if shard.owns(i)]
    shard.gather_files(png_dir, [f"{s}/{f.stem}.png" for s in mine for f in data.frames(s)])
    if not shard.main:  # rank 0 scores every sequence's PNGs and writes the result
        shard.barrier()
        progress.finish()
        return shard.broadcast(None)
    if merge:
        scores = _evaluate_merged(data, png_dir, sequences)
    else:
        scores = evaluate_davis(data.root, png_dir, year=year, sequences=sequences)
    total_frames = sum(n_frames.values())
    rows = scores["per_object"]
    payload = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "vos",
        "dataset": dataset,
        "split": "val",
        "fold": None,
        "shots": None,
        "seed": None,
        "n_sequences": len(sequences),
        "n_frames": total_frames,
        "n_objects": scores["n_objects"],
        "sequences": sequences,
        "data_root_fingerprint": {"path": str(Path(data.root).resolve())},
        "model": model_record(model),
        "protocol": {
            "resolution": "original",
            "variant": "sine-merged" if merge else "davis2017-semi-supervised",
            "memory": options.get("memory"),
            "metric_impl": "promptseg.metrics.davis@1",
            "units": "metrics x100; per_object and accumulators fractions",
        },
        "env": environment(model),
        "metrics": {m: 100.0 * scores[m] for m in MEASURES},
        "per_object": [{k: v for k, v in row.items() if k not in PER_FRAME} for row in rows],
        "accumulators": {row["name"]: {k: row[k] for k in PER_FRAME} for row in rows},
        "pngs": str(png_dir) if save_pngs else None,
    }
    write_result(directory, payload, timing_total, total_frames, "frame")
    shard.barrier()  # the other ranks keep their progress until the result exists
    progress.finish()
    if not save_pngs:
        shutil.rmtree(png_dir, ignore_errors=True)
    return shard.broadcast(payload)
