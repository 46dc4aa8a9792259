"""`promptseg eval fss`: few-shot semantic segmentation on PASCAL-5i, COCO-20i, FSS-1000, LVIS-92i.

Episodes come from `promptseg.data.episodes` (the reference stream, digest recorded); each
episode's query is segmented with a SupportSet of its shots and scored with hsnet's mIoU/FB-IoU
at the protocol resolution (GT nearest-resized like the reference code) or at the original size.
`workers` threads read the episodes' images ahead of the model; the support sets of `batch_size`
consecutive episodes are encoded in one `encode_prompt` call, each query is then decoded alone
against its own support set (`decode` takes one image).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.episodes import DEFAULT_EPISODES, Episode, episode_digest, serialize_episodes
from ..data.fewshot import FewShotDataset, FewShotSample
from ..data.splits import file_sha256, find_split
from ..metrics.fss import FewShotSegEvaluator
from ..prompts import SupportSet, VisualPrompt
from ..transforms import resize_mask
from .distributed import Shard
from .runner import (
    SCHEMA_VERSION,
    Progress,
    encode_prompts,
    environment,
    model_record,
    prefetch,
    prepare_run_dir,
    run_dir,
    write_result,
)

__all__ = ["eval_fss", "protocol_resolution", "reference_episodes", "resolution_label"]


def protocol_resolution(model: Any, resolution: str) -> tuple[int, int] | None:
    """(H, W) the protocol scores at for this model, or None for the original image size."""
    if resolution == "original":
        return None
    if resolution != "model":
        raise ValueError(f"--resolution must be 'model' or 'original', got {resolution!r}")
    size = model.card.data_config.get("eval_resolution", "original")
    return None if size == "original" else (int(size[0]), int(size[1]))


def resolution_label(size: tuple[int, int] | None) -> str:
    """`model:518` (square), `model:480x640`, or `original`, as result.json records it."""
    if size is None:
        return "original"
    return f"model:{size[0]}" if size[0] == size[1] else f"model:{size[0]}x{size[1]}"


def _fold_label(data: FewShotDataset) -> int | str:
    """The fold as results and split files name it (FSS-1000's only split is `test`)."""
    return "test" if data.name == "fss1000" else data.fold


def reference_episodes(data: FewShotDataset, seed: int, n_episodes: int) -> bool:
    """Seed 0, the whole stream and a split list byte-identical to upstream's (hsnet's).

    LVIS-92i's pickle has no published sha256: only seed and length decide (its hash is recorded).
    """
    if seed != 0 or n_episodes != DEFAULT_EPISODES[data.name]:
        return False
    if data.name == "lvis92i":
        return True
    return file_sha256(data.split_path) == find_split(data.name, _fold_label(data)).sha256


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
    batch_size: int = 1,
    workers: int = 0,
    out: str | Path = "runs",
    resume: bool = False,
    overwrite: bool = False,
    save_preds: bool = False,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Run one fold and write its result.json; returns the result dict."""
    if batch_size < 1 or workers < 0:
        raise ValueError(
            f"--batch-size must be >= 1 and --workers >= 0, got {batch_size} and {workers}"
        )
    data = FewShotDataset(
        dataset, data_root, fold, shots=shots, splits_dir=splits_dir, trust_pickle=trust_pickle
    )
    eps = data.episodes(shots, seed=seed, n=episodes)
    digest = episode_digest(eps)
    size = protocol_resolution(model, resolution)
    fold_label = _fold_label(data)
    # a non-default threshold is another run of the same model: its own folder (threshold sweeps)
    name = model.card.name if threshold is None else f"{model.card.name}@t{threshold:g}"
    directory = run_dir(out, "fss", dataset, fold_label, shots, name)
    shard = Shard.current()
    prepare_run_dir(directory, resume=resume, overwrite=overwrite)
    if shard.main:
        (directory / "episodes.tsv").write_text(serialize_episodes(eps), encoding="utf-8")
    evaluator = FewShotSegEvaluator(data.class_ids)
    key = f"{digest}|{size}|{threshold}"
    progress = Progress(directory, resume=resume, key=key, shard=shard)
    if progress.state is not None:
        evaluator.load_state_dict(progress.state)

    def load(ep: Episode) -> tuple[Episode, FewShotSample, SupportSet]:
        refs = [VisualPrompt(s.image, s.mask, class_id=ep.class_id) for s in data.supports(ep)]
        return ep, data.query(ep), SupportSet(refs)

    todo = [ep for ep in eps if ep.index not in progress.done and shard.owns(ep.index)]
    loaded = prefetch(load, todo, workers, ahead=max(2 * workers, batch_size))
    for ep, query, prompts, embeddings in progress.iterate(
        _encoded(model, loaded, batch_size),
        len(eps),
        evaluator.state_dict,
        desc=f"fss {dataset} f{fold_label} {shots}-shot",
        index=lambda i, item: item[0].index,
    ):
        result = model.segment(
            query.image,
            prompts,
            prompt_embeddings=embeddings,
            output_size=size or "original",
            threshold=threshold,
        )
        pred = (
            result.masks.any(dim=0) if len(result) else torch.zeros(result.image_size, dtype=bool)
        )
        gt, ignore = _at(query.mask, size), _at(query.ignore, size)
        evaluator.update(pred.numpy(), gt, ep.class_id, ignore)
        if save_preds:
            _save_pred(directory / "preds" / f"{ep.index:05d}.png", pred)
    timing_total = shard.max(progress.elapsed)
    if save_preds:
        mine = [f"preds/{ep.index:05d}.png" for ep in eps if shard.owns(ep.index)]
        shard.gather_files(directory, mine)
    if shard.merged(evaluator) is None:  # another rank: rank 0 writes the result
        progress.finish()
        return shard.broadcast(None)
    payload = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "fss",
        "dataset": dataset,
        "split": "val" if dataset != "fss1000" else "test",
        "fold": fold_label,
        "shots": shots,
        "seed": seed,
        "n_episodes": len(eps),
        "episode_digest": digest,
        "splits_sha256": _sha_of(data.split_path),
        "data_root_fingerprint": {"path": str(Path(data_root).resolve())},
        "model": model_record(model),
        "protocol": {
            "resolution": resolution_label(size),
            "threshold": threshold if threshold is not None else model.card.default_threshold,
            "metric_impl": "promptseg.metrics.fss@1",
            "reference_episodes": reference_episodes(data, seed, len(eps)),
        },
        "env": environment(model),
        "metrics": {"mIoU": evaluator.miou(), "FB-IoU": evaluator.fbiou()},
        "per_class": [
            {**row, "name": data.class_names.get(row["class_id"], str(row["class_id"]))}
            for row in evaluator.records()
        ],
        "accumulators": evaluator.state_dict(),
        "loader": {"batch_size": batch_size, "workers": workers},
    }
    progress.finish()
    return shard.broadcast(write_result(directory, payload, timing_total, len(eps), "episode"))


def _encoded(
    model: Any, loaded: Iterable[tuple[Episode, FewShotSample, SupportSet]], batch_size: int
) -> Iterator[tuple[Episode, FewShotSample, list[Any], Any]]:
    """(episode, query, prompts, prompt embeddings); `batch_size` support sets per encode call."""
    items = iter(loaded)
    while chunk := list(islice(items, batch_size)):
        encoded = encode_prompts(model, [support for _, _, support in chunk])
        for (ep, query, _), (prompts, embeddings) in zip(chunk, encoded, strict=True):
            yield ep, query, prompts, embeddings


def _at(mask: np.ndarray | None, size: tuple[int, int] | None) -> np.ndarray | None:
    """GT (or ignore) mask at the protocol resolution, torch legacy nearest."""
    if mask is None or size is None:
        return mask
    return resize_mask(torch.from_numpy(mask), size).numpy()


def _save_pred(path: Path, pred: torch.Tensor) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pred.numpy().astype(np.uint8) * 255).save(path)


def _sha_of(path: Path) -> dict[str, str]:
    return {path.name: file_sha256(path)} if path.is_file() else {}
