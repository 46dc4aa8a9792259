"""Reader of the PerSeg one-shot personalised segmentation layout.

`<data-root>/data/Images/<object>/<nn>.jpg` and `<data-root>/data/Annotations/<object>/<nn>.png`
(the data root may also be the `data/` folder itself). Image `00` of each object is the reference
(the one-shot prompt); every other image is a query. The whole layout is checked up front and
every problem is reported at once in a `DatasetLayoutError` naming what was expected where.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from promptseg.data.dense import _require
from promptseg.errors import DatasetLayoutError
from promptseg.metrics.perseg import REFERENCE_STEM, read_mask

__all__ = ["PerSegDataset", "PerSegItem"]

PathLike = str | os.PathLike[str]

_LAYOUT = (
    "data/Images/<object>/<nn>.jpg and data/Annotations/<object>/<nn>.png (same objects, same "
    f"stems; {REFERENCE_STEM}.jpg/.png is the reference, at least one other image per object)"
)
_OBTAIN = (
    "the PerSeg Google Drive link of the ZrrSkywalker/Personalize-SAM README; unzip it so that "
    "<data-root>/data/Images and <data-root>/data/Annotations exist"
)


@dataclass(frozen=True)
class PerSegItem:
    """One PerSeg image: its object, file stem (`00` = reference) and image / mask paths."""

    object: str
    stem: str
    image_path: Path
    mask_path: Path


def _entries(folder: Path, dirs: bool) -> list[str]:
    """Sorted names of the visible sub-folders (or files) of `folder`."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.name[:1] != "." and e.is_dir() == dirs)


def _stems(folder: Path, suffix: str) -> list[str]:
    """Sorted stems of the `suffix` files of `folder`."""
    return [n[: -len(suffix)] for n in _entries(folder, dirs=False) if n.endswith(suffix)]


def _unreadable(path: Path, exc: Exception) -> DatasetLayoutError:
    """The error for an image or mask file PIL cannot read."""
    return DatasetLayoutError(
        f"PerSeg: cannot read {path} ({exc}); re-extract the dataset.\nObtain: {_OBTAIN}"
    )


class PerSegDataset:
    """PerSeg: objects in name order, each with its reference `00` and queries in stem order."""

    def __init__(self, root: PathLike) -> None:
        given = Path(root)
        nested = given / "data"
        use_nested = (nested / "Images").is_dir() or not (given / "Images").is_dir()
        self.root = nested if use_nested else given
        self.image_dir = self.root / "Images"
        self.annotation_dir = self.root / "Annotations"
        _require(
            "PerSeg",
            given,
            [(self.image_dir, "dir"), (self.annotation_dir, "dir")],
            _LAYOUT,
            _OBTAIN,
        )
        image_objects = _entries(self.image_dir, dirs=True)
        mask_objects = _entries(self.annotation_dir, dirs=True)
        problems = [
            f"{self.annotation_dir / o} (dir) for the images of {self.image_dir / o}"
            for o in image_objects
            if o not in mask_objects
        ] + [
            f"{self.image_dir / o} (dir) for the masks of {self.annotation_dir / o}"
            for o in mask_objects
            if o not in image_objects
        ]
        self._items: dict[str, list[PerSegItem]] = {}
        for obj in image_objects:
            if obj not in mask_objects:
                continue
            images = _stems(self.image_dir / obj, ".jpg")
            masks = _stems(self.annotation_dir / obj, ".png")
            problems += [
                f"{self.annotation_dir / obj / s}.png (mask of {self.image_dir / obj / s}.jpg)"
                for s in images
                if s not in masks
            ] + [
                f"{self.image_dir / obj / s}.jpg (image of {self.annotation_dir / obj / s}.png)"
                for s in masks
                if s not in images
            ]
            stems = [s for s in images if s in masks]
            if REFERENCE_STEM not in images and REFERENCE_STEM not in masks:
                problems.append(
                    f"{self.image_dir / obj / REFERENCE_STEM}.jpg and "
                    f"{self.annotation_dir / obj / REFERENCE_STEM}.png (the reference of {obj!r})"
                )
            elif stems == [REFERENCE_STEM]:
                problems.append(f"a query image besides the reference in {self.image_dir / obj}")
            self._items[obj] = [
                PerSegItem(
                    obj,
                    s,
                    self.image_dir / obj / f"{s}.jpg",
                    self.annotation_dir / obj / f"{s}.png",
                )
                for s in stems
            ]
        if not image_objects and not mask_objects:
            problems.append(f"object folders {self.image_dir}/<object>/ (found none)")
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise DatasetLayoutError(
                f"PerSeg: malformed layout under {self.root}; missing:\n{lines}\n"
                f"Expected layout: {_LAYOUT}\nObtain: {_OBTAIN}"
            )

    def objects(self) -> list[str]:
        """Object names, sorted (the reference script's order)."""
        return list(self._items)

    def _object_items(self, obj: str) -> list[PerSegItem]:
        try:
            return self._items[obj]
        except KeyError:
            raise KeyError(f"{obj!r} is not a PerSeg object under {self.image_dir}") from None

    def reference(self, obj: str) -> PerSegItem:
        """The reference image `00` of an object (its one-shot prompt)."""
        return next(it for it in self._object_items(obj) if it.stem == REFERENCE_STEM)

    def queries(self, obj: str) -> list[PerSegItem]:
        """The query images of an object (all but the reference), in stem order."""
        return [it for it in self._object_items(obj) if it.stem != REFERENCE_STEM]

    def items(self) -> list[PerSegItem]:
        """Every query image: objects in name order, stems in order within an object."""
        return [it for obj in self._items for it in self.queries(obj)]

    def image(self, item: PerSegItem) -> np.ndarray:
        """The image as uint8 RGB [H, W, 3]."""
        try:
            with Image.open(item.image_path) as im:
                return np.asarray(im.convert("RGB"))
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
            raise _unreadable(item.image_path, exc) from exc

    def mask(self, item: PerSegItem) -> np.ndarray:
        """The object's mask as bool [H, W] (grayscale `> 0`), checked against the image size."""
        try:
            mask = read_mask(item.mask_path)
        except ValueError as exc:
            raise _unreadable(item.mask_path, exc.__cause__ or exc) from exc
        try:
            with Image.open(item.image_path) as im:
                size = (im.height, im.width)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
            raise _unreadable(item.image_path, exc) from exc
        if mask.shape != size:
            raise DatasetLayoutError(
                f"PerSeg: mask {item.mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{item.image_path} is {size[1]}x{size[0]}; each mask must have its image's size"
            )
        return mask
