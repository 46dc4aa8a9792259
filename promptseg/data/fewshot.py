"""Readers of the real on-disk layouts of the few-shot benchmarks.

`FewShotDataset` maps `promptseg.data.episodes` episodes to images and masks exactly as the
reference loaders read them; `FewShotInstanceDataset` gives COCO-NOVEL's TFA shots and test set.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from promptseg.data.episodes import Episode, episodes, lvis_fold_classes
from promptseg.data.splits import (
    SPLITS_CACHE_KEY,
    SplitFile,
    file_sha256,
    find_split,
    load_lvis_split,
    read_fss_split,
    split_file,
)
from promptseg.errors import DatasetLayoutError, WeightsNotFoundError
from promptseg.transforms import resize_mask

__all__ = [
    "COCO_CATEGORY_IDS",
    "COCO_CLASSES",
    "COCO_NOVEL_IDS",
    "DATA_ROOT_SPLITS",
    "FEWSHOT_DATASETS",
    "INSTANCE_DATASETS",
    "PASCAL_CLASSES",
    "VOC_CONVERTED_CLASSES",
    "FewShotDataset",
    "FewShotInstanceDataset",
    "FewShotSample",
    "ShotRecord",
    "resize_nearest",
    "segmentation_to_mask",
]

PathLike = str | os.PathLike[str]

FEWSHOT_DATASETS = ("pascal5i", "coco20i", "fss1000", "lvis92i")
INSTANCE_DATASETS = ("coco-novel", "coco2voc")

PASCAL_CLASSES = (
    "aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike "
    "person pottedplant sheep sofa train tvmonitor"
).split()
"""VOC classes, 0-based (label PNG value = index + 1)."""

COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]  # fmt: skip
"""COCO category names in ascending category-id order (= COCO-20i class index)."""

_COCO_MISSING_IDS = frozenset({12, 26, 29, 30, 45, 66, 68, 69, 71, 83})
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in _COCO_MISSING_IDS]
"""COCO category id of each COCO-20i class index."""

COCO_NOVEL_IDS = [1, 2, 3, 4, 5, 6, 7, 9, 16, 17, 18, 19, 20, 21, 44, 62, 63, 64, 67, 72]
"""TFA's 20 novel (VOC) classes as COCO category ids, in TFA's order."""

VOC_CONVERTED_CLASSES = (
    "person bicycle car motorbike aeroplane bus train boat bird cat dog horse sheep cow bottle "
    "chair sofa pottedplant diningtable tvmonitor"
).split()
"""Category ids 1..20 of SINE's ``val_converted.json``: VOC classes in COCO-novel order."""

_OBTAIN = {
    "pascal5i": "VOC2012 trainval tar (host.robots.ox.ac.uk, VOCtrainval_11-May-2012.tar) + "
    "SBD-augmented masks SegmentationClassAug (HSNet README Google-Drive link)",
    "coco20i": "COCO2014 train2014.zip, val2014.zip, annotations_trainval2014.zip "
    "(images.cocodataset.org) + per-image class masks from the HSNet Drive links (train2014.zip, "
    "val2014.zip, unzipped under COCO2014/annotations/); the masks cannot be derived from the "
    "COCO json without HSNet's script",
    "fss1000": "the FSS-1000 zip from the HSNet README Google-Drive link",
    "lvis92i": "COCO2017 train2017.zip/val2017.zip (images.cocodataset.org) under LVIS/coco/, "
    "and lvis_train.pkl/lvis_val.pkl from Matcher's Google-Drive lvis.zip (aim-uofa/Matcher "
    "datasets/README.md) under LVIS/",
    "coco-novel": "COCO2014 train2014.zip/val2014.zip (images.cocodataset.org) under coco/ "
    "(TFA: coco/trainval2014 = both merged, coco/val2014) and TFA's cocosplit (ucbdrive/"
    "few-shot-object-detection README, or the Drive link in aim-uofa/SINE inference_fsod/"
    "EVALUATION.md) under cocosplit/",
    "coco2voc": "SINE's voc-cocostyle.zip (aim-uofa/SINE inference_fsod/EVALUATION.md) under "
    "VOCOutput/, plus the COCO-NOVEL shots (coco/ and cocosplit/)",
}

_TITLES = {
    "pascal5i": "PASCAL-5i",
    "coco20i": "COCO-20i",
    "fss1000": "FSS-1000",
    "lvis92i": "LVIS-92i",
    "coco-novel": "COCO-NOVEL",
    "coco2voc": "COCO2VOC",
}

