"""`promptseg.compare`: several models on the same images and prompts, side by side.

    cmp = promptseg.compare("photo.jpg", ["a person", VisualPrompt(ref, ref_mask)],
                            models=["clipseg_vitb16_rd64.refined", "sine_dinov2l"])
    cmp.grid()          # PIL image: one column per model, one row per prompt
    cmp.table()         # markdown: per model and prompt, area, score, times, memory, weights
    cmp.save("out/")    # grid.png (grid_<stem>.png per image), compare.md, compare.json

Each model is built once, each image is encoded once per model (`embed_image`) and each prompt
once per model (`encode_prompt`); a cell (image, model, prompt) only decodes. A prompt a model
cannot take gives an empty cell holding the reason (its `UnsupportedPromptError`), not an error.
With a ground-truth mask, a cell's IoU is that of the UNION of its masks with the ground truth
(an empty union against an empty ground truth counts 1), and models are ranked by their mean IoU
over the cells they could run.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .errors import UnsupportedPromptError
from .imageio import ImageInput, MaskInput, load_image, load_mask, to_pil
from .jsonable import to_jsonable
from .models.base import PromptSegModel
from .prompts import (
    MixedPrompt,
    Prompt,
    SupportSet,
    TextPrompt,
    VisualPrompt,
    Vocabulary,
    as_prompt,
)
from .result import SegmentationResult
from .transforms import resize_mask
from .viz import _Style

__all__ = ["Cell", "Comparison", "ModelEntry", "compare"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
RANDOM_SEED = 0  # random weights: the same model at every run (as `--random-weights`)
MIB = 2**20

# grid drawing
_BG = (255, 255, 255)
_INK = (20, 20, 20)
_MUTED = (90, 90, 90)
_EMPTY = (232, 232, 232)
_RANDOM = (190, 20, 20)
_TEST = (170, 100, 0)
_TRAINED = (22, 128, 60)
_GAP = 6
_PAD = 8
_ROW_HEADER = 190
_TITLE_FONT, _HEAD_FONT, _SMALL_FONT = 18, 16, 13


# ------------------------------------------------------------------------------------------------
# records
# ------------------------------------------------------------------------------------------------


@dataclass
class ModelEntry:
    """One compared model: its name, what its weights are, and how long it took to build."""

    name: str
    weights: str
    """"pretrained" (weights read, sha256 known), "random" (random init: masks mean nothing) or
    "none" (a test model that holds no weights)."""
    weights_sha256: str | None
    level: str
    device: str
    build_seconds: float | None = None
    """None when the model was given already built."""

    @property
    def badge(self) -> str:
        """What the grid and tables say about the weights."""
        if self.weights == "random":
            return "RANDOM WEIGHTS (masks mean nothing)"
        if self.weights == "none":
            return "test model (no weights)"
        return f"weights {self.weights_sha256[:12] if self.weights_sha256 else '?'}"


@dataclass
class Cell:
    """One model's answer to one prompt on one image (or why it has none)."""

    image: int
    model: int
    prompt: int
    result: SegmentationResult | None
    reason: str | None = None
    """Why the cell is empty (the model's UnsupportedPromptError message); None when it ran."""
    encode_image_s: float = 0.0
    """Time to encode this image with this model (once per image and model, shared by a column)."""
    encode_prompt_s: float = 0.0
    """Time to encode this prompt with this model (once per model, reused for every image)."""
    decode_s: float = 0.0
    """Time of this cell's decode + postprocess."""
    peak_memory: int | None = None
    """Bytes, during this cell's prompt encoding and decode (see `Comparison.memory_method`)."""
    encode_peak_memory: int | None = None
    """Bytes, during the image encoding of this column."""
    iou: float | None = None
    """IoU of the union of the cell's masks with the ground truth; None without one."""

    @property
    def ran(self) -> bool:
        return self.result is not None

    @functools.cached_property
    def union(self) -> torch.Tensor | None:
        """bool [H, W]: every mask of the cell together."""
        return None if self.result is None else self.result.masks.any(dim=0)

    @functools.cached_property
    def area(self) -> int | None:
        """Pixels of the union of the cell's masks."""
        u = self.union
        return None if u is None else int(u.sum())

    @property
    def score(self) -> float | None:
        """The best mask's score (None when the cell has no mask)."""
        if self.result is None or len(self.result) == 0:
            return None
        return float(self.result.scores.max())


# ------------------------------------------------------------------------------------------------
# peak memory
# ------------------------------------------------------------------------------------------------


