"""Few-shot readers against the miniature datasets written in the real layouts (spec §1, §5.3)."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from promptseg.data.episodes import episode_digest
from promptseg.data.fewshot import (
    COCO_CLASSES,
    COCO_NOVEL_IDS,
    PASCAL_CLASSES,
    FewShotDataset,
    FewShotInstanceDataset,
    resize_nearest,
    segmentation_to_mask,
)
from promptseg.data.splits import SplitChecksumWarning
from promptseg.errors import ChecksumError, DatasetLayoutError
from promptseg.testing.colors import class_color
from promptseg.testing.mini_fewshot import FSS_CLASSES, LVIS_CATEGORIES, make_mini_fewshot

pytestmark = pytest.mark.filterwarnings("ignore::promptseg.data.splits.SplitChecksumWarning")


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mini")
    start = time.perf_counter()
    make_mini_fewshot(root)
    assert time.perf_counter() - start < 3.0
    return root


def painted(image: np.ndarray, name: str) -> np.ndarray:
    """Pixels showing ``name``'s colour (JPEG moves flat 8x8 blocks by at most 1)."""
    diff = np.abs(image.astype(np.int16) - np.array(class_color(name), dtype=np.int16))
    return diff.max(axis=-1) <= 2


def eroded(mask: np.ndarray) -> np.ndarray:
    """The mask without its 1-pixel border (4-neighbourhood)."""
    p = np.pad(mask, 1)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def dataset(mini: Path, name: str, fold: int | str, **kw) -> FewShotDataset:
    return FewShotDataset(name, mini, fold, splits_dir=mini / "splits", trust_pickle=True, **kw)


# ------------------------------------------------------------------------------- mini layout


def test_mini_files_have_the_real_formats(mini: Path) -> None:
    label = Image.open(next((mini / "VOC2012" / "SegmentationClassAug").glob("*.png")))
    assert label.mode == "L" and set(np.unique(label)) >= {0, 255}
    coco = Image.open(next((mini / "COCO2014" / "annotations" / "val2014").glob("*.png")))
    assert coco.mode == "L" and 255 not in np.unique(coco)
    assert Image.open(next((mini / "COCO2014" / "val2014").glob("*.jpg"))).format == "JPEG"
    test_txt = (mini / "splits" / "fss" / "test.txt").read_bytes()
    assert test_txt == b"".join(n.encode() + b"\r\n" for n in FSS_CLASSES)
    lines = (mini / "splits" / "pascal" / "val" / "fold0.txt").read_text().split("\n")
    assert lines[-1] == "" and lines[:-1] == sorted(lines[:-1])
    assert all(len(ln.rpartition("__")[2]) == 2 for ln in lines[:-1])
    lists = pickle.loads((mini / "splits" / "coco" / "val" / "fold1.pkl").read_bytes())
    assert sorted(lists) == list(range(80))
    assert [c for c in lists if lists[c]] == list(range(1, 80, 4))
    assert all(p.startswith("val2014/COCO_val2014_") for p in lists[5])


def test_mini_split_digests_are_stable(mini: Path) -> None:
    pascal = dataset(mini, "pascal5i", 0).episodes(1, n=20)
    fss = dataset(mini, "fss1000", "test").episodes(5)
    assert len(fss) == 10 * len(FSS_CLASSES)
    # The split lists do not depend on make_mini_fewshot's seed (only rectangles do).
    assert pascal[0].query == "2007_001000" and pascal[0].supports == ("2009_001740",)
    assert fss[0].query == "ab_wheel/1.jpg" and fss[0].supports[0] == fss[0].supports[2]
    assert episode_digest(pascal) == (
        "4c7f29e9a787da14d78dbd06256cbbc61c20bc097c1962e3e6dbc4a9a74aec51"
    )
    assert episode_digest(fss) == (
        "2cb60d8b5b69a676e103b2ac93ae51179d75e061f8634f58ee9bdf7d4151f9a6"
    )


# ------------------------------------------------------------------------------- semantic


