"""`promptseg bench report`: metric names of every eval, side-by-side rows, reference matching,
partial fold / seed sets, oracle thresholds and the chart; reference.yaml, suites and README."""

from __future__ import annotations

import ast
import csv
import io
import json
import re
import shlex
import warnings
from pathlib import Path

import pytest
import yaml
from PIL import Image

from promptseg.bench.report import (
    DEFAULT_REFERENCE,
    build_rows,
    chart_layout,
    draw_chart,
    format_table,
    load_reference,
    load_results,
)
from promptseg.bench.runner import run_dir, write_result
from promptseg.bench.tools import suite_commands
from promptseg.cli import main
from promptseg.testing.mini_dense import make_mini_dense
from promptseg.testing.mini_fewshot import make_mini_fewshot

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
REFERENCE = Path(__file__).resolve().parents[2] / "promptseg" / "bench" / "reference.yaml"
"""The one copy of the published numbers: package data, the report's default."""
SINE = "sine_dinov2l.coco_ade_o365"
DIFF = "diffews_sd21.incontext"
STRICT = "diffews_sd21.coco20i_fold{f}"


def fss_payload(model, fold, miou, *, dataset="coco20i", shots=1, resolution="model:518",
                threshold=0.7, seed=0, n_episodes=1000, digest=None):  # fmt: skip
    """A result.json payload with exactly the keys `eval fss` writes (promptseg.bench.fss)."""
    return {
        "schema_version": 1,
        "benchmark": "fss",
        "dataset": dataset,
        "split": "val" if dataset != "fss1000" else "test",
        "fold": fold,
        "shots": shots,
        "seed": seed,
        "n_episodes": n_episodes,
        "episode_digest": digest or f"{dataset}-f{fold}-k{shots}-s{seed}-n{n_episodes}",
        "splits_sha256": {},
        "data_root_fingerprint": {"path": "/data"},
        "model": {"name": model, "arch": model.split(".")[0], "tag": model.partition(".")[2]},
        "protocol": {
            "resolution": resolution,
            "threshold": threshold,
            "metric_impl": "promptseg.metrics.fss@1",
            "reference_episodes": seed == 0 and n_episodes == 1000,
        },
        "env": {"dtype": "fp32"},
        "metrics": {"mIoU": miou, "FB-IoU": miou + 10},
        "per_class": [],
        "accumulators": {},
    }


def fsis_payload(model, seeds, ap):
    """A result.json payload shaped like `eval fsis` writes it (per_seed + seed mean)."""
    per_seed = [{"seed": s, "n_detections": 3, "AP": ap, "AP50": ap + 10} for s in seeds]
    per_seed = [{**p, "box AP": ap + 1, "box AP50": ap + 11} for p in per_seed]
    return {
        "schema_version": 1,
        "benchmark": "fsis",
        "dataset": "coco-novel",
        "split": "5k",
        "fold": None,
        "shots": 1,
        "seeds": list(seeds),
        "n_images": 5000,
        "model": {"name": model},
        "protocol": {"resolution": "original", "threshold": None, "subset": False},
        "metrics": {"AP": ap, "AP50": ap + 10, "box AP": ap + 1, "box AP50": ap + 11},
        "per_seed": per_seed,
    }


def write(root, payload):
    """Write a payload through the evals' own result writer, into the evals' run folder."""
    directory = run_dir(
        root,
        payload["benchmark"],
        payload["dataset"],
        payload.get("fold"),
        payload.get("shots"),
        payload["model"]["name"],
    )
    directory.mkdir(parents=True, exist_ok=True)
    write_result(directory, payload, 1.0, 10, "episode")
    return directory / "result.json"


def rows_of(root, reference=None):
    ref = load_reference(REFERENCE) if reference is None else reference
    return build_rows(load_results([root]), ref)


def find(rows, dataset, metric, *, native=True, shots=None):
    out = [
        r
        for r in rows
        if r.dataset == dataset
        and r.metric == metric
        and r.native == native
        and (shots is None or r.shots == shots)
    ]
    assert len(out) == 1, [(r.label(), r.protocol) for r in out]
    return out[0]