DATA_ROOT_SPLITS = "splits"
"""Folder of a data root holding split lists in hsnet's ``data/splits`` layout (`bench make-mini`
writes one); used when no ``splits_dir`` is given."""

# Split lists of the Matcher/SINE layout, relative to the data root ({f} = fold).
_MATCHER_SPLITS = {
    "pascal5i": "VOC2012/splits/val/fold{f}.txt",
    "coco20i": "COCO2014/splits/val/fold{f}.pkl",
    "fss1000": "FSS-1000/splits/test.txt",
}

_LABEL_MODES = ("L", "P")


@dataclass(frozen=True, eq=False)
class FewShotSample:
    """What an episode needs of one image: the RGB image and the masks of the episode class.

    Masks have the size of their label file, which is the image size in every real dataset (the
    reference loaders resize image and mask independently, so the readers do not enforce it).
    """

    image: np.ndarray  # uint8 [H, W, 3] RGB, original size
    mask: np.ndarray  # bool [H, W]: pixels of the episode class
    ignore: np.ndarray | None  # bool [H, W]: pixels not scored (PASCAL 255, query only) or None


class ShotRecord(NamedTuple):
    """One few-shot instance support: an image and ONE annotation of a novel class."""

    image_path: Path
    category_id: int
    mask: np.ndarray  # bool [H, W]


def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a mask / label map [H, W] to ``size`` = (h, w) like the protocols do:
    torch ``F.interpolate(mode="nearest")`` (source index = floor(dst * in / out)), which is not
    PIL NEAREST nor "nearest-exact". Values are copied, never converted (exact for every dtype)."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"expected a numpy array [H, W], got {type(array).__name__}")
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"expected a non-empty 2-D mask or label map, got shape {array.shape}")
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in size)
        or min(size) < 1
    ):
        raise ValueError(f"size must be (h, w), two ints >= 1, got {size!r}")
    # Resize the map of flat source indices (exact in float64), then gather the values.
    h, w = array.shape
    index = torch.arange(h * w, dtype=torch.int64).reshape(h, w)
    src = resize_mask(index, size, grid="floor").numpy()
    return array.reshape(-1)[src]


def segmentation_to_mask(segm: Any, height: int, width: int) -> np.ndarray:
    """Bool [H, W] of a COCO/LVIS segmentation: polygon list, RLE dict or 2-D array.

    Polygons go through pycocotools ``frPyObjects(polys, H, W)`` -> ``merge`` -> ``decode``
    (detectron2 ``polygons_to_bitmask``); uncompressed RLE (list counts) is compressed first.
    """
    from pycocotools import mask as mask_utils

    if isinstance(segm, list):
        if not segm:
            return np.zeros((height, width), dtype=bool)
        polys = [np.asarray(p, dtype=np.float64).ravel() for p in segm]
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if [int(s) for s in segm["size"]] != [height, width]:
            raise ValueError(f"RLE of size {segm['size']} for an image of size {[height, width]}")
        if isinstance(segm["counts"], list):
            rle = mask_utils.frPyObjects(segm, height, width)
        else:
            rle = segm
    elif isinstance(segm, np.ndarray) and segm.ndim == 2:
        if segm.shape != (height, width):
            raise ValueError(f"mask array of shape {segm.shape} for an image {(height, width)}")
        return segm != 0
    else:
        raise ValueError(f"unsupported segmentation of type {type(segm).__name__}")
    with warnings.catch_warnings():  # pycocotools 2.0.x under numpy 2: harmless copy= notice
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


# ----------------------------------------------------------------------------------- file access


def _layout_error(dataset: str, problems: Sequence[str], expected: Sequence[str]) -> str:
    """Message of a DatasetLayoutError: what is wrong, the expected layout, how to obtain it."""
    lines = [f"{_TITLES[dataset]} data is missing or malformed:"]
    lines += [f"  - {p}" for p in problems]
    if expected:
        lines.append("Expected (relative to the data root):")
        lines += [f"  {e}" for e in expected]
    lines.append(f"Obtain: {_OBTAIN[dataset]} (see benchmarks/README.md#datasets).")
    return "\n".join(lines)


