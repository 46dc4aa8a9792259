"""DAVIS J, F and J&F: worked examples of spec benchmarks.md §3.4 and a synthetic DAVIS root."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from promptseg.metrics.davis import (
    DavisFormatError,
    MissingResultsError,
    _dilate_disk,
    bound_pixels,
    db_statistics,
    disk,
    evaluate_davis,
    f_measure,
    j_measure,
    object_scores,
    seg2bmap,
    summarize,
)


def square(size: int, lo: int, hi: int, dx: int = 0) -> np.ndarray:
    """Bool [size, size] mask with rows lo..hi and cols lo+dx..hi+dx (inclusive) set."""
    m = np.zeros((size, size), dtype=bool)
    m[lo : hi + 1, lo + dx : hi + 1 + dx] = True
    return m


GT20 = square(20, 5, 10)
EMPTY20 = np.zeros((20, 20), dtype=bool)


# --- DV-1: J and F on hand-made masks ------------------------------------------------------------


@pytest.mark.parametrize(
    ("gt", "pred", "j", "f"),
    [
        (GT20, square(20, 5, 10, dx=1), 0.714286, 1.0),
        (GT20, square(20, 5, 10, dx=3), 0.333333, 0.5),
        (GT20, GT20, 1.0, 1.0),
        (GT20, EMPTY20, 0.0, 0.0),
        (EMPTY20, EMPTY20, 1.0, 1.0),
        (EMPTY20, GT20, 0.0, 0.0),
        (square(100, 20, 59), square(100, 20, 59, dx=3), 0.860465, 0.525),
    ],
    ids=["shift1", "shift3", "same", "pred-empty", "both-empty", "gt-empty", "100px-shift3"],
)
def test_dv1_j_and_f(gt: np.ndarray, pred: np.ndarray, j: float, f: float):
    jj = j_measure(gt, pred)
    ff = f_measure(gt, pred)
    assert isinstance(jj, float) and isinstance(ff, float)
    assert jj == pytest.approx(j, abs=1e-6)
    assert ff == pytest.approx(f, abs=1e-6)


def test_dv1_boundary_match_counts():
    # shift by 3 on 20x20 (r = 1): 12 of 24 boundary pixels matched each way -> P = R = 0.5
    bg, bp = seg2bmap(GT20), seg2bmap(square(20, 5, 10, dx=3))
    assert bg.sum() == bp.sum() == 24
    cross = disk(1)
    assert (bp & ndimage.binary_dilation(bg, cross)).sum() == 12
    assert (bg & ndimage.binary_dilation(bp, cross)).sum() == 12


def test_full_frame_mask_has_no_boundary():
    # seg2bmap semantics: a mask covering the whole frame has an empty boundary, so F is 1 against
    # any mask whose boundary is also empty (here: the empty mask), while J is 0
    full = np.ones((20, 20), dtype=bool)
    assert not seg2bmap(full).any()
    assert j_measure(full, EMPTY20) == 0.0
    assert f_measure(full, EMPTY20) == 1.0
    assert f_measure(full, GT20) == 0.0  # no GT boundary: P = 0, R = 1


def test_video_input_returns_per_frame_float64():
    gt = np.stack([GT20, GT20, EMPTY20, GT20])
    pred = np.stack([square(20, 5, 10, dx=1), square(20, 5, 10, dx=3), EMPTY20, EMPTY20])
    j, f = j_measure(gt, pred), f_measure(gt, pred)
    assert j.dtype == f.dtype == np.float64 and j.shape == f.shape == (4,)
    assert j.tolist() == [j_measure(g, p) for g, p in zip(gt, pred, strict=True)]
    assert f.tolist() == [f_measure(g, p) for g, p in zip(gt, pred, strict=True)]
    assert f == pytest.approx([1.0, 0.5, 1.0, 0.0])
    assert j == pytest.approx([5 / 7, 1 / 3, 1.0, 0.0])


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shapes differ"):
        j_measure(GT20, GT20[:, :10])
    with pytest.raises(ValueError, match="shapes differ"):
        f_measure(GT20, GT20[:, :10])


# --- DV-2: boundary map --------------------------------------------------------------------------


def test_dv2_seg2bmap():
    m = square(6, 1, 3)
    expected = ["111100", "100100", "100100", "111100", "000000", "000000"]
    assert ["".join(str(int(v)) for v in row) for row in seg2bmap(m)] == expected
    assert np.array_equal(seg2bmap(np.stack([m, m.T])), np.stack([seg2bmap(m), seg2bmap(m.T)]))


# --- tolerance disk and dilation -----------------------------------------------------------------


def test_bound_pixels_from_the_diagonal():
    assert bound_pixels((480, 854)) == 8
    assert bound_pixels((480, 910)) == 9
    assert bound_pixels((480, 1152)) == 10
    assert bound_pixels((20, 20)) == 1
    assert bound_pixels((3, 100, 100)) == 2
    assert bound_pixels((20, 20), bound_th=4) == 4
    with pytest.raises(ValueError):
        bound_pixels((20, 20), bound_th=2.5)


def test_disk_structuring_element():
    assert disk(1).astype(int).tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    assert disk(2).sum() == 13 and disk(8).shape == (17, 17)


@pytest.mark.parametrize("radius", [1, 2, 3, 5, 8])
def test_dilation_equals_plain_binary_dilation(radius: int):
    rng = np.random.default_rng(radius)
    b = rng.random((3, 37, 53)) < 0.01
    b[0, 0, 0] = b[1, -1, -1] = b[2, 0, -1] = True  # corners: zero border outside the image
    expected = ndimage.binary_dilation(b, structure=disk(radius)[None])
    assert np.array_equal(_dilate_disk(b, radius), expected)


def f_reference(gt: np.ndarray, pred: np.ndarray) -> float:
    """Plain full-frame F from the spec's pseudo-code (no cropping), for cross-checking."""
    r = bound_pixels(gt.shape)
    bg, bp = seg2bmap(gt), seg2bmap(pred)
    n_bg, n_bp = bg.sum(), bp.sum()
    if n_bp == 0 and n_bg > 0:
        p, rc = 1.0, 0.0
    elif n_bp > 0 and n_bg == 0:
        p, rc = 0.0, 1.0
    elif n_bp == 0 and n_bg == 0:
        p, rc = 1.0, 1.0
    else:
        p = (bp & ndimage.binary_dilation(bg, disk(r))).sum() / n_bp
        rc = (bg & ndimage.binary_dilation(bp, disk(r))).sum() / n_bg
    return 0.0 if p + rc == 0 else 2 * p * rc / (p + rc)