def md_line(md, *needles):
    return next(x for x in md.splitlines() if all(n in x for n in needles))


def rename(path, model):
    """Give a real result the name of a zoo model (the only change: its model name)."""
    data = json.loads(path.read_text())
    data["model"]["name"] = model
    path.write_text(json.dumps(data))
    return data


# ------------------------------------------------------------------------------------------------
# results written by actually running the evals on the miniature datasets


@pytest.fixture(scope="module")
def dense_runs(tmp_path_factory):
    """vos (DAVIS-17, DAVIS-16) and refer (PhraseCut, t = 0.3 and 0.5) with the ColorKey model."""
    root = tmp_path_factory.mktemp("report_dense")
    make_mini_dense(root / "data", ["davis", "phrasecut"])
    runs = root / "runs"
    common = ["--model", "test_colorkey", "--data-root", str(root / "data"), "--out", str(runs)]
    for dataset in ("davis17-val", "davis16-val"):
        assert main(["eval", "vos", "--dataset", dataset, *common]) == 0
    argv = ["eval", "refer", "--dataset", "phrasecut-test", "--thresholds", "0.3,0.5", *common]
    assert main(argv) == 0
    return runs


def test_vos_rows_read_the_metric_names_eval_vos_writes(dense_runs, tmp_path):
    reference = load_reference(REFERENCE)
    vos = sorted((dense_runs / "vos").rglob("result.json"))
    assert len(vos) == 2
    for path in vos:  # every DAVIS reference metric exists in a real vos result
        result = json.loads(path.read_text())
        wanted = {e["metric"] for e in reference if e["dataset"] == result["dataset"]}
        assert wanted == {"J&F-Mean", "J-Mean", "F-Mean"} <= set(result["metrics"])
        target = tmp_path / path.relative_to(dense_runs)
        target.parent.mkdir(parents=True)
        target.write_text(path.read_text())
        rename(target, SINE)
    rows = rows_of(tmp_path)
    jf17 = find(rows, "davis17-val", "J&F-Mean")
    assert jf17.cells[SINE].value == 100.0 and jf17.cells[SINE].reported == 77.0
    assert jf17.delta(SINE) == pytest.approx(23.0)
    assert find(rows, "davis17-val", "J-Mean").cells[SINE].reported == 72.6
    assert find(rows, "davis17-val", "F-Mean").cells[SINE].reported == 81.3
    assert find(rows, "davis16-val", "J&F-Mean").cells[SINE].reported == 82.3
    memory = json.loads(vos[0].read_text())["protocol"].get("memory")
    assert jf17.cells[SINE].memory == memory
    md = format_table(rows)
    assert "100.0 (+23.0)" in md_line(md, "DAVIS-17 val J&F-Mean")
    assert "77.0" in md_line(md, "DAVIS-17 val J&F-Mean")