@pytest.mark.parametrize("fold", range(4))
def test_pascal_masks_ring_and_supports(mini: Path, fold: int) -> None:
    ds = dataset(mini, "pascal5i", fold)
    assert ds.class_ids == list(range(5 * fold, 5 * fold + 5))
    assert ds.class_names[5 * fold] == PASCAL_CLASSES[5 * fold]
    eps = ds.episodes(5, n=12)
    assert {e.class_id for e in eps} == set(ds.class_ids)
    for ep in eps:
        q = ds.query(ep)
        region = painted(q.image, ds.class_names[ep.class_id])
        assert q.image.dtype == np.uint8 and q.image.shape == (*q.mask.shape, 3)
        assert np.array_equal(q.mask, eroded(region))  # GT = rectangle without its ring
        assert np.array_equal(q.ignore & region, region & ~q.mask)  # ring = 255 = ignored
        for s in ds.supports(ep):
            assert s.ignore is None  # boundary is background in supports
            assert np.array_equal(s.mask, eroded(painted(s.image, ds.class_names[ep.class_id])))


@pytest.mark.parametrize("fold", range(4))
def test_coco20i_masks(mini: Path, fold: int) -> None:
    ds = dataset(mini, "coco20i", fold)
    assert ds.class_ids == list(range(fold, 80, 4))
    assert ds.class_names[ds.class_ids[0]] == COCO_CLASSES[fold]
    for ep in ds.episodes(1, n=10):
        name = ds.class_names[ep.class_id]
        for sample in [ds.query(ep), *ds.supports(ep)]:
            assert sample.ignore is None and sample.mask.any()
            assert np.array_equal(sample.mask, painted(sample.image, name))


def test_fss_threshold_127_vs_128(mini: Path) -> None:
    ds = dataset(mini, "fss1000", 0)
    assert ds.class_names == {760 + i: n for i, n in enumerate(sorted(FSS_CLASSES))}
    for ep in ds.episodes(1):
        q = ds.query(ep)
        raw = np.asarray(Image.open(mini / "FSS-1000" / ep.query.replace(".jpg", ".png")))
        assert (raw == 127).sum() == 3 and (raw == 128).sum() == 3
        assert q.mask[raw == 128].all() and not q.mask[raw == 127].any()
        assert np.array_equal(q.mask, painted(q.image, ds.class_names[ep.class_id]))
        assert q.ignore is None


def test_lvis_encodings_folds_and_shot_filter(mini: Path) -> None:
    val = pickle.loads((mini / "LVIS" / "lvis_val.pkl").read_bytes())
    segms = [
        a["segmentation"] for imgs in val.values() for e in imgs.values() for a in e["annotations"]
    ]
    kinds = {
        type(s).__name__ if not isinstance(s, dict) else type(s["counts"]).__name__ for s in segms
    }
    assert kinds == {"list", "ndarray", "str", "bytes"}
    assert any(isinstance(s, list) and len(s) == 2 for s in segms)  # 2 polygons, 1 annotation

    names = {
        shots: [dataset(mini, "lvis92i", f, shots=shots).class_names[0] for f in range(10)]
        for shots in (1, 5)
    }
    kept1 = [n for _, n, count in LVIS_CATEGORIES if count > 1]
    kept5 = [n for _, n, count in LVIS_CATEGORIES if count > 5]
    assert names[1] == kept1[:10] and names[5] == kept5[:10]
    assert "airplane" in names[1] and "airplane" not in names[5]  # exactly 5 images
    assert "alligator" not in names[1]  # exactly 1 image

    for shots in (1, 5):
        for fold in (0, 2, 9):
            ds = dataset(mini, "lvis92i", fold, shots=shots)
            assert ds.class_ids == [0]
            for ep in ds.episodes(shots, n=4):
                assert ep.class_id == 0 and len(ep.supports) == shots
                for s in [ds.query(ep), *ds.supports(ep)]:
                    assert s.ignore is None
                    assert np.array_equal(s.mask, painted(s.image, ds.class_names[0]))
    with pytest.raises(ValueError, match="shot count"):
        dataset(mini, "lvis92i", 0, shots=1).episodes(5)


def test_lvis_pickle_needs_opt_in(mini: Path) -> None:
    with pytest.raises(ChecksumError, match="trust_pickle"):
        FewShotDataset("lvis92i", mini, 0)


