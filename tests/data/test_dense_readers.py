"""promptseg.data.dense readers on the miniature datasets of promptseg.testing.mini_dense."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from promptseg.data.dense import (
    PHRASECUT_INVALID_IMAGE_IDS,
    DavisDataset,
    PanopticDataset,
    PhraseCutDataset,
    SemSegDataset,
    load_label_png,
    polygon2mask,
    polygons_to_mask,
)
from promptseg.errors import DatasetLayoutError
from promptseg.imageio import davis_palette
from promptseg.metrics.davis import evaluate_davis
from promptseg.metrics.panoptic import pq_compute, read_id_png
from promptseg.testing.colors import BACKGROUND, class_color
from promptseg.testing.mini_dense import DENSE_DATASETS, make_mini_dense, separable

JPEG_TOL = 2  # quality 100, no subsampling, 8-aligned flat blocks


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("mini_dense")
    return root, make_mini_dense(root)


def rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int64)


def near(img: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    return np.abs(img - np.array(color)).max(axis=-1) <= JPEG_TOL


# --- writer ---------------------------------------------------------------------------------------


def test_writer_is_fast_and_returns_reader_roots(tmp_path: Path):
    t0 = time.perf_counter()
    paths = make_mini_dense(tmp_path, seed=3)
    assert time.perf_counter() - t0 < 3.0
    assert set(paths) == set(DENSE_DATASETS)
    assert paths["davis"] == tmp_path / "DAVIS"
    assert paths["phrasecut"] == tmp_path / "VGPhraseCut_v0"
    assert paths["ade847"] == tmp_path
    with pytest.raises(ValueError, match="unknown mini datasets"):
        make_mini_dense(tmp_path, datasets=("davis", "kitti"))


def test_writer_subset_and_seed(tmp_path: Path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_mini_dense(a, datasets=("pc459", "coco-panoptic"), seed=0)
    make_mini_dense(b, datasets=("coco-panoptic",), seed=0)
    make_mini_dense(c, datasets=("coco-panoptic",), seed=1)
    assert (a / "pascal_ctx_d2/annotations_ctx459/validation").is_dir()
    assert not (a / "pascal_ctx_d2/annotations_ctx59").exists()
    assert not (a / "DAVIS").exists()
    js = "coco/annotations/panoptic_val2017.json"
    assert (a / js).read_bytes() == (b / js).read_bytes()  # deterministic per seed
    ids = [
        [s["id"] for s in x["segments_info"]]
        for x in json.loads((c / js).read_text())["annotations"]
    ]
    ids0 = [
        [s["id"] for s in x["segments_info"]]
        for x in json.loads((a / js).read_text())["annotations"]
    ]
    assert ids != ids0  # the seed draws the 24-bit segment ids


def test_separable_and_palette():
    assert separable(["person"], ["person"]) == ["person"]
    assert separable(["a", "a"], ["a"]) == ["a", "a"]
    pal = davis_palette()
    assert len(pal) == 768
    assert pal[3:6] == [128, 0, 0] and pal[6:9] == [0, 128, 0] and pal[-3:] == [224, 224, 192]


# --- DAVIS ----------------------------------------------------------------------------------------


def test_davis_2017(mini):
    root, paths = mini
    ds = DavisDataset(paths["davis"], year="2017")
    assert DavisDataset(root).root == paths["davis"]  # a data root holding DAVIS/ works too
    assert ds.sequences() == ["bmx-trees", "dogs-jump"]
    frames = ds.frames("dogs-jump")
    assert [f.name for f in frames] == [f"{t:05d}.jpg" for t in range(6)]
    assert {ds.n_objects(s) for s in ds.sequences()} == {2, 3}
    assert ds.n_objects("bmx-trees") == 2 and ds.n_objects("dogs-jump") == 3
    with Image.open(ds.annotation_path("bmx-trees", 0)) as im:
        assert im.mode == "P"
        assert im.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
    a0 = ds.annotation("bmx-trees", 0)
    assert a0.dtype == np.uint8 and set(np.unique(a0)) == {0, 1, 2, 255}
    assert 255 not in ds.first_frame_mask("bmx-trees")
    assert 3 in ds.annotation("dogs-jump", 3) and 3 not in ds.annotation("dogs-jump", 4)
    for seq in ds.sequences():
        for t in (0, 5):
            img, lab = ds.image(seq, t).astype(np.int64), ds.annotation(seq, t)
            for k in range(1, ds.n_objects(seq) + 1):
                if (lab == k).any():
                    assert near(img, class_color(f"{seq}/{k}"))[lab == k].all()
            assert near(img, BACKGROUND)[lab == 255].all()  # void ring shows background
    with pytest.raises(KeyError):
        ds.frames("blackswan")


def test_davis_ground_truth_scores_perfect(mini, tmp_path: Path):
    _, paths = mini
    ds = DavisDataset(paths["davis"], year="2017")
    pal = davis_palette()
    for seq in ds.sequences():
        for t, f in enumerate(ds.frames(seq)):
            lab = ds.annotation(seq, t)
            im = Image.fromarray(np.where(lab == 255, 0, lab).astype(np.uint8), mode="L")
            im = im.convert("P")
            im.putpalette(pal)
            (tmp_path / seq).mkdir(exist_ok=True)
            im.save(tmp_path / seq / f"{f.stem}.png")
    res = evaluate_davis(ds.root, tmp_path, year="2017", split="val")
    assert res["n_objects"] == 5
    assert res["J&F-Mean"] == pytest.approx(1.0)


def test_davis_2016_merges_objects(mini):
    _, paths = mini
    d16 = DavisDataset(paths["davis"], year=2016)
    d17 = DavisDataset(paths["davis"], year="2017")
    assert d16.merge_objects and not d17.merge_objects
    assert d16.sequences() == ["bmx-trees"]
    for t in range(6):
        a16, a17 = d16.annotation("bmx-trees", t), d17.annotation("bmx-trees", t)
        assert set(np.unique(a16)) <= {0, 1, 255}
        np.testing.assert_array_equal(a16 == 1, (a17 > 0) & (a17 != 255))
        np.testing.assert_array_equal(a16 == 255, a17 == 255)
    assert d16.n_objects("bmx-trees") == 1
    assert set(np.unique(d16.first_frame_mask("bmx-trees"))) == {0, 1}


# --- panoptic -------------------------------------------------------------------------------------


def test_coco_panoptic_reader_and_self_pq(mini):
    root, _ = mini
    ds = PanopticDataset("coco-panoptic", root)
    assert ds.vocabulary_names() == [
        "person",
        "car",
        "dog",
        "sky-other-merged",
        "grass-merged",
        "wall-other-merged",
    ]
    assert ds.thing_flags() == [True, True, True, False, False, False]
    assert all(c["color"] is None for c in ds.categories)  # panoptic_val2017.json has no colours
    items = ds.items()
    assert [it.image_path.name for it in items] == ["000000000139.jpg", "000000000285.jpg"]
    assert [it.image_id for it in items] == [139, 285]
    assert ds.instances_json_path == root / "coco/annotations/instances_val2017.json"
    res = pq_compute(ds.gt_json_path, ds.gt_json_path, ds.gt_folder, ds.gt_folder)
    assert res["All"]["pq"] == pytest.approx(1.0) and res["All"]["n"] == 6
    assert res["Things"]["n"] == 3 and res["Stuff"]["n"] == 3

    crowd = void = 0
    for it in items:
        ids = read_id_png(it.panoptic_png)
        void += int((ids == 0).sum())
        for s in it.segments_info:
            assert s["area"] == int((ids == s["id"]).sum())  # COCO areas equal PNG counts
            crowd += s["iscrowd"]
        cars = [s["id"] for s in it.segments_info if s["category_id"] == 3]
        if cars:
            assert len(cars) == 2
            assert ndimage.label(np.isin(ids, cars))[1] == 2  # two separated instances
        img = rgb(it.image_path)
        names = {c["id"]: c["name"] for c in ds.categories}
        for s in it.segments_info:
            assert near(img, class_color(names[s["category_id"]]))[ids == s["id"]].all()
        assert near(img, BACKGROUND)[ids == 0].all()
    assert crowd == 1 and void > 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools vs numpy 2
def test_coco_semseg_and_instances_match_panoptic(mini):
    from pycocotools.coco import COCO

    root, _ = mini
    ds = PanopticDataset("coco-panoptic", root)
    order = {c["id"]: i for i, c in enumerate(sorted(ds.categories, key=lambda c: c["id"]))}
    coco = COCO(str(ds.instances_json_path))
    for it in ds.items():
        ids = read_id_png(it.panoptic_png)
        sem = load_label_png(ds.semseg_gt_path(it))
        want = np.full(ids.shape, 255, dtype=np.uint8)
        for s in it.segments_info:
            want[ids == s["id"]] = order[s["category_id"]]  # crowd keeps its class
        np.testing.assert_array_equal(sem, want)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[it.image_id]))
        things = [s for s in it.segments_info if s["category_id"] in (1, 3, 18)]
        assert len(anns) == len(things)
        for ann, s in zip(anns, things, strict=True):
            assert ann["iscrowd"] == s["iscrowd"]
            np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), ids == s["id"])


def test_ade_panoptic_quirks(mini):
    root, _ = mini
    ds = PanopticDataset("ade150", root)
    cats = ds.categories
    assert cats[0]["id"] == 0 and cats[0]["name"] == "wall"  # category 0 is real
    assert cats[0]["color"] == [120, 120, 120]
    items = ds.items()
    assert [it.image_id for it in items] == ["ADE_val_00000001", "ADE_val_00000002"]
    assert ds.instances_json_path is None
    over = []
    for it in items:
        ids = read_id_png(it.panoptic_png)
        assert (ids == 0).any()
        for s in it.segments_info:
            n = int((ids == s["id"]).sum())
            assert s["area"] >= n
            if s["area"] > n:
                over.append((s["category_id"], n, s["area"]))
    assert len(over) == 1 and over[0][0] == 1  # 'building' (stuff) under a pasted car
    _, n, area = over[0]
    res = pq_compute(ds.gt_json_path, ds.gt_json_path, ds.gt_folder, ds.gt_folder)
    building = (n / area + 1.0) / 2  # one image with IoU n/area, one with 1
    assert res["per_class"][1]["pq"] == pytest.approx(building)
    assert res["All"]["n"] == 4
    assert res["All"]["pq"] == pytest.approx((3 + building) / 4)
    assert res["Things"]["pq"] == pytest.approx(1.0)


def test_ade_semantic_annotations(mini):
    root, _ = mini
    ade = root / "ade/ADEChallengeData2016"
    ds = PanopticDataset("ade150", root)
    for it in ds.items():
        raw = load_label_png(ade / "annotations/validation" / f"{it.image_id}.png")
        d2 = load_label_png(ds.semseg_gt_path(it))
        np.testing.assert_array_equal(d2, np.where(raw == 0, 255, raw.astype(int) - 1))
        ids = read_id_png(it.panoptic_png)
        np.testing.assert_array_equal(raw == 0, ids == 0)  # unlabeled = VOID


# --- semantic -------------------------------------------------------------------------------------

SEMSEG = {
    # name: (dtype, ignore, num_classes, names from)
    "ade150": (np.uint8, 255, 150, "ade/ADEChallengeData2016/ade20k_panoptic_val.json"),
    "ade847": (np.uint16, 65535, 847, "ids"),
    "pc59": (np.uint8, 255, 59, "ids"),
    "pc459": (np.uint16, 65535, 459, "ids"),
    "pas21": (np.uint8, 255, 21, "ids"),
    "coco-panoptic": (np.uint8, 255, 6, "coco/annotations/panoptic_val2017.json"),
}


@pytest.mark.parametrize("name", list(SEMSEG))
def test_semseg_reader(mini, name: str):
    root, _ = mini
    dtype, ignore, k, source = SEMSEG[name]
    ds = SemSegDataset(name, root)
    assert ds.ignore_label == ignore and ds.num_classes == k and ds.class_names_source == source
    items = ds.items()
    assert len(items) == 2
    assert [i.image_path.name for i in items] == sorted(i.image_path.name for i in items)
    seen: set[int] = set()
    for it in items:
        gt = ds.load_gt(it.gt_path)
        assert gt.dtype == dtype and gt.ndim == 2
        labels = set(np.unique(gt).tolist())
        seen |= labels
        assert all(v < k or v == ignore for v in labels)
        img = rgb(it.image_path)
        assert img.shape[:2] == gt.shape
        for v in labels - {ignore}:  # every labelled pixel shows its class colour
            assert near(img, class_color(ds.class_names[v]))[gt == v].all()
    assert ignore in seen
    if dtype == np.uint16:
        assert max(seen - {ignore}) > 255  # 16-bit labels survive reading
        with Image.open(items[0].gt_path) as im:
            assert im.mode.startswith("I;16")


def test_semseg_names_and_pc59_from_pc459(mini):
    root, _ = mini
    assert SemSegDataset("ade150", root).class_names[0] == "wall"
    assert SemSegDataset("ade150", root).class_names[12] == "person"
    assert SemSegDataset("pas21", root).class_names[:3] == ["0", "1", "2"]
    coco = SemSegDataset("coco-panoptic", root).class_names
    assert coco == ["person", "car", "dog", "sky-other-merged", "grass-merged", "wall-other-merged"]
    given = SemSegDataset("pas21", root, class_names=["background", "aeroplane"])
    assert given.class_names_source == "given" and given.num_classes == 2
    pc59, pc459 = SemSegDataset("pc59", root), SemSegDataset("pc459", root)
    for a, b in zip(pc59.items(), pc459.items(), strict=True):
        assert a.image_path == b.image_path
        full = pc459.load_gt(b.gt_path).astype(np.int64)
        np.testing.assert_array_equal(pc59.load_gt(a.gt_path), np.where(full < 59, full, 255))


def test_load_label_png_keeps_16_bit_and_rejects_colour(tmp_path: Path):
    a = np.array([[0, 300], [846, 65535]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "x.tif")
    got = load_label_png(tmp_path / "x.tif")
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, a)
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(DatasetLayoutError, match="single-channel"):
        load_label_png(tmp_path / "c.png")


# --- PhraseCut ------------------------------------------------------------------------------------


def test_phrasecut_samples(mini):
    root, paths = mini
    ds = PhraseCutDataset(root)  # a data root holding VGPhraseCut_v0/ works
    assert ds.root == paths["phrasecut"]
    got = [(s.image_id, s.j, s.phrase) for s in ds.samples()]
    assert got == [
        (150400, 0, "white dog"),
        (150400, 1, "tall green tree"),
        (285700, 0, "red car"),
        (285700, 1, "black bag"),
    ]
    assert 61530 in PHRASECUT_INVALID_IMAGE_IDS and len(PHRASECUT_INVALID_IMAGE_IDS) == 17
    everything = PhraseCutDataset(paths["phrasecut"], exclude_invalid=False).samples()
    assert [(s.image_id, s.j) for s in everything][0] == (61530, 0)
    assert len(everything) == 5


def test_phrasecut_images_and_masks(mini):
    _, paths = mini
    ds = PhraseCutDataset(paths["phrasecut"], exclude_invalid=False)
    gray = ds.image(61530)
    assert gray.shape == (48, 64, 3) and gray.dtype == np.uint8
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert ds.image_size(61530) == (64, 96)  # JSON size differs from the stored image
    for s in ds.samples():
        if s.image_id == 61530:
            continue
        img = ds.image(s.image_id).astype(np.int64)
        mask = ds.gt_mask(s.image_id, s.j)
        assert mask.dtype == bool and mask.shape == img.shape[:2] == ds.image_size(s.image_id)
        np.testing.assert_array_equal(mask, near(img, class_color(s.phrase)))
    dog = ds.gt_mask(150400, 0)  # two instances, the second of two polygons
    want = np.zeros_like(dog)
    want[8:24, 8:32] = want[40:56, 8:24] = want[40:56, 40:48] = True
    np.testing.assert_array_equal(dog, want)
    assert ndimage.label(dog)[1] == 3


# --- polygon rasterisation -----------------------------------------------------------------------


def test_polygon2mask_hand_cases():
    rect = polygon2mask((8, 9), [(2, 3), (2, 6), (5, 6), (5, 3)])  # (row, col): edges included
    want = np.zeros((8, 9), dtype=bool)
    want[2:6, 3:7] = True
    np.testing.assert_array_equal(rect, want)
    assert not polygon2mask((4, 4), np.zeros((0, 2))).any()
    assert polygon2mask((0, 3), [(0, 0), (1, 1), (0, 1)]).shape == (0, 3)
    tri = polygon2mask((5, 5), [(0, 0), (0, 4), (4, 0)])
    np.testing.assert_array_equal(tri, np.add.outer(np.arange(5), np.arange(5)) <= 4)
    both = polygons_to_mask((8, 9), [[[3, 2], [6, 2], [6, 5], [3, 5]], [[0, 7], [0, 7]]])
    want[7, 0] = True  # a degenerate polygon still marks its vertex, as scikit-image does
    np.testing.assert_array_equal(both, want)


def test_polygon2mask_equals_scikit_image():
    draw = pytest.importorskip("skimage.draw")
    rng = np.random.default_rng(0)
    for t in range(600):
        h, w = (int(v) for v in rng.integers(1, 30, 2))
        n = int(rng.integers(1, 10))
        hi = max(h, w) + 3
        kind = t % 4
        if kind == 0:
            pts = rng.uniform(-3, hi, (n, 2))
        elif kind == 1:
            pts = rng.integers(-3, hi, (n, 2))
        elif kind == 2:
            pts = rng.integers(-6, 2 * hi, (n, 2)) / 2
        else:
            pts = rng.integers(-3, hi, (n, 2)) / 3
        np.testing.assert_array_equal(
            polygon2mask((h, w), pts), draw.polygon2mask((h, w), pts), err_msg=str(pts.tolist())
        )


# --- layout errors --------------------------------------------------------------------------------


@pytest.fixture
def fresh(mini, tmp_path: Path) -> Path:
    src, _ = mini
    dst = tmp_path / "data"
    shutil.copytree(src, dst)
    return dst


def test_davis_layout_errors(fresh: Path, tmp_path: Path):
    davis = fresh / "DAVIS"
    (davis / "ImageSets/2016/val.txt").unlink()
    with pytest.raises(DatasetLayoutError) as e:
        DavisDataset(davis, year="2016")
    msg = str(e.value)
    assert str(davis / "ImageSets/2016/val.txt") in msg and "DAVIS-2017-trainval-480p.zip" in msg
    assert isinstance(e.value, FileNotFoundError)
    shutil.rmtree(davis / "Annotations/480p/dogs-jump")
    with pytest.raises(DatasetLayoutError, match="Annotations/480p/dogs-jump"):
        DavisDataset(davis)
    with pytest.raises(DatasetLayoutError, match="JPEGImages/480p"):
        DavisDataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="year"):
        DavisDataset(davis, year="2019")


def test_panoptic_layout_errors(fresh: Path):
    shutil.rmtree(fresh / "coco/panoptic_val2017")
    with pytest.raises(DatasetLayoutError) as e:
        PanopticDataset("coco-panoptic", fresh)
    assert str(fresh / "coco/panoptic_val2017") in str(e.value)
    assert "panoptic_annotations_trainval2017.zip" in str(e.value)
    (fresh / "ade/ADEChallengeData2016/ade20k_panoptic_val.json").write_text("{not json")
    ds = PanopticDataset("ade150", fresh)  # existence checks pass; parsing is lazy
    with pytest.raises(DatasetLayoutError, match="not valid JSON"):
        _ = ds.categories
    with pytest.raises(ValueError, match="one of"):
        PanopticDataset("cityscapes", fresh)


def test_semseg_layout_errors(fresh: Path):
    shutil.rmtree(fresh / "pascal_ctx_d2/annotations_ctx459")
    with pytest.raises(DatasetLayoutError) as e:
        SemSegDataset("pc459", fresh)
    assert str(fresh / "pascal_ctx_d2/annotations_ctx459/validation") in str(e.value)
    assert "prepare_pascal_ctx_full_sem_seg.py" in str(e.value)
    (fresh / "pascal_voc_d2/annotations_pascal21/validation/2007_000042.png").unlink()
    ds = SemSegDataset("pas21", fresh)
    with pytest.raises(DatasetLayoutError, match="2007_000042.png"):
        ds.items()


def test_phrasecut_layout_errors(fresh: Path):
    base = fresh / "VGPhraseCut_v0"
    (base / "refer_test.json").unlink()
    with pytest.raises(DatasetLayoutError) as e:
        PhraseCutDataset(base)
    assert str(base / "refer_test.json") in str(e.value) and "download_dataset.py" in str(e.value)
    (base / "refer_val.json").write_text(json.dumps({"tasks": []}))
    with pytest.raises(DatasetLayoutError, match="list of tasks"):
        PhraseCutDataset(base, split="val").samples()
    ds = PhraseCutDataset(base, split="val")
    (base / "images/150400.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match="150400.jpg"):
        ds.image(150400)
