"""Miniature dense datasets in the real datasets' exact on-disk layouts (benchmarks/README.md).

Flat-colour JPEG scenes (grey `BACKGROUND`, 8-pixel-aligned rectangles painted `class_color` of
the class name the matching reader reports), so a colour test model scores 100 and the readers,
metrics and CLI run end to end in CI without real data. Only classes whose colour is at least 16
levels (per channel) from every other name of the dataset's vocabulary are painted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from promptseg.data.dense import SEMSEG_NUM_CLASSES
from promptseg.imageio import davis_palette
from promptseg.metrics.panoptic import id2rgb
from promptseg.testing.colors import BACKGROUND, class_color

__all__ = [
    "ADE_CATEGORIES",
    "COCO_CATEGORIES",
    "DENSE_DATASETS",
    "MIN_COLOR_DISTANCE",
    "make_mini_dense",
    "separable",
]

DENSE_DATASETS = (
    "davis",
    "coco-panoptic",
    "ade150",
    "ade847",
    "pc59",
    "pc459",
    "pas21",
    "phrasecut",
)
MIN_COLOR_DISTANCE = 16  # JPEG (+-2) and ColorKey's tolerance (6) never confuse such colours

# a handful of real entries of panopticapi panoptic_coco_categories.json (panoptic_val2017.json
# carries the same categories without 'color')
COCO_CATEGORIES: list[dict[str, Any]] = [
    {"supercategory": "person", "isthing": 1, "id": 1, "name": "person"},
    {"supercategory": "vehicle", "isthing": 1, "id": 3, "name": "car"},
    {"supercategory": "animal", "isthing": 1, "id": 18, "name": "dog"},
    {"supercategory": "sky", "isthing": 0, "id": 187, "name": "sky-other-merged"},
    {"supercategory": "plant", "isthing": 0, "id": 193, "name": "grass-merged"},
    {"supercategory": "wall", "isthing": 0, "id": 199, "name": "wall-other-merged"},
]
# real entries of the ADE20K-150 panoptic categories (ids 0..149; 0 'wall' is a real category,
# listed but not painted: its colour is within 8 levels of another name of the mini vocabulary)
ADE_CATEGORIES: list[dict[str, Any]] = [
    {"name": "wall", "id": 0, "isthing": 0, "color": [120, 120, 120]},
    {"name": "building", "id": 1, "isthing": 0, "color": [180, 120, 120]},
    {"name": "sky", "id": 2, "isthing": 0, "color": [6, 230, 230]},
    {"name": "person", "id": 12, "isthing": 1, "color": [150, 5, 61]},
    {"name": "car", "id": 20, "isthing": 1, "color": [0, 102, 200]},
]

Box = tuple[int, int, int, int]  # rows y0:y1, cols x0:x1 (multiples of 8)


# ------------------------------------------------------------------------------------------------
# helpers


def separable(names: Iterable[str], vocabulary: Sequence[str]) -> list[str]:
    """Names whose class colour is >= MIN_COLOR_DISTANCE (max over channels) from the colour of
    every other vocabulary name, i.e. safe to paint."""
    vocab = list(dict.fromkeys(vocabulary))
    colors = np.array([class_color(n) for n in vocab], dtype=np.int64)
    out = []
    for n in names:
        others = colors[[v != n for v in vocab]]
        c = np.array(class_color(n), dtype=np.int64)
        if others.size == 0 or np.abs(others - c).max(axis=1).min() >= MIN_COLOR_DISTANCE:
            out.append(n)
    return out


def _check_separable(names: Sequence[str], vocabulary: Sequence[str], what: str) -> None:
    bad = sorted(set(names) - set(separable(names, vocabulary)))
    if bad:
        raise RuntimeError(f"mini {what}: colours of {bad} are not separable in its vocabulary")


def _pick_ids(names: Sequence[str], n: int, start: int = 0) -> list[int]:
    """First n class ids >= start whose id-string name is separable in `names`."""
    ok = set(separable(names[start:], names))
    picked = [k for k in range(start, len(names)) if names[k] in ok][:n]
    if len(picked) < n:
        raise RuntimeError(f"only {len(picked)} separable classes from id {start}")
    return picked


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _save_jpeg(path: Path, rgb: np.ndarray) -> None:
    """JPEG with quality 100 and no chroma subsampling: flat 8x8 blocks keep their colour."""
    Image.fromarray(rgb).save(_mkparent(path), quality=100, subsampling=0)


def _save_png(path: Path, array: np.ndarray, palette: list[int] | None = None) -> None:
    im = Image.fromarray(array)
    if palette is not None:
        im = im.convert("P") if im.mode != "P" else im
        im.putpalette(palette)
    im.save(_mkparent(path))


def _write_json(path: Path, data: Any) -> None:
    _mkparent(path).write_text(json.dumps(data), encoding="utf-8")


def _canvas(h: int, w: int) -> np.ndarray:
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    return img


def _bbox(mask: np.ndarray) -> list[int]:
    """COCO [x, y, w, h] of a non-empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def _ring(h: int, w: int, box: Box) -> np.ndarray:
    """1-pixel ring just outside a box (clipped to the image)."""
    y0, y1, x0, x1 = box
    m = np.zeros((h, w), dtype=bool)
    m[max(y0 - 1, 0) : y1 + 1, max(x0 - 1, 0) : x1 + 1] = True
    m[y0:y1, x0:x1] = False
    return m


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE (column-major run lengths, starting with a zero run)."""
    flat = mask.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0, *counts]
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


# ------------------------------------------------------------------------------------------------
# DAVIS


_DAVIS_SEQS: dict[str, dict[str, Any]] = {
    # per object: frame-0 box, per-frame column shift, frames where it is present
    "bmx-trees": {
        "size": (64, 112),
        "objects": {1: ((16, 32, 8, 24), 8, range(6)), 2: ((40, 56, 80, 96), 0, range(6))},
        "void_around": 1,
    },
    "dogs-jump": {
        "size": (64, 128),
        "objects": {
            1: ((8, 24, 8, 24), 8, range(6)),
            2: ((32, 48, 48, 64), 0, range(6)),
            3: ((40, 56, 96, 112), 0, range(4)),  # leaves the scene after frame 3
        },
        "void_around": 2,
    },
}
_DAVIS_2016 = ("bmx-trees",)


def _write_davis(root: Path, rng: np.random.Generator) -> Path:
    """DAVIS/ with 2 sequences x 6 frames, palette PNGs (void ring 255), 2016 + 2017 lists."""
    davis = root / "DAVIS"
    names = [f"{s}/{k}" for s, spec in _DAVIS_SEQS.items() for k in spec["objects"]]
    _check_separable(names, names, "DAVIS")
    palette = davis_palette()
    for seq, spec in _DAVIS_SEQS.items():
        h, w = spec["size"]
        for t in range(6):
            img = _canvas(h, w)
            lab = np.zeros((h, w), dtype=np.uint8)
            for k, ((y0, y1, x0, x1), dx, present) in spec["objects"].items():
                if t not in present:
                    continue
                box = (y0, y1, x0 + dx * t, x1 + dx * t)
                img[box[0] : box[1], box[2] : box[3]] = class_color(f"{seq}/{k}")
                lab[box[0] : box[1], box[2] : box[3]] = k
                if k == spec["void_around"]:
                    lab[_ring(h, w, box)] = 255
            _save_jpeg(davis / "JPEGImages" / "480p" / seq / f"{t:05d}.jpg", img)
            _save_png(davis / "Annotations" / "480p" / seq / f"{t:05d}.png", lab, palette)
    sets = davis / "ImageSets"
    _mkparent(sets / "2017" / "val.txt").write_text("".join(f"{s}\n" for s in _DAVIS_SEQS))
    _mkparent(sets / "2016" / "val.txt").write_text("".join(f"{s}\n" for s in _DAVIS_2016))
    return davis


# ------------------------------------------------------------------------------------------------
# Panoptic: COCO panoptic val2017 and ADE20K-150

# segment: (category name, box or None for "the rest", iscrowd)
_Seg = tuple[str, Box | None, int]

_COCO_SCENES: dict[int, dict[str, Any]] = {
    139: {
        "size": (64, 96),
        "segments": [
            ("sky-other-merged", (0, 24, 0, 96), 0),
            ("grass-merged", (24, 64, 0, 96), 0),
            ("person", (8, 24, 80, 88), 0),
            ("car", (32, 48, 8, 32), 0),  # two separated instances of 'car'
            ("car", (32, 48, 48, 72), 0),
        ],
        "void": [(48, 64, 80, 96)],
    },
    285: {
        "size": (72, 96),
        "segments": [
            ("wall-other-merged", None, 0),
            ("person", (8, 32, 8, 48), 1),  # crowd
            ("person", (40, 64, 8, 24), 0),
            ("dog", (40, 64, 40, 72), 0),
        ],
        "void": [(8, 24, 72, 88)],
    },
}

_ADE_SCENES: dict[str, dict[str, Any]] = {
    "ADE_val_00000001": {
        "size": (64, 96),
        "segments": [
            ("sky", (0, 24, 0, 96), 0),
            ("building", (24, 64, 0, 96), 0),
            ("car", (32, 48, 16, 40), 0),  # pasted over building: its JSON area keeps these pixels
            ("person", (8, 24, 48, 56), 0),  # two separated instances of 'person'
            ("person", (8, 24, 72, 80), 0),
        ],
        "void": [(48, 64, 80, 96)],
        "overcount": {"building": "car"},
    },
    "ADE_val_00000002": {
        "size": (64, 80),
        "segments": [
            ("building", None, 0),
            ("person", (16, 48, 16, 32), 0),
            ("car", (24, 48, 48, 72), 0),
        ],
        "void": [(0, 8, 0, 16)],
    },
}


def _render(
    size: tuple[int, int], segments: Sequence[_Seg], void: Sequence[Box], ids: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str, int, np.ndarray]]]:
    """Image, segment-id map and [(id, name, iscrowd, final mask)] of a scene painted in order
    (later segments over earlier ones, VOID boxes last)."""
    h, w = size
    img, seg = _canvas(h, w), np.zeros((h, w), dtype=np.int64)
    for (name, box, _), sid in zip(segments, ids, strict=True):
        y0, y1, x0, x1 = box if box is not None else (0, h, 0, w)
        img[y0:y1, x0:x1], seg[y0:y1, x0:x1] = class_color(name), sid
    for y0, y1, x0, x1 in void:
        img[y0:y1, x0:x1], seg[y0:y1, x0:x1] = BACKGROUND, 0
    segs = [
        (sid, name, crowd, seg == sid) for (name, _, crowd), sid in zip(segments, ids, strict=True)
    ]
    return img, seg, [s for s in segs if s[3].any()]


def _segment_ids(rng: np.random.Generator, n: int) -> list[int]:
    """n distinct non-zero 24-bit segment ids (all three RGB channels in use)."""
    return (rng.choice(2**24 - 2**16, size=n, replace=False) + 2**16).tolist()


def _write_coco_panoptic(root: Path, rng: np.random.Generator) -> Path:
    """coco/ with val2017, panoptic_val2017(+json), panoptic_semseg_val2017, instances_val2017."""
    coco = root / "coco"
    names = [c["name"] for c in COCO_CATEGORIES]
    _check_separable(names, names, "coco-panoptic")
    cat = {c["name"]: c for c in COCO_CATEGORIES}
    sem_index = {c["id"]: i for i, c in enumerate(sorted(COCO_CATEGORIES, key=lambda c: c["id"]))}
    images, annotations, inst = [], [], []
    for image_id, scene in _COCO_SCENES.items():
        stem = f"{image_id:012d}"
        ids = _segment_ids(rng, len(scene["segments"]))
        img, seg, segs = _render(scene["size"], scene["segments"], scene["void"], ids)
        h, w = scene["size"]
        _save_jpeg(coco / "val2017" / f"{stem}.jpg", img)
        _save_png(coco / "panoptic_val2017" / f"{stem}.png", id2rgb(seg))
        sem = np.full((h, w), 255, dtype=np.uint8)
        infos = []
        for sid, name, crowd, m in segs:
            c = cat[name]
            sem[m] = sem_index[c["id"]]
            info = {"id": sid, "category_id": c["id"], "iscrowd": crowd, "bbox": _bbox(m)}
            infos.append({**info, "area": int(m.sum())})
            if c["isthing"]:
                x, y, bw, bh = info["bbox"]
                poly = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]  # pixel-corner rectangle
                inst.append(
                    {
                        "id": len(inst) + 1,
                        "image_id": image_id,
                        "category_id": c["id"],
                        "segmentation": _uncompressed_rle(m) if crowd else poly,
                        "area": float(m.sum()),
                        "bbox": [float(v) for v in info["bbox"]],
                        "iscrowd": crowd,
                    }
                )
        _save_png(coco / "panoptic_semseg_val2017" / f"{stem}.png", sem)
        images.append({"file_name": f"{stem}.jpg", "id": image_id, "height": h, "width": w})
        annotations.append(
            {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": infos}
        )
    info = {"description": "promptseg miniature COCO panoptic val2017", "version": "1.0"}
    _write_json(
        coco / "annotations" / "panoptic_val2017.json",
        {
            "info": info,
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": COCO_CATEGORIES,
        },
    )
    things = [
        {k: c[k] for k in ("supercategory", "id", "name")} for c in COCO_CATEGORIES if c["isthing"]
    ]
    _write_json(
        coco / "annotations" / "instances_val2017.json",
        {"info": info, "licenses": [], "images": images, "annotations": inst, "categories": things},
    )
    return root


def _write_ade150(root: Path, rng: np.random.Generator) -> Path:
    """ade/ADEChallengeData2016 with images, annotations, annotations_detectron2 and the
    ODISE panoptic JSON + PNGs (string image ids, stuff area counted before things pasted)."""
    ade = root / "ade" / "ADEChallengeData2016"
    vocab = [str(k) for k in range(150)]
    for c in ADE_CATEGORIES:
        vocab[c["id"]] = c["name"]
    painted = sorted({s[0] for sc in _ADE_SCENES.values() for s in sc["segments"]})
    _check_separable(painted, vocab, "ade150")
    cat = {c["name"]: c for c in ADE_CATEGORIES}
    images, annotations = [], []
    for image_id, scene in _ADE_SCENES.items():
        ids = _segment_ids(rng, len(scene["segments"]))
        img, seg, segs = _render(scene["size"], scene["segments"], scene["void"], ids)
        h, w = scene["size"]
        _save_jpeg(ade / "images" / "validation" / f"{image_id}.jpg", img)
        _save_png(ade / "ade20k_panoptic_val" / f"{image_id}.png", id2rgb(seg))
        sem = np.zeros((h, w), dtype=np.uint8)  # 0 = unlabeled, k + 1 = category k
        masks = {}
        for _, name, _, m in segs:
            sem[m] = cat[name]["id"] + 1
            masks[name] = masks.get(name, np.zeros_like(m)) | m
        _save_png(ade / "annotations" / "validation" / f"{image_id}.png", sem)
        d2 = np.where(sem == 0, 255, sem.astype(np.int64) - 1).astype(np.uint8)
        _save_png(ade / "annotations_detectron2" / "validation" / f"{image_id}.png", d2)
        infos = []
        for sid, name, crowd, m in segs:
            area = int(m.sum())
            under = scene.get("overcount", {}).get(name)
            if under is not None:  # the converter's area is taken before things are pasted
                area += int(masks[under].sum())
            infos.append(
                {
                    "id": sid,
                    "category_id": cat[name]["id"],
                    "area": area,
                    "bbox": _bbox(m),
                    "iscrowd": crowd,
                }
            )
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": w, "height": h})
        annotations.append(
            {"image_id": image_id, "file_name": f"{image_id}.png", "segments_info": infos}
        )
    _write_json(
        ade / "ade20k_panoptic_val.json",
        {"images": images, "annotations": annotations, "categories": ADE_CATEGORIES},
    )
    return root


# ------------------------------------------------------------------------------------------------
# Semantic-only datasets: A-847, PC-59, PC-459, PAS-21


def _semantic_scene(
    size: tuple[int, int],
    names: Sequence[str],
    base: int | None,
    boxes: Sequence[tuple[Box, int]],
    ignore: Sequence[Box],
    ignore_label: int,
    dtype: type[np.generic],
) -> tuple[np.ndarray, np.ndarray]:
    """Image painted from a label map: base label (None: ignore) everywhere, then boxes, then
    ignore boxes in grey."""
    h, w = size
    img = _canvas(h, w)
    lab = np.full((h, w), ignore_label if base is None else base, dtype=dtype)
    if base is not None:
        img[:] = class_color(names[base])
    for (y0, y1, x0, x1), k in boxes:
        img[y0:y1, x0:x1], lab[y0:y1, x0:x1] = class_color(names[k]), k
    for y0, y1, x0, x1 in ignore:
        img[y0:y1, x0:x1], lab[y0:y1, x0:x1] = BACKGROUND, ignore_label
    return img, lab


def _id_names(dataset: str) -> list[str]:
    """The reader's class names of a dataset without a name file: ids as strings."""
    return [str(k) for k in range(SEMSEG_NUM_CLASSES[dataset])]