def test_refer_fixed_thresholds_and_oracle_values_never_mix(dense_runs, tmp_path):
    (src,) = (dense_runs / "refer").rglob("result.json")
    target = tmp_path / "refer" / "result.json"
    target.parent.mkdir(parents=True)
    target.write_text(src.read_text())
    real = rename(target, "clipseg_vitb16_rd64.uni")
    rows = rows_of(tmp_path)
    model = "clipseg_vitb16_rd64.uni"
    at03 = find(rows, "phrasecut-test", "mIoU@0.3")
    assert at03.cells[model].value == pytest.approx(real["metrics"]["mIoU@0.3"])
    assert at03.cells[model].reported == 43.4
    assert at03.cells[model].ref_id == "clipseg-rd64-phrasecut-miou"
    assert find(rows, "phrasecut-test", "IoU_FG@0.3").cells[model].reported == 54.7
    assert find(rows, "phrasecut-test", "AP").cells[model].reported == 76.7
    at05 = find(rows, "phrasecut-test", "mIoU@0.5")  # no published number at t = 0.5
    assert at05.cells[model].reported is None and at05.delta(model) is None
    best = find(rows, "phrasecut-test", "mIoU_best")
    assert best.oracle and not at03.oracle
    assert best.cells[model].value == pytest.approx(real["oracle"]["mIoU"])
    assert best.cells[model].reported == 43.6
    assert best.cells[model].oracle_t == real["oracle"]["mIoU_t"]
    md = format_table(rows)
    line = md_line(md, "mIoU_best")
    assert "oracle: best t on the test set" in line and line.rstrip(" |").endswith("(oracle)")
    assert "mIoU (t = 0.3)" in md and f"oracle t = {real['oracle']['mIoU_t']:g}" in md

    # a fixed-threshold reference never meets the oracle value, and the other way round
    ref = load_reference(REFERENCE)
    fixed_only = [e for e in ref if e["id"] == "clipseg-rd64-phrasecut-miou"]
    oracle_as_fixed = [{**e, "metric": "mIoU"} for e in ref if e["id"].endswith("-miou-best")]
    rows = rows_of(tmp_path, fixed_only + oracle_as_fixed)
    assert find(rows, "phrasecut-test", "mIoU_best").cells[model].reported is None
    assert find(rows, "phrasecut-test", "mIoU@0.3").cells[model].reported == 43.4
    rows = rows_of(tmp_path, [{**fixed_only[0], "threshold": "oracle", "metric": "mIoU_best"}])
    assert find(rows, "phrasecut-test", "mIoU_best").cells[model].reported == 43.4


def test_ovseg_and_fsis_rows_read_the_names_those_evals_write(tmp_path):
    data = tmp_path / "data"
    make_mini_dense(data, ["coco-panoptic"])
    make_mini_fewshot(data, ["coco-novel"])
    runs = tmp_path / "runs"
    common = ["--model", "test_colorkey", "--data-root", str(data), "--out", str(runs)]
    assert main(["eval", "ovseg", "--dataset", "coco-panoptic", *common]) == 0
    assert main(["eval", "fsis", "--dataset", "coco-novel", "--seeds", "0-1", *common]) == 0
    (pan,) = (runs / "ovseg").rglob("result.json")
    (fs,) = (runs / "fsis").rglob("result.json")
    odise = "odise_sd13_m2f.label_coco50e"
    real_pan, real_fs = rename(pan, odise), rename(fs, SINE)
    rows = rows_of(runs)
    for metric, reported in (("PQ", 55.4), ("AP", 46.0), ("mIoU", 65.2)):
        cell = find(rows, "coco-panoptic", metric).cells[odise]
        assert cell.value == pytest.approx(real_pan["metrics"][metric])
        assert cell.reported == reported
    ap = find(rows, "coco-novel", "AP").cells[SINE]
    assert ap.parts == [0, 1] and ap.value == pytest.approx(real_fs["metrics"]["AP"])
    assert ap.reported is None and ap.partial == "partial: seeds 0, 1 of 0–9"
    assert find(rows, "coco-novel", "box AP").cells[SINE].partial == ap.partial