def _read_rgb(path: Path, dataset: str, what: str) -> np.ndarray:
    """RGB uint8 [H, W, 3] exactly as the reference loaders read it (PIL ``convert('RGB')``)."""
    if not path.is_file():
        raise DatasetLayoutError(_layout_error(dataset, [f"{what} {path} not found"], []))
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DatasetLayoutError(
            _layout_error(dataset, [f"{what} {path} is not a readable image: {exc}"], [])
        ) from exc


def _read_label(path: Path, dataset: str, what: str, *, gray: bool = False) -> np.ndarray:
    """uint8 [H, W] of a single-channel PNG (``gray``: any mode, converted to 8-bit 'L')."""
    if not path.is_file():
        raise DatasetLayoutError(_layout_error(dataset, [f"{what} {path} not found"], []))
    try:
        with Image.open(path) as img:
            if gray:
                return np.asarray(img.convert("L"))
            if img.mode not in _LABEL_MODES:
                raise ValueError(f"mode {img.mode!r}, expected a single-channel 8-bit PNG (L or P)")
            return np.asarray(img)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise DatasetLayoutError(
            _layout_error(dataset, [f"{what} {path} is not a usable mask PNG: {exc}"], [])
        ) from exc


def _split_view(cache_dir: PathLike | None, data_root: Path, relpath: str, src: Path) -> Path:
    """An hsnet-layout folder whose ``relpath`` is the data root's Matcher/SINE split list.

    `promptseg.data.episodes` only reads hsnet's ``data/splits`` layout; this view (a symlink,
    else a copy, in the promptseg cache) lets it read the copy that ships with the data.
    """
    from promptseg.weights import cache_root

    key = hashlib.sha256(str(data_root.resolve()).encode("utf-8")).hexdigest()[:16]
    view = cache_root(cache_dir) / "fewshot-split-views" / key
    target = view / relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    try:
        target.symlink_to(src.resolve())
    except OSError:
        shutil.copyfile(src, target)
    return view


# ----------------------------------------------------------------------------------- semantic