def test_segmentation_decoders_agree() -> None:
    mask = np.zeros((16, 24), dtype=bool)
    mask[4:12, 8:16] = True
    poly = [[8.0, 4.0, 16.0, 4.0, 16.0, 12.0, 8.0, 12.0]]
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    counts = np.diff(np.flatnonzero(np.diff(np.r_[-1, mask.ravel("F"), -1]))).tolist()
    uncompressed = {"size": [16, 24], "counts": [0, *counts] if mask[0, 0] else counts}
    for segm in (poly, rle, {**rle, "counts": rle["counts"].decode()}, mask.astype(np.uint8)):
        assert np.array_equal(segmentation_to_mask(segm, 16, 24), mask)
    assert np.array_equal(segmentation_to_mask(uncompressed, 16, 24), mask)


# ------------------------------------------------------------------------------- instances


@pytest.mark.parametrize("shots", [1, 5])
def test_coco_novel_records(mini: Path, shots: int) -> None:
    per_seed = []
    for seed in (0, 1):
        ds = FewShotInstanceDataset(mini, shots, seed)
        records = ds.shot_records()
        assert [r.category_id for r in records] == [c for c in COCO_NOVEL_IDS for _ in range(shots)]
        for path, cid, mask in records:
            region = painted(
                np.asarray(Image.open(path).convert("RGB")), ds.novel_category_names[cid]
            )
            assert mask.any() and not (mask & ~region).any()
        per_seed.append([str(r.image_path) for r in records])
        ids = ds.test_image_ids()
        assert ids == sorted(ids) and len(ids) == 8
        assert ds.test_image_path(ids[0]).is_file()
        assert ds.gt_json_path == mini / "cocosplit" / "datasplit" / "5k.json"
    assert per_seed[0] != per_seed[1]
    if shots == 5:  # one image gives two records (one annotation each)
        assert any(per_seed[0].count(p) == 2 for p in per_seed[0])


def test_coco2voc_uses_converted_test_set(mini: Path) -> None:
    ds = FewShotInstanceDataset(mini, 1, 0, dataset="coco2voc")
    assert ds.test_category_ids == list(range(1, 21)) and ds.novel_category_ids == COCO_NOVEL_IDS
    assert ds.gt_json_path.name == "val_converted.json" and len(ds.shot_records()) == 20
    assert all(ds.test_image_path(i).is_file() for i in ds.test_image_ids())


def test_coco_novel_wrong_shot_count(mini: Path, tmp_path: Path) -> None:
    make_mini_fewshot(tmp_path, datasets=["coco-novel"])
    path = tmp_path / "cocosplit" / "full_box_1shot_dining table_trainval.json"
    five = json.loads(
        (tmp_path / "cocosplit" / "full_box_5shot_dining table_trainval.json").read_text()
    )
    path.write_text(json.dumps(five))
    with pytest.raises(DatasetLayoutError, match="expected exactly K = 1") as err:
        FewShotInstanceDataset(tmp_path, 1, 0).shot_records()
    assert str(path) in str(err.value)
    with pytest.raises(DatasetLayoutError, match="seed3"):
        FewShotInstanceDataset(tmp_path, 1, 3)


# ------------------------------------------------------------------------------- layouts


def test_matcher_layout_without_splits_dir(tmp_path: Path) -> None:
    make_mini_fewshot(tmp_path / "h", datasets=["pascal5i", "fss1000", "coco20i"])
    make_mini_fewshot(tmp_path / "m", datasets=["pascal5i", "fss1000", "coco20i"], layout="matcher")
    assert (tmp_path / "m" / "FSS-1000" / "data" / FSS_CLASSES[0] / "1.jpg").is_file()
    for name, fold in (("pascal5i", 1), ("fss1000", "test"), ("coco20i", 2)):
        ref = FewShotDataset(
            name, tmp_path / "h", fold, splits_dir=tmp_path / "h" / "splits", trust_pickle=True
        )
        with pytest.warns(SplitChecksumWarning):
            ds = FewShotDataset(name, tmp_path / "m", fold, trust_pickle=True)  # offline
        assert ds.split_path.name == ref.split_path.name
        assert ds.episodes(1, n=8) == ref.episodes(1, n=8)
        ep = ds.episodes(1, n=1)[0]
        assert np.array_equal(ds.query(ep).mask, ref.query(ep).mask)
    with pytest.raises(ChecksumError, match="Refusing to unpickle"):
        FewShotDataset("coco20i", tmp_path / "m", 0)