def test_fss_run_of_the_eval_is_a_separate_protocol(tmp_path):
    make_mini_fewshot(tmp_path / "data", ["pascal5i"])
    argv = ["eval", "fss", "--dataset", "pascal5i", "--model", "test_colorkey", "--episodes", "5"]
    argv += ["--data-root", str(tmp_path / "data"), "--splits-dir", str(tmp_path / "data/splits")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mini split lists are not hsnet's
        assert main([*argv, "--out", str(tmp_path / "runs")]) == 0
    row = find(rows_of(tmp_path / "runs"), "pascal5i", "mIoU", native=False)
    assert row.cells["test_colorkey"].value == 100.0
    assert row.protocol == "original size · non-reference episodes (seed 0, 5 per fold)"


# ------------------------------------------------------------------------------------------------
# side-by-side rows, protocol classes, partial coverage


def test_models_share_one_row_and_keep_their_own_resolution_and_threshold(tmp_path):
    for f, v in enumerate([64.0, 65.0, 64.0, 64.6]):
        write(tmp_path, fss_payload(SINE, f, v))
        write(tmp_path / "orig", fss_payload(SINE, f, 60.0, resolution="original"))
        write(tmp_path / "s1", fss_payload(SINE, f, 63.0, seed=1))
    for f, v in enumerate([71.0, 71.5, 71.2, 71.1]):
        write(tmp_path, fss_payload(DIFF, f, v, resolution="model:512", threshold=0.25))
    rows = rows_of(tmp_path)
    row = find(rows, "coco20i", "mIoU")
    assert row.protocol == "model-native res. · reference episodes"
    assert set(row.cells) == {SINE, DIFF}
    assert row.cells[SINE].value == pytest.approx(64.4)
    assert row.cells[DIFF].value == pytest.approx(71.2)
    assert row.cells[SINE].parts == [0, 1, 2, 3]
    assert (row.cells[SINE].reported, row.cells[DIFF].reported) == (64.5, 71.3)
    assert row.delta(SINE) == pytest.approx(-0.1) and row.delta(DIFF) == pytest.approx(-0.1)
    (original,) = [r for r in rows if r.metric == "mIoU" and r.protocol.startswith("original")]
    assert original.protocol == "original size · reference episodes" and not original.native
    assert original.cells[SINE].value == 60.0 and original.cells[SINE].reported is None
    others = [r for r in rows if r.metric == "mIoU" and "non-reference" in r.protocol]
    assert len(others) == 1 and others[0].cells[SINE].reported is None

    md = format_table(rows)
    header = md.splitlines()[0]
    assert header.index(DIFF) < header.index(SINE) < header.index("reported")
    line = md_line(md, "COCO-20i mIoU (4-fold mean)", "reference episodes", "71.2")
    assert "64.4 (−0.1)" in line and "71.2 (−0.1)" in line and "71.3 / 64.5" in line
    note = f"[{row.footnote}] {DIFF}: res. model:512, threshold 0.25; "
    assert note + f"{SINE}: res. model:518, threshold 0.7" in md
    assert "not the published protocol, never compared" in md
    assert "60.0 (" not in md  # never a delta on another protocol

    table = list(csv.DictReader(io.StringIO(format_table(rows, "csv"))))
    sine = next(t for t in table if t["model"] == SINE and t["reported"] == "64.5")
    assert sine["resolution"] == "model:518" and sine["parts"] == "0–3"
    data = json.loads(format_table(rows, "json"))
    assert any(d["cells"].get(DIFF, {}).get("parts") == [0, 1, 2, 3] for d in data)


def test_episode_sets_that_differ_are_never_in_one_row(tmp_path):
    write(tmp_path, fss_payload(SINE, 0, 64.0, digest="aaa"))
    write(tmp_path, fss_payload(DIFF, 0, 71.0, digest="bbb", threshold=0.25))
    rows = [r for r in rows_of(tmp_path) if r.metric == "mIoU"]
    assert len(rows) == 2 and all(len(r.cells) == 1 for r in rows)


def test_partial_folds_and_seeds_are_shown_without_delta(tmp_path):
    write(tmp_path, fss_payload(SINE, 0, 50.0))
    for f, v in enumerate([71.0, 71.5, 71.2, 71.1]):
        write(tmp_path, fss_payload(DIFF, f, v, resolution="model:512", threshold=0.25))
    write(tmp_path, fsis_payload(SINE, [0, 1], 17.0))
    rows = rows_of(tmp_path)
    row = find(rows, "coco20i", "mIoU")
    sine = row.cells[SINE]
    assert sine.value == 50.0 and sine.reported is None and row.delta(SINE) is None
    assert sine.partial == "partial: folds 0 of 0–3" and sine.ref_id == "sine-coco20i-1shot"
    md = format_table(rows)
    assert "50.0 (partial: folds 0 of 0–3)" in md and "(−14.5)" not in md
    fsis = find(rows, "coco-novel", "AP")
    assert fsis.delta(SINE) is None and fsis.cells[SINE].partial == "partial: seeds 0, 1 of 0–9"
    write(tmp_path, fsis_payload(SINE, range(10), 17.0))  # all ten seeds: compared
    fsis = find(rows_of(tmp_path), "coco-novel", "AP")
    assert fsis.cells[SINE].parts == list(range(10)) and fsis.delta(SINE) == pytest.approx(0.1)


def test_matcher_fold0_reference_needs_exactly_fold0(tmp_path):
    write(tmp_path / "a", fss_payload("matcher", 0, 31.0, dataset="lvis92i", threshold=None))
    row = find(rows_of(tmp_path / "a"), "lvis92i", "mIoU")
    assert row.cells["matcher"].reported == 31.38
    assert row.label().startswith("LVIS-92i mIoU (fold 0)")
    for f in range(10):  # the 10-fold mean is not the fold-0 number
        write(tmp_path / "b", fss_payload("matcher", f, 31.0, dataset="lvis92i", threshold=None))
    cell = find(rows_of(tmp_path / "b"), "lvis92i", "mIoU").cells["matcher"]
    assert cell.reported is None and cell.partial is None
    write(tmp_path / "c", fss_payload("matcher", "test", 88.0, dataset="fss1000", shots=5))
    assert find(rows_of(tmp_path / "c"), "fss1000", "mIoU").cells["matcher"].reported == 89.61


def test_per_fold_checkpoints_and_the_threshold_sweep(tmp_path):
    for f, v in enumerate([47.8, 56.3, 51.9, 48.8]):
        model = STRICT.format(f=f)
        write(tmp_path, fss_payload(model, f, v, resolution="model:512", threshold=0.25))
    for t, v in ((0.2, 47.5), (0.3, 47.5)):
        model = STRICT.format(f=0)
        payload = fss_payload(model, 0, v, resolution="model:512", threshold=t)
        write(tmp_path / f"t{t}", payload)
    rows = [r for r in rows_of(tmp_path) if r.metric == "mIoU"]
    assert len(rows) == 3 and all(set(r.cells) == {STRICT} for r in rows)
    by_t = {r.cells[STRICT].threshold: r.cells[STRICT] for r in rows}
    assert by_t[0.25].value == pytest.approx(51.2) and by_t[0.25].reported == 51.2
    assert by_t[0.25].ref_id == "diffews-strict-coco20i-1shot"
    assert (by_t[0.2].reported, by_t[0.3].reported) == (47.56, 47.48)
    assert by_t[0.2].ref_id == "diffews-strict-coco20i-f0-thr0.20"
    md = format_table(rows)
    assert f"{STRICT}: res. model:512, threshold 0.2" in md
    assert f"{STRICT}: res. model:512, threshold 0.3" in md


# ------------------------------------------------------------------------------------------------
# command: chart always written, gate


def test_cli_prints_the_table_and_always_writes_a_chart(tmp_path, capsys):
    runs = tmp_path / "runs"
    for f in range(4):
        write(runs, fss_payload(SINE, f, 64.5))
    assert main(["bench", "report", str(runs), "--reference", str(REFERENCE)]) == 0
    captured = capsys.readouterr()
    assert "COCO-20i mIoU (4-fold mean)" in captured.out
    assert str(runs.resolve() / "report.png") in captured.err
    with Image.open(runs / "report.png") as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100
        assert len(im.convert("RGB").getcolors(1 << 16)) > 2  # bars drawn
    chart = tmp_path / "elsewhere" / "c.png"
    assert main(["bench", "report", str(runs), "--chart", str(chart)]) == 0
    assert chart.is_file()
    table = tmp_path / "t.json"
    assert main(["bench", "report", str(runs), "--format", "json", "-o", str(table)]) == 0
    assert json.loads(table.read_text()) and table.with_suffix(".png").is_file()
    bad = tmp_path / "bad"
    for f in range(4):
        write(bad, fss_payload(SINE, f, 50.0))
    assert main(["bench", "report", str(bad), "--reference", str(REFERENCE), "--gate"]) == 1
    assert "GATE FAILED" in capsys.readouterr().err
    assert main(["bench", "report", str(runs), "--reference", str(REFERENCE), "--gate"]) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["bench", "report", str(empty)]) == 2
    assert "no result.json" in capsys.readouterr().err