class FewShotDataset:
    """One of pascal5i | coco20i | fss1000 | lvis92i, one fold, read from the real layout."""

    def __init__(
        self,
        dataset: str,
        data_root: PathLike,
        fold: int | str,
        *,
        shots: int = 1,
        splits_dir: PathLike | None = None,
        cache_dir: PathLike | None = None,
        trust_pickle: bool = False,
    ) -> None:
        if dataset not in FEWSHOT_DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {FEWSHOT_DATASETS}")
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
            raise ValueError(f"shots must be a positive int, got {shots!r}")
        self.name = dataset
        self.data_root = Path(data_root)
        self.shots = shots
        self.trust_pickle = trust_pickle
        self._cache_dir = cache_dir
        self._splits_dir: Path | None = None
        self._fold_arg: int | str
        self._lvis: dict[Any, dict[str, Any]] = {}
        self._lvis_classes: list[Any] = []
        self.split_path: Path
        """The split list the episodes are drawn from (LVIS: ``lvis_val.pkl``)."""

        n_folds = {"pascal5i": 4, "coco20i": 4, "fss1000": 1, "lvis92i": 10}[dataset]
        if dataset == "fss1000" and str(fold) in ("0", "test"):
            self.fold, self._fold_arg = 0, "test"
        else:
            try:
                self.fold = int(fold)
            except (TypeError, ValueError):
                self.fold = -1
            if not 0 <= self.fold < n_folds or str(self.fold) != str(fold).strip():
                valid = "0 or 'test'" if dataset == "fss1000" else f"0..{n_folds - 1}"
                raise ValueError(f"{dataset} fold must be {valid}, got {fold!r}")
            self._fold_arg = self.fold

        if dataset == "lvis92i":
            self._init_lvis()
        else:
            self._check_dirs()
            self.split_path = self._resolve_split(splits_dir)
            if dataset == "pascal5i":
                self.class_ids = list(range(5 * self.fold, 5 * self.fold + 5))
                self.class_names = {c: PASCAL_CLASSES[c] for c in self.class_ids}
            elif dataset == "coco20i":
                self.class_ids = [self.fold + 4 * v for v in range(20)]
                self.class_names = {c: COCO_CLASSES[c] for c in self.class_ids}
            else:
                cats = sorted(read_fss_split(self.split_path))
                self.class_ids = [760 + rank for rank in range(len(cats))]
                self.class_names = dict(zip(self.class_ids, cats, strict=True))
                self._check_fss_classes(cats)

    # ------------------------------------------------------------------ layout and split lists

    def _expected(self) -> list[str]:
        f = self.fold
        relpath = find_split(self.name, self._fold_arg).relpath
        split = f"split list: hsnet data/splits/{relpath} (default: fetched into the promptseg "
        split += f"cache; or splits_dir / --splits-dir), or {DATA_ROOT_SPLITS}/{relpath} (hsnet "
        split += f"layout, `bench make-mini`), or {_MATCHER_SPLITS[self.name].format(f=f)} "
        split += "(Matcher/SINE layout)"
        if self.name == "pascal5i":
            return [
                "VOC2012/JPEGImages/<name>.jpg",
                "VOC2012/SegmentationClassAug/<name>.png (single-channel: class + 1, 255 void)",
                split,
            ]
        if self.name == "coco20i":
            return [
                "COCO2014/val2014/COCO_val2014_<%012d>.jpg",
                "COCO2014/annotations/val2014/COCO_val2014_<%012d>.png (single-channel: "
                "class index + 1)",
                split,
            ]
        return [
            "FSS-1000/<class>/<n>.jpg and <n>.png, n = 1..10 (hsnet), or "
            "FSS-1000/data/<class>/... (Matcher/SINE)",
            split.replace("data/splits/fss/test.txt", "data/splits/fss/test.txt (CRLF)"),
        ]

    def _raise(self, problems: Sequence[str]) -> NoReturn:
        raise DatasetLayoutError(_layout_error(self.name, problems, self._expected()))

    def _check_dirs(self) -> None:
        root = self.data_root
        if self.name == "pascal5i":
            dirs = [root / "VOC2012" / "JPEGImages", root / "VOC2012" / "SegmentationClassAug"]
        elif self.name == "coco20i":
            dirs = [root / "COCO2014" / "val2014", root / "COCO2014" / "annotations" / "val2014"]
        else:
            dirs = [root / "FSS-1000"]
        missing = [f"directory {d} not found" for d in dirs if not d.is_dir()]
        if missing:
            self._raise(missing)

    @property
    def _fss_root(self) -> Path:
        """Class folders: ``FSS-1000/data`` in the Matcher/SINE layout, else ``FSS-1000``."""
        data = self.data_root / "FSS-1000" / "data"
        return data if data.is_dir() else self.data_root / "FSS-1000"

    def _check_fss_classes(self, cats: list[str]) -> None:
        missing = [c for c in cats if not (self._fss_root / c).is_dir()]
        if missing:
            shown = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" * (len(missing) > 5))
            self._raise([f"class folders missing under {self._fss_root}: {shown}"])

    def _resolve_split(self, splits_dir: PathLike | None) -> Path:
        """Split list path: ``splits_dir`` > a data-root copy identical to upstream's > the data
        root's ``splits/`` folder (hsnet layout, as `promptseg bench make-mini` writes it) > the
        cache (downloaded on first use) > a data-root copy in the Matcher/SINE layout.

        Sets ``self._splits_dir`` to the folder `promptseg.data.episodes` must be given.
        """
        entry = find_split(self.name, self._fold_arg)
        get = dict(cache_dir=self._cache_dir, trust_pickle=self.trust_pickle)
        if splits_dir is not None:
            self._splits_dir = Path(splits_dir)
            try:
                return split_file(self.name, self._fold_arg, splits_dir, **get)
            except FileNotFoundError:
                self._raise(
                    [
                        f"split list {Path(splits_dir) / entry.relpath} not found (splits_dir / "
                        "--splits-dir must be laid out like hsnet's data/splits; upstream file "
                        f"{entry.url})"
                    ]
                )
        local = self.data_root / _MATCHER_SPLITS[self.name].format(f=self.fold)
        if local.is_file() and file_sha256(local) == entry.sha256:
            self._splits_dir = _split_view(self._cache_dir, self.data_root, entry.relpath, local)
            return split_file(self.name, self._fold_arg, self._splits_dir, **get)
        own = self.data_root / DATA_ROOT_SPLITS
        if (own / entry.relpath).is_file():
            self._splits_dir = own
            return split_file(self.name, self._fold_arg, own, **get)
        try:
            return split_file(self.name, self._fold_arg, None, **get)
        except WeightsNotFoundError as exc:
            if not local.is_file():
                self._raise_no_split(entry, local, exc)
        # A copy that differs from upstream: warned about (text) or refused unless trusted (pkl).
        self._splits_dir = _split_view(self._cache_dir, self.data_root, entry.relpath, local)
        return split_file(self.name, self._fold_arg, self._splits_dir, **get)

    def _raise_no_split(self, entry: SplitFile, local: Path, exc: Exception) -> NoReturn:
        """No split list anywhere: say where it was looked for and the ways to provide it."""
        from promptseg.weights import cache_root

        reasons = [ln.strip() for ln in str(exc).splitlines() if "failed:" in ln]
        reason = reasons[0].removeprefix("failed:").strip() if reasons else "not available"
        own = self.data_root / DATA_ROOT_SPLITS / entry.relpath
        cached = cache_root(self._cache_dir) / SPLITS_CACHE_KEY / entry.relpath
        self._raise(
            [
                f"split list {entry.relpath} is not in the data root ({own} or {local}), not "
                f"cached, and could not be downloaded ({reason})",
                "fix: pass splits_dir=DIR (command line: --splits-dir DIR), DIR a folder laid out "
                f"like hsnet's data/splits holding DIR/{entry.relpath} (`promptseg bench "
                "make-mini --out D` writes its own to D/splits, used when the data root is D)",
                f"or download {entry.url} ({entry.size} bytes, sha256 {entry.sha256}) to {cached}",
            ]
        )

    def _init_lvis(self) -> None:
        pkl = self.data_root / "LVIS" / "lvis_val.pkl"
        images = self.data_root / "LVIS" / "coco"
        expected = [
            "LVIS/lvis_val.pkl (dict category_id -> {image path: {'annotations': [...]}})",
            "LVIS/coco/{train2017,val2017}/<%012d>.jpg (the pickle's image paths)",
            "optional: LVIS/lvis_v1_val.json (category names)",
        ]
        problems = [f"file {pkl} not found"] * (not pkl.is_file())
        problems += [f"directory {images} not found"] * (not images.is_dir())
        if problems:
            raise DatasetLayoutError(_layout_error("lvis92i", problems, expected))
        self._lvis, sha = load_lvis_split(
            self.data_root, trust_pickle=self.trust_pickle, cache_dir=self._cache_dir
        )
        self.split_path = pkl
        self.lvis_sha256 = sha
        self._lvis_classes = lvis_fold_classes(self._lvis, self.fold, self.shots)
        if not self._lvis_classes:
            raise DatasetLayoutError(
                _layout_error(
                    "lvis92i",
                    [f"{pkl} has fewer than 10 categories with more than {self.shots} images"],
                    expected,
                )
            )
        self.class_ids = list(range(len(self._lvis_classes)))

    @cached_property
    def class_names(self) -> dict[int, str]:
        """LVIS: category name from ``LVIS/lvis_v1_val.json`` if present, else the id as text."""
        names: dict[Any, str] = {}
        path = self.data_root / "LVIS" / "lvis_v1_val.json"
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                names = {c["id"]: c["name"] for c in json.load(f).get("categories", [])}
        return {i: names.get(c, str(c)) for i, c in enumerate(self._lvis_classes)}

    # ------------------------------------------------------------------ episodes and samples

    def episodes(self, shots: int, *, seed: int = 0, n: int | None = None) -> list[Episode]:
        """The reference episode stream of this fold (`promptseg.data.episodes.episodes`)."""
        if self.name == "lvis92i" and shots != self.shots:
            raise ValueError(
                f"LVIS-92i's fold classes depend on the shot count: this dataset was "
                f"built with shots={self.shots}; build FewShotDataset(..., shots={shots})"
            )
        return episodes(
            self.name,
            self._fold_arg,
            shots,
            seed=seed,
            n=n,
            splits_dir=self._splits_dir,
            data_root=self.data_root,
            cache_dir=self._cache_dir,
            trust_pickle=self.trust_pickle,
        )

    def image_path(self, image_id: str) -> Path:
        """Image file of an episode's query or support id."""
        if self.name == "pascal5i":
            return self.data_root / "VOC2012" / "JPEGImages" / f"{image_id}.jpg"
        if self.name == "coco20i":
            return self.data_root / "COCO2014" / image_id
        if self.name == "fss1000":
            return self._fss_root / image_id
        return self.data_root / "LVIS" / "coco" / image_id

    def _sample(self, image_id: str, class_id: int, *, query: bool) -> FewShotSample:
        image = _read_rgb(self.image_path(image_id), self.name, "image")
        ignore = None
        if self.name == "pascal5i":
            path = self.data_root / "VOC2012" / "SegmentationClassAug" / f"{image_id}.png"
            label = _read_label(path, self.name, "label map")
            mask = label == class_id + 1
            ignore = (label == 255) if query else None
        elif self.name == "coco20i":
            stem = image_id[: image_id.index(".jpg")] if ".jpg" in image_id else image_id
            path = self.data_root / "COCO2014" / "annotations" / f"{stem}.png"
            mask = _read_label(path, self.name, "class mask") == class_id + 1
        elif self.name == "fss1000":
            path = self._fss_root / f"{image_id.rsplit('.', 1)[0]}.png"
            mask = _read_label(path, self.name, "mask", gray=True) >= 128
        else:
            mask = self._lvis_mask(image_id, class_id, image.shape[:2])
        return FewShotSample(image=image, mask=mask, ignore=ignore)

    def _lvis_mask(self, image_id: str, class_id: int, hw: tuple[int, int]) -> np.ndarray:
        """Union of the image's annotations of the fold class."""
        entries = self._lvis[self._lvis_classes[class_id]]
        entry = entries.get(image_id)
        if entry is None:  # episode ids are str(key)
            entry = next((v for k, v in entries.items() if str(k) == image_id), None)
        if entry is None:
            raise KeyError(f"{image_id!r} is not an image of LVIS fold class {class_id}")
        mask = np.zeros(hw, dtype=bool)
        for ann in entry["annotations"]:
            try:
                mask |= segmentation_to_mask(ann["segmentation"], *hw)
            except (ValueError, KeyError, TypeError) as exc:
                raise DatasetLayoutError(
                    _layout_error(
                        "lvis92i",
                        [f"{self.split_path}: bad segmentation for {image_id} ({exc})"],
                        [],
                    )
                ) from exc
        return mask

    def query(self, ep: Episode) -> FewShotSample:
        """Query image and GT mask of the episode class (+ PASCAL's 255 boundary as ignore)."""
        return self._sample(ep.query, ep.class_id, query=True)

    def supports(self, ep: Episode) -> list[FewShotSample]:
        """Support images and masks (ignore None: PASCAL's boundary is background here)."""
        return [self._sample(s, ep.class_id, query=False) for s in ep.supports]