def _save_tiff16(path: Path, labels: np.ndarray) -> None:
    """uint16 TIFF (PIL mode I;16), as ODISE's converters write them."""
    Image.fromarray(labels.astype(np.uint16)).save(_mkparent(path))


def _write_ade847(root: Path, rng: np.random.Generator) -> Path:
    """ade/ADE20K_2021_17_01 images_detectron2 + annotations_detectron2 (uint16 TIFF, 65535)."""
    base = root / "ade" / "ADE20K_2021_17_01"
    names = _id_names("ade847")
    low, high = _pick_ids(names, 2), _pick_ids(names, 2, start=300)
    scenes = {
        "ADE_val_00000001": (
            (64, 96),
            low[0],
            [((8, 32, 8, 40), high[0]), ((40, 56, 56, 88), low[1])],
        ),
        "ADE_val_00000002": ((56, 80), high[1], [((16, 40, 16, 48), low[0])]),
    }
    for stem, (size, bg, boxes) in scenes.items():
        img, lab = _semantic_scene(size, names, bg, boxes, [(0, 8, 0, 16)], 65535, np.uint16)
        _save_jpeg(base / "images_detectron2" / "validation" / f"{stem}.jpg", img)
        _save_tiff16(base / "annotations_detectron2" / "validation" / f"{stem}.tif", lab)
    return root


