"""`promptseg train odise`: train ODISE's trainable parts on a COCO-panoptic-format dataset.

Data: the panoptic json's images, one target mask per non-crowd segment (kept
even when the crop leaves it empty, as the reference does); detectron2's large-scale jitter:
horizontal flip (p 0.5), ResizeScale(`scale_range` x `crop_size`, aspect kept, PIL bilinear
image, nearest segments), FixedSizeCrop(`crop_size`) (one random offset fraction for both axes;
the image padded bottom/right with 128 as detectron2's default, the segments with void). Images
come epoch by epoch in a fresh random order.

Forward: pixels [B, 3, S, S] in [0, 1] -> diffusion pyramid (implicit-captioner conditioning, empty
prompt) -> Mask2Former head, every prediction (initial queries and each decoder layer). Label model:
class logits are the K+1 cosine logits (K classes and the learned null embedding) against the
training vocabulary (`vocabulary`: a preset whose label-file ids are the dataset's category ids,
COCO's `coco_panoptic`; or null for the dataset's category names); the frozen CLIP embeds the raw
synonyms once, `text_proj` and `null_embed` are trained. Caption model: fg / no-object targets on
the head's 2-way class logits, plus the grounding loss (weight 1) between mask embeddings and noun
phrases of a random caption.

Loss: Mask2Former's set criterion on every prediction: Hungarian matching (costs class 2, BCE 5,
dice 5 on `num_points` uniform points), class CE x 2 (no-object weight 0.1), point BCE x 5 and dice
x 5 on `num_points` importance-sampled points (oversample 3, importance ratio 0.75), mask terms
normalised by the number of target masks. Optimiser (detectron2 defaults with decay 0 for norm
layers and biases): AdamW, lr x the reference's step schedule expressed as fractions of `steps`
(linear warmup from `warmup_factor` over the first `warmup`, x 0.1 at each of `lr_drops`), gradient
norm over the optimiser's parameters clipped to `grad_clip`. A step takes `batch_size` images in
forwards of `micro_batch` images, each micro-batch in the role of one GPU of the reference (losses
averaged; masks normalised by the step's masks / micro-batches). Frozen: the SD UNet and VAE and
CLIP. `amp: fp16` (or `true`, the older spelling): fp16 autocast and a gradient scaler (CUDA) as the
reference; `amp: bf16`: bf16 autocast. Image j of step t is augmented (and its caption words drawn)
with `sample_rng(seed, t, j)`; the random points of the micro-batch starting at image j come from
`sample_generator(seed, t, j)`. `resume: true` continues from `out/train_state.pt` (trainable
parameters, optimiser, schedule, scaler, step, data order and every rank's RNGs) on the schedule of
the config's `steps`.

Several processes (torchrun, see promptseg.train.common): every rank follows the one epoch order of
images, rank r loads, augments and runs micro-batches r, r + N, ... of each step (`num_masks` is the
global batch's, summed over the ranks as the reference all-reduces it), and DistributedDataParallel
all-reduces the trainable parts' gradients before the step: N processes give the updates of one;
`batch_size` must be a multiple of N x `micro_batch`.

Not reproduced: the grounding loss contrasts the images of one micro-batch, not the global batch
(the reference gathers them across GPUs), and the evaluation during training; the reference
orders a caption's noun phrases as a Python set (hash-seed dependent), here they are sorted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor, nn

from ..errors import DatasetLayoutError
from ..layers.matching import (
    HungarianMatcher,
    Match,
    dice_loss,
    point_sample,
    sigmoid_ce_loss,
    uncertain_point_coords,
)
from ..metrics.panoptic import read_id_png
from ..models.odise import PHOTO_TEMPLATE, max_over_synonyms
from ..prompts import Vocabulary
from ..registry import register_trainer
from ..vocabularies import PRESETS
from .common import (
    STATE_FILE,
    GradientAccumulator,
    TrainConfig,
    autocast,
    configured_model,
    pil_resize,
    resume_point,
    run_from_file,
    run_steps,
    sample_generator,
    sample_rng,
    start_distributed,
)

__all__ = [
    "ODISETrainConfig",
    "CocoPanoptic",
    "PanopticImage",
    "TrainingSample",
    "EpochSampler",
    "SetCriterion",
    "large_scale_jitter",
    "training_vocabulary",
    "label_logits",
    "predictions",
    "grounding_loss",
    "merge_chunks",
    "nltk_noun_phrases",
    "odise_parameter_groups",
    "step_lr_factor",
    "frozen_modules",
    "train_odise",
    "train_from_file",
]

SIZE_DIVISIBILITY = 64  # ODISE pads its input to multiples of 64
IMAGE_PAD = 128  # detectron2 FixedSizeCrop's image padding value (ODISE keeps the default)
LR_DROP = 0.1  # the step schedule's values 1, 0.1, 0.01
WHERE_EPSILON = 1e-6  # fvcore's tolerance when locating a training fraction in a schedule
UNUSED_LABEL = "invalid_class_id"  # label-file lines that are not classes
# noun-phrase grammars of the caption model (Kim et al.'s keyphrase patterns), without and with
# a preposition joining two noun groups
NOUN_PHRASE_GRAMMARS = (
    "NBAR: {<NN.*|JJ>*<NN.*>}\nNP: {<NBAR>}",
    "NBAR: {<NN.*|JJ>*<NN.*>}\nNP: {<NBAR><IN><NBAR>}\n{<NBAR>}",
)
NLTK_HELP = (
    "pip install nltk, then fetch its data once: python -m nltk.downloader punkt punkt_tab "
    "averaged_perceptron_tagger averaged_perceptron_tagger_eng"
)


@dataclass
class ODISETrainConfig(TrainConfig):
    """What `promptseg train odise --config FILE.yaml` reads (defaults: the official 50-epoch
    COCO run, 64 images per step)."""

    model: str = "odise_sd13_m2f.label_coco50e"
    annotations: str = ""  # COCO panoptic json, e.g. panoptic_train2017.json
    panoptic_masks: str = ""  # folder of its panoptic PNGs, e.g. panoptic_train2017/
    images: str = ""  # folder of its images, e.g. train2017/
    captions: str | None = None  # COCO captions json: the caption model's grounding loss
    vocabulary: str | None = "coco_panoptic"  # preset keyed by category id; null: category names
    crop_size: int = 1024
    scale_range: tuple[float, float] = (0.1, 2.0)
    steps: int = 92188
    batch_size: int = 64  # images per optimiser step
    micro_batch: int = 2  # images per forward (the reference's images per GPU)
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup: float = 500 / 184375  # fraction of `steps` of linear warmup
    warmup_factor: float = 0.067  # learning-rate factor at step 0
    lr_drops: tuple[float, ...] = (163889 / 184375, 177546 / 184375)  # fractions of `steps`
    grad_clip: float | None = 0.01
    num_points: int = 12544  # points per mask of the matching costs and of the mask losses
    num_words: int = 8  # caption words per image (grounding loss)
    save_every: int = 4500
    out: str = "runs/train_odise"

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.warmup_steps or self.lr_end:
            problems.append(
                f"warmup_steps ({self.warmup_steps}) and lr_end ({self.lr_end}) do not apply to "
                "ODISE's step schedule; set `warmup` (a fraction of steps), `warmup_factor` and "
                "`lr_drops` instead"
            )
        if self.crop_size < SIZE_DIVISIBILITY or self.crop_size % SIZE_DIVISIBILITY:
            problems.append(
                f"crop_size ({self.crop_size}) must be a positive multiple of {SIZE_DIVISIBILITY} "
                "(ODISE's input padding); the official value is 1024"
            )
        scale = self.scale_range
        if not (isinstance(scale, tuple) and len(scale) == 2 and 0 < scale[0] <= scale[1]):
            problems.append(f"scale_range ({scale}) must be [min, max] with 0 < min <= max")
        if self.micro_batch < 1 or self.batch_size % self.micro_batch:
            problems.append(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch "
                f"({self.micro_batch} >= 1)"
            )
        if not 0 <= self.warmup < 1 or not 0 < self.warmup_factor <= 1:
            problems.append(
                f"warmup ({self.warmup}) must be in [0, 1) and warmup_factor "
                f"({self.warmup_factor}) in (0, 1]"
            )
        drops = self.lr_drops
        if (
            not isinstance(drops, tuple)
            or list(drops) != sorted(drops)
            or not all(0 < d <= 1 for d in drops)
        ):
            problems.append(f"lr_drops ({drops}) must be increasing fractions of steps in (0, 1]")
        if self.num_points < 1 or self.num_words < 1:
            problems.append(
                f"num_points ({self.num_points}) and num_words ({self.num_words}) must be >= 1"
            )
        if self.vocabulary is not None and self.vocabulary not in PRESETS:
            problems.append(
                f"vocabulary ({self.vocabulary!r}) must be one of {list(PRESETS)} (a preset whose "
                "label-file ids are the dataset's category ids) or null (the category names)"
            )
        if self.captions is not None and not Path(self.captions).is_file():
            problems.append(
                f"captions ({self.captions}) is not a file; give a COCO captions json "
                "(captions_train2017.json) or null"
            )
        return problems


# ----------------------------------------------------------------------------------------------
# data


@dataclass
class PanopticImage:
    """One dataset image: RGB uint8 [H, W, 3], segment id map int64 [H, W] (0 = void), the ids
    [T] and category ids [T] of its non-crowd segments, its captions (possibly none)."""

    image: np.ndarray
    segments: np.ndarray
    segment_ids: np.ndarray
    category_ids: np.ndarray
    captions: list[str]


@dataclass
class TrainingSample:
    """One augmented image: RGB uint8 [S, S, 3], target masks bool [T, S, S], class index of each
    target [T] (into the training vocabulary), caption words (caption model) or None."""

    image: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    words: list[str] | None


class CocoPanoptic:
    """A COCO panoptic dataset: the json, its folder of panoptic PNGs, its image folder and,
    optionally, a COCO captions json of the same images."""

    def __init__(
        self,
        annotations: str | os.PathLike,
        panoptic_masks: str | os.PathLike,
        images: str | os.PathLike,
        captions: str | os.PathLike | None = None,
    ) -> None:
        path = Path(annotations)
        self.mask_root, self.image_root = Path(panoptic_masks), Path(images)
        if not path.is_file():
            raise DatasetLayoutError(
                f"COCO panoptic annotations not found: {path!s} (set `annotations` to a panoptic "
                "json such as annotations/panoptic_train2017.json)"
            )
        for folder, key in ((self.mask_root, "panoptic_masks"), (self.image_root, "images")):
            if not folder.is_dir():
                raise DatasetLayoutError(f"`{key}` folder not found: {folder!s}")
        data = json.loads(path.read_text(encoding="utf-8"))
        lacking = [k for k in ("images", "annotations", "categories") if k not in data]
        if lacking:
            raise DatasetLayoutError(f"{path}: not a COCO panoptic json, it lacks {lacking}")
        self.categories: list[dict[str, Any]] = data["categories"]
        by_id = {im["id"]: im for im in data["images"]}
        orphans = [a["image_id"] for a in data["annotations"] if a["image_id"] not in by_id]
        if orphans:
            raise DatasetLayoutError(f"{path}: annotations of images {orphans[:5]} not in 'images'")
        self.entries = [(by_id[a["image_id"]], a) for a in data["annotations"]]
        if not self.entries:
            raise DatasetLayoutError(f"{path}: no annotated image")
        self.captions: dict[Any, list[str]] = {}
        if captions is not None:
            caption_data = json.loads(Path(captions).read_text(encoding="utf-8"))
            if "annotations" not in caption_data:
                raise DatasetLayoutError(
                    f"{captions}: not a COCO captions json (no 'annotations' of image_id, caption)"
                )
            for a in caption_data["annotations"]:
                self.captions.setdefault(a["image_id"], []).append(a["caption"])

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> PanopticImage:
        info, ann = self.entries[i]
        with Image.open(self.image_root / info["file_name"]) as im:
            image = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        segments = read_id_png(self.mask_root / ann["file_name"])
        if segments.shape != image.shape[:2]:
            raise DatasetLayoutError(
                f"{ann['file_name']}: panoptic PNG of size {segments.shape} but its image "
                f"{info['file_name']} is {image.shape[:2]}"
            )
        kept = [s for s in ann["segments_info"] if not s.get("iscrowd", 0)]
        return PanopticImage(
            image=image,
            segments=segments,
            segment_ids=np.array([s["id"] for s in kept], dtype=np.int64),
            category_ids=np.array([s["category_id"] for s in kept], dtype=np.int64),
            captions=self.captions.get(info["id"], []),
        )


class EpochSampler:
    """Dataset indices in a new random order every epoch (detectron2's TrainingSampler), drawn
    from `rng`; its position is part of the training state."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size, self.rng = size, rng
        self.order: list[int] = []
        self.cursor = 0

    def __call__(self) -> int:
        if self.cursor == len(self.order):
            self.order, self.cursor = self.rng.permutation(self.size).tolist(), 0
        self.cursor += 1
        return self.order[self.cursor - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"order": list(self.order), "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order, self.cursor = list(state["order"]), int(state["cursor"])


def resize_segments(segments: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour PIL resize of a segment id map [H, W] to `size` (h, w), as detectron2
    resizes the RGB-encoded panoptic PNG."""
    pil = Image.fromarray(segments.astype(np.int32))
    return np.asarray(pil.resize(size[::-1], Image.Resampling.NEAREST)).astype(np.int64)


def large_scale_jitter(
    image: np.ndarray,
    segments: np.ndarray,
    crop_size: int,
    rng: np.random.Generator,
    scale_range: tuple[float, float] = (0.1, 2.0),
) -> tuple[np.ndarray, np.ndarray]:
    """detectron2's RandomFlip + ResizeScale + FixedSizeCrop on an image [H, W, 3] and its
    segment id map [H, W] -> [S, S, 3] (padding 128) and [S, S] (padding 0 = void)."""
    if rng.random() < 0.5:
        image, segments = image[:, ::-1], segments[:, ::-1]
    h, w = image.shape[:2]
    target = crop_size * rng.uniform(*scale_range)
    scale = min(target / h, target / w)
    size = (max(1, int(np.round(h * scale))), max(1, int(np.round(w * scale))))
    image = pil_resize(image, size, Image.Resampling.BILINEAR)
    segments = resize_segments(segments, size)
    y0, x0 = np.round(np.maximum(np.subtract(size, crop_size), 0) * rng.random()).astype(int)
    image = image[y0 : y0 + crop_size, x0 : x0 + crop_size]
    segments = segments[y0 : y0 + crop_size, x0 : x0 + crop_size]
    padded_image = np.full((crop_size, crop_size, 3), IMAGE_PAD, dtype=np.uint8)
    padded_segments = np.zeros((crop_size, crop_size), dtype=np.int64)
    padded_image[: image.shape[0], : image.shape[1]] = image
    padded_segments[: segments.shape[0], : segments.shape[1]] = segments
    return padded_image, padded_segments


def preset_category_ids(name: str) -> list[int]:
    """The label-file id of each class of a built-in vocabulary, in class order (for COCO the
    panoptic category ids)."""
    text = resources.files("promptseg.vocabularies") / "labels" / f"{name}_with_prompt_eng.txt"
    lines = text.read_text(encoding="utf-8").splitlines()
    return [int(i) for i, _, s in (line.partition(":") for line in lines) if s != UNUSED_LABEL]


def training_vocabulary(
    categories: Sequence[dict[str, Any]], preset: str | None
) -> tuple[Vocabulary, dict[int, int]]:
    """The vocabulary the label model is trained on and the class index of each category id:
    a preset whose label-file ids are the category ids (COCO: "coco_panoptic", all 133 classes
    even if the dataset has fewer), or (None) the categories' names in file order."""
    if preset is None:
        names = [c["name"] for c in categories]
        things = [bool(c.get("isthing", 1)) for c in categories]
        return Vocabulary(names, things), {c["id"]: k for k, c in enumerate(categories)}
    index = {cid: k for k, cid in enumerate(preset_category_ids(preset))}
    unknown = sorted(c["id"] for c in categories if c["id"] not in index)
    if unknown:
        raise ValueError(
            f"category ids {unknown} of the dataset are not class ids of the {preset!r} "
            "vocabulary; set `vocabulary: null` to train on the dataset's category names"
        )
    return Vocabulary.preset(preset), {c["id"]: index[c["id"]] for c in categories}


def training_sample(
    item: PanopticImage,
    class_index: dict[int, int],
    config: ODISETrainConfig,
    rng: np.random.Generator,
    phrases: Callable[[str], list[str]] | None,
) -> TrainingSample:
    """An augmented image with one target per non-crowd segment (and caption words if
    `phrases`, the caption model's noun-phrase extractor, is given)."""
    image, segments = large_scale_jitter(
        item.image, item.segments, config.crop_size, rng, config.scale_range
    )
    masks = segments[None] == item.segment_ids[:, None, None]
    labels = np.array([class_index[int(c)] for c in item.category_ids], dtype=np.int64)
    words = None
    if phrases is not None:
        words = caption_words(item.captions, rng, config.num_words, phrases)
    return TrainingSample(image, masks, labels, words)


def caption_words(
    captions: Sequence[str],
    rng: np.random.Generator,
    num_words: int,
    phrases: Callable[[str], list[str]],
) -> list[str]:
    """`num_words` words drawn with replacement from the noun phrases of one random caption (the
    empty word, which the grounding loss ignores, if there are none)."""
    caption = captions[int(rng.integers(len(captions)))] if captions else ""
    found = (phrases(caption) if caption else []) or [""]
    return [found[int(k)] for k in rng.integers(len(found), size=num_words)]


def merge_chunks(parts: Sequence[str | None]) -> list[str]:
    """The reference's phrases of a chunked caption: `parts` are chunk texts, None for a token
    outside any chunk. Consecutive chunks join into one phrase, emitted at the next token
    outside a chunk, so a chunk that ends the caption is dropped; a phrase already emitted is
    not repeated and then keeps growing with the next chunks."""
    phrases: list[str] = []
    current: list[str] = []
    for part in parts:
        if part is not None:
            current.append(part)
        elif current:
            phrase = " ".join(current)
            if phrase not in phrases:
                phrases.append(phrase)
                current = []
    return phrases


def nltk_noun_phrases() -> Callable[[str], list[str]]:
    """The caption model's noun-phrase extractor: NLTK tokens and POS tags, chunked by the two
    grammars, merged (merge_chunks), the union sorted. Fails now if NLTK or its data is
    missing."""
    try:
        import nltk
    except ImportError as exc:
        raise ImportError(f"the caption model's grounding loss needs NLTK: {NLTK_HELP}") from exc
    parsers = [nltk.RegexpParser(grammar) for grammar in NOUN_PHRASE_GRAMMARS]

    def noun_phrases(caption: str) -> list[str]:
        tagged = nltk.pos_tag(nltk.word_tokenize(caption))
        found: set[str] = set()
        for parser in parsers:
            parts = [
                " ".join(token for token, _ in part.leaves())
                if isinstance(part, nltk.Tree)
                else None
                for part in parser.parse(tagged)
            ]
            found.update(merge_chunks(parts))
        return sorted(found)

    try:
        noun_phrases("a dog on the grass")
    except LookupError as exc:
        raise LookupError(f"NLTK's tokeniser or tagger data is missing: {NLTK_HELP}") from exc
    return noun_phrases


# ----------------------------------------------------------------------------------------------
# forward and losses


@dataclass
class ClassText:
    """The training vocabulary's frozen CLIP text embeddings [S, E] (one per synonym, raw
    synonyms as the label model's reference) and the class of each synonym [S]."""

    embedding: Tensor
    synonym_class: Tensor
    n_classes: int


@torch.no_grad()
def class_text(model: Any, vocabulary: Vocabulary) -> ClassText:
    """CLIP text embeddings of every synonym of `vocabulary`, computed once (CLIP is frozen)."""
    synonyms = [s for c in vocabulary.classes for s in c]
    owner = [k for k, c in enumerate(vocabulary.classes) for _ in c]
    return ClassText(
        embedding=model.encode_texts(synonyms),
        synonym_class=torch.tensor(owner, device=model.device),
        n_classes=len(vocabulary),
    )


def label_logits(
    mask_embed: Tensor,
    logit_scale: Tensor,
    text: Tensor,
    synonym_class: Tensor,
    n_classes: int,
    null: Tensor,
) -> Tensor:
    """The label model's class logits [B, Q, K+1]: logit_scale x the best cosine
    over each class's synonyms of mask embeddings [B, Q, D] with projected texts [S, D], then
    the cosine with the projected null text [1, D] as the void class."""
    z = F.normalize(mask_embed.float(), dim=-1)
    per_synonym = logit_scale * z @ F.normalize(text.float(), dim=-1).T  # [B, Q, S]
    classes = max_over_synonyms(per_synonym.flatten(0, 1), synonym_class, n_classes)
    void = logit_scale * z @ F.normalize(null.float(), dim=-1).T  # [B, Q, 1]
    return torch.cat([classes.unflatten(0, z.shape[:2]), void], dim=-1)


def predictions(model: Any, pixels: Tensor, text: ClassText | None) -> list[dict[str, Any]]:
    """Every prediction of the head for pixels [B, 3, S, S] in [0, 1], initial queries first and
    the final one last: pred_masks [B, Q, S/4, S/4], mask_embed, logit_scale and pred_logits
    (label model: [B, Q, K+1] against `text`; caption model: the 2-way fg / no-object head)."""
    features = model.backbone(
        pixels,
        image_embedder=model.caption_embedding,
        text_embedding=model.empty_prompt_embedding,
    )
    out = model.head(features, aux=True)
    stages = [*out["aux"], {k: v for k, v in out.items() if k != "aux"}]
    if text is None:
        return stages
    head = model.text_head
    projected = head.text_proj(text.embedding.to(head.text_proj.weight.dtype))  # [S, D]
    null = head.text_proj(head.null_embed)  # [1, D]
    return [
        {
            **stage,
            "pred_logits": label_logits(
                stage["mask_embed"],
                stage["logit_scale"],
                projected,
                text.synonym_class,
                text.n_classes,
                null,
            ),
        }
        for stage in stages
    ]


class SetCriterion:
    """Mask2Former's set loss over a list of predictions (final one last) -> weighted losses
    `loss_ce`, `loss_mask`, `loss_dice` of the final prediction and `..._{i}` of earlier one i.

    Each prediction is matched anew per image (HungarianMatcher on class, BCE and dice costs);
    class CE over all queries of the batch (no-object weight 0.1); point BCE and dice of the
    matched masks on importance-sampled points, summed and divided by `num_masks`.
    """

    def __init__(
        self,
        num_points: int = 12544,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        self.matcher = HungarianMatcher(class_weight, mask_weight, dice_weight, num_points)
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.no_object_weight = no_object_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio

    def match(
        self, stage: dict[str, Any], targets: list[dict[str, Tensor]], generator: Any
    ) -> list[Match]:
        """Per image: (query indices, target indices); none for an image without targets."""
        matches = []
        for b, t in enumerate(targets):
            if len(t["labels"]) == 0:
                matches.append((torch.zeros(0, dtype=torch.long),) * 2)
                continue
            matches.append(
                self.matcher(
                    stage["pred_logits"][b],
                    stage["pred_masks"][b],
                    t["labels"],
                    t["masks"],
                    generator,
                )
            )
        return matches

    def class_loss(
        self, logits: Tensor, targets: list[dict[str, Tensor]], matches: list[Match]
    ) -> Tensor:
        """Weighted CE of logits [B, Q, C+1] (last = no-object) over the batch's queries."""
        n_classes = logits.shape[-1] - 1
        target = torch.full(logits.shape[:2], n_classes, dtype=torch.long, device=logits.device)
        for b, (t, (rows, cols)) in enumerate(zip(targets, matches, strict=True)):
            target[b, rows.to(logits.device)] = t["labels"][cols.to(t["labels"].device)].to(
                logits.device
            )
        weight = torch.ones(n_classes + 1, device=logits.device)
        weight[-1] = self.no_object_weight
        return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), weight)

    def mask_losses(
        self,
        masks: Tensor,
        targets: list[dict[str, Tensor]],
        matches: list[Match],
        num_masks: float,
        generator: Any,
    ) -> tuple[Tensor, Tensor]:
        """Point BCE and dice of the matched mask logits (from [B, Q, h, w]) / num_masks."""
        src = torch.cat([masks[b][rows.to(masks.device)] for b, (rows, _) in enumerate(matches)])
        if len(src) == 0:
            zero = masks.sum() * 0.0
            return zero, zero
        pairs = zip(targets, matches, strict=True)
        tgt = torch.cat([t["masks"][cols.to(t["masks"].device)] for t, (_, cols) in pairs])
        src = src[:, None].float()  # [N, 1, h, w]
        with torch.no_grad():
            coords = uncertain_point_coords(
                src, self.num_points, self.oversample_ratio, self.importance_sample_ratio, generator
            )
            point_labels = point_sample(tgt[:, None].to(coords), coords)[:, 0]  # [N, P]
        point_logits = point_sample(src, coords)[:, 0]
        return (
            sigmoid_ce_loss(point_logits, point_labels, num_masks),
            dice_loss(point_logits, point_labels, num_masks),
        )

    def __call__(
        self,
        stages: list[dict[str, Any]],
        targets: list[dict[str, Tensor]],
        num_masks: float,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        losses = {}
        named = [(stages[-1], ""), *((s, f"_{i}") for i, s in enumerate(stages[:-1]))]
        for stage, suffix in named:  # final prediction first, as Mask2Former draws its points
            matches = self.match(stage, targets, generator)
            bce, dice = self.mask_losses(
                stage["pred_masks"], targets, matches, num_masks, generator
            )
            raw = {
                "loss_ce": self.class_loss(stage["pred_logits"], targets, matches),
                "loss_mask": bce,
                "loss_dice": dice,
            }
            losses.update({f"{k}{suffix}": v * self.weights[k] for k, v in raw.items()})
        return losses


def grounding_loss(
    mask_embed: Tensor, logit_scale: Tensor, word_embed: Tensor, word_valid: Tensor
) -> Tensor:
    """The caption model's image-caption contrastive loss over a batch: with
    s(q, w) = logit_scale x cos(mask embedding q [B, Q, D], word w [B, K, D]), the score of
    image i and caption t is the mean over t's words of sum_q softmax_q(s) s; symmetric
    InfoNCE, 0.5 (text->image + image->text), captions without a valid word [B, K] ignored."""
    m = F.normalize(mask_embed.float(), dim=-1)
    w = F.normalize(word_embed.float(), dim=-1)
    sim = logit_scale * torch.einsum("iqd,tkd->iqtk", m, w)  # [B images, Q, B captions, K]
    scores = (sim.softmax(dim=1) * sim).sum(dim=1).mean(dim=-1)  # [B images, B captions]
    labels = torch.arange(len(scores), device=scores.device)
    valid = word_valid.any(dim=-1).to(scores.device)
    text_to_image = (F.cross_entropy(scores.T, labels, reduction="none") * valid).mean()
    image_to_text = F.cross_entropy(scores, labels, weight=valid.float())
    if not torch.isfinite(image_to_text):  # no valid caption: the reference drops the weights
        image_to_text = F.cross_entropy(scores, labels)
    return 0.5 * (text_to_image + image_to_text)


def batch_loss(
    model: Any,
    samples: Sequence[TrainingSample],
    text: ClassText | None,
    criterion: SetCriterion,
    num_masks: float,
    generator: torch.Generator | None = None,
    amp: bool | torch.dtype | None = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss of one micro-batch and its terms: set losses (label model: against `text`),
    and for the caption model the grounding loss `loss_grounding[_i]` on the samples' words."""
    device = model.device
    images = torch.from_numpy(np.stack([s.image for s in samples])).to(device)
    pixels = images.permute(0, 3, 1, 2).float() / 255.0  # [B, 3, S, S] in [0, 1]
    targets = [  # the caption model's targets are all one class, foreground
        {
            "labels": torch.from_numpy(s.labels if model.label else np.zeros_like(s.labels)).to(
                device
            ),
            "masks": torch.from_numpy(s.masks).to(device),
        }
        for s in samples
    ]
    dtype = torch.float16 if amp is True else amp or None  # true: fp16, the older spelling
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        stages = predictions(model, pixels.to(model.dtype), text)
        words = None
        if not model.label:
            flat = [PHOTO_TEMPLATE.format(w) for s in samples for w in s.words]
            with torch.no_grad():
                clip_words = model.encode_texts(flat)
            words = model.text_head.text_proj(clip_words.to(model.text_head.text_proj.weight.dtype))
    losses = criterion(stages, targets, num_masks, generator)
    if words is not None:
        words = words.unflatten(0, (len(samples), -1))  # [B, K, D]
        valid = torch.tensor([[len(w) > 0 for w in s.words] for s in samples], device=device)
        named = [(stages[-1], ""), *((s, f"_{i}") for i, s in enumerate(stages[:-1]))]
        for stage, suffix in named:
            losses[f"loss_grounding{suffix}"] = grounding_loss(
                stage["mask_embed"], stage["logit_scale"], words, valid
            )
    return sum(losses.values()), losses


# ----------------------------------------------------------------------------------------------
# optimisation

NORM_LAYERS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def odise_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters grouped as the reference's optimiser (detectron2's defaults with
    weight_decay_norm = weight_decay_bias = 0): no decay for normalisation layers' parameters
    and for parameters named `bias`; decay for the rest, embeddings, positional tables, gates,
    null_embed, the logit scale and attention's packed `in_proj_bias` included."""
    groups = {
        True: {"params": [], "names": [], "weight_decay": weight_decay},
        False: {"params": [], "names": [], "weight_decay": 0.0},
    }
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        norm = isinstance(module, NORM_LAYERS)
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            decay = not norm and name != "bias"
            groups[decay]["params"].append(p)
            groups[decay]["names"].append(f"{prefix}.{name}" if prefix else name)
    return [g for g in groups.values() if g["params"]]


def step_lr_factor(
    step: int, total: int, warmup: float, warmup_factor: float, drops: Sequence[float]
) -> float:
    """The reference's learning-rate factor at optimiser step `step` (0-based) of `total`,
    evaluated at the fraction step / total: LR_DROP ** (number of `drops` reached), and during
    the first `warmup` fraction linear from warmup_factor x its start value to its value at
    the warmup's end (detectron2 WarmupParamScheduler over fvcore MultiStepParamScheduler)."""

    def multistep(where: float) -> float:
        return LR_DROP ** sum(where + WHERE_EPSILON >= d for d in drops)

    where = step / total
    if where + WHERE_EPSILON <= warmup:
        start, end = warmup_factor * multistep(0.0), multistep(warmup)
        t = where / warmup
        return end * t + start * (1 - t)
    return multistep(where)


def frozen_modules(model: Any) -> dict[str, nn.Module]:
    """The parts ODISE never trains: Stable Diffusion's UNet and VAE, and CLIP."""
    return {"unet": model.backbone.unet, "vae": model.backbone.vae, "clip": model.clip}


def training_model(config: ODISETrainConfig) -> Any:
    """The configured ODISE in training mode with its frozen parts frozen (and, built from
    scratch, `null_embed` set to CLIP's embedding of "" as the reference initialises it)."""
    model = configured_model(config)
    if getattr(model.card, "family", None) != "odise":
        raise ValueError(
            f"`promptseg train odise` trains ODISE models; {config.model!r} is a "
            f"{model.card.family} model (try odise_sd13_m2f or odise_test_tiny)"
        )
    model.train()
    for module in frozen_modules(model).values():
        module.requires_grad_(False).eval()
    if model.label and not config.pretrained and config.checkpoint is None:
        with torch.no_grad():
            model.text_head.null_embed.copy_(model.encode_texts([""]))
    return model


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The parameters the trainer updates, by name (the frozen parts are left out)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """Copy saved trainable parameters back into `model` (all must be there, same shapes)."""
    own = trainable_state(model)
    missing = sorted(set(own) - set(state))
    wrong = sorted(k for k in own if k in state and state[k].shape != own[k].shape)
    if missing or wrong:
        raise ValueError(
            f"{path} was written for another model: missing {missing[:5]}, other shapes "
            f"{wrong[:5]}; delete it or set resume: false to start again"
        )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in own:
                p.copy_(state[name])


# ----------------------------------------------------------------------------------------------
# the loop


def micro_batch_loss(
    model: Any,
    config: ODISETrainConfig,
    step: int,
    samples: dict[int, TrainingSample],
    text: ClassText | None,
    criterion: SetCriterion,
    num_masks: float,
    m: int,
) -> torch.Tensor:
    """The total loss of micro-batch `m` of step `step` (random points keyed by its first image)."""
    first = m * config.micro_batch
    loss, _ = batch_loss(
        model,
        [samples[j] for j in range(first, first + config.micro_batch)],
        text,
        criterion,
        num_masks,
        sample_generator(config.seed, step, first),
        config.amp_dtype,
    )
    return loss


def train_odise(config: ODISETrainConfig, *, progress: bool = True) -> list[float]:
    """Run the optimiser steps (resuming if asked); returns the loss of every step run."""

    config.check()
    ctx = start_distributed(config, divisor=config.micro_batch)
    torch.manual_seed(config.seed)
    data = CocoPanoptic(config.annotations, config.panoptic_masks, config.images, config.captions)
    vocabulary, class_index = training_vocabulary(data.categories, config.vocabulary)
    model = training_model(config)
    autocast(config, model.device)  # amp needs CUDA: say so before training
    if not model.label and config.captions is None:
        raise ValueError(
            "the caption model trains with a grounding loss on captions: set `captions` to a "
            "COCO captions json of the same images (captions_train2017.json)"
        )
    text = class_text(model, vocabulary) if model.label else None
    phrases = None if model.label else nltk_noun_phrases()
    optimiser = torch.optim.AdamW(
        odise_parameter_groups(model, config.weight_decay),
        lr=config.lr,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    params = [p for g in optimiser.param_groups for p in g["params"]]
    accumulator = GradientAccumulator(params, ctx)
    factor = partial(
        step_lr_factor,
        total=config.steps,
        warmup=config.warmup,
        warmup_factor=config.warmup_factor,
        drops=config.lr_drops,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
    scaler = torch.amp.GradScaler(model.device.type, enabled=config.amp_dtype == torch.float16)
    criterion = SetCriterion(config.num_points)
    rng = np.random.default_rng(config.seed)
    sampler = EpochSampler(len(data), rng)
    start, state = resume_point(
        config, ctx, rng=rng, optimiser=optimiser, schedule=schedule, scaler=scaler, sampler=sampler
    )
    if state:
        load_trainable_state(model, state["trainable"], Path(config.out) / STATE_FILE)
    micro_batches = config.batch_size // config.micro_batch

    def step_loss(step: int, positions: range) -> partial:
        images = [sampler() for _ in range(config.batch_size)]  # the step's, alike on every rank
        samples = {  # those of this rank's micro-batches
            j: training_sample(
                data[images[j]], class_index, config, sample_rng(config.seed, step, j), phrases
            )
            for m in positions
            for j in range(m * config.micro_batch, (m + 1) * config.micro_batch)
        }
        own_masks = sum(len(s.labels) for s in samples.values())
        num_masks = max(ctx.sum(own_masks) / micro_batches, 1.0)  # the global batch's
        return partial(micro_batch_loss, model, config, step, samples, text, criterion, num_masks)

    return run_steps(
        ctx,
        config,
        model,
        start=start,
        units=micro_batches,
        step_loss=step_loss,
        accumulator=accumulator,
        optimiser=optimiser,
        schedule=schedule,
        scaler=scaler,
        desc="train odise",
        progress=progress,
        rng=rng,
        sampler=sampler,
        trainable=trainable_state(model),  # views of the live parameters
    )


@register_trainer("odise")
def train_from_file(path: str | os.PathLike, **overrides: Any) -> str:
    """`promptseg train odise --config FILE`: train, return the summary line."""
    return run_from_file(ODISETrainConfig, train_odise, path, overrides)