def test_f_matches_plain_definition_on_random_blobs():
    rng = np.random.default_rng(0)
    gt = ndimage.gaussian_filter(rng.random((6, 90, 130)), (0, 5, 5)) > 0.5
    pred = ndimage.gaussian_filter(rng.random((6, 90, 130)), (0, 5, 5)) > 0.5
    pred[4] = gt[4] ^ (rng.random((90, 130)) < 0.02)  # close to GT
    pred[5] = False
    f = f_measure(gt, pred)
    assert f.tolist() == [f_reference(g, p) for g, p in zip(gt, pred, strict=True)]
    assert all(0 < v < 1 for v in f[:5]) and f[5] == 0.0


# --- DV-3: statistics ----------------------------------------------------------------------------


def test_dv3_db_statistics():
    m, r, d = db_statistics([1.0, 0.9, 0.4, 0.6, 0.2, 0.8, 0.3, 0.5])
    assert (m, r, d) == pytest.approx((0.5875, 0.5, 0.233333), abs=1e-6)
    m, r, d = db_statistics([0.7, np.nan, 0.3])
    assert (m, r, d) == pytest.approx((0.5, 0.333333, 0.4), abs=1e-6)


def test_db_statistics_two_frames_and_long_sequences():
    assert db_statistics([1.0, 0.0]) == (0.5, 0.5, 1.0)  # bins v[0:1] and v[1:2]
    v = np.linspace(1.0, 0.0, 300)  # > 255 frames: int64 bins (the reference's uint8 overflows)
    _, _, d = db_statistics(v)
    assert d == pytest.approx(v[:76].mean() - v[224:].mean())