def _write_pascal_context(root: Path, which: Sequence[str]) -> Path:
    """pascal_ctx_d2 images shared by PC-59 (uint8 PNG) and PC-459 (uint16 TIFF): a PC-459 class
    outside PC-59 is 255 in PC-59, as the converters produce."""
    base = root / "pascal_ctx_d2"
    names = _id_names("pc459")
    low, high = _pick_ids(names, 3), _pick_ids(names, 2, start=300)
    scenes = {
        "2008_000002": ((64, 96), low[0], [((8, 32, 8, 40), low[1]), ((40, 56, 56, 88), high[0])]),
        "2008_000003": ((64, 80), low[2], [((16, 40, 16, 48), high[1]), ((8, 24, 56, 72), low[0])]),
    }
    for stem, (size, bg, boxes) in scenes.items():
        img, lab = _semantic_scene(size, names, bg, boxes, [(48, 64, 0, 16)], 65535, np.uint16)
        _save_jpeg(base / "images" / "validation" / f"{stem}.jpg", img)
        if "pc459" in which:
            _save_tiff16(base / "annotations_ctx459" / "validation" / f"{stem}.tif", lab)
        if "pc59" in which:
            lab59 = np.where(lab < 59, lab, 255).astype(np.uint8)
            _save_png(base / "annotations_ctx59" / "validation" / f"{stem}.png", lab59)
    return root


