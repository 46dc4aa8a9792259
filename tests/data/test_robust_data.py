"""Generated bad and good inputs for the data helpers (tests/robustness.py)."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from promptseg.data.episodes import DEFAULT_EPISODES, episodes
from promptseg.data.fewshot import resize_nearest
from promptseg.data.splits import load_coco_split, read_fss_split, read_pascal_split
from tests.robustness import run_case

N = 400


@settings(max_examples=N)
@given(
    dataset=st.sampled_from(["pascal5i", "pascal5i", "fss1000", "nope", 3, ["pascal5i"]]),
    fold=st.one_of(st.just(0), st.integers(-1, 4), st.sampled_from(["test", "0", " 1", None])),
    shots=st.one_of(st.integers(1, 3), st.integers(-1, 3), st.sampled_from([1.0, "1", True])),
    seed=st.one_of(
        st.integers(0, 2**32 - 1),
        st.integers(-(2**34), 2**34),
        st.sampled_from([-1, 2**33, "x", 1.5, None, True]),
    ),
    n=st.one_of(st.integers(0, 5), st.none(), st.integers(-2, 5), st.sampled_from(["3", 2.0])),
    text=st.one_of(
        st.just("a__01\nb__01\nc__02\n"),
        st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
        st.sampled_from(["a__00\n", "x__\u00b2\n", "__01\n", "a__01\n"]),
    ),
)
def test_episodes(tmp_path_factory, dataset, fold, shots, seed, n, text) -> None:
    d = tmp_path_factory.mktemp("splits")
    (d / "pascal" / "val").mkdir(parents=True)
    for f in range(4):
        (d / "pascal" / "val" / f"fold{f}.txt").write_text(text, encoding="utf-8")
    (d / "fss").mkdir()
    (d / "fss" / "test.txt").write_text("cat\r\ndog\r\n")

    def check(eps: list) -> None:
        assert len(eps) == (DEFAULT_EPISODES[dataset] if n is None else min(n, len(eps)))
        for e in eps:
            assert len(e.supports) == shots and e.query not in e.supports

    run_case(
        "data.episodes",
        lambda: episodes(dataset, fold, shots, seed=seed, n=n, splits_dir=d, cache_dir=d),
        check,
    )


@settings(max_examples=N)
@given(
    raw=st.one_of(
        st.binary(max_size=40),
        st.lists(st.from_regex(r"[a-z]{1,4}__[0-9]{1,2}", fullmatch=True), max_size=5).map(
            lambda ls: ("\n".join(ls) + "\n").encode()
        ),
    ),
    cut=st.integers(0, 40),
    kind=st.sampled_from(["pascal", "fss", "coco", "missing"]),
)
def test_split_readers(tmp_path_factory, raw: bytes, cut: int, kind: str) -> None:
    path = tmp_path_factory.mktemp("s") / "split"
    if kind == "coco":
        raw = pickle.dumps({0: ["a.jpg"], 4: ["b.jpg", "c.jpg"]})[: cut * 2] if cut else raw
    if kind != "missing":
        path.write_bytes(raw[:cut] if kind != "coco" else raw)

    def call() -> Any:
        if kind == "coco":
            return load_coco_split(path, trust_pickle=True)
        return read_fss_split(path) if kind == "fss" else read_pascal_split(path)

    def check(out: Any) -> None:
        if kind == "pascal":
            assert all(isinstance(n, str) and c >= 0 for n, c in out)
        elif kind == "coco":
            assert all(isinstance(k, int) and isinstance(v, list) for k, v in out.items())
        else:
            assert all(isinstance(n, str) and n for n in out)

    run_case(f"data.read_{kind}_split", call, check)


@settings(max_examples=N)
@given(
    a=st.one_of(
        st.tuples(
            st.one_of(
                hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
                hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
            ),
            st.sampled_from([np.bool_, np.uint8, np.int16, np.int64, np.uint64, np.float32]),
        ).flatmap(lambda sd: hnp.arrays(sd[1], sd[0])),
        st.sampled_from([[[1, 2]], "ab", None]),
    ),
    size=st.one_of(
        st.tuples(st.integers(1, 8), st.integers(1, 8)),
        st.tuples(st.integers(-1, 8), st.integers(-1, 8)),
        st.sampled_from([(3,), (2.0, 2), "ab", None]),
    ),
)
def test_resize_nearest(a: Any, size: Any) -> None:
    def check(out: np.ndarray) -> None:
        assert out.shape == tuple(size) and out.dtype == a.dtype
        vals = set(np.unique(a).tolist()) if a.dtype.kind != "f" else None
        if vals is not None:
            assert set(np.unique(out).tolist()) <= vals  # nearest never invents a label
        rows = (np.arange(size[0]) * a.shape[0]) // size[0]
        cols = (np.arange(size[1]) * a.shape[1]) // size[1]
        np.testing.assert_array_equal(out, a[rows][:, cols])

    run_case("data.resize_nearest", lambda: resize_nearest(a, size), check)
