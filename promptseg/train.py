"""`promptseg train sine`: fine-tune SINE's trainable parts on a COCO-format instance dataset.

Each step draws one image and builds an in-context pair from it (sine.md §3, §7 "crop pairs"):
the reference is the image with all its instance masks; the target is the same image flipped
horizontally, so every ID query has a matching target instance (fixed matching by annotation id)
and instance queries are matched by the Hungarian matcher. Losses: SINECriterion (instance CE,
ID CE, point-sampled mask BCE + dice, deep supervision). The frozen DINOv2 encoder gets no
gradient; neck and decoder are trained with AdamW. The official large-scale-jitter augmentation
and multi-image batches are not reproduced.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image
from tqdm import tqdm

from .data.fewshot import segmentation_to_mask
from .errors import DatasetLayoutError
from .heads.matcher import SINECriterion

__all__ = ["TrainConfig", "CocoInstances", "train_sine"]


@dataclass
class TrainConfig:
    """What `promptseg train sine --config FILE.yaml` reads (keys as below)."""

    model: str = "sine_dinov2l.coco_ade_o365"
    annotations: str = ""  # COCO instances json (with segmentation masks)
    images: str = ""  # folder the json's file_name entries are relative to
    pretrained: bool = True
    checkpoint: str | None = None
    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.05
    seed: int = 0
    device: str | None = None
    out: str = "runs/train_sine"
    save_every: int = 500

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainConfig:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"{path}: unknown keys {unknown}; known: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**data)


class CocoInstances:
    """Images of a COCO instances json that have at least one non-crowd mask."""

    def __init__(self, annotations: str | os.PathLike, images: str | os.PathLike) -> None:
        path, self.root = Path(annotations), Path(images)
        if not path.is_file():
            raise DatasetLayoutError(f"COCO annotations not found: {path} (a COCO instances json)")
        coco = json.loads(path.read_text(encoding="utf-8"))
        anns: dict[int, list[dict]] = {}
        for a in coco.get("annotations", []):
            if not a.get("iscrowd", 0) and a.get("segmentation"):
                anns.setdefault(a["image_id"], []).append(a)
        self.images = [im for im in coco.get("images", []) if im["id"] in anns]
        self.anns = anns
        if not self.images:
            raise DatasetLayoutError(f"{path}: no image has a non-crowd segmentation annotation")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(image uint8 [H, W, 3], masks bool [T, H, W], category ids [T], annotation ids [T])."""
        info = self.images[i]
        image = np.array(Image.open(self.root / info["file_name"]).convert("RGB"))
        h, w = image.shape[:2]
        anns = self.anns[info["id"]]
        masks = np.stack([segmentation_to_mask(a["segmentation"], h, w) for a in anns])
        return (
            image,
            masks,
            np.array([a["category_id"] for a in anns]),
            np.array([a["id"] for a in anns]),
        )


def training_pair(
    model: Any, image: np.ndarray, masks: np.ndarray, cats: np.ndarray, ids: np.ndarray
) -> tuple[dict, dict]:
    """Head outputs for one (reference = image, target = flipped image) pair and its targets."""
    keep = masks.reshape(len(masks), -1).any(1)
    masks, cats, ids = masks[keep], cats[keep], ids[keep]
    classes = np.unique(cats)  # GT class index = position in the sorted unique class list
    labels = torch.from_numpy(np.searchsorted(classes, cats)).long()
    ref = torch.from_numpy(image).permute(2, 0, 1)
    tgt = ref.flip(-1)
    device = model.device
    ref_masks = torch.stack([model._canvas_mask(torch.from_numpy(m)) for m in masks]).to(device)
    tgt_masks = ref_masks[..., : model.image_size[0], : model.image_size[1]].flip(-1)
    tgt_masks = torch.nn.functional.pad(
        tgt_masks, (0, model.canvas - tgt_masks.shape[-1], 0, model.canvas - tgt_masks.shape[-2])
    )
    ref_feats = model.features(model.preprocess(ref))
    tokens = model.head.pool_tokens(
        ref_feats, [ref_masks], ids=[torch.from_numpy(ids)], classes=[labels]
    )
    feats = model.features(model.preprocess(tgt))
    out = model.head(feats, model.head.mask_features(feats), tokens.id_tokens, tokens.sem_tokens)
    target = {
        "labels": labels.to(device),
        "masks": tgt_masks,
        "ids": torch.from_numpy(ids).to(device),
        "ref_ids": tokens.ids,
    }
    return out, target


def train_sine(config: TrainConfig, *, progress: bool = True) -> list[float]:
    """Run `config.steps` optimiser steps; returns the loss of every step; saves checkpoints."""
    from .weights import save_state_dict_file
    from .zoo import create_model

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = create_model(
        config.model,
        pretrained=config.pretrained,
        checkpoint_path=config.checkpoint,
        device=config.device,
    )
    model.train()
    model.backbone.requires_grad_(False)
    model.backbone.eval()
    params = [p for p in model.head.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    criterion = SINECriterion()
    data = CocoInstances(config.annotations, config.images)
    generator = torch.Generator().manual_seed(config.seed)
    out_dir = Path(config.out)
    losses = []
    bar = tqdm(range(config.steps), desc="train sine", disable=not progress or None)
    for step in bar:
        output, target = training_pair(model, *data[int(rng.integers(len(data)))])
        loss = sum(criterion(output, target, generator=generator).values())
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % config.save_every == 0 or step + 1 == config.steps:
            save_state_dict_file(model.state_dict(), out_dir / "promptseg.safetensors")
    model.eval()
    return losses