def _write_pas21(root: Path, rng: np.random.Generator) -> Path:
    """pascal_voc_d2 images + annotations_pascal21 (uint8, background 0 is a class, 255 rings)."""
    base = root / "pascal_voc_d2"
    names = _id_names("pas21")
    objs = _pick_ids(names, 3, start=1)
    scenes = {
        "2007_000033": ((64, 96), [((8, 32, 8, 40), objs[0]), ((40, 56, 56, 88), objs[1])]),
        "2007_000042": ((56, 80), [((16, 40, 16, 48), objs[2])]),
    }
    for stem, (size, boxes) in scenes.items():
        img, lab = _semantic_scene(size, names, 0, boxes, [], 255, np.uint8)
        for box, _ in boxes:  # VOC's 'difficult' boundary band, pixels keep their colour
            lab[_ring(*size, box)] = 255
        _save_jpeg(base / "images" / "validation" / f"{stem}.jpg", img)
        _save_png(base / "annotations_pascal21" / "validation" / f"{stem}.png", lab)
    return root


# ------------------------------------------------------------------------------------------------
# PhraseCut

_PHRASECUT_INVALID = 61530  # listed by CLIPSeg: the JSON size differs from the stored image
# image id -> (stored size, tasks: (phrase, instances: list of boxes per instance))
_PHRASECUT: dict[int, tuple[tuple[int, int], list[tuple[str, list[list[Box]]]]]] = {
    285700: (
        (72, 96),
        [
            ("red car", [[(16, 40, 16, 48)]]),
            ("black bag", [[(48, 64, 56, 72)]]),
        ],
    ),
    150400: (
        (64, 96),
        [
            # two instances, the second made of two polygons
            ("white dog", [[(8, 24, 8, 32)], [(40, 56, 8, 24), (40, 56, 40, 48)]]),
            ("tall green tree", [[(8, 56, 64, 80)]]),
        ],
    ),
    _PHRASECUT_INVALID: ((48, 64), [("grey cat", [[(8, 24, 8, 24)]])]),
}