class _PeakMemory:
    """Peak memory of a step: CUDA's max_memory_allocated, else the process's peak RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.base = 0
        if self.cuda:
            self.method = (
                "torch.cuda.max_memory_allocated during the step (absolute: includes the "
                "model's weights)"
            )
        elif _reset_peak_rss():
            self.method = (
                "process peak RSS during the step above its RSS at the step's start "
                "(Linux VmHWM, reset per step)"
            )
        else:
            self.method = (
                "growth of the process's peak RSS (ru_maxrss) during the step: 0 when an "
                "earlier step had already peaked higher"
            )

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method.startswith("process peak RSS") and _reset_peak_rss():
            self.base = _proc_status_bytes("VmRSS")
        else:
            self.base = _ru_maxrss()

    def stop(self) -> int:
        """Bytes used at the peak of the step started by `start`."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.method.startswith("process peak RSS"):
            return max(0, _proc_status_bytes("VmHWM") - self.base)
        return max(0, _ru_maxrss() - self.base)


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux: write 5 to /proc/self/clear_refs); True if done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_bytes("VmHWM") > 0
    except OSError:
        return False


def _proc_status_bytes(key: str) -> int:
    """A `kB` field of /proc/self/status in bytes (0 when absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _ru_maxrss() -> int:
    """The process's peak RSS in bytes (getrusage), 0 where unavailable."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# the comparison
