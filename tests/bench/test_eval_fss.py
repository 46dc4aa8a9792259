"""`promptseg eval fss` end to end on the miniature datasets with the test models."""

from __future__ import annotations

import hashlib
import json
import threading
import warnings
from pathlib import Path

import pytest

from promptseg.cli import main
from promptseg.testing.mini_fewshot import make_mini_fewshot

DATASETS = ["pascal5i", "coco20i", "fss1000", "lvis92i"]
SHARED_SPLITS = Path(__file__).resolve().parents[2].parent / "shared/data/fss-splits"


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
    assert perfect["protocol"]["reference_episodes"] is False
    assert perfect["env"]["dtype"] == "fp32" and perfect["model"]["weights_sha256"] is None


def test_resume_gives_the_uninterrupted_numbers(mini, tmp_path, monkeypatch, interrupted_after):
    full = run(mini, tmp_path / "full", "test_shifted", "pascal5i", "--episodes", "60")

    with interrupted_after(30):
        run(mini, tmp_path / "resumed", "test_shifted", "pascal5i", "--episodes", "60")
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
    assert result["protocol"]["resolution"] == "model:64"
    assert 0.0 <= result["metrics"]["mIoU"] <= 100.0
    assert result["model"]["weights_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()


def test_fss1000_fold_all_is_recorded_as_test(mini, tmp_path):
    result = run(mini, tmp_path, "test_empty", "fss1000", "--fold", "all", "--episodes", "5")
    assert result["fold"] == "test" and result["split"] == "test"
    assert (tmp_path / "fss" / "fss1000" / "test" / "1" / "test_empty" / "result.json").is_file()


def test_threshold_sweep_runs_get_their_own_folders(mini, tmp_path):
    for t in ("0.25", "0.4"):
        argv = ["eval", "fss", "--dataset", "pascal5i", "--model", "test_empty", "--threshold", t]
        argv += ["--data-root", str(mini), "--splits-dir", str(mini / "splits"), "--episodes", "3"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main([*argv, "--out", str(tmp_path)]) == 0
    folders = sorted(p.parent.name for p in (tmp_path / "fss").rglob("result.json"))
    assert folders == ["test_empty@t0.25", "test_empty@t0.4"]


def _dataset(mini, dataset, splits_dir):
    from promptseg.data.fewshot import FewShotDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mini split files are not hsnet's
        return FewShotDataset(dataset, mini, 0, splits_dir=splits_dir, trust_pickle=True)


def test_a_modified_split_list_is_not_the_reference(mini):
    from promptseg.bench.fss import reference_episodes

    for dataset in ("pascal5i", "coco20i"):
        assert not reference_episodes(_dataset(mini, dataset, mini / "splits"), 0, 1000)


@pytest.mark.skipif(not SHARED_SPLITS.is_dir(), reason="shared hsnet split files not present")
def test_the_upstream_split_lists_give_the_reference(mini):
    from promptseg.bench.fss import reference_episodes

    for dataset in ("pascal5i", "coco20i"):
        data = _dataset(mini, dataset, SHARED_SPLITS)
        assert reference_episodes(data, 0, 1000)
        assert not reference_episodes(data, 1, 1000)  # another seed
        assert not reference_episodes(data, 0, 40)  # --episodes: a prefix of the stream


def test_batch_size_and_workers_change_the_calls_not_the_numbers(mini, tmp_path, monkeypatch):
    from promptseg.data.fewshot import FewShotDataset
    from promptseg.models.testing import ColorKey

    sizes: list[int] = []
    threads: set[str] = set()
    encode, query = ColorKey.encode_prompt, FewShotDataset.query

    def counting_encode(self, prompts, level=None):
        sizes.append(len(prompts))
        return encode(self, prompts, level)

    def loading_query(self, ep):
        threads.add(threading.current_thread().name)
        return query(self, ep)

    monkeypatch.setattr(ColorKey, "encode_prompt", counting_encode)
    monkeypatch.setattr(FewShotDataset, "query", loading_query)
    base = run(mini, tmp_path / "a", "test_shifted", "coco20i", "--episodes", "30", "--shots", "2")
    assert sizes == [1] * 30 and threads == {threading.current_thread().name}
    sizes.clear()
    threads.clear()
    batched = run(
        mini,
        tmp_path / "b",
        "test_shifted",
        "coco20i",
        *("--episodes", "30", "--shots", "2", "--batch-size", "8", "--workers", "2"),
    )
    assert sizes == [8, 8, 8, 6]  # support sets of 8 episodes per encode_prompt call
    assert threads and all(t.startswith("promptseg-load") for t in threads)
    assert batched["accumulators"] == base["accumulators"]
    assert batched["metrics"] == base["metrics"] and 0 < base["metrics"]["mIoU"] < 100


def test_bad_batch_size_is_a_clear_error(mini, tmp_path, capsys):
    argv = ["eval", "fss", "--dataset", "fss1000", "--model", "test_empty"]
    argv += ["--data-root", str(mini), "--splits-dir", str(mini / "splits"), "--batch-size", "0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*argv, "--out", str(tmp_path)]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err


def test_under_torchrun_only_rank_0_prints_the_warning(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    assert main(["bench", "make-mini", "--out", str(data), "--datasets", "pascal5i"]) == 0
    argv = ["eval", "fss", "--dataset", "pascal5i", "--model", "test_colorkey"]
    argv += ["--data-root", str(data), "--episodes", "5", "--out", str(tmp_path / "a")]
    capsys.readouterr()
    monkeypatch.setenv("RANK", "1")  # what torchrun sets (WORLD_SIZE unset: no process group)
    assert main(argv) == 0
    assert "warning" not in capsys.readouterr().err


def test_the_data_roots_split_lists_are_used_and_their_warning_is_one_line(tmp_path, capsys):
    """`bench make-mini` writes split lists to <data root>/splits: `eval fss` finds them without
    --splits-dir (offline), warns ONCE, in one line, that they are not the reference episodes,
    and without them the error names --splits-dir and make-mini's own split lists."""
    data = tmp_path / "data"
    assert main(["bench", "make-mini", "--out", str(data), "--datasets", "pascal5i"]) == 0
    argv = ["eval", "fss", "--dataset", "pascal5i", "--model", "test_colorkey"]
    argv += ["--data-root", str(data), "--episodes", "5"]
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    warned = [ln for ln in err.splitlines() if ln.strip()]
    assert len(warned) == 1, err
    assert warned[0].startswith("promptseg eval fss: warning: ")
    assert str(data / "splits" / "pascal" / "val" / "fold0.txt") in warned[0]
    assert "NOT the reference episodes" in warned[0] and "README.md#split-lists" in warned[0]
    assert "§" not in err and "Warning:" not in err and ".py:" not in err
    (path,) = (tmp_path / "a").rglob("result.json")
    result = json.loads(path.read_text())
    assert (
        result["protocol"]["reference_episodes"] is False and "fold0.txt" in result["splits_sha256"]
    )

    (data / "splits").rename(tmp_path / "elsewhere")
    assert main([*argv, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("promptseg eval fss: error: ") and "--splits-dir DIR" in err
    assert "bench make-mini --out D` writes its own to D/splits" in err
    assert str(data / "splits" / "pascal" / "val" / "fold0.txt") in err and "§" not in err
    assert (
        main([*argv, "--out", str(tmp_path / "b"), "--splits-dir", str(tmp_path / "elsewhere")])
        == 0
    )
