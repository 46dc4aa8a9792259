"""`promptseg eval fss` runs DiffewS (tiny config) end to end at its processing resolution."""

from __future__ import annotations

import pytest

from tests.bench.test_eval_fss import run


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    from promptseg.testing.mini_fewshot import make_mini_fewshot

    root = tmp_path_factory.mktemp("mini")
    make_mini_fewshot(root)
    return root


@pytest.mark.parametrize("shots", [1, 2])
def test_diffews_fss_on_the_mini_dataset(mini, tmp_path, shots):
    result = run(
        mini,
        tmp_path,
        "diffews_test_tiny",
        "pascal5i",
        "--episodes",
        "3",
        "--shots",
        str(shots),
        "--random-weights",
    )
    assert result["protocol"]["resolution"] == "model:32"  # the official 512 squash, tiny
    assert result["n_episodes"] == 3 and 0.0 <= result["metrics"]["mIoU"] <= 100.0