# ------------------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """The cells of every (image, model, prompt), with `grid()`, `table()` and `save()`."""

    images: list[str]
    """A name per image (file name, or "image i")."""
    prompts: list[str]
    """A row label per prompt."""
    models: list[ModelEntry]
    cells: list[Cell]
    image_seconds: list[float]
    """Wall time of all models on each image (encode + every decode)."""
    memory_method: str
    thumbnails: list[torch.Tensor] = field(default_factory=list, repr=False)
    """uint8 [3, H, W] per image (the images themselves)."""
    prompt_thumbnails: list[np.ndarray | None] = field(default_factory=list, repr=False)
    """Per prompt, a picture of its first reference with its mask tinted (None for text)."""
    has_gt: bool = False
    total_seconds: float = 0.0

    # -- lookups ---------------------------------------------------------------------------------
    def cell(self, image: int, model: int | str, prompt: int) -> Cell:
        """The cell of an image index, a model (index or name) and a prompt index."""
        m = model if isinstance(model, int) else self._model_index(model)
        for c in self.cells:
            if (c.image, c.model, c.prompt) == (image, m, prompt):
                return c
        raise IndexError(f"no cell for image {image}, model {model!r}, prompt {prompt}")

    def _model_index(self, name: str) -> int:
        for i, m in enumerate(self.models):
            if m.name == name:
                return i
        raise KeyError(f"no model {name!r} in this comparison; it has {self.model_names}")

    def _image_index(self, image: int | str) -> int:
        if isinstance(image, int):
            if not -len(self.images) <= image < len(self.images):
                raise IndexError(
                    f"image {image} out of range: the comparison has {len(self.images)} image(s)"
                )
            return image % len(self.images)
        if image in self.images:
            return self.images.index(image)
        raise KeyError(f"no image {image!r} in this comparison; it has {self.images}")

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]

    # -- numbers ---------------------------------------------------------------------------------
    def ranking(self) -> list[dict[str, Any]] | None:
        """Models by mean IoU over the cells they ran (best first); None without ground truth."""
        if not self.has_gt:
            return None
        rows = []
        for i, m in enumerate(self.models):
            ious = [c.iou for c in self.cells if c.model == i and c.iou is not None]
            total = sum(1 for c in self.cells if c.model == i)
            mean = sum(ious) / len(ious) if ious else None
            rows.append({"model": m.name, "mean_iou": mean, "cells": len(ious), "of": total})
        rows.sort(key=lambda r: -1.0 if r["mean_iou"] is None else -r["mean_iou"])
        rank = 0
        for k, row in enumerate(rows):
            if row["mean_iou"] is not None:
                rank = k + 1
            row["rank"] = rank if row["mean_iou"] is not None else None
        return rows

    def _rank_of(self, model: int) -> dict[str, Any] | None:
        for row in self.ranking() or []:
            if row["model"] == self.models[model].name:
                return row
        return None

    def timings(self) -> dict[str, Any]:
        """Build time per model, wall time per image, their totals and the work done."""
        n = len(self.images)
        return {
            "total_s": self.total_seconds,
            "build_s": {m.name: m.build_seconds for m in self.models},
            "per_image_s": dict(zip(self.images, self.image_seconds, strict=True)),
            "mean_image_s": sum(self.image_seconds) / n if n else 0.0,
            "encode_image_s": {
                m.name: sum(c.encode_image_s for c in self.cells if c.model == i and c.prompt == 0)
                for i, m in enumerate(self.models)
            },
            "work": {
                m.name: {
                    "builds": 0 if m.build_seconds is None else 1,
                    "image_encodes": n,
                    "prompt_encodes": len({c.prompt for c in self.cells if c.model == i and c.ran}),
                    "decodes": sum(1 for c in self.cells if c.model == i and c.ran),
                }
                for i, m in enumerate(self.models)
            },
        }

    def records(self) -> list[dict[str, Any]]:
        """One JSON-able record per cell."""
        out = []
        for c in self.cells:
            m = self.models[c.model]
            r = c.result
            h, w = self.thumbnails[c.image].shape[-2:] if self.thumbnails else (0, 0)
            out.append(
                {
                    "image": self.images[c.image],
                    "model": m.name,
                    "prompt": self.prompts[c.prompt],
                    "supported": c.ran,
                    "reason": c.reason,
                    "level": m.level,
                    "n_masks": None if r is None else len(r),
                    "labels": None if r is None else list(r.labels),
                    "scores": None if r is None else [float(s) for s in r.scores],
                    "score": c.score,
                    "area": c.area,
                    "area_fraction": None if c.area is None else c.area / max(h * w, 1),
                    "encode_image_s": c.encode_image_s,
                    "encode_prompt_s": c.encode_prompt_s if c.ran else None,
                    "decode_s": c.decode_s if c.ran else None,
                    "peak_memory_mib": _mib(c.peak_memory),
                    "encode_peak_memory_mib": _mib(c.encode_peak_memory),
                    "weights": m.weights,
                    "random_weights": m.weights == "random",
                    "weights_sha256": m.weights_sha256,
                    "iou": c.iou,
                }
            )
        return out

    def to_json(self) -> dict[str, Any]:
        """Everything of compare.json."""
        return to_jsonable(
            {
                "images": [
                    {"name": name, "size": list(t.shape[-2:]), "seconds": s}
                    for name, t, s in zip(
                        self.images, self.thumbnails, self.image_seconds, strict=True
                    )
                ],
                "prompts": self.prompts,
                "models": [
                    {
                        "name": m.name,
                        "weights": m.weights,
                        "weights_sha256": m.weights_sha256,
                        "level": m.level,
                        "device": m.device,
                        "build_s": m.build_seconds,
                    }
                    for m in self.models
                ],
                "memory": {"unit": "MiB", "method": self.memory_method},
                "iou": (
                    "IoU of the union of each cell's masks with the ground-truth mask (1 when "
                    "both are empty); models ranked by mean IoU over the cells they ran"
                )
                if self.has_gt
                else None,
                "ranking": self.ranking(),
                "timings": self.timings(),
                "cells": self.records(),
            },
            finite_only=True,
        )

    # -- markdown --------------------------------------------------------------------------------
    def table(self) -> str:
        """Markdown: the models, per model and prompt the numbers (means over the images), the
        ranking with ground truth, and the timings."""
        n = len(self.images)
        over = f" (means over {n} images)" if n > 1 else ""
        lines = [
            "# Comparison",
            "",
            f"{n} image(s), {len(self.prompts)} prompt(s), {len(self.models)} model(s). "
            f"Peak memory: {self.memory_method}.",
            "",
            "| model | weights | sha256 | level | device | build (s) |",
            "|---|---|---|---|---|---|",
        ]
        for m in self.models:
            sha = m.weights_sha256[:16] if m.weights_sha256 else "None"
            weights = "**RANDOM (masks mean nothing)**" if m.weights == "random" else m.weights
            build = "given built" if m.build_seconds is None else f"{m.build_seconds:.2f}"
            lines.append(f"| {m.name} | {weights} | {sha} | {m.level} | {m.device} | {build} |")
        gt = " IoU |" if self.has_gt else ""
        lines += [
            "",
            f"## Per model and prompt{over}",
            "",
            "| model | prompt | masks | area (px) | area (%) | score | encode image (ms) | "
            f"encode prompt (ms) | decode (ms) | peak memory (MiB) |{gt}",
            "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if self.has_gt else ""),
        ]
        records = self.records()
        for i, m in enumerate(self.models):
            name = f"{m.name} (RANDOM)" if m.weights == "random" else m.name
            for p, prompt in enumerate(self.prompts):
                rows = [
                    r
                    for r, c in zip(records, self.cells, strict=True)
                    if c.model == i and c.prompt == p
                ]
                cell = f"| {name} | {_md(prompt)} |"
                if not any(r["supported"] for r in rows):
                    reason = _md(_short_reason(rows[0]["reason"] or ""))
                    blanks = " |" * (7 + bool(self.has_gt))
                    lines.append(f"{cell} not supported: {reason} |{blanks}")
                    continue
                ran = [r for r in rows if r["supported"]]
                peak = [r["peak_memory_mib"] for r in ran if r["peak_memory_mib"] is not None]
                values = [
                    _num(_mean(r["n_masks"] for r in ran), 1),
                    _num(_mean(r["area"] for r in ran), 0),
                    _num(_mean(100 * r["area_fraction"] for r in ran), 1),
                    _num(_mean(r["score"] for r in ran), 3),
                    _num(_mean(1000 * r["encode_image_s"] for r in ran), 1),
                    _num(ran[0]["encode_prompt_s"] * 1000, 1),
                    _num(_mean(1000 * r["decode_s"] for r in ran), 1),
                    _num(max(peak) if peak else None, 1),
                ]
                if self.has_gt:
                    values.append(_num(_mean(r["iou"] for r in ran), 3))
                lines.append(cell + "".join(f" {v} |" for v in values))
        ranking = self.ranking()
        if ranking:
            lines += [
                "",
                "## Ranking by IoU with the ground truth",
                "",
                "IoU of the union of each cell's masks with the ground-truth mask; mean over the "
                "cells a model could run (a prompt kind it cannot take is left out).",
                "",
                "| rank | model | mean IoU | cells scored |",
                "|---|---|---|---|",
            ]
            for row in ranking:
                rank = row["rank"] if row["rank"] is not None else "-"
                lines.append(
                    f"| {rank} | {row['model']} | {_num(row['mean_iou'], 3)} | "
                    f"{row['cells']}/{row['of']} |"
                )
        t = self.timings()
        lines += [
            "",
            "## Timings",
            "",
            f"Total {t['total_s']:.2f} s; per image {t['mean_image_s']:.3f} s on average. Each "
            "model was built once, encoded each image once, encoded each prompt once and only "
            "decoded per cell.",
            "",
            "| model | build (s) | image encodes | encode images total (s) | prompt encodes | "
            "decodes |",
            "|---|---|---|---|---|---|",
        ]
        for m in self.models:
            work = t["work"][m.name]
            build = "given built" if m.build_seconds is None else f"{m.build_seconds:.2f}"
            lines.append(
                f"| {m.name} | {build} | {work['image_encodes']} | "
                f"{t['encode_image_s'][m.name]:.3f} | {work['prompt_encodes']} | "
                f"{work['decodes']} |"
            )
        return "\n".join(lines) + "\n"

    # -- the grid --------------------------------------------------------------------------------
    def grid(self, image: int | str = 0, cell_width: int = 384) -> Image.Image:
        """The grid of one image: a column per model (name, weights, image encode time), a row per
        prompt; each cell the overlay of its masks at `cell_width` px with its decode time (and
        IoU), or, for a prompt the model cannot take, a grey cell saying why."""
        g = self._layout(image, cell_width)
        i, cw, ch = g["image"], g["cell_width"], g["cell_height"]
        thumb = torch.from_numpy(
            np.array(to_pil(self.thumbnails[i]).resize((cw, ch), Image.Resampling.LANCZOS))
        ).permute(2, 0, 1)
        title, small = _Style.make(_TITLE_FONT), _Style.make(_SMALL_FONT)
        width, height = g["size"]
        canvas = Image.new("RGB", (width, height), _BG)
        draw = ImageDraw.Draw(canvas)

        y = _PAD
        for k, text in enumerate(g["title"]):
            style = title if k == 0 else small
            draw.text(
                (_PAD, y - style.top), style.fit(text, width - 2 * _PAD), fill=_INK, font=style.font
            )
            y += style.line + style.pad + (title.pad if k == 0 else 0)

        for k, lines in enumerate(g["headers"]):
            x = _ROW_HEADER + _GAP + k * (cw + _GAP)
            yy = g["title_height"] + _PAD
            for text, style, ink, fill in lines:
                lh = _line_height(style)
                if fill is not None:
                    tw = style.text_width(text) + 2 * style.pad
                    draw.rectangle((x, yy, x + tw - 1, yy + lh - 2), fill=fill)
                    draw.text(
                        (x + style.pad, yy + style.pad // 2 - style.top),
                        text,
                        fill=ink,
                        font=style.font,
                    )
                else:
                    draw.text((x, yy + style.pad // 2 - style.top), text, fill=ink, font=style.font)
                yy += lh

        top = g["grid_top"]
        draw.line((0, top - 1, width, top - 1), fill=(200, 200, 200))
        footer_h = g["footer_height"]
        for p in range(len(self.prompts)):
            y0 = top + _GAP + p * (ch + footer_h + _GAP)
            box = (_PAD, y0, _ROW_HEADER - _PAD, y0 + ch + footer_h)
            self._row_header(canvas, draw, p, box, small)
            for k in range(len(self.models)):
                x0, y0 = g["cells"][(k, p)][:2]
                cell = self.cell(i, k, p)
                self._draw_cell(canvas, draw, cell, thumb, (x0, y0), (cw, ch), footer_h, small)
        return canvas

    def cell_boxes(
        self, image: int | str = 0, cell_width: int = 384
    ) -> dict[tuple[int, int], tuple[int, int, int, int]]:
        """Where `grid` puts each cell's overlay: (model, prompt) -> (x0, y0, x1, y1), x1 and y1
        exclusive (each cell's footer of numbers lies below its box)."""
        return self._layout(image, cell_width)["cells"]

    def _layout(self, image: int | str, cell_width: int) -> dict[str, Any]:
        """The grid's geometry and header lines for one image."""
        if isinstance(cell_width, bool) or not isinstance(cell_width, int) or cell_width < 96:
            raise ValueError(
                f"cell_width must be an integer of at least 96 pixels, got {cell_width!r}"
            )
        i = self._image_index(image)
        h, w = self.thumbnails[i].shape[-2:]
        cw = cell_width
        ch = max(32, round(cw * h / w))
        title, head, small = (
            _Style.make(_TITLE_FONT),
            _Style.make(_HEAD_FONT),
            _Style.make(_SMALL_FONT),
        )
        n_models, n_prompts = len(self.models), len(self.prompts)
        title_lines = [f"{self.images[i]}  ({w} x {h} px)"]
        if self.has_gt:
            title_lines.append("IoU: union of each cell's masks vs the ground-truth mask")
        title_h = _PAD + len(title_lines) * (title.line + title.pad) + _PAD
        headers = [self._column_header(k, i, cw - 2 * _PAD, head, small) for k in range(n_models)]
        header_h = max(sum(_line_height(s) for _, s, _, _ in lines) for lines in headers)
        header_h += 2 * _PAD
        footer_h = small.line + 2 * small.pad + 4
        top = title_h + header_h
        cells = {}
        for p in range(n_prompts):
            y0 = top + _GAP + p * (ch + footer_h + _GAP)
            for k in range(n_models):
                x0 = _ROW_HEADER + _GAP + k * (cw + _GAP)
                cells[(k, p)] = (x0, y0, x0 + cw, y0 + ch)
        return {
            "image": i,
            "cell_width": cw,
            "cell_height": ch,
            "footer_height": footer_h,
            "title": title_lines,
            "title_height": title_h,
            "headers": headers,
            "grid_top": top,
            "cells": cells,
            "size": (
                _ROW_HEADER + n_models * (cw + _GAP) + _GAP,
                top + n_prompts * (ch + footer_h + _GAP) + _GAP,
            ),
        }

    def _column_header(
        self, k: int, image: int, width: int, head: _Style, small: _Style
    ) -> list[tuple[str, _Style, tuple[int, int, int], tuple[int, int, int] | None]]:
        """Lines (text, style, ink, box fill or None) above a model's column."""
        m = self.models[k]
        lines: list[tuple[str, _Style, tuple[int, int, int], tuple[int, int, int] | None]] = [
            (t, head, _INK, None) for t in _wrap(m.name, head, width, max_lines=2)
        ]
        fill = {"random": _RANDOM, "none": _TEST}.get(m.weights, _TRAINED)
        lines.append((small.fit(m.badge, width - 2 * small.pad), small, (255, 255, 255), fill))
        cells = [c for c in self.cells if c.model == k and c.image == image]
        encode = cells[0].encode_image_s if cells else 0.0
        text = f"level {m.level} · image encode {_ms(encode)}"
        lines.append((small.fit(text, width), small, _MUTED, None))
        rank = self._rank_of(k)
        if rank is not None and rank["mean_iou"] is not None:
            text = f"rank {rank['rank']} · mean IoU {rank['mean_iou']:.3f} ({rank['cells']} cells)"
            lines.append((small.fit(text, width), small, _INK, None))
        elif self.has_gt:
            lines.append(("no cell scored", small, _MUTED, None))
        return lines

    def _row_header(
        self,
        canvas: Image.Image,
        draw: ImageDraw.ImageDraw,
        p: int,
        box: tuple[int, int, int, int],
        style: _Style,
    ) -> None:
        """The prompt's label (wrapped) and, for a reference prompt, its image with the mask."""
        x0, y0, x1, y1 = box
        head = _Style.make(_HEAD_FONT)
        y = y0
        for line in _wrap(self.prompts[p], head, x1 - x0, max_lines=4):
            draw.text((x0, y - head.top), line, fill=_INK, font=head.font)
            y += head.line + head.spacing
        picture = self.prompt_thumbnails[p] if p < len(self.prompt_thumbnails) else None
        if picture is not None:
            y += style.pad
            room = (x1 - x0, y1 - y)
            if room[1] > 24:
                img = Image.fromarray(picture)
                img.thumbnail(room, Image.Resampling.LANCZOS)
                canvas.paste(img, (x0, y))

    def _draw_cell(
        self,
        canvas: Image.Image,
        draw: ImageDraw.ImageDraw,
        cell: Cell,
        thumb: torch.Tensor,
        origin: tuple[int, int],
        size: tuple[int, int],
        footer_h: int,
        small: _Style,
    ) -> None:
        """One cell: the overlay (or the reason it is empty) and a footer of numbers."""
        x0, y0 = origin
        cw, ch = size
        m = self.models[cell.model]
        if cell.result is None:
            draw.rectangle((x0, y0, x0 + cw - 1, y0 + ch - 1), fill=_EMPTY)
            head = _Style.make(_HEAD_FONT)
            lines = [(t, head) for t in _wrap("cannot take this prompt", head, cw - 2 * _PAD)]
            reason = _short_reason(cell.reason or "")
            lines += [(t, small) for t in _wrap(reason, small, cw - 2 * _PAD, max_lines=6)]
            total = sum(s.line + s.spacing for _, s in lines)
            y = y0 + max(_PAD, (ch - total) // 2)
            for text, style in lines:
                x = x0 + (cw - style.text_width(text)) // 2
                draw.text((x, y - style.top), text, fill=_INK, font=style.font)
                y += style.line + style.spacing
            footer = "not run"
        else:
            small_result = _resized(cell.result, thumb, (ch, cw))
            canvas.paste(small_result.overlay(), (x0, y0))
            if m.weights == "random":
                tag = "RANDOM WEIGHTS"
                tw = small.text_width(tag) + 2 * small.pad
                th = small.line + 2 * small.pad
                bx, by = x0 + cw - tw, y0
                draw.rectangle((bx, by, bx + tw - 1, by + th - 1), fill=_RANDOM)
                draw.text(
                    (bx + small.pad, by + small.pad - small.top),
                    tag,
                    fill=(255, 255, 255),
                    font=small.font,
                )
            n = len(cell.result)
            masks = f"{n} mask{'s' if n != 1 else ''}" if cell.area else f"{n} mask(s), all empty"
            parts = [f"decode {_ms(cell.decode_s)}", masks if n else "no mask"]
            if cell.score is not None:
                parts.append(f"score {cell.score:.2f}")
            if cell.iou is not None:
                parts.append(f"IoU {cell.iou:.3f}")
            footer = " · ".join(parts)
        fy = y0 + ch
        fill = (245, 225, 225) if m.weights == "random" else (244, 244, 244)
        draw.rectangle((x0, fy, x0 + cw - 1, fy + footer_h - 1), fill=fill)
        draw.text(
            (x0 + small.pad, fy + (footer_h - small.line) // 2 - small.top),
            small.fit(footer, cw - 2 * small.pad),
            fill=_INK,
            font=small.font,
        )

    # -- files -----------------------------------------------------------------------------------
    def grid_names(self) -> list[str]:
        """File name of each image's grid: grid.png for one image, grid_<name>.png for several."""
        if len(self.images) == 1:
            return ["grid.png"]
        names, seen = [], set()
        for k, name in enumerate(self.images):
            stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in Path(name).stem)
            stem = stem if stem not in seen else f"{stem}_{k}"
            seen.add(stem)
            names.append(f"grid_{stem}.png")
        return names

    def save(self, directory: str | os.PathLike[str], cell_width: int = 384) -> list[Path]:
        """Write the grid(s), compare.md and compare.json into `directory` (created); return the
        paths written."""
        out = Path(directory)
        if out.is_file():
            raise ValueError(f"{out} is a file; give a folder to write the comparison into")
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for k, name in enumerate(self.grid_names()):
            path = out / name
            self.grid(k, cell_width=cell_width).save(path)
            written.append(path)
        path = out / "compare.md"
        path.write_text(self.table())
        written.append(path)
        record = self.to_json()
        for entry, name in zip(record["images"], self.grid_names(), strict=True):
            entry["grid"] = name
        path = out / "compare.json"
        path.write_text(json.dumps(record, indent=2))
        written.append(path)
        return written


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------


def compare(
    image: ImageInput | str | os.PathLike[str] | Sequence[ImageInput],
    prompts: Any,
    models: Sequence[str | PromptSegModel],
    *,
    gt: MaskInput | Sequence[MaskInput] | str | os.PathLike[str] | None = None,
    random_weights: bool = False,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    threshold: float | None = None,
    build: Callable[[str], PromptSegModel] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Comparison:
    """Run every model on the same image(s) with every prompt; see the module docstring.

    `image`: an image (path, PIL, array, tensor), a folder of images or a list of images.
    `prompts`: one prompt or a list, one grid row each (a str is a text prompt, an
    (image, mask) pair a visual prompt; SupportSet, Vocabulary, MixedPrompt as they are).
    `models`: names (built once, with random weights when `random_weights`) or built models.
    `gt`: a ground-truth mask for one image; for several, a list of masks or a folder holding
    `<image stem>.png` per image. `build(name)` replaces how a named model is built.
    """
    start_all = time.perf_counter()
    images, names = _images(image)
    rows = _rows(prompts)
    if isinstance(models, (str, PromptSegModel)) or not isinstance(models, Sequence) or not models:
        raise ValueError(
            "models must be a non-empty list of model names or built models, e.g. "
            "models=['clipseg_test_tiny', 'test_colorkey']"
        )
    gts = _ground_truths(gt, names, image)
    built: list[PromptSegModel] = []
    entries: list[ModelEntry] = []
    for spec in models:
        seconds = None
        if isinstance(spec, PromptSegModel):
            model = spec
        elif isinstance(spec, str):
            t0 = time.perf_counter()
            model = (build or _builder(random_weights, device, cache_dir))(spec)
            seconds = time.perf_counter() - t0
            if progress:
                progress(f"built {spec} in {seconds:.2f} s")
        else:
            raise TypeError(
                f"models holds a {type(spec).__name__}; give model names (str) or models built "
                "with promptseg.create_model"
            )
        built.append(model)
        entries.append(_entry(model, seconds))

    meter = _PeakMemory(built[0].device)
    cells: list[Cell] = []
    pictures: list[torch.Tensor] = []
    image_seconds: list[float] = []
    # per model and row: prompts, their embeddings and the encode time (or why unsupported)
    encoded: dict[tuple[int, int], tuple[list[Prompt], Any, float] | str] = {}
    for i, img_input in enumerate(images):
        t_image = time.perf_counter()
        img = load_image(img_input)
        pictures.append(img)
        truth = None
        if gts is not None:
            truth = load_mask(gts[i], size=tuple(img.shape[-2:]))
        for k, model in enumerate(built):
            level = entries[k].level
            meter.start()
            t0 = time.perf_counter()
            embedding = model.embed_image(img, level)
            _sync(model.device)
            encode_s = time.perf_counter() - t0
            encode_peak = meter.stop()
            for p, row in enumerate(rows):
                meter.start()
                state = encoded.get((k, p))
                if state is None:
                    state = _encode_row(model, row, level)
                    encoded[(k, p)] = state
                if isinstance(state, str):
                    cells.append(
                        Cell(
                            i,
                            k,
                            p,
                            None,
                            reason=state,
                            encode_image_s=encode_s,
                            encode_peak_memory=encode_peak,
                        )
                    )
                    continue
                prepared, embeddings, prompt_s = state
                t0 = time.perf_counter()
                result = model.run(
                    embedding, prepared, embeddings, level=level, threshold=threshold
                )
                _sync(model.device)
                decode_s = time.perf_counter() - t0
                cell = Cell(
                    i,
                    k,
                    p,
                    result,
                    encode_image_s=encode_s,
                    encode_prompt_s=prompt_s,
                    decode_s=decode_s,
                    peak_memory=meter.stop(),
                    encode_peak_memory=encode_peak,
                )
                if truth is not None:
                    cell.iou = _iou(cell.union, truth)
                cells.append(cell)
        image_seconds.append(time.perf_counter() - t_image)
        if progress:
            progress(f"image {i + 1}/{len(images)} {names[i]}: {image_seconds[-1]:.3f} s")
    return Comparison(
        images=names,
        prompts=[_describe(row) for row in rows],
        models=entries,
        cells=cells,
        image_seconds=image_seconds,
        memory_method=meter.method,
        thumbnails=pictures,
        prompt_thumbnails=[_prompt_picture(row) for row in rows],
        has_gt=gts is not None,
        total_seconds=time.perf_counter() - start_all,
    )


def _encode_row(
    model: PromptSegModel, row: list[Prompt], level: str
) -> tuple[list[Prompt], Any, float] | str:
    """(prompts, embeddings, seconds) of a row for a model, or why the model cannot take it."""
    try:
        prepared = model.prepare_prompts(row)
        t0 = time.perf_counter()
        with torch.inference_mode():
            embeddings = model.encode_prompt(prepared, level)
        _sync(model.device)
        return prepared, embeddings, time.perf_counter() - t0
    except UnsupportedPromptError as exc:
        return str(exc)


def _builder(random_weights: bool, device: Any, cache_dir: Any) -> Callable[[str], PromptSegModel]:
    """How `compare` builds a named model: released weights, or seeded random weights."""

    def build(name: str) -> PromptSegModel:
        from .zoo import create_model, model_info

        card = model_info(name)
        if not random_weights and card.converter is not None and not card.weights:
            raise ValueError(
                f"{card.name} has no released weights: pass random_weights=True to compare it "
                "with random weights (meaningless masks), or build it yourself with "
                "create_model(..., checkpoint_path=...) and pass the model"
            )
        pretrained = not random_weights and card.converter is not None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            return create_model(name, pretrained=pretrained, device=device, cache_dir=cache_dir)

    return build


def _entry(model: PromptSegModel, seconds: float | None) -> ModelEntry:
    """What the tables say about a built model (weights from its card)."""
    card = model.card
    if card.weights_sha256:
        weights = "pretrained"
    elif card.converter is None:
        weights = "none"
    else:
        weights = "random"
    return ModelEntry(
        name=card.name,
        weights=weights,
        weights_sha256=card.weights_sha256,
        level=model.check_level(None),
        device=str(model.device),
        build_seconds=seconds,
    )


def _images(image: Any) -> tuple[list[Any], list[str]]:
    """The images to run and a name for each (a folder gives its image files, sorted)."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise FileNotFoundError(
                    f"the folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}); give an "
                    "image or a folder of images"
                )
            return list(files), [p.name for p in files]
        if not path.exists():
            raise FileNotFoundError(
                f"image {str(image)!r} does not exist; give an image file or a folder of images"
            )
        return [path], [path.name]
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError("the list of images is empty; give at least one image")
        names = [
            Path(x).name if isinstance(x, (str, os.PathLike)) else f"image {k}"
            for k, x in enumerate(image)
        ]
        return list(image), names
    return [image], ["image"]


def _rows(prompts: Any) -> list[list[Prompt]]:
    """Prompts -> grid rows (each a list of prompts decoded together, usually one)."""
    single = (str, TextPrompt, VisualPrompt, MixedPrompt, SupportSet, Vocabulary)
    if prompts is None:
        raise ValueError(
            "compare needs at least one prompt: a text, a VisualPrompt(image, mask), "
            "a SupportSet, a Vocabulary, or a list of them"
        )
    if isinstance(prompts, single) or (
        isinstance(prompts, tuple) and len(prompts) == 2 and not isinstance(prompts[0], single)
    ):
        items = [prompts]
    elif isinstance(prompts, (list, tuple)):
        items = list(prompts)
    else:
        items = [prompts]
    if not items:
        raise ValueError("the prompt list is empty; give at least one prompt (one grid row each)")
    return [as_prompt(item) for item in items]


def _describe(row: list[Prompt]) -> str:
    """A row's label: the prompt's kind and its content."""
    return " + ".join(_describe_one(p) for p in row)


def _describe_one(p: Prompt) -> str:
    if isinstance(p, TextPrompt):
        return f'text "{p.text}"'
    if isinstance(p, VisualPrompt):
        return f"reference {_source_name(p.image)}"
    if isinstance(p, MixedPrompt):
        return f'text "{p.text.text}" x{p.text_weight:g} + reference {_source_name(p.visual.image)}'
    if isinstance(p, SupportSet):
        return f"{len(p)}-shot support set ({len(p.class_ids)} class(es))"
    if isinstance(p, Vocabulary):
        names = [c[0] for c in p.classes]
        shown = "; ".join(names[:4]) + ("; …" if len(names) > 4 else "")
        return f"vocabulary of {len(names)}: {shown}"
    return type(p).__name__


def _source_name(x: Any) -> str:
    return Path(x).name if isinstance(x, (str, os.PathLike)) else "(in memory)"


def _prompt_picture(row: list[Prompt]) -> np.ndarray | None:
    """The row's first reference image with its mask tinted red, uint8 [H, W, 3], or None."""
    for p in row:
        shot = p.visual if isinstance(p, MixedPrompt) else p
        if isinstance(shot, SupportSet):
            shot = shot.shots[0]
        if isinstance(shot, VisualPrompt):
            img = load_image(shot.image)
            mask = load_mask(shot.mask, size=tuple(img.shape[-2:])).numpy()
            arr = img.permute(1, 2, 0).numpy().astype(np.float32)
            arr[mask] = 0.45 * arr[mask] + 0.55 * np.array([230, 40, 40], dtype=np.float32)
            return arr.round().clip(0, 255).astype(np.uint8)
    return None


def _ground_truths(gt: Any, names: list[str], image: Any) -> list[Any] | None:
    """One ground-truth mask input per image, or None."""
    if gt is None:
        return None
    n = len(names)
    if isinstance(gt, (str, os.PathLike)) and Path(gt).is_dir():
        folder = Path(gt)
        found = []
        for name in names:
            stem = Path(name).stem
            hits = [folder / f"{stem}{s}" for s in (".png", ".bmp", ".tif", ".tiff")]
            hit = next((h for h in hits if h.is_file()), None)
            if hit is None:
                raise FileNotFoundError(
                    f"no ground-truth mask for {name} in {folder}: expected {stem}.png"
                )
            found.append(hit)
        return found
    if isinstance(gt, (str, os.PathLike)) and not Path(gt).exists():
        raise FileNotFoundError(f"ground-truth mask {str(gt)!r} does not exist")
    if isinstance(gt, (list, tuple)):
        if len(gt) != n:
            raise ValueError(f"gt holds {len(gt)} masks for {n} images; give one per image")
        return list(gt)
    if n > 1:
        raise ValueError(
            f"one ground-truth mask for {n} images: give a folder of <image stem>.png masks or a "
            "list with one mask per image"
        )
    return [gt]


def _iou(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """IoU of two bool masks [H, W]; 1 when both are empty."""
    union = int((pred | truth).sum())
    return 1.0 if union == 0 else int((pred & truth).sum()) / union


def _resized(result: SegmentationResult, picture: torch.Tensor, size: tuple[int, int]):
    """The result at the cell's size (masks nearest, image already resized) for its overlay."""
    return SegmentationResult(
        masks=resize_mask(result.masks, size, grid="center"),
        scores=result.scores,
        labels=list(result.labels),
        prompt_index=result.prompt_index,
        level=list(result.level),
        image=picture,
    )


# ------------------------------------------------------------------------------------------------
# small text helpers
# ------------------------------------------------------------------------------------------------


def _line_height(style: _Style) -> int:
    return style.line + style.pad + 2


def _wrap(text: str, style: _Style, width: int, max_lines: int = 3) -> list[str]:
    """`text` broken at spaces into lines of at most `width` px (the last one shortened)."""
    words = text.split()
    lines: list[str] = []
    current = ""
    for word in words:
        candidate = f"{current} {word}".strip()
        if style.text_width(candidate) <= width or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [" ".join(lines[max_lines - 1 :])]
    return [style.fit(line, width) for line in lines]


def _short_reason(reason: str) -> str:
    """The first sentence of an UnsupportedPromptError (the list of other models left out)."""
    cut = reason.split(". Models that")[0]
    return cut if cut.endswith(".") else cut + "."


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.1f} ms"


def _mib(n: int | None) -> float | None:
    return None if n is None else n / MIB


def _mean(values: Any) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _md(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")