def test_the_shipped_reference_is_the_default_from_any_folder(tmp_path, capsys, monkeypatch):
    assert DEFAULT_REFERENCE == REFERENCE and DEFAULT_REFERENCE.is_file()
    runs = tmp_path / "runs"
    for f in range(4):
        write(runs, fss_payload(SINE, f, 64.4))
    monkeypatch.chdir(tmp_path)  # outside the checkout
    assert main(["bench", "report", str(runs), "--gate"]) == 0
    captured = capsys.readouterr()
    assert "64.4 (−0.1)" in md_line(captured.out, "COCO-20i mIoU")
    assert "gate passed: 1 value(s) within tolerance" in captured.err


def test_gate_fails_loudly_without_anything_to_gate(tmp_path, capsys):
    runs = tmp_path / "runs"
    write(runs, fss_payload(SINE, 0, 64.4))  # one fold of four: nothing to compare
    assert main(["bench", "report", str(runs), "--gate"]) == 1
    err = capsys.readouterr().err
    assert "GATE FAILED: nothing to gate" in err and str(REFERENCE) in err
    empty = tmp_path / "empty.yaml"
    empty.write_text("schema_version: 1\nrows: []\n")
    assert main(["bench", "report", str(runs), "--reference", str(empty), "--gate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("promptseg bench report: error: --gate: ") and err.count("\n") == 1
    assert str(empty) in err and "no reference values" in err
    missing = tmp_path / "nope.yaml"
    assert main(["bench", "report", str(runs), "--reference", str(missing)]) == 2
    assert f"reference file {missing} not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# chart


def fixed_measure(text, style="text"):
    """Text size without fonts: 7 px per character (6 small, 10 title), 14 px high."""
    return {"title": 10, "text": 7, "small": 6}[style] * len(text), 14


def chart_rows(root, *, long_protocol=False):
    """SINE on all four COCO-20i folds (compared with the paper), DiffewS on fold 0 only."""
    seed = 3 if long_protocol else 0  # another seed: a non-reference-episodes protocol label
    for f, v in enumerate([64.0, 64.5, 64.9, 64.6]):
        write(root, fss_payload(SINE, f, v, seed=seed))
    write(root, fss_payload(DIFF, 0, 70.0, resolution="model:512", threshold=0.25, seed=seed))
    return rows_of(root)


def test_chart_layout_fits_its_labels_and_marks_partial_runs(tmp_path):
    rows = chart_rows(tmp_path / "a")
    layout = chart_layout(rows, fixed_measure)
    miou = next(i for i, r in enumerate(rows) if r.metric == "mIoU")
    assert "4-fold mean" in rows[miou].label()
    bars = {(b.row, b.model): b for b in layout.bars}
    partial, full = bars[(miou, DIFF)], bars[(miou, SINE)]
    assert partial.partial and "(1/4 folds, partial)" in partial.label
    assert partial.paper_box is None and "vs paper" not in partial.label
    assert not full.partial and full.label == "64.5 (±0.0 vs paper)"
    assert full.paper_box is not None and full.paper_label == "paper 64.5"
    assert full.paper_box[1] >= full.box[3]  # the published value right below the reproduced one
    assert partial.box[2] - partial.box[0] > full.box[2] - full.box[0]  # 70.0 > 64.5
    texts = {t.text: t for t in layout.texts}
    assert texts["Reproduced vs published results"].style == "title"
    assert any(t.startswith("score") for t in texts)  # axis label
    assert {SINE, DIFF} <= set(texts)  # legend: model names in full
    assert any(t.startswith(rows[miou].label()) for t in texts)  # row label in full
    for t in layout.texts:  # nothing cut off
        w, h = fixed_measure(t.text, t.style)
        assert 0 <= t.x and t.x + w <= layout.width and 0 <= t.y and t.y + h <= layout.height, t

    longer = chart_layout(chart_rows(tmp_path / "b", long_protocol=True), fixed_measure)
    assert longer.width > layout.width  # grows with its labels
    write(tmp_path / "a", fsis_payload(SINE, range(10), 17.0))
    more = chart_layout(rows_of(tmp_path / "a"), fixed_measure)
    assert more.height > layout.height  # and with its rows
    assert chart_layout([], fixed_measure).width > 0


def test_chart_png_hatches_partial_bars_and_has_the_layouts_size(tmp_path):
    rows = chart_rows(tmp_path / "runs")
    path = draw_chart(rows, tmp_path / "chart.png")
    layout = chart_layout(rows)  # the fonts draw_chart uses
    miou = next(i for i, r in enumerate(rows) if r.metric == "mIoU")
    bars = {(b.row, b.model): b for b in layout.bars}
    with Image.open(path) as im:
        assert im.size == (layout.width, layout.height)
        rgb = im.convert("RGB")

    def colours(box):
        x0, y0, x1, y1 = box
        return {rgb.getpixel((x, y)) for x in range(x0 + 2, x1 - 1) for y in range(y0 + 2, y1 - 1)}

    assert colours(bars[(miou, SINE)].box) == {layout.colors[SINE]}  # a solid bar
    stripes = colours(bars[(miou, DIFF)].box)  # the model's colour on a paler tint of it
    colour = layout.colors[DIFF]
    assert colour in stripes and any(c != colour and min(c) >= min(colour) for c in stripes)
    assert colours(bars[(miou, SINE)].paper_box) == {(120, 120, 120)}


# ------------------------------------------------------------------------------------------------
# reference.yaml, suites, README


def test_reference_yaml_rows_are_structured_data():
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
    assert by_id["diffews-strict-coco20i-1shot"]["per_fold"] == [47.7, 56.4, 51.9, 48.7]
    for rid, ds, folds, shots, value in (
        ("matcher-fss1000-1shot", "fss1000", ["test"], 1, 87.12),
        ("matcher-fss1000-5shot", "fss1000", ["test"], 5, 89.61),
        ("matcher-lvis92i-fold0-1shot", "lvis92i", [0], 1, 31.38),
        ("matcher-lvis92i-fold0-5shot", "lvis92i", [0], 5, 37.0),
    ):
        r = by_id[rid]
        assert (r["dataset"], r["folds"], r["shots"], r["value"]) == (ds, folds, shots, value)
        assert r["source"]["kind"] == "log" and r["model"] == "matcher"
    yt = {r["metric"]: r["value"] for r in rows if r["dataset"] == "ytvos18-valid"}
    assert yt == {"G": 66.2, "Js": 69.1, "Fs": 57.6, "Ju": 71.7, "Fu": 66.5}
    clip = {
        (r["dataset"], r["shots"], r["metric"]): r["value"]
        for r in rows
        if r["benchmark"] in ("clipseg-fss", "gzsl")
    }
    assert clip == {
        ("pascal5i", 1, "mIoU"): 59.5,
        ("pascal5i", 1, "IoU_BIN"): 75.0,
        ("pascal5i", 1, "AP"): 82.3,
        ("coco20i", 1, "mIoU"): 33.3,
        ("coco20i", 1, "IoU_BIN"): 59.1,
        ("coco20i", 1, "AP"): 41.7,
        ("pascal5i", 0, "mIoU"): 72.4,
        ("pascal5i", 0, "IoU_BIN"): 83.1,
        ("pascal5i", 0, "AP"): 93.5,
        ("voc-unseen10", 0, "mIoU_S"): 35.7,
        ("voc-unseen10", 0, "mIoU_U"): 43.1,
        ("voc-unseen4", 0, "mIoU_S"): 20.8,
        ("voc-unseen4", 0, "mIoU_U"): 47.3,
    }
    sweep = {
        r["threshold"]: r["value"] for r in rows if r["id"].startswith("diffews-strict-coco20i-f0")
    }
    assert sweep == {0.2: 47.56, 0.25: 47.69, 0.3: 47.48, 0.35: 47.40, 0.4: 47.11}
    oracle = [r for r in rows if r["threshold"] == "oracle"]
    assert oracle and all(r["metric"].endswith("_best") for r in oracle)


def test_suites_load_and_name_existing_reference_rows():
    ids = {r["id"] for r in load_reference(REFERENCE)}
    suites = {p.stem: p for p in (BENCH / "suites").glob("*.yaml")}
    assert "diffews_table3" in suites
    for name, path in suites.items():
        data = yaml.safe_load(path.read_text())
        assert data["reference_ids"] and set(data["reference_ids"]) <= ids, name
        commands = suite_commands(path, {"DATA_ROOT": "/d"})
        assert len(commands) == len(data["runs"]) and all(c[0] == "eval" for c in commands)
    table4 = yaml.safe_load(suites["sine_table4"].read_text())["reference_ids"]
    assert {"sine-davis17-j", "sine-davis17-f", "sine-davis16-j", "sine-davis16-f"} <= set(table4)
    assert {i for i in ids if i.startswith("sine-ytvos18")} <= set(table4)
    t23 = set(yaml.safe_load(suites["sine_table2_3"].read_text())["reference_ids"])
    assert {i for i in ids if i.startswith(("sine-coconovel", "sine-coco2voc"))} == t23
    odise = set(yaml.safe_load(suites["odise_readme"].read_text())["reference_ids"])
    assert odise == {i for i in ids if i.startswith("odise-")} and len(odise) == 20
    sweep = yaml.safe_load(suites["diffews_table3"].read_text())
    argvs = [shlex.split(r) for r in sweep["runs"]]
    thresholds = [float(a[a.index("--threshold") + 1]) for a in argvs]
    assert thresholds == [0.2, 0.25, 0.3, 0.35, 0.4]
    assert len({a[a.index("--out") + 1] for a in argvs}) == 1  # run folders: <model>@t<thr>


def test_readme_documents_bench_run_and_split_downloads():
    text = (BENCH / "README.md").read_text()
    assert "promptseg bench run benchmarks/suites/" in text and "envsubst" not in text
    assert "--trust-pickle" in text and "--splits-dir" in text and "sha256" in text
    assert "report.png" in text and "--overwrite" in text and "make-mini" in text
    assert "promptseg/bench/reference.yaml" in text and "§" not in text
    assert not (BENCH / "reference.yaml").exists()  # one copy: the package's


def _user_strings():
    """(file, line, text) of every string literal of the package that is not a docstring."""
    package = Path(__file__).resolve().parents[2] / "promptseg"
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = {
            id(n.value)
            for n in ast.walk(tree)
            if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if id(node) not in docs:
                    yield path.relative_to(package.parent), node.lineno, node.value


def test_messages_point_at_the_readme_not_at_spec_sections():
    """Users have benchmarks/README.md, not the spec: no message cites `§` sections, and every
    `benchmarks/README.md#anchor` a message names is a heading of the README."""
    cited = [(f, n, t) for f, n, t in _user_strings() if "§" in t or "benchmarks.md" in t]
    assert not cited
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in (BENCH / "README.md").read_text().splitlines()
        if line.startswith("## ")
    }
    anchors = {
        a for _, _, t in _user_strings() for a in re.findall(r"benchmarks/README\.md#([\w-]+)", t)
    }
    assert {"datasets", "split-lists"} <= anchors <= headings


def test_no_package_text_cites_the_design_documents():
    """Docstrings and comments are read by users too (help(), the source): none cites the
    internal design documents (their `§` sections, `specs/`, `<family>.md`)."""
    package = Path(__file__).resolve().parents[2] / "promptseg"
    pattern = re.compile(r"§|specs/|\b(?:sine|odise|clipseg|diffews|benchmarks|design)\.md\b")
    cited = [
        f"{path.relative_to(package)}:{number}: {line.strip()}"
        for path in sorted(package.rglob("*"))
        if path.suffix in {".py", ".yaml", ".md"}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not cited, "\n".join(cited)