def test_object_scores_and_their_mean_over_objects():
    """One row per object (DV-1 frames), J&F = mean of the object means of J and F."""
    gt = np.stack([GT20, GT20])
    shifted = object_scores("seq", 1, ["00001", "00002"], gt, np.stack([square(20, 5, 10, 1)] * 2))
    perfect = object_scores("seq", 2, ["00001", "00002"], gt, gt)
    assert shifted["name"] == "seq_1" and shifted["F"] == [1.0, 1.0]
    assert shifted["J"] == pytest.approx([5 / 7, 5 / 7]) and shifted["J-Decay"] == 0.0
    out = summarize([shifted, perfect], ["seq"])
    assert out["J-Mean"] == pytest.approx((5 / 7 + 1) / 2) and out["F-Mean"] == 1.0
    assert out["J&F-Mean"] == pytest.approx(((5 / 7 + 1) / 2 + 1) / 2)
    assert out["n_objects"] == 2 and out["per_object"] == [shifted, perfect]
    assert np.isnan(summarize([], [])["J&F-Mean"])


# --- evaluate_davis on a synthetic DAVIS root ----------------------------------------------------

PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0, 0, 0] * 251 + [224, 224, 192]


def write_index_png(path: Path, labels: np.ndarray) -> None:
    """Palette PNG holding `labels` as indices (the DAVIS annotation format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = labels.shape
    im = Image.frombytes("P", (w, h), labels.astype(np.uint8).tobytes())
    im.putpalette(PALETTE)
    im.save(path)


def alpha_frame(dx: int = 0, void: bool = False) -> np.ndarray:
    """Sequence 'alpha': one object (rows/cols 5..10, shifted by dx); GT has void rows 0 and 19."""
    a = square(20, 5, 10, dx=dx).astype(np.uint8)
    if void:
        a[0] = a[19] = 255
    return a


def beta_frame(objects: tuple[int, ...] = (1, 2)) -> np.ndarray:
    """Sequence 'beta': object 1 rows/cols 2..5, object 2 rows/cols 12..16."""
    a = np.zeros((20, 20), dtype=np.uint8)
    if 1 in objects:
        a[2:6, 2:6] = 1
    if 2 in objects:
        a[12:17, 12:17] = 2
    return a


@pytest.fixture()
def davis_root(tmp_path: Path) -> Path:
    root = tmp_path / "DAVIS"
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("alpha\nbeta\n")
    for t in range(4):
        write_index_png(
            root / "Annotations" / "480p" / "alpha" / f"{t:05d}.png", alpha_frame(void=True)
        )
        write_index_png(root / "Annotations" / "480p" / "beta" / f"{t:05d}.png", beta_frame())
    return root


def write_results(root: Path, frames: dict[str, dict[int, np.ndarray]]) -> Path:
    for seq, by_t in frames.items():
        for t, labels in by_t.items():
            write_index_png(root / seq / f"{t:05d}.png", labels)
    return root


def test_evaluate_davis_perfect(davis_root: Path, tmp_path: Path):
    res = write_results(
        tmp_path / "perfect",
        {
            "alpha": {t: alpha_frame() for t in range(4)},
            "beta": {t: beta_frame() for t in range(4)},
        },
    )
    out = evaluate_davis(davis_root, res)
    assert out["J&F-Mean"] == out["J-Mean"] == out["F-Mean"] == 1.0
    assert out["J-Recall"] == out["F-Recall"] == 1.0
    assert out["J-Decay"] == out["F-Decay"] == 0.0
    assert out["n_objects"] == 3 and out["sequences"] == ["alpha", "beta"]
    assert [row["name"] for row in out["per_object"]] == ["alpha_1", "beta_1", "beta_2"]
    assert out["per_object"][0]["frames"] == ["00001", "00002"]  # first and last excluded


def test_evaluate_davis_degraded(davis_root: Path, tmp_path: Path):
    res = write_results(
        tmp_path / "degraded",
        {
            # no frame 0 at all; frame 1 shifted by 1 (J 5/7, F 1), frame 2 by 3 (J 1/3, F 0.5);
            # the last frame is never read
            "alpha": {1: alpha_frame(dx=1), 2: alpha_frame(dx=3)},
            # object 2 never predicted -> all-zero masks; label 7 in the last frame is not evaluated
            "beta": {
                0: beta_frame(),
                1: beta_frame((1,)),
                2: beta_frame((1,)),
                3: np.full((20, 20), 7),
            },
        },
    )
    out = evaluate_davis(davis_root, res)
    alpha, beta1, beta2 = out["per_object"]
    assert alpha["J"] == pytest.approx([5 / 7, 1 / 3]) and alpha["F"] == pytest.approx([1.0, 0.5])
    assert (alpha["J-Mean"], alpha["J-Recall"], alpha["J-Decay"]) == pytest.approx(
        ((5 / 7 + 1 / 3) / 2, 0.5, 5 / 7 - 1 / 3)
    )
    assert (alpha["F-Mean"], alpha["F-Recall"], alpha["F-Decay"]) == (0.75, 0.5, 0.5)
    assert beta1["J"] == beta1["F"] == [1.0, 1.0]
    assert beta2["J"] == beta2["F"] == [0.0, 0.0]
    j_mean = ((5 / 7 + 1 / 3) / 2 + 1 + 0) / 3
    f_mean = (0.75 + 1 + 0) / 3
    assert out["J-Mean"] == pytest.approx(j_mean)  # mean over objects, not sequences
    assert out["F-Mean"] == pytest.approx(f_mean)
    assert out["J&F-Mean"] == pytest.approx((j_mean + f_mean) / 2)  # 0.545635
    assert out["J&F-Mean"] == pytest.approx(0.545635, abs=1e-6)
    assert out["J-Recall"] == pytest.approx(0.5) and out["F-Recall"] == pytest.approx(0.5)
    assert out["J-Decay"] == pytest.approx((5 / 7 - 1 / 3) / 3)
    assert out["F-Decay"] == pytest.approx(0.5 / 3)


def test_evaluate_davis_sequence_subset(davis_root: Path, tmp_path: Path):
    res = write_results(tmp_path / "r", {"beta": {1: beta_frame((2,)), 2: beta_frame((2,))}})
    out = evaluate_davis(davis_root, res, sequences=["beta"])
    assert [row["name"] for row in out["per_object"]] == ["beta_1", "beta_2"]
    assert out["J-Mean"] == 0.5 and out["F-Mean"] == 0.5


def test_evaluate_davis_missing_results_are_listed(davis_root: Path, tmp_path: Path):
    res = write_results(tmp_path / "r", {"alpha": {1: alpha_frame()}, "beta": {2: beta_frame()}})
    with pytest.raises(MissingResultsError, match="2 result PNG") as err:
        evaluate_davis(davis_root, res)
    assert "alpha/00002.png" in str(err.value) and "beta/00001.png" in str(err.value)


def test_evaluate_davis_label_above_object_count(davis_root: Path, tmp_path: Path):
    res = write_results(
        tmp_path / "r",
        {
            "alpha": {1: alpha_frame(), 2: alpha_frame() * 2},
            "beta": {1: beta_frame(), 2: beta_frame()},
        },
    )
    with pytest.raises(DavisFormatError, match="alpha: result label 2 exceeds the 1 object"):
        evaluate_davis(davis_root, res)


def test_evaluate_davis_bad_results(davis_root: Path, tmp_path: Path):
    res = write_results(
        tmp_path / "small", {"alpha": {1: alpha_frame()[:10], 2: alpha_frame()[:10]}}
    )
    with pytest.raises(DavisFormatError, match="size"):
        evaluate_davis(davis_root, res, sequences=["alpha"])
    rgb = tmp_path / "rgb" / "alpha"
    rgb.mkdir(parents=True)
    for t in (1, 2):
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(rgb / f"{t:05d}.png")
    with pytest.raises(DavisFormatError, match="indexed"):
        evaluate_davis(davis_root, tmp_path / "rgb", sequences=["alpha"])


def test_evaluate_davis_missing_sequence_list(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="ImageSets"):
        evaluate_davis(tmp_path, tmp_path)
