"""`promptseg eval fss`: few-shot semantic segmentation on PASCAL-5i, COCO-20i, FSS-1000, LVIS-92i.

Episodes come from `promptseg.data.episodes` (the reference stream, digest recorded); each
episode's query is segmented with a SupportSet of its shots and scored with hsnet's mIoU/FB-IoU
at the protocol resolution (GT nearest-resized, benchmarks.md P1) or at the original size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.episodes import episode_digest, serialize_episodes
from ..data.fewshot import FewShotDataset
from ..metrics.fss import FewShotSegEvaluator
from ..prompts import SupportSet, VisualPrompt
from ..transforms import resize_mask
from .runner import (
    SCHEMA_VERSION,
    Progress,
    environment,
    model_record,
    run_dir,
    write_result,
)

__all__ = ["eval_fss", "protocol_resolution"]


def protocol_resolution(model: Any, resolution: str) -> tuple[int, int] | None:
    """(H, W) the protocol scores at for this model, or None for the original image size."""
    if resolution == "original":
        return None
    if resolution != "model":
        raise ValueError(f"--resolution must be 'model' or 'original', got {resolution!r}")
    size = model.card.data_config.get("eval_resolution", "original")
    return None if size == "original" else (int(size[0]), int(size[1]))


def eval_fss(
    model: Any,
    *,
    dataset: str,
    fold: int | str,
    shots: int,
    data_root: str | Path,
    splits_dir: str | Path | None = None,
    seed: int = 0,
    episodes: int | None = None,
    resolution: str = "model",
    threshold: float | None = None,
    out: str | Path = "runs",
    resume: bool = False,
    save_preds: bool = False,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Run one fold and write its result.json; returns the result dict."""
    data = FewShotDataset(
        dataset, data_root, fold, shots=shots, splits_dir=splits_dir, trust_pickle=trust_pickle
    )
    eps = data.episodes(shots, seed=seed, n=episodes)
    digest = episode_digest(eps)
    size = protocol_resolution(model, resolution)
    directory = run_dir(out, "fss", dataset, data.fold, shots, model.card.name)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "episodes.tsv").write_text(serialize_episodes(eps), encoding="utf-8")
    evaluator = FewShotSegEvaluator(data.class_ids)
    key = f"{digest}|{size}|{threshold}"
    progress = Progress(directory, resume=resume, key=key)
    if progress.state is not None:
        evaluator.load_state_dict(progress.state)
    for ep in progress.iterate(
        eps, len(eps), evaluator.state_dict, desc=f"fss {dataset} f{data.fold} {shots}-shot"
    ):
        query = data.query(ep)
        support = SupportSet(
            [VisualPrompt(s.image, s.mask, class_id=ep.class_id) for s in data.supports(ep)]
        )
        result = model.segment(
            query.image, support, output_size=size or "original", threshold=threshold
        )
        pred = (
            result.masks.any(dim=0) if len(result) else torch.zeros(result.image_size, dtype=bool)
        )
        gt, ignore = _at(query.mask, size), _at(query.ignore, size)
        evaluator.update(pred.numpy(), gt, ep.class_id, ignore)
        if save_preds:
            _save_pred(directory / "preds" / f"{ep.index:05d}.png", pred)
    timing_total = progress.elapsed
    payload = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "fss",
        "dataset": dataset,
        "split": "val" if dataset != "fss1000" else "test",
        "fold": data.fold,
        "shots": shots,
        "seed": seed,
        "n_episodes": len(eps),
        "episode_digest": digest,
        "splits_sha256": _sha_of(data.split_path),
        "data_root_fingerprint": {"path": str(Path(data_root).resolve())},
        "model": model_record(model),
        "protocol": {
            "resolution": f"model:{size[0]}x{size[1]}" if size else "original",
            "threshold": threshold if threshold is not None else model.card.default_threshold,
            "metric_impl": "promptseg.metrics.fss@1",
            "reference_episodes": seed == 0 and episodes is None,
        },
        "env": environment(model),
        "metrics": {"mIoU": evaluator.miou(), "FB-IoU": evaluator.fbiou()},
        "per_class": [
            {**row, "name": data.class_names.get(row["class_id"], str(row["class_id"]))}
            for row in evaluator.records()
        ],
        "accumulators": evaluator.state_dict(),
    }
    progress.finish()
    return write_result(directory, payload, timing_total, len(eps), "episode")


def _at(mask: np.ndarray | None, size: tuple[int, int] | None) -> np.ndarray | None:
    """GT (or ignore) mask at the protocol resolution, torch legacy nearest (P1)."""
    if mask is None or size is None:
        return mask
    return resize_mask(torch.from_numpy(mask), size).numpy()


def _save_pred(path: Path, pred: torch.Tensor) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pred.numpy().astype(np.uint8) * 255).save(path)


def _sha_of(path: Path) -> dict[str, str]:
    from ..data.splits import file_sha256

    return {path.name: file_sha256(path)} if path.is_file() else {}
