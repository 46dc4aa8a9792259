"""`promptseg eval fsis`: few-shot instance segmentation, COCO-NOVEL and COCO2VOC.

Per (K, seed): the support set is every shot record (one image + ONE annotation, class_id = its
COCO category id), each test image (ascending id) is segmented at level "instance", detections
(RLE at original size, no `bbox`) go to `coco_mask_ap` restricted to the novel category ids.
The support set is encoded once per seed and reused for every test image. The dataset number is
the mean over seeds of the per-seed APs. Each finished seed keeps its detections in
`seed<S>/segm_results.json` (the COCOeval input); `--resume` reuses them and continues the seed
that was interrupted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..data.fewshot import FewShotInstanceDataset, ShotRecord
from ..data.splits import file_sha256
from ..metrics.coco_ap import coco_mask_ap
from ..prompts import SupportSet, VisualPrompt
from .distributed import Shard, ordered
from .runner import (
    SCHEMA_VERSION,
    Progress,
    encode_prompts,
    environment,
    model_record,
    prepare_run_dir,
    run_dir,
    write_json,
    write_result,
)

__all__ = ["FSIS_DATASETS", "eval_fsis", "parse_seeds"]

FSIS_DATASETS = ("coco-novel", "coco2voc")


def parse_seeds(text: str | int | list[int]) -> list[int]:
    """'0-9' -> [0..9], '0,3,5' -> [0, 3, 5], 4 -> [4]."""
    if isinstance(text, int):
        return [text]
    if isinstance(text, list):
        return [int(s) for s in text]
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"--seeds must look like 0-9 or 0,1,2, got {text!r}")
    return list(dict.fromkeys(seeds))


def _test_category_map(data: FewShotInstanceDataset) -> dict[int, int]:
    """Support class id (COCO id) -> test GT category id (identity on COCO; VOC ids by name, else
    by position in the novel list, for COCO2VOC)."""
    if data.name == "coco-novel":
        return {c: c for c in data.novel_category_ids}
    gt = json.loads(data.gt_json_path.read_text(encoding="utf-8"))
    by_name = {_norm(c["name"]): c["id"] for c in gt.get("categories", [])}
    out = {}
    for pos, cid in enumerate(data.novel_category_ids):
        name = _norm(data.novel_category_names[cid])
        out[cid] = by_name.get(name, data.test_category_ids[pos])
    return out


def _norm(name: str) -> str:
    return name.lower().replace(" ", "").replace("_", "")


def _finished_seed(seed_dir: Path, key: str) -> tuple[list[dict[str, Any]], float] | None:
    """(detections, seconds) a resumed run reuses: the seed's results file, if it finished."""
    path = seed_dir / "segm_results.json"
    if any(seed_dir.glob("progress*.json")) or not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("key") != key:
        raise ValueError(
            f"{path} belongs to another run (different shots, images or shot files); "
            "delete it or run without --resume"
        )
    return saved["results"], float(saved["elapsed"])


def _run_seed(
    model: Any,
    data: FewShotInstanceDataset,
    records: list[ShotRecord],
    ids: list[int],
    seed_dir: Path,
    *,
    key: str,
    resume: bool,
    desc: str,
    shard: Shard,
) -> tuple[list[dict[str, Any]] | None, float]:
    """Segment the seed's test images (resumable); (detections in test category ids, seconds).

    In a sharded run each rank segments its images; rank 0 gets every detection in image
    order, the other ranks None."""
    if shard.main:
        (seed_dir / "segm_results.json").unlink(missing_ok=True)
    to_test = _test_category_map(data)
    support = SupportSet(
        [VisualPrompt(r.image_path, r.mask, class_id=r.category_id) for r in records]
    )
    ((prompts, embeddings),) = encode_prompts(model, [support], level="instance")
    detections: list[dict[str, Any]] = []
    progress = Progress(seed_dir, resume=resume, key=key, shard=shard)
    if progress.state is not None:
        detections.extend(progress.state["detections"])
    state = {"detections": detections}
    for image_id in progress.iterate(ids, len(ids), lambda: state, desc=desc):
        result = model.segment(
            data.test_image_path(image_id), prompts, prompt_embeddings=embeddings, level="instance"
        )
        for rec in result.to_coco_rle():
            cid = rec["category_id"]
            if cid is None or int(cid) not in to_test:
                continue
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": to_test[int(cid)],
                    "segmentation": rec["segmentation"],
                    "score": rec["score"],
                }
            )
    elapsed = shard.max(progress.elapsed)
    parts = shard.gather(detections)
    if parts is None:  # another rank: rank 0 writes the seed's results
        progress.finish()
        return None, elapsed
    position = {image_id: i for i, image_id in enumerate(ids)}
    detections = ordered(parts, lambda d: position[d["image_id"]])
    write_json(
        seed_dir / "segm_results.json",
        {"key": key, "elapsed": elapsed, "results": detections},
    )
    progress.finish()
    return detections, elapsed


