"""SINE (Liu et al., 2024): in-context segmentation at three levels from one forward pass.

    backbone = DINOv2        (backbones/dinov2.py; frozen, last block before its final norm)
    head     = MFormerHead   (heads/mformer.py; neck, mask pooling, in-context fusion, M-Former)

References (k shots, each a mask with a class and optionally an object id) are pooled into ID
tokens (one per object) and semantic tokens (one per class). The target is decoded into
`identity` masks (the same objects), `instance` masks (top-k, scored and classed) and `semantic`
masks (one per class, semantic map > 0.7). Pre-processing follows the official protocol of each
level (sine.md §1.3): semantic and identity use the FSS one (squash to `input_size`, RGB, pad to
`canvas`), instance the FSOD one (longer side to 896 keeping the aspect, BGR, pad to 896; zoo.yaml
`data_config.instance`), video the VOS one (`segment_video`).

Caching (sine.md §9): a reference is used only through mask pooling, so the pooled (sum, pixel
count) of every (reference image, token mask, protocol) is kept in an LRU; tokens of any shot
combination are exact sums of those. Whole target features are kept per image for the last few.
"""

from __future__ import annotations

import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F

from ..backbones.dinov2 import DINOv2
from ..heads.mformer import (
    MFormerHead,
    PooledTokens,
    id_scores,
    instance_topk,
    semantic_map,
    tokens_from_sums,
)
from ..imageio import ImageInput, MaskInput, content_hash, load_image, load_label_map, load_mask
from ..prompts import Prompt, SupportSet, VisualPrompt
from ..registry import register_model
from ..result import SegmentationResult
from ..transforms import preprocess as to_pixels
from ..transforms import resize_mask, shortest_edge_size
from .base import ImageEmbedding, PromptSegModel

__all__ = ["SINE", "SINEPrompt", "MemoryBank", "decayed_score", "merge_objects"]

LEVELS = ("semantic", "instance", "identity")
PROTOCOL = {"semantic": "fss", "identity": "fss", "instance": "fsod"}  # level -> pre-processing
PROMPT_FORMAT = "promptseg.sine_prompt"
FSS_THRESHOLD = 0.7  # official semantic-map threshold, when the card has no default
_TOKEN_FIELDS = PooledTokens._fields  # id_tokens, sem_tokens, ids, classes


def protocols_for(level: str) -> tuple[str, ...]:
    """Pre-processing protocols an output level needs ("all": every protocol)."""
    levels = LEVELS if level == "all" else (level,)
    return tuple(dict.fromkeys(PROTOCOL[lvl] for lvl in levels))