def _rect_polygon(box: Box) -> list[list[int]]:
    """[x, y] corners of pixel rows y0..y1-1, cols x0..x1-1: polygon2mask includes the boundary."""
    y0, y1, x0, x1 = box
    return [[x0, y0], [x1 - 1, y0], [x1 - 1, y1 - 1], [x0, y1 - 1]]


def _write_phrasecut(root: Path, rng: np.random.Generator) -> Path:
    """VGPhraseCut_v0 with images, refer_test.json (tasks interleaved across images) and
    image_data_split.json; the listed invalid id is a grayscale image with a wrong JSON size."""
    base = root / "VGPhraseCut_v0"
    phrases = [p for _, tasks in _PHRASECUT.values() for p, _ in tasks]
    _check_separable(phrases, phrases, "phrasecut")
    tasks_json: list[dict[str, Any]] = []
    split = [{"image_id": 1, "split": "train", "height": 600, "width": 800}]
    for image_id, ((h, w), tasks) in _PHRASECUT.items():
        img = _canvas(h, w)
        for j, (phrase, instances) in enumerate(tasks):
            for inst in instances:
                for y0, y1, x0, x1 in inst:
                    img[y0:y1, x0:x1] = class_color(phrase)
            tasks_json.append(
                {
                    "task_id": f"{image_id}__{j}",
                    "image_id": image_id,
                    "phrase": phrase,
                    "phrase_structure": {
                        "name": phrase.split()[-1],
                        "attributes": phrase.split()[:-1],
                        "relation_descriptions": [],
                        "relation_ids": [],
                        "type": "attribute" if len(phrase.split()) > 1 else "name",
                    },
                    "ann_ids": [image_id * 100 + j * 10 + i for i in range(len(instances))],
                    "instance_boxes": [
                        [
                            min(b[2] for b in inst),
                            min(b[0] for b in inst),
                            max(b[3] for b in inst) - min(b[2] for b in inst),
                            max(b[1] for b in inst) - min(b[0] for b in inst),
                        ]
                        for inst in instances
                    ],
                    "Polygons": [[_rect_polygon(b) for b in inst] for inst in instances],
                }
            )
        path = base / "images" / f"{image_id}.jpg"
        if image_id == _PHRASECUT_INVALID:
            gray = img.mean(axis=2).astype(np.uint8)
            Image.fromarray(gray).save(_mkparent(path), quality=100)
            h, w = h + 16, w + 32  # the stored size disagrees with the JSON, as upstream
        else:
            _save_jpeg(path, img)
        split.append({"image_id": image_id, "split": "test", "height": h, "width": w})
    # refer_test.json interleaves images; per image, the file order of its tasks is j
    order = [2, 0, 4, 3, 1]
    _write_json(base / "refer_test.json", [tasks_json[i] for i in order])
    _write_json(base / "image_data_split.json", split)
    return base