# ----------------------------------------------------------------------------------- instances


class FewShotInstanceDataset:
    """COCO-NOVEL (or COCO2VOC) few-shot instance segmentation, TFA shots."""

    def __init__(
        self,
        data_root: PathLike,
        shots: int,
        seed: int,
        *,
        dataset: str = "coco-novel",
    ) -> None:
        if dataset not in INSTANCE_DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {INSTANCE_DATASETS}")
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
            raise ValueError(f"shots must be a positive int, got {shots!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.name = dataset
        self.data_root = root = Path(data_root)
        self.shots = shots
        self.seed = seed
        self.novel_category_ids = list(COCO_NOVEL_IDS)
        self.novel_category_names = {
            i: COCO_CLASSES[COCO_CATEGORY_IDS.index(i)] for i in self.novel_category_ids
        }
        problems: list[str] = []

        # Shot files: seed S in cocosplit/seed{S}/; seed 0 in seed0/ (SINE) or at the top (TFA).
        split = root / "cocosplit"
        folders = [split / f"seed{seed}"] + [split] * (seed == 0)
        folder = next((d for d in folders if d.is_dir() and self._has_shots(d)), None)
        self.shot_files = [self._shot_file(folder or folders[-1], c) for c in COCO_NOVEL_IDS]
        missing = [p for p in self.shot_files if not p.is_file()]
        if missing:
            where = " or ".join(str(d) for d in folders)
            problems.append(
                f"{len(missing)} of 20 shot files for K={shots}, seed {seed} not found in {where}"
                f" (e.g. {missing[0].name})"
            )

        # Support images: TFA coco/trainval2014, else coco/{train,val}2014, else COCO2014/.
        self._shot_dirs = [root / "coco" / "trainval2014", root / "coco", root / "COCO2014"]
        if not any(d.is_dir() for d in self._shot_dirs):
            problems.append(f"no image folder {root / 'coco' / 'trainval2014'} or {root / 'coco'}")

        if dataset == "coco-novel":
            self.gt_json_path = split / "datasplit" / "5k.json"
            test_dirs = [root / "coco" / "val2014", root / "COCO2014" / "val2014"]
            self.test_category_ids = list(COCO_NOVEL_IDS)
        else:
            self.gt_json_path = root / "VOCOutput" / "annotations" / "val_converted.json"
            test_dirs = [root / "VOCOutput" / "val"]
            self.test_category_ids = list(range(1, 21))
        if not self.gt_json_path.is_file():
            problems.append(f"test annotations {self.gt_json_path} not found")
        self.test_image_dir = next((d for d in test_dirs if d.is_dir()), test_dirs[0])
        if not self.test_image_dir.is_dir():
            problems.append(f"test image folder {' or '.join(map(str, test_dirs))} not found")
        if problems:
            raise DatasetLayoutError(_layout_error(dataset, problems, self._expected()))

    def _expected(self) -> list[str]:
        out = [
            "cocosplit/full_box_{K}shot_{name}_trainval.json (seed 0, TFA) or "
            "cocosplit/seed{S}/full_box_{K}shot_{name}_trainval.json (name: TFA's spaced COCO "
            "names, e.g. 'dining table', 'potted plant', 'tv')",
            "coco/trainval2014/COCO_{train,val}2014_<%012d>.jpg (support images)",
        ]
        if self.name == "coco-novel":
            return [*out, "cocosplit/datasplit/5k.json", "coco/val2014/COCO_val2014_<%012d>.jpg"]
        return [*out, "VOCOutput/annotations/val_converted.json", "VOCOutput/val/<file_name>"]

    def _shot_file(self, folder: Path, category_id: int) -> Path:
        name = self.novel_category_names[category_id]
        return folder / f"full_box_{self.shots}shot_{name}_trainval.json"

    def _has_shots(self, folder: Path) -> bool:
        return self._shot_file(folder, COCO_NOVEL_IDS[0]).is_file()

    def _image_path(self, file_name: str) -> Path:
        """Support image: the first of TFA's, SINE's or HSNet's COCO folders that holds it."""
        sub = "val2014" if "val2014" in file_name else "train2014"
        candidates = [
            self._shot_dirs[0] / file_name,
            self._shot_dirs[1] / sub / file_name,
            self._shot_dirs[2] / sub / file_name,
        ]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise DatasetLayoutError(
                _layout_error(
                    self.name,
                    ["support image not found at " + " or ".join(map(str, candidates))],
                    self._expected(),
                )
            )
        return found

    def shot_records(self) -> list[ShotRecord]:
        """One record per annotation: classes in TFA order, images by id, annotations in file order.

        Raises DatasetLayoutError unless every class file holds exactly K annotations.
        """
        records: list[ShotRecord] = []
        for category_id, path in zip(self.novel_category_ids, self.shot_files, strict=True):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                images = {img["id"]: img for img in data["images"]}
                anns = data["annotations"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise DatasetLayoutError(
                    _layout_error(self.name, [f"{path} is not a COCO-format json: {exc}"], [])
                ) from exc
            if len(anns) != self.shots:
                raise DatasetLayoutError(
                    _layout_error(
                        self.name,
                        [f"{path} has {len(anns)} annotations, expected exactly K = {self.shots}"],
                        [],
                    )
                )
            by_image: dict[int, list[dict[str, Any]]] = {}
            for ann in anns:
                by_image.setdefault(ann["image_id"], []).append(ann)
            for image_id in sorted(by_image):
                img = images[image_id]
                path_img = self._image_path(img["file_name"])
                for ann in by_image[image_id]:
                    if ann["category_id"] != category_id:
                        raise DatasetLayoutError(
                            _layout_error(
                                self.name,
                                [
                                    f"{path}: annotation {ann.get('id')} has category "
                                    f"{ann['category_id']}, expected {category_id}"
                                ],
                                [],
                            )
                        )
                    mask = segmentation_to_mask(ann["segmentation"], img["height"], img["width"])
                    records.append(ShotRecord(path_img, category_id, mask))
        return records

    @cached_property
    def _test_images(self) -> dict[int, dict[str, Any]]:
        with open(self.gt_json_path, encoding="utf-8") as f:
            return {img["id"]: img for img in json.load(f)["images"]}

    def test_image_ids(self) -> list[int]:
        """Test image ids in ascending order (TFA's evaluation order)."""
        return sorted(self._test_images)

    def test_image_path(self, image_id: int) -> Path:
        """File of one test image."""
        return self.test_image_dir / self._test_images[image_id]["file_name"]