def test_mini_coco_pickles_need_trust_and_text_lists_warn(mini: Path) -> None:
    with pytest.raises(ChecksumError, match="trust_pickle"):
        FewShotDataset("coco20i", mini, 0, splits_dir=mini / "splits")
    with pytest.warns(SplitChecksumWarning):
        FewShotDataset("pascal5i", mini, 0, splits_dir=mini / "splits")


# ------------------------------------------------------------------------------- errors


def test_missing_dataset_folder(tmp_path: Path) -> None:
    make_mini_fewshot(tmp_path, datasets=["fss1000", "pascal5i"])
    for name, where in (("coco20i", "COCO2014/val2014"), ("lvis92i", "LVIS/lvis_val.pkl")):
        with pytest.raises(DatasetLayoutError) as err:
            FewShotDataset(name, tmp_path, 0, splits_dir=tmp_path / "splits", trust_pickle=True)
        assert str(tmp_path / where) in str(err.value) and "Obtain:" in str(err.value)
    (tmp_path / "FSS-1000" / FSS_CLASSES[2]).rename(tmp_path / "elsewhere")
    with pytest.raises(DatasetLayoutError, match=FSS_CLASSES[2]):
        FewShotDataset("fss1000", tmp_path, 0, splits_dir=tmp_path / "splits")


def test_missing_split_file(tmp_path: Path) -> None:
    make_mini_fewshot(tmp_path, datasets=["pascal5i"])
    (tmp_path / "splits" / "pascal" / "val" / "fold2.txt").unlink()
    with pytest.raises(DatasetLayoutError) as err:
        FewShotDataset("pascal5i", tmp_path, 2, splits_dir=tmp_path / "splits")
    assert str(tmp_path / "splits" / "pascal" / "val" / "fold2.txt") in str(err.value)
    with pytest.raises(DatasetLayoutError) as err:  # offline, nothing cached, no data-root copy
        FewShotDataset("pascal5i", tmp_path, 2)
    assert str(tmp_path / "VOC2012" / "splits" / "val" / "fold2.txt") in str(err.value)
    assert "pascal/val/fold2.txt" in str(err.value) and "VOCtrainval_11-May-2012" in str(err.value)


def test_malformed_png(tmp_path: Path) -> None:
    make_mini_fewshot(tmp_path, datasets=["pascal5i", "coco20i"])
    ds = dataset(tmp_path, "pascal5i", 0)
    ep = ds.episodes(1, n=1)[0]
    label = tmp_path / "VOC2012" / "SegmentationClassAug" / f"{ep.query}.png"
    Image.open(label).convert("RGB").save(label)  # colour-coded instead of single-channel
    with pytest.raises(DatasetLayoutError, match="mode 'RGB'") as err:
        ds.query(ep)
    assert str(label) in str(err.value)
    coco = dataset(tmp_path, "coco20i", 0)
    ep = coco.episodes(1, n=1)[0]
    mask = tmp_path / "COCO2014" / "annotations" / ep.query.replace(".jpg", ".png")
    mask.write_bytes(b"not a png")
    with pytest.raises(DatasetLayoutError) as err:
        coco.query(ep)
    assert str(mask) in str(err.value)
    mask.unlink()
    with pytest.raises(DatasetLayoutError, match="not found"):
        coco.query(ep)


def test_resize_nearest_is_torch_legacy_nearest() -> None:
    label = np.random.default_rng(0).integers(0, 256, size=(37, 53)).astype(np.uint8)
    for size in [(400, 400), (518, 518), (20, 31), (37, 53)]:
        ref = F.interpolate(torch.from_numpy(label)[None, None].float(), size, mode="nearest")
        assert np.array_equal(resize_nearest(label, size), ref[0, 0].numpy().astype(np.uint8))
    rows = np.floor(np.arange(400) * 37 / 400).astype(int)
    assert np.array_equal(resize_nearest(label, (400, 53)), label[rows])
    assert resize_nearest(label > 128, (9, 9)).dtype == bool
