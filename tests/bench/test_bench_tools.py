"""`promptseg bench episodes | verify-splits | make-mini`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from promptseg.cli import main
from promptseg.data.episodes import episode_digest, episodes, serialize_episodes
from promptseg.testing.mini_fewshot import make_mini_fewshot

SHARED_SPLITS = Path(__file__).resolve().parents[2].parent / "shared/data/fss-splits"


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini_fs")
    make_mini_fewshot(root, ["pascal5i", "fss1000"])
    return root


@pytest.mark.parametrize(
    ("dataset", "fold", "shots"), [("pascal5i", "0", 1), ("fss1000", "test", 5)]
)
def test_episodes_prints_the_digest(mini, tmp_path, capsys, dataset, fold, shots):
    out = tmp_path / "episodes.tsv"
    argv = ["bench", "episodes", "--dataset", dataset, "--fold", fold, "--shots", str(shots)]
    argv += ["--splits-dir", str(mini / "splits"), "--data-root", str(mini), "--out", str(out)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mini split files are not hsnet's
        assert main(argv) == 0
        eps = episodes(
            dataset,
            int(fold) if fold.isdigit() else fold,
            shots,
            splits_dir=mini / "splits",
            data_root=mini,
        )
    printed = capsys.readouterr().out.split()
    assert printed == [episode_digest(eps)]
    assert out.read_text(encoding="utf-8") == serialize_episodes(eps)
    at = argv.index("--splits-dir")  # without it: the data root's own splits/ (make-mini's)
    assert main(argv[:at] + argv[at + 2 :]) == 0
    assert capsys.readouterr().out.split() == [episode_digest(eps)]


def test_make_mini_writes_the_folders(tmp_path, capsys):
    assert main(["bench", "make-mini", "--out", str(tmp_path), "--datasets", "davis,pascal5i"]) == 0
    assert (tmp_path / "DAVIS" / "ImageSets" / "2017" / "val.txt").is_file()
    assert (tmp_path / "VOC2012").is_dir() and (tmp_path / "splits" / "pascal" / "val").is_dir()
    assert "davis" in capsys.readouterr().out
    assert main(["bench", "make-mini", "--out", str(tmp_path), "--datasets", "nope"]) != 0
    assert "unknown mini datasets" in capsys.readouterr().err


def test_make_mini_all(tmp_path):
    assert main(["bench", "make-mini", "--out", str(tmp_path)]) == 0
    for folder in ("DAVIS", "VGPhraseCut_v0", "VOC2012", "splits"):
        assert (tmp_path / folder).is_dir(), folder


def test_verify_splits_flags_foreign_and_missing_files(mini, capsys):
    assert main(["bench", "verify-splits", "--splits-dir", str(mini / "splits")]) == 1
    table = capsys.readouterr().out
    assert "MISMATCH" in table and "MISSING" in table  # mini pascal/fss lists, no coco pickles
    assert "pascal/val/fold0.txt" in table


@pytest.mark.skipif(not SHARED_SPLITS.is_dir(), reason="shared hsnet split files not present")
def test_verify_splits_on_the_shared_copy_is_all_ok(capsys):
    assert main(["bench", "verify-splits", "--splits-dir", str(SHARED_SPLITS)]) == 0
    table = capsys.readouterr().out
    assert table.count("| OK |") == 9 and "MISMATCH" not in table and "MISSING" not in table


def _matcher_layout(root: Path, splits: Path, *, pascal_folds=range(4)) -> Path:
    """A data root holding hsnet split files where Matcher/SINE keep them."""
    import shutil

    for f in pascal_folds:
        dst = root / "VOC2012" / "splits" / "val" / f"fold{f}.txt"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(splits / "pascal" / "val" / f"fold{f}.txt", dst)
    if (splits / "fss" / "test.txt").is_file():
        dst = root / "FSS-1000" / "splits" / "test.txt"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(splits / "fss" / "test.txt", dst)
    for f in range(4):
        src = splits / "coco" / "val" / f"fold{f}.pkl"
        if src.is_file():
            dst = root / "COCO2014" / "splits" / "val" / f"fold{f}.pkl"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    return root


def test_verify_splits_reads_a_matcher_data_root(mini, tmp_path, capsys):
    root = _matcher_layout(tmp_path, mini / "splits", pascal_folds=[0, 1])
    assert main(["bench", "verify-splits", "--data-root", str(root)]) == 1
    rows = {line.split(" | ")[0][2:]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "MISMATCH" in rows["VOC2012/splits/val/fold0.txt"]  # the mini lists, found there
    assert "MISMATCH" in rows["FSS-1000/splits/test.txt"]
    assert "MISSING" in rows["VOC2012/splits/val/fold2.txt"]
    assert "MISSING" in rows["COCO2014/splits/val/fold0.pkl"]
    with pytest.raises(SystemExit):  # argparse: --splits-dir not allowed with --data-root
        main(["bench", "verify-splits", "--data-root", "x", "--splits-dir", "y"])
    from promptseg.bench.tools import verify_splits

    with pytest.raises(ValueError, match="not both"):
        verify_splits("x", data_root="y")


@pytest.mark.skipif(not SHARED_SPLITS.is_dir(), reason="shared hsnet split files not present")
def test_verify_splits_on_a_matcher_data_root_with_upstream_files(tmp_path, capsys):
    root = _matcher_layout(tmp_path, SHARED_SPLITS)
    assert main(["bench", "verify-splits", "--data-root", str(root)]) == 0
    table = capsys.readouterr().out
    assert table.count("| OK |") == 9 and "COCO2014/splits/val/fold3.pkl | OK" in table


def test_bench_run_executes_a_suite(tmp_path, capsys):
    from promptseg.cli import main
    from promptseg.testing.mini_fewshot import make_mini_fewshot

    make_mini_fewshot(tmp_path / "data", datasets=("pascal5i",))
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: mini\nruns:\n"
        "  - promptseg eval fss --dataset pascal5i --model test_colorkey --data-root ${DATA_ROOT}"
        " --splits-dir ${DATA_ROOT}/splits --episodes 10\n"
    )
    assert (
        main(
            [
                "bench",
                "run",
                str(suite),
                "--data-root",
                str(tmp_path / "data"),
                "--out",
                str(tmp_path / "runs"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "mIoU 100.00" in out and "1 of 1 runs succeeded" in out
    assert main(["bench", "run", str(suite)]) == 2  # ${DATA_ROOT} missing: a clear error
    assert "DATA_ROOT" in capsys.readouterr().err
    assert (
        main(
            ["bench", "run", "benchmarks/suites/sine_table1.yaml", "--data-root", "/d", "--dry-run"]
        )
        == 0
    )
    out = capsys.readouterr().out
    suite_file = Path(__file__).resolve().parents[2] / "benchmarks/suites/sine_table1.yaml"
    n = len(yaml.safe_load(suite_file.read_text())["runs"])
    assert f"would run {n} evals (dry run: nothing was run)" in out and "succeeded" not in out


def test_bench_run_lines_share_no_process_state_and_failures_are_counted(
    tmp_path, capsys, monkeypatch
):
    """Each suite line runs in its own process: `--no-tf32` of one line (a process-wide torch
    flag) changes neither the `bench run` process nor a later line; a failing line is counted,
    its error shown, and the suite goes on."""
    make_mini_fewshot(tmp_path / "data", datasets=("pascal5i",))
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")  # TF32 on where not turned off
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    fss = (
        "  - promptseg eval fss --dataset pascal5i --model test_colorkey --data-root ${DATA_ROOT}"
        " --splits-dir ${DATA_ROOT}/splits --episodes 2"
    )
    failing = "  - promptseg eval perseg --model test_empty --data-root ${DATA_ROOT}"
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: tf32\nruns:\n{fss} --fold 0 --no-tf32\n{failing}\n{fss} --fold 1\n")
    argv = ["bench", "run", str(suite), "--data-root", str(tmp_path / "data")]
    assert main([*argv, "--out", str(tmp_path / "runs")]) == 1
    captured = capsys.readouterr()
    assert "2 of 3 runs succeeded" in captured.out
    assert "promptseg eval perseg: error: PerSeg: layout not found" in captured.err
    assert torch.backends.cuda.matmul.allow_tf32 is True
    tf32 = {
        fold: json.loads(
            (tmp_path / "runs/fss/pascal5i" / fold / "1/test_colorkey/result.json").read_text()
        )["env"]["tf32"]
        for fold in ("0", "1")
    }
    assert tf32 == {"0": False, "1": True}