def eval_fsis(
    model: Any,
    *,
    dataset: str,
    shots: int,
    seeds: str | list[int] = "0-9",
    data_root: str | Path,
    images: int | None = None,
    out: str | Path = "runs",
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate every seed (resumable per seed); writes result.json with the mean AP."""
    if dataset not in FSIS_DATASETS:
        raise ValueError(f"--dataset must be one of {FSIS_DATASETS}, got {dataset!r}")
    seed_list = parse_seeds(seeds)
    shard = Shard.current()
    directory = run_dir(out, "fsis", dataset, None, shots, model.card.name)
    prepare_run_dir(directory, resume=resume, overwrite=overwrite)
    per_seed: list[dict[str, Any]] = []
    seed_files: list[dict[str, Any]] = []
    total_s = 0.0
    ids: list[int] = []
    gt_path = None
    cat_ids: list[int] = []
    for seed in seed_list:
        data = FewShotInstanceDataset(data_root, shots, seed, dataset=dataset)
        gt_path, cat_ids = data.gt_json_path, list(data.test_category_ids)
        ids = data.test_image_ids()
        if images is not None:
            ids = ids[:images]
        seed_dir = directory / f"seed{seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        records = data.shot_records()
        key = f"fsis|{dataset}|{shots}|{seed}|{len(ids)}|{len(records)}"
        finished = _finished_seed(seed_dir, key) if resume and shard.main else None
        if shard.broadcast(finished is None):  # rank 0 decides: every rank runs the seed
            desc = f"fsis {dataset} s{seed}"
            finished = _run_seed(
                model, data, records, ids, seed_dir, key=key, resume=resume, desc=desc, shard=shard
            )
        if not shard.main:
            continue
        assert finished is not None
        detections, seconds = finished
        assert detections is not None
        ap = coco_mask_ap(gt_path, detections, cat_ids=cat_ids, img_ids=ids)
        box = coco_mask_ap(gt_path, detections, iou_type="bbox", cat_ids=cat_ids, img_ids=ids)
        box_ap = {f"box {k}": v for k, v in box.items() if k in ("AP", "AP50", "AP75")}
        per_seed.append({"seed": seed, "n_detections": len(detections), **ap, **box_ap})
        results = seed_dir / "segm_results.json"
        seed_files.append(
            {
                "seed": seed,
                "results_json": str(results.relative_to(directory)),
                "sha256": file_sha256(results),
            }
        )
        total_s += seconds

    if not shard.main:  # another rank: rank 0 writes the result
        return shard.broadcast(None)
    names = [k for k, v in per_seed[0].items() if isinstance(v, float)]
    metrics = {n: _mean([row[n] for row in per_seed]) for n in names}
    payload = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "fsis",
        "dataset": dataset,
        "split": "5k" if dataset == "coco-novel" else "voc-val",
        "fold": None,
        "shots": shots,
        "seeds": seed_list,
        "n_images": len(ids),
        "data_root_fingerprint": {"path": str(Path(data_root).resolve())},
        "gt_json": str(gt_path),
        "model": model_record(model),
        "protocol": {
            "resolution": "original",
            "threshold": model.card.default_threshold,
            "cat_ids": cat_ids,
            "box_source": "bounding box of each predicted mask",
            "metric_impl": "promptseg.metrics.coco_ap@1",
            "subset": images is not None,
        },
        "env": environment(model),
        "metrics": metrics,
        "per_seed": per_seed,
        "accumulators": {
            "note": "COCOeval inputs: per seed its detections file (segm; bbox = mask boxes) "
            "against gt_json, restricted to cat_ids and img_ids; dataset value = seed mean",
            "gt_json": str(gt_path),
            "cat_ids": cat_ids,
            "img_ids": ids,
            "seeds": seed_files,
        },
    }
    return shard.broadcast(write_result(directory, payload, total_s, len(ids), "image"))


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan
