"""The table-driven `promptseg eval` commands: options every one of them takes."""

from __future__ import annotations

import json

import pytest

from promptseg.bench.cli import EVALS
from promptseg.cli import main
from promptseg.testing import make_mini

DATASET = {
    "fss": ["--dataset", "pascal5i"],
    "vos": ["--dataset", "davis17-val"],
    "refer": ["--dataset", "phrasecut-test"],
    "ovseg": ["--dataset", "ade150"],
    "fsis": ["--dataset", "coco-novel"],
    "perseg": [],
}


def test_every_eval_command_is_covered():
    assert list(DATASET) == list(EVALS)


@pytest.mark.parametrize("name", list(DATASET))
def test_config_with_an_unknown_key_is_a_one_line_error(name, tmp_path, capsys):
    argv = ["eval", name, *DATASET[name], "--model", "test_shifted"]
    argv += ["--data-root", str(tmp_path), "--out", str(tmp_path), "--config", "nope.depth=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"promptseg eval {name}: error: ") and err.count("\n") == 1
    assert "'nope'" in err and "dx, mode" in err  # names the key and the valid ones


def test_config_overrides_reach_the_model(tmp_path, capsys):
    make_mini(tmp_path / "data", "perseg")
    argv = ["eval", "perseg", "--model", "test_shifted", "--data-root", str(tmp_path / "data")]
    assert main([*argv, "--out", str(tmp_path / "runs"), "--config", "dx=0"]) == 0
    assert "perseg test_shifted: mIoU 100.00  mAcc 100.00" in capsys.readouterr().out
    result = tmp_path / "runs" / "perseg" / "perseg" / "-" / "1" / "test_shifted" / "result.json"
    assert json.loads(result.read_text())["metrics"]["mIoU"] == pytest.approx(100.0, abs=1e-8)


SMOKE = {
    "fss": ["--episodes", "4"],
    "ovseg": ["--images", "2", "--tasks", "miou"],
    "fsis": ["--seeds", "0", "--images", "2"],
}
"""Options that keep each eval a few seconds long on the miniature data."""


@pytest.fixture(scope="module")
def mini_all(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini_all")
    make_mini(root)
    return root


@pytest.mark.parametrize("name", list(DATASET))
def test_a_finished_run_is_replaced_only_with_overwrite_or_resume(name, mini_all, tmp_path, capsys):
    argv = ["eval", name, *DATASET[name], *SMOKE.get(name, []), "--model", "test_colorkey"]
    argv += ["--data-root", str(mini_all), "--out", str(tmp_path)]
    assert main(argv) == 0
    (result,) = tmp_path.rglob("result.json")
    before = result.read_bytes()
    capsys.readouterr()

    assert main(argv) == 2  # run again: refused before anything is written
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ": error: " in ln]
    assert len(errors) == 1 and errors[0].startswith(f"promptseg eval {name}: error: ")
    assert str(result) in errors[0] and "--overwrite" in errors[0] and "--resume" in errors[0]
    assert result.read_bytes() == before

    assert main([*argv, "--overwrite"]) == 0
    assert json.loads(result.read_text())["metrics"] == json.loads(before)["metrics"]
    assert main([*argv, "--resume"]) == 0