@dataclass
class SINEPrompt:
    """Pooled reference tokens of one prompt per protocol, reusable for any number of targets.

    `tokens["fss"]` feeds the semantic and identity levels, `tokens["fsod"]` the instance level
    (no ID tokens: the official few-shot instance segmentation decodes without them). Tensors
    only, so `save` / `load` go through safetensors and never unpickle anything.
    """

    tokens: dict[str, PooledTokens]  # id_tokens [N, C], sem_tokens [M, C], ids [N], classes [M]

    def save(self, path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> None:
        """Write this prompt as safetensors (tensors + small string metadata)."""
        save_prompts([self], path, metadata)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SINEPrompt:
        """Read a prompt written by `save` (CPU tensors; segment() moves them to the model)."""
        prompts, _ = load_prompts(path)
        if len(prompts) != 1:
            raise ValueError(
                f"{path} holds {len(prompts)} prompts; read it with model.load_prompt_embedding()"
            )
        return prompts[0]


def save_prompts(
    prompts: Sequence[SINEPrompt], path: str | os.PathLike[str], metadata: dict[str, str] | None
) -> None:
    """Write prompts as `{index}.{protocol}.{field}` tensors plus format metadata."""
    tensors = {
        f"{i}.{proto}.{name}": value.detach().cpu().clone()  # no shared storage
        for i, p in enumerate(prompts)
        for proto, tokens in p.tokens.items()
        for name, value in zip(_TOKEN_FIELDS, tokens, strict=True)
    }
    meta = {"format": PROMPT_FORMAT, "version": "1", "prompts": str(len(prompts))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, path, metadata={**(metadata or {}), **meta})


def load_prompts(path: str | os.PathLike[str]) -> tuple[list[SINEPrompt], dict[str, str]]:
    """Read prompts written by `save_prompts` -> (prompts, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no SINE prompt file at {path}")
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for foreign files
        raise ValueError(
            f"{path} is not a safetensors file ({exc}); save prompts with "
            "SINEPrompt.save or model.save_prompt_embedding"
        ) from exc
    if meta.get("format") != PROMPT_FORMAT:
        raise ValueError(
            f"{path} is not a SINE prompt file (metadata format {meta.get('format')!r}, expected "
            f"{PROMPT_FORMAT!r}); write one with SINEPrompt.save or model.save_prompt_embedding"
        )
    prompts = []
    for i in range(int(meta["prompts"])):
        protos = sorted({k.split(".")[1] for k in tensors if k.split(".")[0] == str(i)})
        prompts.append(
            SINEPrompt(
                {
                    proto: PooledTokens(*(tensors[f"{i}.{proto}.{n}"] for n in _TOKEN_FIELDS))
                    for proto in protos
                }
            )
        )
    return prompts, meta


class LRUCache:
    """Least-recently-used mapping holding at most `capacity` entries (evicts one at a time)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[Hashable, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: Hashable) -> Any:
        """The value of `key` (now most recently used), or None."""
        if key not in self._data:
            return None
        self._data.move_to_end(key)
        return self._data[key]

    def put(self, key: Hashable, value: Any) -> None:
        """Store `value`; the least recently used entry goes when over capacity."""
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def clear(self) -> None:
        """Forget every entry."""
        self._data.clear()


def decayed_score(score: float, age: int, ratio: int = 20) -> float:
    """Linear decay of a memory frame's score with its age in frames (0 from `ratio` on)."""
    return score * max(0.0, 1.0 - age / ratio) if age < ratio else 0.0


def merge_objects(masks: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """bool [K, H, W] masks of objects `ids` [K] -> int64 label map [H, W] (0 = background).

    Overlapping pixels go to the LARGEST object id, not the highest score (official VOS merge).
    """
    if len(ids) == 0:
        return torch.zeros(masks.shape[-2:], dtype=torch.int64, device=masks.device)
    return (masks.long() * ids.view(-1, 1, 1).to(masks.device)).amax(dim=0)


def to_canvas(logits: torch.Tensor, canvas: int) -> torch.Tensor:
    """Mask logits [K, h, w] -> bilinear (align_corners=False) to [K, canvas, canvas], float32."""
    return F.interpolate(
        logits[None].float(), size=(canvas, canvas), mode="bilinear", align_corners=False
    )[0]


def crop_resize(x: torch.Tensor, valid: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """detectron2 sem_seg_postprocess: [K, canvas, canvas] -> crop the image region `valid`
    (h', w') -> bilinear to `size` -> [K, *size]."""
    x = x[..., : valid[0], : valid[1]]
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return x


@dataclass
class MemoryEntry:
    """One memory frame of one object: its neck features, canvas mask, score and frame index."""

    feats: torch.Tensor  # [C, g, g]
    mask: torch.Tensor  # float [canvas, canvas]
    score: float
    frame: int


@dataclass
class MemoryBank:
    """Per-object VOS memory: the first-frame GT always kept, plus the best `capacity - 1` frames
    by (decayed score, score, frame index); the lowest is evicted (sine.md §4.3)."""

    capacity: int
    fixed: MemoryEntry
    entries: list[MemoryEntry] = field(default_factory=list)

    def push(self, entry: MemoryEntry, now: int) -> None:
        self.entries.append(entry)
        self.entries.sort(
            key=lambda e: (decayed_score(e.score, now - e.frame), e.score, e.frame), reverse=True
        )
        del self.entries[max(self.capacity - 1, 0) :]

    def frames(self) -> list[MemoryEntry]:
        return [self.fixed, *self.entries]


@register_model("sine")
class SINE(PromptSegModel):
    """k-shot references -> identity / instance / semantic masks of a target image.

    Classes are the distinct `class_id`s of the shots, so every class has at least one shot by
    construction (an empty SupportSet is rejected). Identity masks: one per object id, however
    many; the decoder's S instance queries do not bound them (ID queries are extra rows). Instance
    masks: at most `instance_topk` (100) (query, class) pairs of the S x M, those with score > 0 —
    an empty mask scores 0, so no instance mask is empty (the official [0, 0, 1, 1] box for empty
    masks never arises). Reference masks of any size are resized nearest to their image.
    """

    levels = ("semantic", "instance", "identity", "all")
    reference_cache_size = 4096  # pooled (sum, count) entries, ~1 KB each at C = 256
    target_cache_size = 2  # whole target features (~72 MB each for ViT-L at 896)

    def __init__(self, card: Any) -> None:
        super().__init__(card)
        cfg = card.config
        vit = cfg["backbone"]
        self.backbone = DINOv2(
            vit.get("arch"),
            embed_dim=vit.get("embed_dim"),
            depth=vit.get("depth"),
            num_heads=vit.get("num_heads"),
            data_config=card.data_config,
        )
        self.head = MFormerHead(in_channels=self.backbone.out_channels, **cfg["head"])
        fss = {k: v for k, v in card.data_config.items() if k not in ("instance", "video")}
        self.protocols = {"fss": fss, "fsod": {**fss, **card.data_config["instance"]}}
        self.canvas = int(fss["canvas"])
        self.image_size = tuple(fss["input_size"])
        self.instance_topk = int(cfg.get("instance_topk", 100))
        self.video = dict(card.data_config["video"])  # short_side, canvas, memory
        self._pooled = LRUCache(self.reference_cache_size)  # (proto, image, mask) -> (sum, count)
        self._targets = LRUCache(self.target_cache_size)  # (image, proto) -> encode_image dict

    def clear_caches(self) -> None:
        """Forget pooled references and target features (they are only valid for the weights)."""
        self._pooled.clear()
        self._targets.clear()

    def train(self, mode: bool = True) -> SINE:
        """Switch mode; caches are dropped, since training changes the weights they came from."""
        self.clear_caches()
        return super().train(mode)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """nn.Module.load_state_dict, dropping caches computed with the old weights."""
        self.clear_caches()
        return super().load_state_dict(*args, **kwargs)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> SINE:
        """Every .to() / .cuda() / .half() passes here: cached features keep the old device and
        dtype, so they are dropped."""
        self.clear_caches()
        return super()._apply(fn, *args, **kwargs)

    # -- images --------------------------------------------------------------------------------
    def preprocess(self, image: torch.Tensor, protocol: str = "fss") -> torch.Tensor:
        """uint8 [3, H, W] -> a protocol's normalised, zero-padded canvas [1, 3, canvas, canvas]."""
        cfg = self.protocols[protocol]
        x = to_pixels(image, cfg, self.dtype).to(self.device)  # [1, 3, h', w']
        h, w = x.shape[-2:]
        return F.pad(x, (0, cfg["canvas"] - w, 0, cfg["canvas"] - h))

    def valid_size(self, image_size: Sequence[int], protocol: str = "fss") -> tuple[int, int]:
        """(h', w') the image occupies on the protocol's canvas (top-left; the rest is padding)."""
        cfg = self.protocols[protocol]
        if cfg.get("resize", "squash") == "shortest_edge":
            return shortest_edge_size(*image_size, int(cfg["short"]), int(cfg["max_size"]))
        return tuple(cfg["input_size"])

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Neck features [B, C, g, g] of canvas pixels (frozen encoder + trainable neck)."""
        return self.head.neck(self.backbone.forward_features(pixels)["tokens"])

    def encode_image(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Target-only parts (cached per image): neck features, mask features, fusion SA."""
        feats = self.features(pixels)
        return {
            "feats": feats,
            "mfeat": self.head.mask_features(feats),
            "image_sa": self.head.image_self_attention(feats),
        }

    def embed_image(self, image: ImageInput, level: str | None = None) -> ImageEmbedding:
        """Target features for each protocol `level` needs, as {protocol: encode_image dict}."""
        img = load_image(image)
        key = content_hash(img)
        start = time.perf_counter()
        with torch.inference_mode():
            features = {
                p: self._target_features(img, key, p)
                for p in protocols_for(self.check_level(level))
            }
        return ImageEmbedding(features, img, key, time.perf_counter() - start, self.card.name)

    def _target_features(self, image: torch.Tensor, key: str, protocol: str) -> dict:
        """encode_image of one image under one protocol, from the target LRU when possible."""
        hit = self._targets.get((key, protocol))
        if hit is None:
            hit = self.encode_image(self.preprocess(image, protocol))
            self._targets.put((key, protocol), hit)
        return hit

    def _reference_features(self, image: torch.Tensor, key: str, protocol: str) -> torch.Tensor:
        """Neck features [C, g, g] of a reference (reusing a cached target's when it is one)."""
        hit = self._targets.get((key, protocol))
        if hit is not None:
            return hit["feats"][0]
        return self.features(self.preprocess(image, protocol))[0]

    def _canvas_mask(self, mask: torch.Tensor, protocol: str = "fss") -> torch.Tensor:
        """bool [H, W] (at its image's size) -> float [canvas, canvas]: nearest, zero padding."""
        m = resize_mask(mask, self.valid_size(tuple(mask.shape[-2:]), protocol)).float()
        canvas = self.protocols[protocol]["canvas"]
        return F.pad(m, (0, canvas - m.shape[1], 0, canvas - m.shape[0]))

    def run(
        self,
        embedding: ImageEmbedding,
        prompts: list[Prompt],
        prompt_embeddings: Any = None,
        **kw: Any,
    ) -> SegmentationResult:
        """Add the target features of the level's protocols that `embedding` lacks (a Predictor
        image set before the level was chosen), then decode as every family does."""
        key = embedding.key
        missing = [
            p
            for p in protocols_for(self.check_level(kw.get("level")))
            if p not in embedding.features
        ]
        with torch.inference_mode():
            for p in missing:
                embedding.features[p] = self._target_features(embedding.image, key, p)
        return super().run(embedding, prompts, prompt_embeddings, **kw)

    # -- prompts -------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_prompt(self, prompts: list[Prompt], level: str | None = None) -> list[SINEPrompt]:
        """One SINEPrompt per prompt with the tokens `level` needs (None: every level's).

        Inference only (cached pools must not hold autograd graphs); training pools with
        `head.pool_tokens` directly.
        """
        protocols = tuple(self.protocols) if level is None else protocols_for(level)
        return [self._encode_references(_shots(p), protocols) for p in prompts]

    def embed_prompt(self, prompts: list[Prompt], level: str | None = None) -> list[SINEPrompt]:
        """encode_prompt for one output level only (the other protocol's pooling is skipped)."""
        return self.encode_prompt(prompts, self.check_level(level))

    def as_prompt_embedding(self, obj: Any) -> list[SINEPrompt] | None:
        """A SINEPrompt or a list of them (encode_prompt / load_prompt_embedding) as a batch."""
        if isinstance(obj, SINEPrompt):
            obj = [obj]
        if isinstance(obj, (list, tuple)) and obj and all(isinstance(p, SINEPrompt) for p in obj):
            return [self._to_model(p) for p in obj]
        return None

    def _to_model(self, prompt: SINEPrompt) -> SINEPrompt:
        """The prompt with its tensors on this model's device (tokens in its dtype)."""
        for t in prompt.tokens.values():
            if t.sem_tokens.shape[-1] != self.head.dim:
                raise ValueError(
                    f"the prompt embedding has {t.sem_tokens.shape[-1]}-d tokens but "
                    f"{self.card.name} uses {self.head.dim}-d ones; encode the references with "
                    "this model (model.encode_prompt)"
                )
        return SINEPrompt(
            {
                proto: PooledTokens(
                    t.id_tokens.to(self.device, self.dtype),
                    t.sem_tokens.to(self.device, self.dtype),
                    t.ids.to(self.device),
                    t.classes.to(self.device),
                )
                for proto, t in prompt.tokens.items()
            }
        )

    def save_prompt_embedding(self, embeddings: Any, path: str | os.PathLike[str]) -> None:
        """Write encode_prompt's SINEPrompts to a safetensors file (tensors + metadata only)."""
        prompts = self.as_prompt_embedding(embeddings)
        if prompts is None:
            raise TypeError(
                f"expected what encode_prompt returned (a SINEPrompt or a list of them), "
                f"got {type(embeddings).__name__}"
            )
        save_prompts(prompts, path, {"model": self.card.name, "dim": str(self.head.dim)})

    def load_prompt_embedding(self, path: str | os.PathLike[str]) -> list[SINEPrompt]:
        """Read SINEPrompts saved by save_prompt_embedding / SINEPrompt.save, on this device."""
        prompts, meta = load_prompts(path)
        if meta.get("model", self.card.name) != self.card.name:
            warnings.warn(
                f"{path} was encoded by {meta['model']}, not {self.card.name}: its tokens only "
                "fit the weights that made them; encode the references again with this model",
                stacklevel=2,
            )
        return [self._to_model(p) for p in prompts]

    def _encode_references(
        self, shots: tuple[VisualPrompt, ...], protocols: tuple[str, ...]
    ) -> SINEPrompt:
        """Group shots by image content, give unnamed objects fresh ids, pool per protocol."""
        groups: dict[str, dict[str, Any]] = {}
        next_id = max([s.object_id for s in shots if s.object_id is not None], default=-1) + 1
        for shot in shots:
            image = load_image(shot.image)
            mask = load_mask(shot.mask, size=tuple(image.shape[-2:]))  # nearest to its image
            if not mask.any():
                raise ValueError(
                    "a reference mask has no foreground pixel; SINE needs each reference object "
                    "marked in its mask"
                )
            object_id = shot.object_id
            if object_id is None:
                object_id, next_id = next_id, next_id + 1
            g = groups.setdefault(
                content_hash(image), {"image": image, "masks": [], "ids": [], "classes": []}
            )
            g["masks"].append(mask)
            g["ids"].append(object_id)
            g["classes"].append(int(shot.class_id))
        ids = torch.tensor(sorted({i for g in groups.values() for i in g["ids"]}))
        classes = torch.tensor(sorted({c for g in groups.values() for c in g["classes"]}))
        return SINEPrompt({p: self._pool(groups, ids, classes, p) for p in protocols})

    def _pool(
        self, groups: dict[str, dict[str, Any]], ids: torch.Tensor, classes: torch.Tensor, protocol
    ) -> PooledTokens:
        """Tokens [ID (fss only); semantic]: per token, the union of its masks in each image,
        pooled (cached per (image, union mask)), summed over images / total pixel count."""
        rows = [("ids", int(i)) for i in ids] if protocol == "fss" else []
        rows += [("classes", int(c)) for c in classes]
        row_of = {row: r for r, row in enumerate(rows)}
        sums = torch.zeros(len(rows), self.head.dim, device=self.device)  # [N + M, C], fp32
        counts = torch.zeros(len(rows), device=self.device)  # [N + M]
        for key, g in groups.items():
            masks = torch.stack(g["masks"])  # bool [K, H, W]
            found: dict[int, tuple[Hashable, torch.Tensor]] = {}  # row -> (cache key, canvas)
            for kind in ("ids", "classes"):
                labels = torch.tensor(g[kind])  # [K]
                for value in dict.fromkeys(g[kind]):  # the tokens this image has masks for
                    if (kind, value) in row_of:
                        canvas = self._canvas_mask(masks[labels == value].any(0), protocol)
                        found[row_of[kind, value]] = ((protocol, key, content_hash(canvas)), canvas)
            pooled = {r: self._pooled.get(k) for r, (k, _) in found.items()}
            missing = [r for r, v in pooled.items() if v is None]
            if missing:
                feats = self._reference_features(g["image"], key, protocol)  # [C, g, g]
                stacked = torch.stack([found[r][1] for r in missing]).to(self.device)
                (s,), (n,) = self.head.pool_sums(feats[None], [stacked])  # [K', C], [K']
                for r, s_r, n_r in zip(missing, s, n, strict=True):
                    pooled[r] = (s_r, n_r)
                    self._pooled.put(found[r][0], pooled[r])
            for r, (s_r, n_r) in pooled.items():
                sums[r] += s_r.float()
                counts[r] += n_r.float()
        tokens = tokens_from_sums(sums, counts).to(self.dtype)
        n = len(ids) if protocol == "fss" else 0
        return PooledTokens(
            tokens[:n], tokens[n:], ids.to(self.device)[:n], classes.to(self.device)
        )

    # -- video ---------------------------------------------------------------------------------
    def _video_geometry(self, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(frame size with the short side at `short_side`, its size on the canvas)."""
        short, canvas = self.video["short_side"], self.video["canvas"]
        if h <= w:
            small = (short, int(short * w / h))
        else:
            small = (int(short * h / w), short)
        if small[0] >= small[1]:
            big = (canvas, int(canvas / (small[0] / small[1])))
        else:
            big = (int(canvas / (small[1] / small[0])), canvas)
        return small, big

    def _video_pixels(self, image: torch.Tensor) -> torch.Tensor:
        """Frame -> short side resized, long side to the canvas, normalised, zero-padded."""
        small, big = self._video_geometry(*image.shape[-2:])
        x = image[None].float().to(self.device) / 255.0
        x = F.interpolate(x, size=small, mode="bilinear", align_corners=False, antialias=False)
        x = F.interpolate(x, size=big, mode="bilinear", align_corners=False)
        cfg = self.card.data_config
        mean = torch.tensor(cfg["mean"], device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(cfg["std"], device=x.device).view(1, 3, 1, 1)
        x = ((x - mean) / std).to(self.dtype)
        canvas = self.video["canvas"]
        return F.pad(x, (0, canvas - big[1], 0, canvas - big[0]))

    def _video_mask(self, mask: torch.Tensor, small, big) -> torch.Tensor:
        """bool mask (any size) -> float [canvas, canvas], nearest at each resize step."""
        m = resize_mask(resize_mask(mask, small), big).float()
        canvas = self.video["canvas"]
        return F.pad(m, (0, canvas - big[1], 0, canvas - big[0])).to(self.device)

    def _vos_autocast(self) -> torch.autocast:
        """fp16 autocast on CUDA, as the official VOS evaluation (`torch.cuda.amp.autocast`).

        On other devices it is disabled: CPU fp16 autocast is not what the official numbers ran
        with, so CPU runs stay fp32 (or the model's dtype) and differ from CUDA by fp16 noise.
        """
        cuda = self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=cuda)

    @torch.inference_mode()
    def segment_video(
        self,
        frames: Sequence[ImageInput],
        first_mask: MaskInput,
        *,
        memory: int | None = None,
        masks: Mapping[int, MaskInput] | None = None,
    ) -> Iterator[torch.Tensor]:
        """Label maps int64 [H, W] per frame; objects are the labels of `first_mask` and `masks`.

        Official memory: first-frame GT fixed, `memory - 1` best predicted frames by decayed score;
        each frame's features are computed once and reused when it becomes a memory frame.
        Overlapping objects go to the largest id (`merge_objects`). fp16 autocast on CUDA only.

        `masks` maps later frame indices (positions in `frames`, 1..len - 1) to label maps, as
        YouTube-VOS `use_all_mask` (sine.md §4.3): an object whose label first appears there joins
        at that frame, its memory's fixed entry being that frame's GT, and is decoded with the
        others from then on (its prediction there enters its memory, as at frame 0). Labels of
        objects already known are ignored: their memories are kept, not reset. The spec does not
        say what the official output is at such a frame; here it is the given GT for the objects
        joining there and the prediction for the others, merged by the same largest-id rule.
        Frame 0 is written with the prediction, as officially. To process only the annotated
        frames (YouTube-VOS: every 5th, unless `--all_frame`), pass only those frames.
        """
        capacity = int(memory or self.video["memory"])
        annotations = {0: first_mask, **_later_masks(masks, frames)}
        banks: dict[int, MemoryBank] = {}
        for t, frame in enumerate(frames):
            image = load_image(frame)
            size = tuple(image.shape[-2:])
            small, big = self._video_geometry(*size)
            joined: dict[int, torch.Tensor] = {}  # objects joining at this frame -> GT [H, W]
            with self._vos_autocast():
                feats = self.encode_image(self._video_pixels(image))
                if t in annotations:
                    labels = load_label_map(annotations[t], size=size)
                    objects = [int(k) for k in torch.unique(labels) if 0 < int(k) < 255]
                    if t == 0 and not objects:
                        raise ValueError("the first-frame mask has no object (labels 1..254)")
                    for k in objects:
                        if k in banks:
                            continue
                        joined[k] = labels == k
                        gt = MemoryEntry(
                            feats["feats"][0], self._video_mask(joined[k], small, big), 1.0, t
                        )
                        banks[k] = MemoryBank(capacity, gt)
                refs = [(k, e.feats, e.mask) for k in sorted(banks) for e in banks[k].frames()]
                ids, logits, scores = self.vos_decode(feats, refs, small, big)
                pred = logits > 0  # [K, *small]
                for k, mask, score in zip(ids.tolist(), pred, scores.tolist(), strict=True):
                    entry = MemoryEntry(
                        feats["feats"][0],
                        self._video_mask(mask, small, big),
                        score if mask.any() else 0.0,
                        t,
                    )
                    banks[k].push(entry, t)
            shown = {} if t == 0 else joined  # objects written with their GT at this frame
            keep = torch.tensor([k not in shown for k in ids.tolist()], dtype=torch.bool)
            keep = keep.to(ids.device)
            label_map = resize_mask(merge_objects(pred[keep], ids[keep]).cpu(), size)
            for k, gt in shown.items():
                label_map = torch.maximum(label_map, gt.long() * k)
            yield label_map

    def vos_decode(
        self,
        target: dict[str, torch.Tensor],
        refs: Sequence[tuple[int, torch.Tensor, torch.Tensor]],
        small: tuple[int, int],
        big: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One VOS step: target encode_image dict, refs (object id, feats [C, g, g], canvas mask)
        -> object ids [K], ID mask logits [K, *small], scores [K] (semantic tokens = ID tokens)."""
        tokens = self.head.pool_tokens(
            torch.stack([f for _, f, _ in refs]),
            [m[None] for _, _, m in refs],
            ids=[torch.tensor([k]) for k, _, _ in refs],
            classes=[torch.tensor([k]) for k, _, _ in refs],
        )
        out = self.head(
            target["feats"],
            target["mfeat"],
            tokens.id_tokens,
            tokens.sem_tokens,
            image_sa=target["image_sa"],
            aux=False,
        )
        logits = crop_resize(to_canvas(out["pred_id_masks"], self.video["canvas"]), big, small)
        return tokens.ids, logits, id_scores(out["pred_id_logits"], logits)

    # -- decode and postprocess ----------------------------------------------------------------
    def decode(
        self,
        features: dict[str, dict[str, torch.Tensor]],
        prompt_embeddings: list[SINEPrompt],
        level: str | None = None,
    ) -> list[tuple[SINEPrompt, dict[str, dict]]]:
        """Head outputs (final stage) per prompt and per protocol the level needs.

        The instance level decodes without ID tokens, as the official few-shot instance
        segmentation does (`use_id_query: False`); tokens interact, so this changes the result.
        """
        protocols = protocols_for(self.check_level(level))
        raw = []
        for p in prompt_embeddings:
            outs = {}
            for proto in protocols:
                tokens, f = _tokens(p, proto), features[proto]
                outs[proto] = self.head(
                    f["feats"],
                    f["mfeat"],
                    None if proto == "fsod" else tokens.id_tokens,
                    tokens.sem_tokens,
                    image_sa=f["image_sa"],
                    aux=False,
                )
            raw.append((p, outs))
        return raw

    def postprocess(
        self,
        raw: list[tuple[SINEPrompt, dict[str, dict]]],
        embedding: ImageEmbedding,
        prompts: list[Prompt],
        *,
        level: str = "semantic",
        threshold: float | None = None,
        output_size: Any = "original",
        return_logits: bool = False,
    ) -> SegmentationResult:
        """Masks per requested level (or all three), at the output size."""
        size = embedding.image_size if output_size == "original" else tuple(output_size)
        if threshold is None:
            threshold = self.card.default_threshold
        thr = FSS_THRESHOLD if threshold is None else float(threshold)
        parts = []
        for i, (prompt, outs) in enumerate(raw):
            for lvl in LEVELS if level == "all" else (level,):
                proto = PROTOCOL[lvl]
                frame = (
                    int(self.protocols[proto]["canvas"]),
                    self.valid_size(embedding.image_size, proto),
                    size,
                )
                parts.append(self._level(lvl, prompt.tokens[proto], outs[proto], frame, thr, i))
        masks = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, *size, dtype=bool)
        return SegmentationResult(
            masks=masks.cpu(),
            scores=torch.cat([p[1] for p in parts]).float().cpu(),
            labels=[lab for p in parts for lab in p[2]],
            prompt_index=torch.cat([p[3] for p in parts]),
            level=[lvl for p in parts for lvl in p[4]],
            class_ids=torch.cat([p[5] for p in parts]).cpu(),
            image=embedding.image if size == embedding.image_size else None,
            meta={
                "model": self.card.name,
                "tag": self.card.tag,
                "threshold": thr,
                "input_size": (self.canvas, self.canvas),
                "output_size": size,
            },
        )

    def _level(
        self, level: str, tokens: PooledTokens, out: dict, frame: tuple, thr: float, index: int
    ) -> tuple:
        """(masks, scores, labels, prompt_index, levels, class_ids) of one level of one prompt.

        `frame` = (canvas, valid (h', w'), output size): logits go to the canvas, are cropped to
        the image region and resized to the output (sine.md §4).
        """
        canvas, valid, size = frame
        if level == "semantic":  # official order: logits to the canvas, then sigmoid and sum
            sem = semantic_map(
                out["pred_logits"], out["pred_masks"], resize=lambda m: to_canvas(m, canvas)
            )  # [M, canvas, canvas]
            sem = crop_resize(sem, valid, size)
            masks, classes = sem > thr, tokens.classes
            scores = sem.flatten(1).amax(dim=1)
            labels = [f"class {int(c)}" for c in classes]
        elif level == "instance":
            scores, cls, _, logits = instance_topk(
                out["pred_logits"],
                out["pred_masks"],
                self.instance_topk,
                resize=lambda m: crop_resize(to_canvas(m, canvas), valid, size),
            )
            keep = scores > 0.0  # an empty mask scores 0: never returned
            masks, scores, classes = logits[keep] > 0, scores[keep], tokens.classes[cls[keep]]
            labels = [f"class {int(c)}" for c in classes]
        else:
            logits = crop_resize(to_canvas(out["pred_id_masks"], canvas), valid, size)
            masks, classes = logits > 0, tokens.ids
            scores = id_scores(out["pred_id_logits"], logits)
            labels = [f"object {int(c)}" for c in classes]
        n = len(masks)
        return (
            masks,
            scores,
            labels,
            torch.full((n,), index, dtype=torch.int64),
            [level] * n,
            classes.long(),
        )


def _later_masks(
    masks: Mapping[int, MaskInput] | None, frames: Sequence[ImageInput]
) -> dict[int, MaskInput]:
    """`segment_video`'s `masks`, checked: keys must be frame indices 1..len(frames) - 1."""
    if not masks:
        return {}
    later, n_frames = dict(masks), len(frames)
    for t in later:
        if not 0 < t < n_frames:
            raise ValueError(
                f"masks has a label map for frame index {t}, but later masks must be keyed by "
                f"positions 1..{n_frames - 1} in the {n_frames} frames given (frame 0's objects "
                "come from first_mask)"
            )
    return later


def _tokens(prompt: SINEPrompt, protocol: str) -> PooledTokens:
    """A prompt's tokens for one protocol, or an error saying how to get them."""
    if protocol not in prompt.tokens:
        levels = [lvl for lvl, p in PROTOCOL.items() if p == protocol]
        raise ValueError(
            f"this SINE prompt embedding has no tokens for the {levels} level(s) (protocol "
            f"{protocol!r}; it has {sorted(prompt.tokens)}); encode the references with "
            "model.encode_prompt(prompts) (no level: every level) or with that level"
        )
    return prompt.tokens[protocol]


def _shots(p: Prompt) -> tuple[VisualPrompt, ...]:
    if isinstance(p, SupportSet):
        return p.shots
    if isinstance(p, VisualPrompt):
        return (p,)
    raise TypeError(f"SINE takes reference images with masks, not {type(p).__name__}")
