"""Episode generation against the golden digests and readable checks of spec §2.3."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest

from promptseg.data.episodes import (
    DEFAULT_EPISODES,
    Episode,
    draw_supports,
    episode_digest,
    episodes,
    lvis_fold_classes,
    pick,
    serialize_episodes,
)
from promptseg.errors import ChecksumError

SHARED_SPLITS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fss-splits"


@pytest.fixture(scope="module")
def splits() -> Path:
    if not SHARED_SPLITS.is_dir():
        pytest.skip(f"reference split lists not found at {SHARED_SPLITS} (../shared/data)")
    return SHARED_SPLITS


GOLDEN = {
    ("pascal5i", 0, 1): "1d5228cc01e1ca35b4ec056b28d6264e937478beae05ed3cd69a749ab6638d27",
    ("pascal5i", 0, 5): "2d060f23838f5880597c0b75494128cbfc708b26b39e192cfede74b6d7b7a97e",
    ("pascal5i", 1, 1): "83edd36a5ba4731a7c3ab66a83a0ee2c9a7d457a029e69147c59a995ac50ea79",
    ("pascal5i", 1, 5): "2d4e0f9bb041e53cfc302751b665cfef10503bd1d9f84d94f7018c9f8e499263",
    ("pascal5i", 2, 1): "b6188763081de7c96bf93449105523f25576b7ec624c17192dcbd0b63209b082",
    ("pascal5i", 2, 5): "ca83d0d3beb04654d169b0c5f947f84fa5d72c1b2b2210ca73b7f6762e4ea173",
    ("pascal5i", 3, 1): "7425aff317c788cd976efeb70cc478ae85fccb380d040d34677ed66f3924a35e",
    ("pascal5i", 3, 5): "d75865ce72e927aa49f832e1c18d27b64ff1ca33087045908bf5f450fe7dfe68",
    ("coco20i", 0, 1): "d571c773d6c3f2041c097be22f6d4fd4ce7ddf6324a41f9c4064840d5c3cfb79",
    ("coco20i", 0, 5): "3286194b7b8841523c4f0b6f4a50e3dbbb56018a0e6c5d8a5407e51c965593ef",
    ("coco20i", 1, 1): "62868e9e2eef0e3d466d54c6ba76d2bfc220282de4c3942eef4d19c856fd045b",
    ("coco20i", 1, 5): "06894b634bd9a1d383dd965f8c3ab06620470b3b6b4e23ce500a940ac309af1f",
    ("coco20i", 2, 1): "38dbcf69afdfe72ee6eceb9ec1ae8a4d539773297ce9fe3235ea58fada0eb2a5",
    ("coco20i", 2, 5): "1be15633a88e2e8fdf306d1cee508ca840fd0a5a07c9420bea711ec935562413",
    ("coco20i", 3, 1): "f7592c0f02a5ace84815c386c9aa51abbdb85ec09a7a3df5b313a3e3581b82c4",
    ("coco20i", 3, 5): "61009d4711d2601a41885363bcf91a8972dcf85d1abd7f7527efda54a327f44e",
    ("fss1000", "test", 1): "b99395086bb0abe00b9ebcdc7c56da09e5317cf0541acaad3f1b90d7eecc9357",
    ("fss1000", "test", 5): "2694e4d72dacfa3a741683605a986a0c735741a3fea8ce882a28eaa491c37c8d",
}


def coco(num: int) -> str:
    return f"val2014/COCO_val2014_{num:012d}.jpg"


@pytest.mark.parametrize(("dataset", "fold", "shots"), list(GOLDEN))
def test_golden_digest(splits: Path, dataset: str, fold: int | str, shots: int) -> None:
    eps = episodes(dataset, fold, shots, splits_dir=splits)
    assert len(eps) == DEFAULT_EPISODES[dataset]
    assert [e.index for e in eps] == list(range(len(eps)))
    assert all(len(e.supports) == shots and e.query not in e.supports for e in eps)
    assert episode_digest(eps) == GOLDEN[dataset, fold, shots]


def test_pascal_first_episodes(splits: Path) -> None:
    assert episodes("pascal5i", 0, 1, splits_dir=splits, n=3) == [
        Episode(0, 0, "2007_000033", ("2010_001174",)),
        Episode(1, 3, "2007_000061", ("2007_005705",)),
        Episode(2, 1, "2007_000129", ("2008_003108",)),
    ]
    first = episodes("pascal5i", 0, 5, splits_dir=splits, n=1)[0]
    assert first.supports == (
        "2010_001174",
        "2007_001884",
        "2011_002515",
        "2010_000238",
        "2011_001114",
    )


def test_pascal_cycles_through_val_list(splits: Path) -> None:
    eps = episodes("pascal5i", 0, 1, splits_dir=splits)
    assert [e.query for e in eps[346:349]] == [e.query for e in eps[:3]]  # fold0 has 346 lines
    assert eps[346].supports != eps[0].supports or eps[347].supports != eps[1].supports
    for fold in range(4):
        ids = {e.class_id for e in episodes("pascal5i", fold, 1, splits_dir=splits, n=400)}
        assert ids == set(range(5 * fold, 5 * fold + 5))
    person = sum(e.class_id == 14 for e in episodes("pascal5i", 2, 1, splits_dir=splits))
    assert person == 541  # spec §2.2


def test_coco_first_episodes(splits: Path) -> None:
    assert episodes("coco20i", 0, 1, splits_dir=splits, n=3) == [
        Episode(0, 72, coco(507081), (coco(486122),)),
        Episode(1, 44, coco(504005), (coco(570465),)),
        Episode(2, 32, coco(74951), (coco(41212),)),
    ]
    second = episodes("coco20i", 0, 5, splits_dir=splits, n=2)[1]
    assert (second.class_id, second.query) == (60, coco(307172))


@pytest.mark.parametrize(
    ("fold", "shots", "classes"),
    [
        (0, 1, "72 44 32 36 72 72 60 56 20 8 32 0 20 60 64 60 64 68 52 64"),
        (0, 5, "72 60 36 76 4 20 72 20 60 44 72 68 32 0 68 28 12 52 20 4"),
        (1, 1, "73 77 21 69 57 1 13 5 25 21"),
        (2, 1, "74 14 18 2 34 6 74 14 26 30"),
        (3, 1, "75 3 31 15 51 35 15 35 7 7"),
    ],
)
def test_coco_class_sequences(splits: Path, fold: int, shots: int, classes: str) -> None:
    expected = [int(c) for c in classes.split()]
    eps = episodes("coco20i", fold, shots, splits_dir=splits, n=len(expected))
    assert [e.class_id for e in eps] == expected


def test_coco_class_coverage(splits: Path) -> None:
    eps = episodes("coco20i", 0, 1, splits_dir=splits)
    counts = np.bincount([e.class_id for e in eps], minlength=80)
    assert set(np.flatnonzero(counts)) == set(range(0, 80, 4))
    assert counts[0::4].min() == 40 and counts[0::4].max() == 66  # spec §2.2


def test_shots_share_only_the_start_of_the_stream(splits: Path) -> None:
    one = episodes("coco20i", 0, 1, splits_dir=splits, n=5)
    five = episodes("coco20i", 0, 5, splits_dir=splits, n=5)
    assert (one[0].class_id, one[0].query, one[0].supports[0]) == (
        five[0].class_id,
        five[0].query,
        five[0].supports[0],
    )
    assert [e.class_id for e in one[1:]] != [e.class_id for e in five[1:]]


def test_fss_first_episodes_and_layout(splits: Path) -> None:
    eps = episodes("fss1000", "test", 1, splits_dir=splits)
    assert eps[:3] == [
        Episode(0, 760, "abe's_flyingfish/1.jpg", ("abe's_flyingfish/3.jpg",)),
        Episode(1, 760, "abe's_flyingfish/10.jpg", ("abe's_flyingfish/4.jpg",)),
        Episode(2, 760, "abe's_flyingfish/2.jpg", ("abe's_flyingfish/3.jpg",)),
    ]
    assert [e.query.split("/")[1] for e in eps[:10]] == [
        f"{k}.jpg" for k in (1, 10, 2, 3, 4, 5, 6, 7, 8, 9)
    ]
    assert {e.class_id for e in eps} == set(range(760, 1000))
    assert len({e.query for e in eps}) == 2400
    assert all(s.split("/")[0] == e.query.split("/")[0] for e in eps for s in e.supports)
    five = episodes("fss1000", "test", 5, splits_dir=splits, n=1)[0]
    assert five.supports.count("abe's_flyingfish/3.jpg") == 2  # duplicates are legal (§2.1)


@pytest.mark.parametrize(
    ("dataset", "fold"), [("pascal5i", 1), ("coco20i", 2), ("fss1000", "test")]
)
@pytest.mark.parametrize("n", [0, 1, 37, 999])
def test_n_takes_a_prefix_of_the_stream(splits: Path, dataset: str, fold, n: int) -> None:
    full = episodes(dataset, fold, 5, splits_dir=splits)
    assert episodes(dataset, fold, 5, splits_dir=splits, n=n) == full[:n]


def test_seed_and_repeatability(splits: Path) -> None:
    a = episodes("coco20i", 1, 1, splits_dir=splits, n=50)
    assert a == episodes("coco20i", 1, 1, splits_dir=splits, n=50)
    b = episodes("coco20i", 1, 1, splits_dir=splits, n=50, seed=1)
    assert episode_digest(a) != episode_digest(b)


def test_argument_errors(splits: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        episodes("pascal", 0, 1, splits_dir=splits)
    with pytest.raises(ValueError, match="fold must be 0..3"):
        episodes("pascal5i", 4, 1, splits_dir=splits)
    with pytest.raises(ValueError, match="'test'"):
        episodes("fss1000", 0, 1, splits_dir=splits)
    with pytest.raises(ValueError, match="shots"):
        episodes("coco20i", 0, 0, splits_dir=splits)
    with pytest.raises(ValueError, match="n must be in 0..1000"):
        episodes("coco20i", 0, 1, splits_dir=splits, n=1001)
    assert episodes("pascal5i", "2", 1, splits_dir=splits, n=3) == episodes(
        "pascal5i", 2, 1, splits_dir=splits, n=3
    )


# --------------------------------------------------------------------------- primitives


@pytest.mark.parametrize("length", [1, 2, 3, 10, 37, 500, 4096])
def test_pick_equals_choice_on_the_sequence(length: int) -> None:
    seq = [f"img{i:05d}" for i in range(length)]
    a, b = np.random.RandomState(7), np.random.RandomState(7)
    for _ in range(20):
        assert pick(a, seq) == b.choice(seq, 1, replace=False)[0]
    assert a.randint(2**31) == b.randint(2**31)  # same number of raw draws consumed


def test_draw_supports_rejects_query_keeps_duplicates() -> None:
    rs = np.random.RandomState(0)
    sup = draw_supports(rs, ["q", "a"], "q", 4)
    assert sup == ("a", "a", "a", "a")
    with pytest.raises(ValueError, match="no support candidate"):
        draw_supports(rs, ["q"], "q", 1)


def test_serialisation_format() -> None:
    eps = [Episode(0, 3, "x/1.jpg", ("x/2.jpg", "x/2.jpg")), Episode(1, 70, "é", ("b",))]
    text = serialize_episodes(eps)
    assert text == "0\t3\tx/1.jpg\tx/2.jpg,x/2.jpg\n1\t70\té\tb\n"
    assert episode_digest(eps) == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert episode_digest([]) == hashlib.sha256(b"").hexdigest()


# --------------------------------------------------------------------------- LVIS-92i


def _lvis_val(n_cats: int = 80) -> dict[int, dict[str, dict]]:
    """Synthetic LVIS val pickle: category k has 1 + k % 7 images (some with <= 5)."""
    val: dict[int, dict[str, dict]] = {}
    for k in range(n_cats):
        cat = 1000 - 3 * k  # dict order, not key order, defines folds
        val[cat] = {
            f"val2017/{k:03d}_{j}.jpg": {"annotations": [{"segmentation": [[0, 0, 1, 0, 1, 1]]}]}
            for j in range(1 + k % 7)
        }
    return val


def _lvis_reference(val, fold: int, shots: int, n: int) -> list[Episode]:
    """Spec §2.2 pseudo-code written literally (rs.choice on the lists themselves)."""
    rs = np.random.RandomState(0)
    cats = [c for c in val.keys() if len(val[c]) > shots]
    classes = [cats[fold + 10 * v] for v in range(len(cats) // 10)]
    out = []
    for i in range(n):
        imgs = list(val[classes[i % len(classes)]].keys())
        q = rs.choice(imgs, 1, replace=False)[0]
        sup: list[str] = []
        while len(sup) < shots:
            s = rs.choice(imgs, 1, replace=False)[0]
            if s != q:
                sup.append(str(s))
        out.append(Episode(i, i % len(classes), str(q), tuple(sup)))
    return out


@pytest.fixture
def lvis_root(tmp_path: Path) -> Path:
    (tmp_path / "LVIS").mkdir()
    (tmp_path / "LVIS" / "lvis_val.pkl").write_bytes(pickle.dumps(_lvis_val()))
    return tmp_path


def test_lvis_needs_data_root_and_opt_in(lvis_root: Path) -> None:
    with pytest.raises(ValueError, match="data_root"):
        episodes("lvis92i", 0, 1)
    with pytest.raises(ChecksumError, match="trust_pickle=True"):
        episodes("lvis92i", 0, 1, data_root=lvis_root, n=5)
    with pytest.raises(FileNotFoundError, match="lvis_val.pkl"):
        episodes("lvis92i", 0, 1, data_root=lvis_root / "nope", trust_pickle=True)


def test_lvis_pickle_is_trusted_once_and_refused_when_changed(lvis_root: Path) -> None:
    from promptseg.data.splits import SplitChecksumWarning

    first = episodes("lvis92i", 0, 1, data_root=lvis_root, trust_pickle=True, n=5)
    assert episodes("lvis92i", 0, 1, data_root=lvis_root, n=5) == first  # no flag needed now
    pkl = lvis_root / "LVIS" / "lvis_val.pkl"
    pkl.write_bytes(pickle.dumps({**_lvis_val(), 99999: {}}))
    with pytest.raises(ChecksumError, match="CHANGED since you trusted it"):
        episodes("lvis92i", 0, 1, data_root=lvis_root, n=5)
    with pytest.warns(SplitChecksumWarning, match="changed since you trusted it"):
        episodes("lvis92i", 0, 1, data_root=lvis_root, trust_pickle=True, n=5)
    episodes("lvis92i", 0, 1, data_root=lvis_root, n=5)  # the new file is trusted now


@pytest.mark.parametrize(("fold", "shots"), [(0, 1), (3, 1), (0, 5), (9, 5)])
def test_lvis_matches_literal_spec(lvis_root: Path, fold: int, shots: int) -> None:
    eps = episodes("lvis92i", fold, shots, data_root=lvis_root, trust_pickle=True, n=60)
    assert eps == _lvis_reference(_lvis_val(), fold, shots, 60)


def test_lvis_classes_depend_on_shots() -> None:
    val = _lvis_val()
    one, five = lvis_fold_classes(val, 0, 1), lvis_fold_classes(val, 0, 5)
    assert all(len(val[c]) > 1 for c in one) and all(len(val[c]) > 5 for c in five)
    assert len(one) == len([c for c in val if len(val[c]) > 1]) // 10
    assert len(five) < len(one)
    assert one[0] == next(c for c in val if len(val[c]) > 1)  # dict order
