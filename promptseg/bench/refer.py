"""`promptseg eval refer`: referring segmentation on PhraseCut test with CLIPSeg's metrics.

Samples are sorted by (image_id, j); per image, all its phrases go to the model in ONE
`segment` call with logits kept. Scoring follows CLIPSeg's evaluation: the GT (union of the task's
polygons) is nearest-resized to the scoring size (352x352, or the model's eval_resolution);
the probability map sigmoid(logits) is resized bilinearly (align_corners=True) to that size;
`FixedIntervalMetrics` counts per sample (class id = the sample, so mIoU is the mean per-phrase IoU
and IoU_FG the cumulative IoU). Fixed thresholds give the paper numbers; the best threshold over
the grid is chosen on the test set itself and is labelled "oracle".
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.dense import PhraseCutDataset, PhraseCutSample
from ..metrics.clipseg import FixedIntervalMetrics
from ..transforms import resize_mask
from .distributed import Shard, interleave
from .fss import protocol_resolution, resolution_label
from .runner import (
    SCHEMA_VERSION,
    Progress,
    environment,
    model_record,
    prepare_run_dir,
    run_dir,
    write_result,
)

__all__ = ["PAPER_THRESHOLDS", "eval_refer", "parse_thresholds"]

REFER_DATASETS = {"phrasecut-test": "test"}
PAPER_THRESHOLDS = {"phrasecut-test": (0.3,)}
DEFAULT_SIZE = (352, 352)


def parse_thresholds(spec: str | Sequence[float], dataset: str = "phrasecut-test") -> list[float]:
    """'paper' -> the paper's threshold(s); '0.3,0.5' -> [0.3, 0.5] (must lie on the 0.02 grid)."""
    if isinstance(spec, str):
        if spec == "paper":
            return list(PAPER_THRESHOLDS[dataset])
        try:
            values = [float(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            msg = f"--thresholds must be 'paper' or numbers like 0.3,0.5, got {spec!r}"
            raise ValueError(msg) from None
    else:
        values = [float(x) for x in spec]
    grid = np.linspace(0, 1, 51)[1:-1]
    bad = [t for t in values if not np.any(np.abs(grid - t) < 1e-9)]
    if not values or bad:
        raise ValueError(
            f"thresholds must be on CLIPSeg's grid 0.02, 0.04, ..., 0.98; got {bad or spec!r}"
        )
    return values


def _by_image(samples: list[PhraseCutSample]) -> list[tuple[int, list[PhraseCutSample]]]:
    groups: dict[int, list[PhraseCutSample]] = {}
    for s in samples:
        groups.setdefault(s.image_id, []).append(s)
    return sorted(groups.items())


def _prompt_logits(result: Any, n_prompts: int) -> list[torch.Tensor | None]:
    """Per prompt its logit map [h, w] (cropped to logits_valid; max over several masks)."""
    if result.logits is None:
        raise ValueError("the model returned no logits although return_logits=True was asked")
    lg = result.logits.float()
    if result.logits_valid is not None:
        lg = lg[:, : result.logits_valid[0], : result.logits_valid[1]]
    out: list[torch.Tensor | None] = []
    for i in range(n_prompts):
        rows = (result.prompt_index == i).nonzero().flatten()
        out.append(lg[rows].amax(dim=0) if len(rows) else None)
    return out


def eval_refer(
    model: Any,
    *,
    dataset: str = "phrasecut-test",
    data_root: str | Path,
    thresholds: str | Sequence[float] = "paper",
    out: str | Path = "runs",
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run PhraseCut test and write result.json (metrics x100); returns the result dict."""
    if dataset not in REFER_DATASETS:
        raise ValueError(f"unknown refer dataset {dataset!r}; choose from {sorted(REFER_DATASETS)}")
    fixed = parse_thresholds(thresholds, dataset)
    data = PhraseCutDataset(data_root, split=REFER_DATASETS[dataset])
    samples = data.samples()
    images = _by_image(samples)
    size = protocol_resolution(model, "model") or DEFAULT_SIZE
    directory = run_dir(out, "refer", dataset, None, None, model.card.name)
    prepare_run_dir(directory, resume=resume, overwrite=overwrite)
    metric = FixedIntervalMetrics(sigmoid=True, resize_pred=True)
    key = f"refer|{dataset}|{size}|{len(samples)}|{images[0][0] if images else ''}"
    shard = Shard.current()
    progress = Progress(directory, resume=resume, key=key, shard=shard)
    if progress.state is not None:
        metric.load_state_dict(progress.state)
    for image_id, group in progress.iterate(
        images, len(images), metric.state_dict, desc=f"refer {dataset}"
    ):
        image = data.image(image_id)
        phrases = [s.phrase for s in group]
        result = model.segment(image, phrases, output_size=size, return_logits=True)
        logits = _prompt_logits(result, len(phrases))
        for s, lg in zip(group, logits, strict=True):
            gt = data.gt_mask(image_id, s.j)
            gt = resize_mask(torch.from_numpy(gt), size).numpy()
            pred = lg.numpy() if lg is not None else np.full(size, -np.inf, dtype=np.float32)
            metric.update(pred, gt, None)
    timing_total = shard.max(progress.elapsed)
    states = shard.gather(metric.state_dict())
    if states is None:  # another rank: rank 0 writes the result
        progress.finish()
        return shard.broadcast(None)
    if shard.distributed:
        metric.load_state_dict(_merged(states, [len(group) for _, group in images]))
    summary = metric.compute(fixed)
    best = metric.best()
    metrics: dict[str, Any] = {}
    for t in fixed:
        metrics[f"mIoU@{t:g}"] = 100.0 * summary[f"miou_{t:g}"]
        metrics[f"IoU_FG@{t:g}"] = 100.0 * summary[f"fgiou_{t:g}"]
        metrics[f"IoU_BIN@{t:g}"] = 100.0 * summary[f"biniou_{t:g}"]
    metrics["AP"] = 100.0 * summary["ap"]
    oracle = {
        "oracle": True,
        "note": "best threshold chosen on the test set itself: not a fair test number",
        "mIoU": 100.0 * best["miou_best"],
        "mIoU_t": best["miou_best_t"],
        "IoU_FG": 100.0 * best["fgiou_best"],
        "IoU_FG_t": best["fgiou_best_t"],
        "IoU_BIN": 100.0 * best["biniou_best"],
        "IoU_BIN_t": best["biniou_best_t"],
    }
    payload = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "refer",
        "dataset": dataset,
        "split": REFER_DATASETS[dataset],
        "fold": None,
        "shots": None,
        "seed": None,
        "n_samples": len(samples),
        "n_images": len(images),
        "data_root_fingerprint": {"path": str(Path(data.root).resolve())},
        "model": model_record(model),
        "protocol": {
            "resolution": resolution_label(size),
            "thresholds": fixed,
            "paper_thresholds": list(PAPER_THRESHOLDS[dataset]),
            "class_id": "sample",
            "metric_impl": "promptseg.metrics.clipseg@1",
            "units": "x100",
        },
        "env": environment(model),
        "metrics": metrics,
        "oracle": oracle,
        "ap_ties": summary["ap_ties"],
        "accumulators": metric.state_dict(),
    }
    progress.finish()
    return shard.broadcast(write_result(directory, payload, timing_total, len(samples), "sample"))


def _merged(states: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    """The metric state of a single-process run from the ranks' states: totals summed (ints),
    per-sample counts put back in image order (the mIoU mean then sums in the same order)."""
    merged = dict(states[0])
    merged["total"] = sum(np.asarray(s["total"], dtype=np.int64) for s in states)
    merged["n_samples"] = sum(int(s["n_samples"]) for s in states)
    parts = [list(np.asarray(s["sample_counts"], dtype=np.int64)) for s in states]
    shape = np.asarray(merged["total"]).shape
    merged["sample_counts"] = np.array(interleave(parts, sizes), dtype=np.int64).reshape(-1, *shape)
    return merged
