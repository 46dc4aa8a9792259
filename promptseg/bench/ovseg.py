"""`promptseg eval ovseg`: open-vocabulary PQ / mask AP / mIoU (ODISE protocol).

One vocabulary per dataset (its class names and thing flags), images in ascending file name
order. Per image the model segments ONCE at level "all" (a Mask2Former-like family yields every
level from one set of mask logits); each task reads the masks of its level from that result:

- `pq`   level "panoptic": id map + segments_info written as panopticapi PNG + JSON, scored with
         `pq_compute` (GT JSON areas); per-category tp/fp/fn/iou_sum kept as accumulators.
- `miou` level "semantic": label map (pixels no mask covers get an extra "<none>" class that is
         never in the GT, so they count as misses of the true class and never as a hit) into
         detectron2's SemSegEvaluator; the (K+2)² confusion matrix is saved as .npy.
- `ap`   level "instance": COCO RLE detections with dataset category ids (no `bbox`) into
         `coco_mask_ap`, only when the dataset's instances JSON exists.

Vocabulary index k maps to the dataset category of index k: panoptic categories in file order
(COCO: ascending id = panoptic_semseg index; ADE: ids 0..149), semantic datasets: class index.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.dense import PANOPTIC_DATASETS, PanopticDataset, SemSegDataset
from ..metrics.coco_ap import coco_mask_ap
from ..metrics.panoptic import PQStat, id2rgb, pq_compute, pq_stat_image
from ..metrics.semseg import SemSegEvaluator
from ..prompts import Vocabulary
from .distributed import Shard, ordered
from .runner import (
    SCHEMA_VERSION,
    Progress,
    environment,
    model_record,
    prepare_run_dir,
    run_dir,
    write_json,
    write_result,
)

__all__ = ["OVSEG_DATASETS", "TASKS", "eval_ovseg", "read_vocabulary_file"]

OVSEG_DATASETS = ("coco-panoptic", "ade150", "ade847", "pc59", "pc459", "pas21")
TASKS = ("pq", "ap", "miou")
TASK_LEVELS = {"pq": "panoptic", "ap": "instance", "miou": "semantic"}
"""The output level each task scores (masks of other levels in the result are ignored)."""
NONE_CLASS = "<none>"


def read_vocabulary_file(path: str | Path) -> list[list[str]]:
    """One class per line, synonyms separated by commas (ODISE `*_with_prompt_eng.txt` style;
    an optional leading `<index>:` is dropped)."""
    classes = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        head, sep, rest = line.partition(":")
        if sep and head.strip().isdigit():
            line = rest
        classes.append([s.strip() for s in line.split(",") if s.strip()])
    return classes


DATASET_PRESETS = {
    "coco-panoptic": "coco_panoptic",
    "ade150": "ade20k_150",
    "ade847": "ade20k_847",
    "pc59": "pascal_context_59",
    "pc459": "pascal_context_459",
    "pas21": "pascal_voc_21",
}
"""The prompt-engineered vocabulary (`Vocabulary.preset`) each dataset is evaluated with."""


def dataset_vocabulary(
    dataset: str, names: list[str], choice: str | Path = "auto", model_default: str = "names"
) -> tuple[list[list[str]], str]:
    """(classes, what they are) for `--vocabulary`: "prompt-engineered" (the dataset's preset,
    the ODISE protocol), "names" (the dataset's class names), a file of one class per line, or
    "auto": the model's `eval_vocabulary` (data config), else the names."""
    preset = Vocabulary.preset(DATASET_PRESETS[dataset])
    if choice == "auto":
        choice = model_default
    if choice == "names":
        return [[n] for n in names], "dataset class names"
    if choice == "prompt-engineered":
        if len(preset) != len(names):
            raise ValueError(
                f"--vocabulary prompt-engineered: the {DATASET_PRESETS[dataset]} preset has "
                f"{len(preset)} classes but this {dataset} data root has {len(names)}; use "
                "--vocabulary names or a file"
            )
        return [list(c) for c in preset.classes], f"preset {DATASET_PRESETS[dataset]}"
    classes = read_vocabulary_file(choice)
    if len(classes) != len(names):
        raise ValueError(f"{choice} has {len(classes)} classes, {dataset} has {len(names)}")
    return classes, str(choice)


def _parse_tasks(tasks: str | list[str]) -> list[str]:
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out = [t.strip().lower() for t in items if t.strip()]
    bad = sorted(set(out) - set(TASKS))
    if bad or not out:
        raise ValueError(f"--tasks must be a comma list of {TASKS}, got {tasks!r}")
    return list(dict.fromkeys(out))


class _Data:
    """The images, vocabulary and GT of one ovseg dataset, whichever readers it has."""

    def __init__(self, dataset: str, root: Path, tasks: list[str]) -> None:
        if dataset not in OVSEG_DATASETS:
            raise ValueError(f"--dataset must be one of {OVSEG_DATASETS}, got {dataset!r}")
        self.dataset = dataset
        self.skipped: dict[str, str] = {}
        self.panoptic = PanopticDataset(dataset, root) if dataset in PANOPTIC_DATASETS else None
        need_sem = "miou" in tasks or self.panoptic is None
        self.semseg = SemSegDataset(dataset, root) if need_sem else None
        if self.panoptic is not None:
            cats = self.panoptic.categories
            self.names = [c["name"] for c in cats]
            self.things = [bool(c["isthing"]) for c in cats]
            self.category_ids = [c["id"] for c in cats]
            self.items = [(it.image_id, it.image_path, it) for it in self.panoptic.items()]
        else:
            sem = self.semseg
            assert sem is not None
            self.names = sem.class_names
            self.things = [False] * len(self.names)
            self.category_ids = list(range(len(self.names)))
            self.items = [(it.image_path.stem, it.image_path, it) for it in sem.items()]
        self.instances_json = self.panoptic.instances_json_path if self.panoptic else None
        if "pq" in tasks and self.panoptic is None:
            self.skipped["pq"] = f"{dataset} has no panoptic annotations"
        if "ap" in tasks and self.instances_json is None:
            self.skipped["ap"] = f"{dataset}: no instances JSON in the data root"
        # vocabulary index -> semantic GT index
        if self.semseg is not None:
            if dataset == "coco-panoptic":
                order = sorted(self.category_ids)
                self.sem_index = [order.index(c) for c in self.category_ids]
            else:
                self.sem_index = [int(c) for c in self.category_ids]
            if max(self.sem_index, default=-1) >= self.semseg.num_classes:
                raise ValueError(f"{dataset}: category ids exceed the semantic classes")

    def semantic_gt(self, item: Any) -> np.ndarray:
        assert self.semseg is not None
        path = self.panoptic.semseg_gt_path(item) if self.panoptic is not None else item.gt_path
        return self.semseg.load_gt(path)


def eval_ovseg(
    model: Any,
    *,
    dataset: str,
    data_root: str | Path,
    tasks: str | list[str] = "pq,ap,miou",
    vocabulary: str | Path = "auto",
    images: int | None = None,
    out: str | Path = "runs",
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate one dataset; writes result.json (and the prediction files) and returns it."""
    wanted = _parse_tasks(tasks)
    data = _Data(dataset, Path(data_root), wanted)
    tasks_run = [t for t in wanted if t not in data.skipped]
    missing = [t for t in tasks_run if TASK_LEVELS[t] not in model.levels]
    if missing:
        raise ValueError(
            f"{model.card.name} has no {TASK_LEVELS[missing[0]]!r} output, which --tasks "
            f"{missing[0]} scores; its levels: {list(model.levels)}"
        )
    default = model.card.data_config.get("eval_vocabulary", "names")
    classes, vocabulary_source = dataset_vocabulary(dataset, data.names, vocabulary, default)
    vocab = Vocabulary(classes, is_thing=data.things, allow_duplicates=True)
    items = data.items[:images] if images is not None else data.items

    directory = run_dir(out, "ovseg", dataset, None, None, model.card.name)
    prepare_run_dir(directory, resume=resume, overwrite=overwrite)
    pred_dir = directory / "panoptic_pred"

    k = data.semseg.num_classes if data.semseg is not None else 0
    evaluator = (
        SemSegEvaluator(k + 1, data.semseg.ignore_label, [*data.semseg.class_names, NONE_CLASS])
        if "miou" in tasks_run and data.semseg is not None
        else None
    )
    pq_categories = data.panoptic.categories if data.panoptic is not None else []
    pq_stat = PQStat([c["id"] for c in pq_categories])
    pq_annotations: list[dict[str, Any]] = []
    detections: list[dict[str, Any]] = []

    def state() -> dict[str, Any]:
        return {
            "semseg": evaluator.state_dict() if evaluator is not None else None,
            "pq": pq_stat.state_dict(),
            "pq_annotations": pq_annotations,
            "detections": detections,
        }

    key = f"ovseg|{dataset}|{','.join(tasks_run)}|{len(items)}|{vocabulary_source}"
    shard = Shard.current()
    progress = Progress(directory, resume=resume, key=key, shard=shard)
    if progress.state is not None:
        saved = progress.state
        if evaluator is not None and saved["semseg"] is not None:
            evaluator.load_state_dict(saved["semseg"])
        pq_stat.load_state_dict(saved["pq"])
        pq_annotations.extend(saved["pq_annotations"])
        detections.extend(saved["detections"])

    for image_id, image_path, item in progress.iterate(
        items, len(items), state, desc=f"ovseg {dataset}"
    ):
        result = model.segment(image_path, vocab, level="all")
        if "pq" in tasks_run:
            ann = _panoptic_prediction(result, data.category_ids, image_id, item, pred_dir)
            assert data.panoptic is not None
            pq_stat.merge(
                pq_stat_image(
                    data.panoptic.panoptic_ids(item),
                    item.segments_info,
                    _id_map(result),
                    ann["segments_info"],
                    pq_categories,
                    image_id=image_id,
                )
            )
            pq_annotations.append(ann)
        if evaluator is not None:
            gt = data.semantic_gt(item)
            semantic = _at_level(result, "semantic")
            evaluator.update(_label_map(semantic, data.sem_index, k, gt.shape), gt)
        if "ap" in tasks_run:
            instances = _at_level(result, "instance")
            detections.extend(_detections(instances, data.category_ids, data.things, image_id))

    timing_total = shard.max(progress.elapsed)
    if "pq" in tasks_run:  # the prediction PNGs pq_compute reads on rank 0
        names = [Path(it.panoptic_png).name for i, (_, _, it) in enumerate(items) if shard.owns(i)]
        shard.gather_files(pred_dir, names)
    states = shard.gather(state())
    if states is None:  # another rank: rank 0 writes the result
        progress.finish()
        return shard.broadcast(None)
    if shard.distributed:
        position = {image_id: i for i, (image_id, _, _) in enumerate(items)}
        for other in states[1:]:
            if evaluator is not None:
                evaluator.merge(SemSegEvaluator.from_state_dict(other["semseg"]))
            # per-category iou sums are floats: merged they may differ from a single-process
            # run's in the last bits (~1e-12); PQ itself is recomputed from the files, exactly
            pq_stat.merge(PQStat.from_state_dict(other["pq"]))
        pq_annotations[:] = ordered(
            [s["pq_annotations"] for s in states], lambda a: position[a["image_id"]]
        )
        detections[:] = ordered(
            [s["detections"] for s in states], lambda d: position[d["image_id"]]
        )
    metrics: dict[str, Any] = {}
    per_class: dict[str, Any] = {}
    accumulators: dict[str, Any] = {}
    files: dict[str, str] = {}
    if "pq" in tasks_run:
        assert data.panoptic is not None
        pred_json = directory / "panoptic_pred.json"
        write_json(
            pred_json,
            {"annotations": pq_annotations, "categories": pq_categories},
        )
        gt_json = data.panoptic.gt_json_path
        if images is not None:  # score only the evaluated images
            gt_json = directory / "panoptic_gt_subset.json"
            full = json.loads(data.panoptic.gt_json_path.read_text(encoding="utf-8"))
            done = {a["image_id"] for a in pq_annotations}
            full["annotations"] = [a for a in full["annotations"] if a["image_id"] in done]
            write_json(gt_json, full)
        res = pq_compute(gt_json, pred_json, data.panoptic.gt_folder, pred_dir)
        for split, short in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            for m in ("pq", "sq", "rq"):
                metrics[f"{m.upper()}{short}"] = 100.0 * res[split][m]
        per_class["pq"] = [
            {"category_id": c["id"], "name": c["name"], **pq_stat.get(c["id"])}
            for c in pq_categories
        ]
        accumulators["pq"] = pq_stat.state_dict()
        files["panoptic"] = "panoptic_pred.json"
    if evaluator is not None:
        sem = evaluator.compute()
        metrics.update({m: sem[m] for m in ("mIoU", "fwIoU", "mACC", "pACC")})
        per_class["semseg"] = [
            {"class_id": i, "name": n, "iou": sem[f"IoU-{n}"], "acc": sem[f"ACC-{n}"]}
            for i, n in enumerate(evaluator.class_names[:-1])
        ]
        np.save(directory / "confusion_matrix.npy", evaluator.confusion_matrix)
        files["confusion_matrix"] = "confusion_matrix.npy"
    if "ap" in tasks_run:
        assert data.instances_json is not None
        img_ids = [i for i, _, _ in items]
        write_json(directory / "instances_results.json", {"results": detections})
        ap = coco_mask_ap(
            data.instances_json,
            detections,
            cat_ids=_instance_cat_ids(data.instances_json),
            img_ids=img_ids,
        )
        metrics.update(ap)
        files["instances_results"] = "instances_results.json"

    payload = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "ovseg",
        "dataset": dataset,
        "split": "val",
        "fold": None,
        "shots": None,
        "seed": None,
        "n_images": len(items),
        "tasks": tasks_run,
        "skipped_tasks": data.skipped,
        "data_root_fingerprint": {"path": str(Path(data_root).resolve())},
        "model": model_record(model),
        "protocol": {
            "resolution": "original",
            "threshold": model.card.default_threshold,
            "vocabulary": vocabulary_source,
            "metric_impl": "promptseg.metrics.panoptic@1,semseg@1,coco_ap@1",
            "subset": images is not None,
        },
        "env": environment(model),
        "metrics": metrics,
        "per_class": per_class,
        "accumulators": accumulators,
        "files": files,
    }
    progress.finish()
    return shard.broadcast(write_result(directory, payload, timing_total, len(items), "image"))


def _at_level(result: Any, level: str) -> Any:
    """The masks of one output level of a level="all" result."""
    return result.select([lv == level for lv in result.level])


def _id_map(result: Any) -> np.ndarray:
    pan = result.panoptic
    if pan is None:
        return np.zeros(result.image_size, dtype=np.int64)
    ids = pan["id_map"]
    return (ids.numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)).astype(np.int64)


def _panoptic_prediction(
    result: Any, category_ids: list[Any], image_id: Any, item: Any, pred_dir: Path
) -> dict[str, Any]:
    """Write the prediction PNG (RGB ids) and return its panopticapi annotation."""
    from PIL import Image

    ids = _id_map(result)
    segments = []
    present = set(np.unique(ids).tolist())
    for s in (result.panoptic or {}).get("segments_info", []):
        if int(s["id"]) not in present:
            continue  # a segment fully covered by others: panopticapi rejects JSON-only ids
        index = int(s["category_id"])
        if not 0 <= index < len(category_ids):
            raise ValueError(f"image {image_id!r}: vocabulary index {index} out of range")
        segments.append(
            {
                "id": int(s["id"]),
                "category_id": category_ids[index],
                "isthing": int(bool(s.get("isthing", True))),
            }
        )
    name = Path(item.panoptic_png).name
    pred_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(id2rgb(ids)).save(pred_dir / name)
    return {"image_id": image_id, "file_name": name, "segments_info": segments}


def _label_map(result: Any, sem_index: list[int], none: int, shape: tuple[int, ...]) -> np.ndarray:
    """Semantic label map: higher-scoring masks painted last; uncovered pixels = `none`."""
    out = np.full(result.image_size, none, dtype=np.int64)
    if len(result):
        order = torch.argsort(result.scores.float(), stable=True).tolist()
        masks = result.masks.numpy()
        cids = result.class_ids.tolist()
        for i in order:
            out[masks[i]] = sem_index[int(cids[i])]
    if out.shape != tuple(shape):
        raise ValueError(f"prediction size {out.shape} != GT size {tuple(shape)}")
    return out


def _detections(
    result: Any, category_ids: list[Any], things: list[bool], image_id: Any
) -> list[dict[str, Any]]:
    """COCO segm results (dataset category ids, no bbox) of the thing classes."""
    out = []
    for rec in result.to_coco_rle():
        index = int(rec["category_id"])
        if not things[index]:
            continue
        out.append(
            {
                "image_id": image_id,
                "category_id": category_ids[index],
                "segmentation": rec["segmentation"],
                "score": rec["score"],
            }
        )
    return out


def _instance_cat_ids(path: Path) -> list[int]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [c["id"] for c in data["categories"]]
