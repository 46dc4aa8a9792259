"""`promptseg eval fss` end to end on the miniature datasets with the test models."""

from __future__ import annotations

import json
import warnings

import pytest

from promptseg.cli import main
from promptseg.testing.mini_fewshot import make_mini_fewshot

DATASETS = ["pascal5i", "coco20i", "fss1000", "lvis92i"]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    make_mini_fewshot(root)
    return root


def run(mini, out, model, dataset, *extra):
    argv = ["eval", "fss", "--dataset", dataset, "--model", model, "--data-root", str(mini)]
    argv += ["--splits-dir", str(mini / "splits"), "--trust-pickle", "--out", str(out), *extra]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mini split files are not hsnet's: checksum warnings
        assert main(argv) == 0
    (path,) = (out / "fss" / dataset).glob(f"*/*/{model}/result.json")
    return json.loads(path.read_text())


@pytest.mark.parametrize("dataset", DATASETS)
def test_colorkey_is_perfect_and_empty_scores_zero(mini, tmp_path, dataset):
    perfect = run(
        mini, tmp_path / "a", "test_colorkey", dataset, "--episodes", "200", "--shots", "5"
    )
    assert perfect["metrics"] == {"mIoU": 100.0, "FB-IoU": 100.0}
    empty = run(mini, tmp_path / "b", "test_empty", dataset, "--episodes", "40")
    assert empty["metrics"]["mIoU"] == 0.0 and 0 < empty["metrics"]["FB-IoU"] < 50
    assert (
        empty["episode_digest"]
        == run(mini, tmp_path / "c", "test_shifted", dataset, "--episodes", "40")["episode_digest"]
    )
    assert perfect["schema_version"] == 1 and perfect["n_episodes"] == min(
        200, perfect["n_episodes"]
    )
    assert {"per_class", "accumulators", "env", "protocol", "timing"} <= set(perfect)


def test_resume_gives_the_uninterrupted_numbers(mini, tmp_path, monkeypatch):
    full = run(mini, tmp_path / "full", "test_shifted", "pascal5i", "--episodes", "60")
    from promptseg.bench import runner

    calls = {"n": 0}
    original = runner.Progress.iterate

    def crash_after_30(self, *a, **k):
        for item in original(self, *a, **k):
            calls["n"] += 1
            if calls["n"] > 30:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(runner.Progress, "iterate", crash_after_30)
    with pytest.raises(KeyboardInterrupt):
        run(mini, tmp_path / "resumed", "test_shifted", "pascal5i", "--episodes", "60")
    monkeypatch.setattr(runner.Progress, "iterate", original)
    progress = next((tmp_path / "resumed").rglob("progress.json"))
    assert len(json.loads(progress.read_text())["done"]) == 25  # saved every 25 episodes
    resumed = run(
        mini, tmp_path / "resumed", "test_shifted", "pascal5i", "--episodes", "60", "--resume"
    )
    assert resumed["accumulators"] == full["accumulators"]
    assert resumed["metrics"] == full["metrics"]
    assert not progress.exists()


def test_clipseg_runs_one_shot_at_its_protocol_resolution(mini, tmp_path, tiny_clipseg):
    from promptseg.weights import save_state_dict_file

    ckpt = tmp_path / "tiny.safetensors"
    save_state_dict_file(tiny_clipseg.state_dict(), ckpt)
    result = run(
        mini,
        tmp_path,
        "clipseg_test_tiny",
        "pascal5i",
        "--episodes",
        "5",
        "--checkpoint",
        str(ckpt),
    )
    assert result["protocol"]["resolution"] == "model:64x64"
    assert 0.0 <= result["metrics"]["mIoU"] <= 100.0