# ------------------------------------------------------------------------------------------------


def make_mini_dense(
    root: Path,
    datasets: Sequence[str] = DENSE_DATASETS,
    seed: int = 0,
) -> dict[str, Path]:
    """Write the requested miniature dense datasets under `root`; returns, per dataset, the path
    its reader takes (DAVIS: root/DAVIS; PhraseCut: root/VGPhraseCut_v0; others: root)."""
    root = Path(root)
    unknown = sorted(set(datasets) - set(DENSE_DATASETS))
    if unknown:
        raise ValueError(f"unknown mini datasets {unknown}; choose from {DENSE_DATASETS}")
    rng = np.random.default_rng(seed)
    writers: dict[str, Callable[[Path, np.random.Generator], Path]] = {
        "davis": _write_davis,
        "coco-panoptic": _write_coco_panoptic,
        "ade150": _write_ade150,
        "ade847": _write_ade847,
        "pas21": _write_pas21,
        "phrasecut": _write_phrasecut,
    }
    out: dict[str, Path] = {}
    for name in dict.fromkeys(datasets):
        if name in ("pc59", "pc459"):
            if name not in out:  # one pass writes the shared images and both GT sets
                for pc in ("pc59", "pc459"):
                    if pc in datasets:
                        out[pc] = root
                _write_pascal_context(root, datasets)
        else:
            out[name] = writers[name](root, rng)
    return out
