"""Miniature few-shot datasets in exactly the real on-disk layouts.

Every image is a grey (`colors.BACKGROUND`) scene of 8-pixel-aligned rectangles painted
``colors.class_color(<class name>)`` and saved as JPEG (quality 100, no chroma subsampling), so
``|pixel - colour| <= 2`` recovers each class region exactly (JPEG moves flat 8x8 blocks by <= 1).

Deliberate quirks, each tested by the readers' tests:

- PASCAL-5i: the 255 "void" ring is the 1-pixel border *inside* each painted rectangle, so ring
  pixels are 255 in the label map while the image shows the object colour there; query GT +
  ignore = the painted rectangle, support mask = the rectangle without its border.
- FSS-1000: masks are 0/255 plus a few 128 pixels inside the object and 127 pixels outside it.
- LVIS-92i: polygon, compressed-RLE (str and bytes counts), 2-D array and multi-annotation
  segmentations; one category has exactly 5 images and one exactly 1 (dropped by ``> shots``).
- COCO-NOVEL: each shot file holds exactly K annotations (one image holds two of them); seed 0
  at TFA's top level, seed 1 in ``seed1/``; ``5k.json`` lists images in descending id order and
  has a crowd (uncompressed RLE) annotation. COCO2VOC test images paint each object with the
  colour of the corresponding COCO-novel class name (what its supports show), not the VOC name.

Split lists are written in hsnet's ``data/splits`` layout under ``root/splits`` (pass it as
``splits_dir``; they differ from upstream, so text lists warn and the COCO pickles need
``trust_pickle=True``), and with ``layout="matcher"`` also where Matcher/SINE keep them.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from promptseg.data.fewshot import (
    COCO_CATEGORY_IDS,
    COCO_CLASSES,
    COCO_NOVEL_IDS,
    PASCAL_CLASSES,
    VOC_CONVERTED_CLASSES,
)
from promptseg.testing.colors import BACKGROUND, class_color

__all__ = [
    "FSS_CLASSES",
    "LVIS_CATEGORIES",
    "MINI_FEWSHOT_DATASETS",
    "make_mini_fewshot",
]

MINI_FEWSHOT_DATASETS = ("pascal5i", "coco20i", "fss1000", "lvis92i", "coco-novel")

FSS_CLASSES = ("zucchini", "abe's_flyingfish", "afghan_hound", "ab_wheel")
"""test.txt order (not sorted: the reader sorts by code point)."""

LVIS_CATEGORIES: tuple[tuple[int, str, int], ...] = (
    (1, "aerosol_can", 6),
    (2, "air_conditioner", 6),
    (3, "airplane", 5),  # exactly 5 images: a fold class at 1-shot, dropped at 5-shot
    (4, "alarm_clock", 6),
    (5, "alcohol", 6),
    (6, "alligator", 1),  # exactly 1 image: dropped at 1-shot and 5-shot
    (7, "almond", 6),
    (8, "ambulance", 6),
    (9, "amplifier", 6),
    (10, "anklet", 6),
    (11, "antenna", 6),
    (12, "apple", 6),
)
"""(category id, name, number of val images), in the pickle's dict order."""

Rect = tuple[int, int, int, int]  # y0, y1, x0, x1 (multiples of 8)


# ----------------------------------------------------------------------------------- drawing


def _check_palette(names: Iterable[str]) -> None:
    """Every painted class needs a colour unique within its dataset (and not the background)."""
    colors = [class_color(n) for n in names]
    if len(set(colors)) != len(colors) or BACKGROUND in colors:
        raise AssertionError("mini dataset vocabulary has colliding class colours")


def _rects(rng: np.random.Generator, h: int, w: int, n: int, per_col: int = 1) -> list[Rect]:
    """``n`` columns x ``per_col`` rows of random 8-aligned rectangles, >= 16 px a side."""
    cw, rh = (w // n) // 8, (h // per_col) // 8
    out = []
    for col in range(n):
        for row in range(per_col):
            a0 = int(rng.integers(0, cw - 1))
            a1 = int(rng.integers(a0 + 2, cw + 1))
            b0 = int(rng.integers(0, rh - 1))
            b1 = int(rng.integers(b0 + 2, rh + 1))
            y, x = row * rh, col * cw
            out.append((8 * (y + b0), 8 * (y + b1), 8 * (x + a0), 8 * (x + a1)))
    return out


def _paint(h: int, w: int, objects: Sequence[tuple[Rect, str]]) -> np.ndarray:
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for (y0, y1, x0, x1), name in objects:
        img[y0:y1, x0:x1] = class_color(name)
    return img


def _jpeg(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, "JPEG", quality=100, subsampling=0)


def _png(path: Path, label: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8), mode="L").save(path)


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)


