"""`promptseg eval perseg`: one-shot personalised segmentation on PerSeg.

Per object, the reference image `00` and its mask are the prompt (one `VisualPrompt`); every other
image of the object is segmented at its original size (Personalize-SAM scores its output masks
at image size) and scored with `promptseg.metrics.perseg` (per-object IoU / accuracy sums,
mIoU / mAcc = mean over objects, ×100). Queries run object by object in stem order; `--resume`
continues from the accumulators of the interrupted run. With `save_preds` the binary masks are
written as `<run>/preds/<object>/<stem>.png` (0/255), the layout `evaluate_perseg` re-scores.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.perseg import PerSegDataset, PerSegItem
from ..metrics.perseg import REFERENCE_STEM, PerSegEvaluator
from ..prompts import VisualPrompt
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

__all__ = ["eval_perseg"]


def _items_digest(items: list[PerSegItem]) -> str:
    """sha256 of the ordered `object/stem` query list (identifies the run for --resume)."""
    text = "".join(f"{it.object}/{it.stem}\n" for it in items)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def eval_perseg(
    model: Any,
    *,
    data_root: str | Path,
    out: str | Path = "runs",
    resume: bool = False,
    overwrite: bool = False,
    save_preds: bool = False,
) -> dict[str, Any]:
    """Run PerSeg and write result.json (metrics ×100); returns the result dict."""
    data = PerSegDataset(data_root)
    objects = data.objects()
    items = data.items()
    digest = _items_digest(items)
    directory = run_dir(out, "perseg", "perseg", None, 1, model.card.name)
    prepare_run_dir(directory, resume=resume, overwrite=overwrite)
    evaluator = PerSegEvaluator(objects)
    shard = Shard.current()
    progress = Progress(directory, resume=resume, key=f"perseg|{digest}", shard=shard)
    if progress.state is not None:
        evaluator.load_state_dict(progress.state)
    prompts: dict[str, tuple[VisualPrompt, Any]] = {}  # object -> (prompt, its embedding)
    level = model.check_level(None)
    for item in progress.iterate(items, len(items), evaluator.state_dict, desc="perseg"):
        if item.object not in prompts:  # encoded once, reused for every image of the object
            ref = data.reference(item.object)
            prompt = VisualPrompt(str(ref.image_path), data.mask(ref))
            with torch.inference_mode():
                prompts[item.object] = (prompt, model.encode_prompt([prompt], level))
        gt = data.mask(item)
        prompt, embedding = prompts[item.object]
        result = model.segment(
            str(item.image_path), prompt, prompt_embeddings=embedding, output_size="original"
        )
        pred = result.masks.any(dim=0) if len(result) else torch.zeros(gt.shape, dtype=torch.bool)
        pred = pred.cpu().numpy()
        evaluator.update(item.object, pred, gt)
        if save_preds:
            path = directory / "preds" / item.object / f"{item.stem}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pred.astype(np.uint8) * 255).save(path)
    timing_total = shard.max(progress.elapsed)
    if save_preds:
        mine = [f"preds/{it.object}/{it.stem}.png" for i, it in enumerate(items) if shard.owns(i)]
        shard.gather_files(directory, mine)
    if shard.merged(evaluator) is None:  # another rank: rank 0 writes the result
        progress.finish()
        return shard.broadcast(None)
    payload = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "perseg",
        "dataset": "perseg",
        "split": "test",
        "fold": None,
        "shots": 1,
        "seed": None,
        "n_objects": len(objects),
        "n_images": len(items),
        "items_digest": digest,
        "data_root_fingerprint": {"path": str(Path(data.root).resolve())},
        "model": model_record(model),
        "protocol": {
            "resolution": "original",
            "threshold": model.card.default_threshold,
            "reference_image": REFERENCE_STEM,
            "metric_impl": "promptseg.metrics.perseg@1",
            "units": "x100",
        },
        "env": environment(model),
        "metrics": {"mIoU": evaluator.miou(), "mAcc": evaluator.macc()},
        "per_object": evaluator.records(),
        "accumulators": evaluator.state_dict(),
        "preds": str(directory / "preds") if save_preds else None,
    }
    progress.finish()
    return shard.broadcast(write_result(directory, payload, timing_total, len(items), "image"))
