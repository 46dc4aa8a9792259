"""`promptseg bench report`: aggregation, protocol separation, formats and the PIL chart."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from promptseg.bench.report import build_rows, format_table, load_reference, load_results
from promptseg.cli import main

REFERENCE = Path(__file__).resolve().parents[2] / "benchmarks" / "reference.yaml"
SINE = "sine_dinov2l.coco_ade_o365"
DIFF = "diffews_sd21.incontext"


def fss_result(model, fold, miou, *, shots=1, resolution="model:518x518", digest=None):
    return {
        "schema_version": 1,
        "benchmark": "fss",
        "dataset": "coco20i",
        "split": "val",
        "fold": fold,
        "shots": shots,
        "seed": 0,
        "n_episodes": 1000,
        "episode_digest": digest or f"digest-fold{fold}-{shots}",
        "model": {"name": model},
        "protocol": {
            "resolution": resolution,
            "threshold": 0.7,
            "metric_impl": "promptseg.metrics.fss@1",
            "reference_episodes": True,
        },
        "metrics": {"mIoU": miou, "FB-IoU": miou + 10},
    }


def write(tmp_path, results):
    paths = []
    for i, r in enumerate(results):
        p = tmp_path / f"r{i}" / "result.json"
        p.parent.mkdir(parents=True)
        p.write_text(json.dumps(r))
        paths.append(p)
    return paths


@pytest.fixture
def results():
    out = [fss_result(SINE, f, v) for f, v in enumerate([64.0, 65.0, 64.0, 64.6])]
    out += [fss_result(DIFF, f, v) for f, v in enumerate([71.0, 71.5, 71.2, 71.1])]
    # a different protocol (original resolution): own row + footnote, never compared
    out += [fss_result(SINE, f, 60.0, resolution="original") for f in range(4)]
    out.append(
        {
            "schema_version": 1,
            "benchmark": "fsis",
            "dataset": "coco-novel",
            "split": "5k",
            "fold": None,
            "shots": 1,
            "seeds": [0, 1],
            "model": {"name": SINE},
            "protocol": {"resolution": "original", "threshold": None},
            "metrics": {"AP": 17.0, "AP50": 30.0},
            "per_seed": [
                {"seed": 0, "AP": 16.0, "AP50": 29.0},
                {"seed": 1, "AP": 18.0, "AP50": 31.0},
            ],
        }
    )
    return out


def test_reference_yaml_has_every_section4_row_with_the_schema():
    rows = load_reference(REFERENCE)
    keys = {"id", "model", "tag", "benchmark", "dataset", "split", "folds", "shots", "seeds"}
    keys |= {"resolution", "threshold", "metric", "value", "per_fold", "source", "status"}
    keys |= {"tolerance"}
    assert all(keys <= set(r) for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert {r["status"] for r in rows} == {"R", "U", "S"}
    assert all(r["source"]["kind"] in ("paper", "readme", "log") for r in rows)
    by_id = {r["id"]: r for r in rows}
    assert by_id["sine-coco20i-1shot"]["value"] == 64.5
    assert by_id["odise-label-coco-pq"]["value"] == 55.4
    assert by_id["clipseg-rd64-phrasecut-ap"]["value"] == 76.7
    assert by_id["diffews-strict-coco20i-1shot"]["per_fold"] == [47.7, 56.4, 51.9, 48.7]
    for suite in (REFERENCE.parent / "suites").glob("*.yaml"):
        data = yaml.safe_load(suite.read_text())
        assert data["runs"] and all(r.startswith("promptseg eval ") for r in data["runs"])


def test_folds_are_averaged_and_protocols_never_mixed(tmp_path, results):
    rows = build_rows(load_results(write(tmp_path, results)), load_reference(REFERENCE))
    miou = [r for r in rows if r.benchmark == "fss" and r.metric == "mIoU"]
    assert len(miou) == 2
    paper = next(r for r in miou if r.comparable)
    other = next(r for r in miou if not r.comparable)
    assert paper.cells[SINE] == pytest.approx(64.4) and paper.cells[DIFF] == pytest.approx(71.2)
    assert paper.parts == {SINE: 4, DIFF: 4}
    assert paper.reported == {SINE: 64.5, DIFF: 71.3}
    assert paper.delta(SINE) == pytest.approx(-0.1)
    assert other.cells == {SINE: 60.0} and other.delta(SINE) is None
    assert paper.footnote is not None and other.footnote is not None
    fsis = next(r for r in rows if r.benchmark == "fsis" and r.metric == "AP")
    assert fsis.cells[SINE] == pytest.approx(17.0) and fsis.parts[SINE] == 2
    assert fsis.delta(SINE) == pytest.approx(0.1)

    md = format_table(rows, "md")
    # models are sorted by name: DiffewS first
    line = next(x for x in md.splitlines() if "COCO-20i mIoU (4-fold mean)" in x and "71.2" in x)
    assert "64.4 (−0.1)" in line and "71.2 (−0.1)" in line and "71.3 / 64.5" in line
    assert "res. original" in md and "not the paper protocol" in md
    header = md.splitlines()[0]
    assert SINE in header and DIFF in header and "reported" in header

    table = list(csv.DictReader(io.StringIO(format_table(rows, "csv"))))
    assert {t["model"] for t in table} == {SINE, DIFF}
    data = json.loads(format_table(rows, "json"))
    assert any(d["cells"].get(DIFF, {}).get("parts") == 4 for d in data)


def test_cli_report_writes_table_and_chart(tmp_path, results, capsys):
    paths = write(tmp_path, results)
    chart = tmp_path / "chart.png"
    argv = ["bench", "report", *map(str, paths), "--reference", str(REFERENCE)]
    assert main([*argv, "--chart", str(chart)]) == 0
    assert "COCO-20i mIoU (4-fold mean)" in capsys.readouterr().out
    with Image.open(chart) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100
        assert len(im.convert("RGB").getcolors(1 << 16)) > 2  # bars drawn
    assert main([*argv, "--format", "json", "-o", str(tmp_path / "t.json")]) == 0
    assert json.loads((tmp_path / "t.json").read_text())
    # a folder is searched for result.json; --gate fails on |Δ| > tolerance
    bad = [fss_result(SINE, f, 50.0) for f in range(4)]
    folder = tmp_path / "bad"
    write(folder, bad)
    assert main(["bench", "report", str(folder), "--reference", str(REFERENCE), "--gate"]) == 1
    ok = [fss_result(SINE, f, 64.5) for f in range(4)]
    write(tmp_path / "ok", ok)
    assert main(["bench", "report", str(tmp_path / "ok"), "--reference", str(REFERENCE)]) == 0