def _polygon(rect: Rect) -> list[float]:
    """COCO polygon of a rectangle; pycocotools rasterises it to exactly its pixels."""
    y0, y1, x0, x1 = rect
    return [float(v) for v in (x0, y0, x1, y0, x1, y1, x0, y1)]


def _rect_mask(h: int, w: int, rects: Iterable[Rect]) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    for y0, y1, x0, x1 in rects:
        m[y0:y1, x0:x1] = 1
    return m


def _rle(mask: np.ndarray, *, as_str: bool) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    counts = rle["counts"]
    return {"size": [int(s) for s in rle["size"]], "counts": counts.decode() if as_str else counts}


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO crowd-style RLE: column-major run lengths starting with a background run."""
    flat = mask.astype(np.uint8).ravel(order="F")
    edges = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        runs = [0, *runs]
    return {"size": list(mask.shape), "counts": runs}


def _bbox(rects: Sequence[Rect]) -> list[float]:
    y0 = min(r[0] for r in rects)
    y1 = max(r[1] for r in rects)
    x0 = min(r[2] for r in rects)
    x1 = max(r[3] for r in rects)
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def _area(rects: Sequence[Rect]) -> float:
    return float(sum((r[1] - r[0]) * (r[3] - r[2]) for r in rects))


# ----------------------------------------------------------------------------------- datasets


def _pascal(root: Path, rng: np.random.Generator, split_dirs: list[Path]) -> Path:
    """40 images, every class the main object of 2; some hold a 2nd rectangle or another class."""
    _check_palette(PASCAL_CLASSES)
    voc = root / "VOC2012"
    lines: list[list[str]] = [[] for _ in range(4)]
    for k in range(40):
        classes = [k % 20] * (2 if k % 4 == 1 else 1)
        extra = (7 * k + 3) % 20
        if k % 3 == 0 and extra != k % 20:
            classes.append(extra)
        h, w = (64, 96) if k % 2 == 0 else (80, 96)
        rects = _rects(rng, h, w, len(classes))
        name = f"{2007 + k % 6}_{1000 + 37 * k:06d}"
        objects = [(r, PASCAL_CLASSES[c]) for r, c in zip(rects, classes, strict=True)]
        _jpeg(voc / "JPEGImages" / f"{name}.jpg", _paint(h, w, objects))
        label = np.zeros((h, w), dtype=np.uint8)
        for (y0, y1, x0, x1), c in zip(rects, classes, strict=True):
            label[y0:y1, x0:x1] = 255
            label[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1] = c + 1
        _png(voc / "SegmentationClassAug" / f"{name}.png", label)
        for c in sorted(set(classes)):
            lines[c // 5].append(f"{name}__{c + 1:02d}")
    for f, fold_lines in enumerate(lines):
        text = "".join(f"{line}\n" for line in sorted(fold_lines))
        for folder in split_dirs:
            _write(folder / f"fold{f}.txt", text)
    return voc


def _coco20i(root: Path, rng: np.random.Generator, split_dirs: list[Path]) -> Path:
    """54 images of 3 classes each: every COCO class in 2-3 images; 80-key pickles per fold."""
    _check_palette(COCO_CLASSES)
    coco = root / "COCO2014"
    holders: dict[int, list[str]] = {c: [] for c in range(80)}
    for k in range(54):
        classes = [(3 * k + j) % 80 for j in range(3)]
        rects = _rects(rng, 64, 96, 3)
        stem = f"COCO_val2014_{100000 + 977 * k:012d}"
        objects = [(r, COCO_CLASSES[c]) for r, c in zip(rects, classes, strict=True)]
        _jpeg(coco / "val2014" / f"{stem}.jpg", _paint(64, 96, objects))
        label = np.zeros((64, 96), dtype=np.uint8)
        for (y0, y1, x0, x1), c in zip(rects, classes, strict=True):
            label[y0:y1, x0:x1] = c + 1
        _png(coco / "annotations" / "val2014" / f"{stem}.png", label)
        for c in classes:
            holders[c].append(f"val2014/{stem}.jpg")
    for f in range(4):
        lists: dict[int, list[str]] = {c: [] for c in range(80)}
        for c in range(f, 80, 4):
            lists[c] = [holders[c][i] for i in rng.permutation(len(holders[c]))]
        blob = pickle.dumps(lists, protocol=4)
        for folder in split_dirs:
            _write(folder / f"fold{f}.pkl", blob)
    return coco


def _fss(root: Path, rng: np.random.Generator, split_files: list[Path], matcher: bool) -> Path:
    """4 classes x 10 images; masks 0/255 with 128 pixels inside and 127 outside the object."""
    _check_palette(FSS_CLASSES)
    fss = root / "FSS-1000"
    classes_dir = fss / "data" if matcher else fss
    for name in FSS_CLASSES:
        for n in range(1, 11):
            (rect,) = _rects(rng, 48, 48, 1)
            rect = (rect[0] + 8, rect[1] + 8, rect[2] + 8, rect[3] + 8)  # 8-px grey margin
            _jpeg(classes_dir / name / f"{n}.jpg", _paint(64, 64, [(rect, name)]))
            y0, y1, x0, x1 = rect
            mask = np.zeros((64, 64), dtype=np.uint8)
            mask[y0:y1, x0:x1] = 255
            mask[[y0, y1 - 1, y0 + 1], [x0, x1 - 1, x1 - 2]] = 128  # foreground (>= 128)
            mask[[0, 0, 63], [0, 1, 63]] = 127  # background (< 128)
            _png(classes_dir / name / f"{n}.png", mask)
    text = "".join(f"{name}\r\n" for name in FSS_CLASSES)
    for path in split_files:
        _write(path, text)
    return fss


def _lvis(root: Path, rng: np.random.Generator) -> Path:
    """33 images holding 2 categories each; segmentations cycle through every encoding."""
    _check_palette(name for _, name, _ in LVIS_CATEGORIES)
    lvis = root / "LVIS"
    slots = [cid for cid, _, count in LVIS_CATEGORIES for _ in range(count)]
    half = len(slots) // 2
    names = {cid: name for cid, name, _ in LVIS_CATEGORIES}
    val: dict[int, dict[str, Any]] = {cid: {} for cid, _, _ in LVIS_CATEGORIES}
    ann_id = 0
    for i in range(half):
        cats = (slots[i], slots[i + half])
        h, w = (64, 96) if i % 2 == 0 else (80, 96)
        image_id = 500000 + 313 * i
        key = f"{'train2017' if i % 4 == 3 else 'val2017'}/{image_id:012d}.jpg"
        objects: list[tuple[Rect, str]] = []
        for col, cid in enumerate(cats):
            kind = (i + col) % 4
            two = kind == 3 or (kind == 0 and i % 8 == 4)
            rects = _rects(rng, h, 48, 1, per_col=2 if two else 1)
            rects = [(y0, y1, x0 + 48 * col, x1 + 48 * col) for y0, y1, x0, x1 in rects]
            objects += [(r, names[cid]) for r in rects]
            if kind == 0:  # one annotation, one polygon per rectangle
                segms: list[Any] = [[_polygon(r) for r in rects]]
            elif kind == 1:
                segms = [_rle(_rect_mask(h, w, rects), as_str=True)]
            elif kind == 2:
                segms = [_rect_mask(h, w, rects)]
            else:  # two annotations: a polygon and a bytes-counts RLE
                segms = [[_polygon(rects[0])], _rle(_rect_mask(h, w, rects[1:]), as_str=False)]
            anns = []
            for segm in segms:
                ann_id += 1
                anns.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": cid,
                        "bbox": _bbox(rects),
                        "area": _area(rects),
                        "segmentation": segm,
                    }
                )
            val[cid][key] = {"annotations": anns}
        _jpeg(lvis / "coco" / key, _paint(h, w, objects))
    _write(lvis / "lvis_val.pkl", pickle.dumps(val, protocol=4))
    train = {cid: dict(list(val[cid].items())[:1]) for cid, _, _ in LVIS_CATEGORIES[:3]}
    _write(lvis / "lvis_train.pkl", pickle.dumps(train, protocol=4))
    cats = [{"id": cid, "name": name} for cid, name, _ in LVIS_CATEGORIES]
    _write(
        lvis / "lvis_v1_val.json", json.dumps({"categories": cats, "images": [], "annotations": []})
    )
    return lvis


def _coco_novel(root: Path, rng: np.random.Generator) -> Path:
    """60 support-pool images, 8 test images, TFA shot files for K in {1, 5}, seeds 0 and 1."""
    _check_palette(COCO_CLASSES)
    name_of = dict(zip(COCO_CATEGORY_IDS, COCO_CLASSES, strict=True))
    categories = [{"id": i, "name": n, "supercategory": "mini"} for i, n in name_of.items()]
    base = [i for i in COCO_CATEGORY_IDS if i not in COCO_NOVEL_IDS]
    next_ann = [0]

    def annotate(image: dict[str, Any], cid: int, rects: list[Rect], how: str) -> dict[str, Any]:
        next_ann[0] += 1
        h, w = image["height"], image["width"]
        if how == "polygon":
            segm: Any = [_polygon(r) for r in rects]
        elif how == "crowd":
            segm = _uncompressed_rle(_rect_mask(h, w, rects).astype(bool))
        else:
            segm = _rle(_rect_mask(h, w, rects), as_str=True)
        return {
            "id": next_ann[0],
            "image_id": image["id"],
            "category_id": cid,
            "segmentation": segm,
            "area": _area(rects),
            "bbox": _bbox(rects),
            "iscrowd": int(how == "crowd"),
        }

    def scene(folder: Path, image: dict[str, Any], objs: list[tuple[int, int, str]], paint_as=None):
        """objs: (category id, rectangles in its column, encoding); returns the annotations."""
        h, w = image["height"], image["width"]
        rects_all = _rects(rng, h, w, len(objs), per_col=2)
        anns, painted = [], []
        for col, (cid, n_rects, how) in enumerate(objs):
            rects = rects_all[2 * col : 2 * col + n_rects]
            painted += [(r, paint_as(cid) if paint_as else name_of[cid]) for r in rects]
            if how == "two":  # two annotations of the same class
                anns += [annotate(image, cid, [r], "polygon") for r in rects]
            else:
                anns.append(annotate(image, cid, rects, how))
        _jpeg(folder / image["file_name"], _paint(h, w, painted))
        return anns

    # Support pool (trainvalno5k): image j holds novel A = j % 20 (two annotations when
    # 20 <= j < 40) and novel B = (j + 7) % 20, plus a base-class object every 5th image.
    pool_imgs, pool_anns = [], []
    for j in range(60):
        prefix = "COCO_val2014" if j % 10 == 9 else "COCO_train2014"
        image = {
            "id": 200000 + 131 * j,
            "file_name": f"{prefix}_{200000 + 131 * j:012d}.jpg",
            "height": 64,
            "width": 96,
        }
        how_a = "two" if 20 <= j < 40 else ("rle" if j % 7 == 3 else "polygon")
        objs = [
            (COCO_NOVEL_IDS[j % 20], 2 if how_a == "two" else 1, how_a),
            (COCO_NOVEL_IDS[(j + 7) % 20], 1, "polygon"),
        ]
        if j % 5 == 0:
            objs.append((base[j % len(base)], 1, "polygon"))
        pool_imgs.append(image)
        pool_anns += scene(root / "coco" / "trainval2014", image, objs)
    split = root / "cocosplit"
    coco_json = {"info": {}, "licenses": [], "categories": categories}
    _write(
        split / "datasplit" / "trainvalno5k.json",
        json.dumps({**coco_json, "images": pool_imgs, "annotations": pool_anns}),
    )

    for seed in (0, 1):
        folder = split if seed == 0 else split / f"seed{seed}"
        for shots in (1, 5):
            for cid in COCO_NOVEL_IDS:
                holders = [
                    img
                    for img in pool_imgs
                    if any(
                        a["image_id"] == img["id"] and a["category_id"] == cid for a in pool_anns
                    )
                ]
                order = np.random.default_rng([seed, shots, cid]).permutation(len(holders))
                chosen, anns = [], []
                for idx in order:  # whole images while the annotation count stays <= K
                    img = holders[idx]
                    mine = [
                        a
                        for a in pool_anns
                        if a["image_id"] == img["id"] and a["category_id"] == cid
                    ]
                    if len(anns) + len(mine) <= shots:
                        chosen.append(img)
                        anns += mine
                    if len(anns) == shots:
                        break
                path = folder / f"full_box_{shots}shot_{name_of[cid]}_trainval.json"
                _write(path, json.dumps({**coco_json, "images": chosen, "annotations": anns}))

    # Test set: 8 val2014 images (listed in descending id order), one crowd annotation.
    test_imgs, test_anns = [], []
    for t in range(8):
        image = {
            "id": 300000 + 17 * t,
            "file_name": f"COCO_val2014_{300000 + 17 * t:012d}.jpg",
            "height": 64 if t % 2 else 80,
            "width": 96,
        }
        objs = [
            (COCO_NOVEL_IDS[(3 * t) % 20], 1, "crowd" if t == 5 else "polygon"),
            (base[t], 1, "polygon"),
            (COCO_NOVEL_IDS[(3 * t + 1) % 20], 1, "polygon"),
        ]
        test_imgs.insert(0, image)
        test_anns += scene(root / "coco" / "val2014", image, objs)
    _write(
        split / "datasplit" / "5k.json",
        json.dumps({**coco_json, "images": test_imgs, "annotations": test_anns}),
    )

    # COCO2VOC test set: VOC-named categories 1..20 in COCO-novel order.
    voc_name = {cid: name_of[cid] for cid in COCO_NOVEL_IDS}
    voc_cats = [
        {"id": i + 1, "name": n, "supercategory": "voc"}
        for i, n in enumerate(VOC_CONVERTED_CLASSES)
    ]
    voc_imgs, voc_anns = [], []
    for t in range(4):
        image = {
            "id": t + 1,
            "file_name": f"2008_{4000 + 7 * t:06d}.jpg",
            "height": 64,
            "width": 96,
        }
        objs = [(i + 1, 1, "polygon") for i in (t, t + 10)]
        voc_imgs.append(image)
        voc_anns += scene(
            root / "VOCOutput" / "val",
            image,
            objs,
            paint_as=lambda vid: voc_name[COCO_NOVEL_IDS[vid - 1]],
        )
    _write(
        root / "VOCOutput" / "annotations" / "val_converted.json",
        json.dumps(
            {
                "info": {},
                "licenses": [],
                "categories": voc_cats,
                "images": voc_imgs,
                "annotations": voc_anns,
            }
        ),
    )
    return split


def make_mini_fewshot(
    root: str | Path,
    datasets: Sequence[str] = MINI_FEWSHOT_DATASETS,
    seed: int = 0,
    *,
    layout: str = "hsnet",
) -> dict[str, Path]:
    """Write miniature datasets under ``root`` (the data root) and their split lists.

    Returns each written dataset's top folder, plus ``"splits"`` = ``root/splits`` (hsnet's
    ``data/splits`` layout, pass it as ``splits_dir``). ``layout="matcher"`` puts FSS-1000 under
    ``FSS-1000/data/`` and also writes the split lists where Matcher/SINE read them.
    "coco-novel" (alias "coco2voc") writes ``coco/``, ``cocosplit/`` and ``VOCOutput/``.
    """
    if layout not in ("hsnet", "matcher"):
        raise ValueError(f"layout must be 'hsnet' or 'matcher', got {layout!r}")
    wanted = {"coco-novel" if d == "coco2voc" else d for d in datasets}
    unknown = wanted - set(MINI_FEWSHOT_DATASETS)
    if unknown:
        raise ValueError(f"unknown datasets {sorted(unknown)}; choose from {MINI_FEWSHOT_DATASETS}")
    root = Path(root)
    splits = root / "splits"
    matcher = layout == "matcher"
    out: dict[str, Path] = {"splits": splits}
    for i, name in enumerate(MINI_FEWSHOT_DATASETS):
        if name not in wanted:
            continue
        rng = np.random.default_rng([seed, i])
        if name == "pascal5i":
            dirs = [splits / "pascal" / "val"] + [root / "VOC2012" / "splits" / "val"] * matcher
            out[name] = _pascal(root, rng, dirs)
        elif name == "coco20i":
            dirs = [splits / "coco" / "val"] + [root / "COCO2014" / "splits" / "val"] * matcher
            out[name] = _coco20i(root, rng, dirs)
        elif name == "fss1000":
            files = [splits / "fss" / "test.txt"]
            files += [root / "FSS-1000" / "splits" / "test.txt"] * matcher
            out[name] = _fss(root, rng, files, matcher)
        elif name == "lvis92i":
            out[name] = _lvis(root, rng)
        else:
            out[name] = _coco_novel(root, rng)
    return out
