"""SINE video object segmentation: per-object memory banks and the frame loop (`segment_video`).

Official memory: each object keeps its first-frame ground truth plus the best `memory - 1`
predicted frames by decayed score; a frame's features are computed once and reused when it
becomes a memory frame. Frames are resized short side first, then long side to the canvas, and
zero-padded; overlaps between objects go to the largest id.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..heads.mformer import id_scores, unbatch
from ..imageio import ImageInput, MaskInput, load_image, load_label_map
from ..transforms import crop_resize, resize_logits, resize_mask
from .base import check_frames

__all__ = [
    "SINEVideo",
    "MemoryBank",
    "MemoryEntry",
    "decayed_score",
    "merge_objects",
]


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
    by (decayed score, score, frame index); the lowest is evicted."""

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


def _later_masks(
    masks: Mapping[int, MaskInput] | None, frames: Sequence[ImageInput]
) -> dict[int, MaskInput]:
    """`segment_video`'s `masks`, checked: keys must be frame indices 1..len(frames) - 1."""
    if not masks:
        return {}
    if not isinstance(masks, Mapping):
        raise TypeError(
            f"masks must map frame indices to label maps (a dict), got {type(masks).__name__}"
        )
    later, n_frames = dict(masks), len(frames)
    for t in later:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 < t < n_frames:
            raise ValueError(
                f"masks has a label map for frame index {t}, but later masks must be keyed by "
                f"positions 1..{n_frames - 1} in the {n_frames} frames given (frame 0's objects "
                "come from first_mask)"
            )
    return later


class SINEVideo:
    """The video part of the SINE model (mixed into it): needs `encode_image`, `head`, `video`
    (the `video` data config: short_side, canvas, memory), `device` and `dtype`."""

    def _video_geometry(self, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(frame size with the short side at `short_side`, its size on the canvas); sides are
        kept >= 1, so a very wide or tall frame still has a pixel row or column."""
        short, canvas = self.video["short_side"], self.video["canvas"]
        if h <= w:
            small = (short, int(short * w / h))
        else:
            small = (int(short * h / w), short)
        if small[0] >= small[1]:
            big = (canvas, int(canvas / (small[0] / small[1])))
        else:
            big = (int(canvas / (small[1] / small[0])), canvas)
        return (max(1, small[0]), max(1, small[1])), (max(1, big[0]), max(1, big[1]))

    def _video_pixels(self, image: torch.Tensor) -> torch.Tensor:
        """Frame -> short side resized, long side to the canvas, normalised, zero-padded."""
        small, big = self._video_geometry(*image.shape[-2:])
        x = image[None].float().to(self.device) / 255.0
        x = F.interpolate(x, size=small, mode="bilinear", align_corners=False, antialias=False)
        x = F.interpolate(x, size=big, mode="bilinear", align_corners=False)
        cfg = self.video
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
        YouTube-VOS `use_all_mask`: an object whose label first appears there joins at that
        frame, its memory's fixed entry being that frame's GT, and is decoded with the others
        from then on (its prediction there enters its memory, as at frame 0). Labels of objects
        already known are ignored: their memories are kept, not reset. At such a frame the output
        is the given GT for the objects joining there and the prediction for the others, merged
        by the same largest-id rule.
        Frame 0 is written with the prediction, as officially. To process only the annotated
        frames (YouTube-VOS: every 5th, unless `--all_frame`), pass only those frames.
        The arguments are checked when called, before the first frame is decoded.
        """
        frames = check_frames(frames)
        if memory is None:
            memory = self.video["memory"]
        if isinstance(memory, bool) or not isinstance(memory, numbers.Integral) or memory < 1:
            raise ValueError(
                f"memory must be an int >= 1 (frames kept per object, the first-frame mask "
                f"included), got {memory!r}"
            )
        annotations = {0: first_mask, **_later_masks(masks, frames)}
        return self._video_frames(frames, annotations, int(memory))

    @torch.inference_mode()
    def _video_frames(
        self, frames: Sequence[ImageInput], annotations: dict[int, MaskInput], capacity: int
    ) -> Iterator[torch.Tensor]:
        """The frame loop of `segment_video` (a generator: one label map per frame)."""
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
        out = unbatch(out)[0]  # the one target
        canvas = self.video["canvas"]
        logits = crop_resize(resize_logits(out["pred_id_masks"], (canvas, canvas)), big, small)
        return tokens.ids, logits, id_scores(out["pred_id_logits"], logits)
