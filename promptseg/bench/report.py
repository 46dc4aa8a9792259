"""`promptseg bench report`: comparison table of result.json files against reference.yaml (§5.2).

Results are grouped into rows keyed by (benchmark, dataset, split, shots, metric, protocol):
folds are aggregated as the mean of the per-fold values (P19), FSIS seeds as the mean of the
per-seed APs. Results of different protocols (resolution, threshold, episodes) are never put in
one row: each such row gets a footnote describing its protocol, and only rows run with the paper
protocol are compared with the reported numbers. One column per model, cells
`reproduced (Δ vs reported)`; the last column lists the reported values of the row's models.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_REFERENCE",
    "Row",
    "build_rows",
    "draw_chart",
    "format_table",
    "gate_failures",
    "load_reference",
    "load_results",
    "main_report",
]

DEFAULT_REFERENCE = Path("benchmarks") / "reference.yaml"

# headline metrics per benchmark (others: every numeric metric of the result)
HEADLINE: dict[str, tuple[str, ...]] = {
    "fss": ("mIoU", "FB-IoU"),
    "fsis": ("AP", "AP50", "box AP", "box AP50"),
    "ovseg": ("PQ", "AP", "mIoU"),
    "vos": ("J&F", "J", "F"),
}

DATASET_LABEL: dict[str, str] = {
    "pascal5i": "PASCAL-5i",
    "coco20i": "COCO-20i",
    "fss1000": "FSS-1000",
    "lvis92i": "LVIS-92i",
    "coco-novel": "COCO-NOVEL",
    "coco2voc": "COCO2VOC",
    "davis17-val": "DAVIS-17 val",
    "davis16-val": "DAVIS-16 val",
    "coco-panoptic": "COCO panoptic",
    "ade150": "ADE20K-150",
    "ade847": "A-847",
    "pc59": "PC-59",
    "pc459": "PC-459",
    "pas21": "PAS-21",
    "phrasecut-test": "PhraseCut test",
}


@dataclass
class Row:
    """One table row: a (benchmark, dataset, split, shots, metric, protocol) and its cells."""

    benchmark: str
    dataset: str
    split: str | None
    shots: Any
    metric: str
    protocol: str  # human-readable protocol description
    protocol_key: str  # what makes two cells comparable
    comparable: bool  # paper protocol: may be compared with reported numbers
    n_parts: int = 1  # folds (or seeds) aggregated
    cells: dict[str, float] = field(default_factory=dict)  # model -> value
    parts: dict[str, int] = field(default_factory=dict)  # model -> folds / seeds aggregated
    reported: dict[str, float] = field(default_factory=dict)  # model -> reported value
    footnote: int | None = None

    @property
    def key(self) -> tuple[Any, ...]:
        return (
            self.benchmark,
            self.dataset,
            self.split,
            self.shots,
            self.metric,
            self.protocol_key,
        )

    def label(self) -> str:
        name = DATASET_LABEL.get(self.dataset, self.dataset)
        agg = ""
        n = max(self.parts.values(), default=1)
        if self.benchmark == "fss" and n > 1:
            agg = f" ({n}-fold mean)"
        elif self.benchmark == "fsis" and n > 1:
            agg = f" ({n}-seed mean)"
        mark = f" [{self.footnote}]" if self.footnote is not None else ""
        return f"{name} {self.metric}{agg}{mark}"

    def delta(self, model: str) -> float | None:
        if not self.comparable or model not in self.reported or model not in self.cells:
            return None
        return self.cells[model] - self.reported[model]


# ------------------------------------------------------------------------------------------------
# loading


def load_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Parse result.json files; a folder is searched recursively for result.json."""
    out = []
    for p in paths:
        path = Path(p)
        files = sorted(path.rglob("result.json")) if path.is_dir() else [path]
        for f in files:
            data = json.loads(f.read_text(encoding="utf-8"))
            if data.get("schema_version") != 1:
                raise ValueError(f"{f}: unsupported schema_version {data.get('schema_version')!r}")
            data["_path"] = str(f)
            out.append(data)
    return out


def load_reference(path: str | Path | None) -> list[dict[str, Any]]:
    """The rows of reference.yaml (a list, or a mapping with a `rows` list)."""
    if path is None:
        return []
    import yaml

    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    rows = data.get("rows", []) if isinstance(data, Mapping) else data
    return list(rows or [])


# ------------------------------------------------------------------------------------------------
# aggregation


def _model_name(result: Mapping[str, Any]) -> str:
    return str(result.get("model", {}).get("name", "?"))


def _protocol(result: Mapping[str, Any]) -> tuple[str, str, bool]:
    """(description, comparability key without per-fold parts, paper protocol?)."""
    proto = dict(result.get("protocol", {}))
    res = proto.get("resolution", "?")
    thr = proto.get("threshold")
    desc = f"res. {res}, threshold {thr}"
    bench = result.get("benchmark")
    comparable = True
    if bench == "fss":
        comparable = str(res).startswith("model") and proto.get("reference_episodes", True)
        if not proto.get("reference_episodes", True):
            desc += f", seed {result.get('seed')}, {result.get('n_episodes')} episodes"
    if proto.get("subset"):
        comparable = False
        desc += ", subset of the images"
    if proto.get("vocabulary") not in (None, "dataset class names"):
        desc += f", vocabulary {proto['vocabulary']}"
    key = json.dumps(
        {k: v for k, v in proto.items() if k not in ("metric_impl",)}, sort_keys=True, default=str
    )
    return desc, key, bool(comparable)


def _metric_names(result: Mapping[str, Any]) -> list[str]:
    metrics = result.get("metrics", {})
    names = HEADLINE.get(str(result.get("benchmark")))
    if names is None:
        names = tuple(k for k, v in metrics.items() if isinstance(v, int | float) and k[:1] != "_")
    return [n for n in names if isinstance(metrics.get(n), int | float)]


def build_rows(
    results: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]] = ()
) -> list[Row]:
    """Aggregate folds / seeds and group the results into comparable rows."""
    # group per (benchmark, dataset, split, shots, model, protocol): the fold / seed parts
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in results:
        desc, pkey, comparable = _protocol(r)
        gkey = (r["benchmark"], r["dataset"], r.get("split"), r.get("shots"), pkey)
        g = groups.setdefault(
            gkey, {"desc": desc, "comparable": comparable, "models": {}, "digests": {}}
        )
        model = _model_name(r)
        parts = g["models"].setdefault(model, {})
        if r["benchmark"] == "fsis" and r.get("per_seed"):
            for s in r["per_seed"]:  # seeds: mean of the per-seed APs
                parts[("seed", s["seed"])] = s
        else:
            parts[("fold", r.get("fold"), r.get("seed"))] = r["metrics"]
        if r.get("episode_digest"):
            g["digests"].setdefault(model, {})[r.get("fold")] = r["episode_digest"]
    rows: dict[tuple[Any, ...], Row] = {}
    for (bench, dataset, split, shots, pkey), g in groups.items():
        for model, parts in g["models"].items():
            digests = g["digests"].get(model, {})
            episodes = (
                hashlib.sha256(json.dumps(sorted(digests.items(), key=str)).encode()).hexdigest()
                if digests
                else ""
            )
            some = next(iter(parts.values()))
            names = [
                n
                for n in (HEADLINE.get(bench) or tuple(some))
                if isinstance(some.get(n), int | float) and not isinstance(some.get(n), bool)
            ]
            for metric in names:
                values = [float(p[metric]) for p in parts.values() if metric in p]
                finite = [v for v in values if not math.isnan(v)]
                value = sum(finite) / len(finite) if finite else math.nan
                key = (bench, dataset, split, shots, metric, f"{pkey}|{episodes}")
                row = rows.get(key)
                if row is None:
                    row = rows[key] = Row(
                        bench, dataset, split, shots, metric, g["desc"], key[-1], g["comparable"]
                    )
                row.cells[model] = value
                row.parts[model] = len(values)
    out = sorted(rows.values(), key=lambda r: tuple(map(str, r.key)))
    _attach_reference(out, reference)
    _footnotes(out)
    return out


def _ref_models(entry: Mapping[str, Any]) -> set[str]:
    model, tag = entry.get("model"), entry.get("tag")
    names = {str(model)}
    if tag:
        names.add(f"{model}.{tag}")
    return names


def _attach_reference(rows: Sequence[Row], reference: Sequence[Mapping[str, Any]]) -> None:
    for row in rows:
        for entry in reference:
            if (
                entry.get("benchmark") != row.benchmark
                or entry.get("dataset") != row.dataset
                or entry.get("metric") != row.metric
                or entry.get("value") is None
            ):
                continue
            shots = entry.get("shots")
            if shots is not None and row.shots is not None and int(shots) != int(row.shots):
                continue
            for model in row.cells:
                if model in _ref_models(entry):
                    row.reported[model] = float(entry["value"])


def _footnotes(rows: Sequence[Row]) -> None:
    """Rows sharing (benchmark, dataset, split, shots, metric) with another protocol, and rows not
    run with the paper protocol, get a numbered footnote."""
    base: dict[tuple[Any, ...], list[Row]] = {}
    for r in rows:
        base.setdefault(r.key[:-1], []).append(r)
    n = 0
    for r in rows:
        if len(base[r.key[:-1]]) > 1 or not r.comparable:
            n += 1
            r.footnote = n


def footnote_lines(rows: Sequence[Row]) -> list[str]:
    lines = []
    for r in rows:
        if r.footnote is None:
            continue
        extra = "" if r.comparable else "; not the paper protocol, not compared"
        lines.append(f"[{r.footnote}] {r.protocol}{extra}")
    return lines


# ------------------------------------------------------------------------------------------------
# formatting


def _fmt(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "—"
    if math.isnan(v):
        return "nan"
    return f"{v:.{digits}f}"


def _cell(row: Row, model: str) -> str:
    if model not in row.cells:
        return ""
    text = _fmt(row.cells[model])
    d = row.delta(model)
    if d is not None:
        sign = "+" if d > 0 else ("−" if d < 0 else "±")
        text += f" ({sign}{abs(d):.1f})"
    return text


def _models(rows: Sequence[Row]) -> list[str]:
    return sorted({m for r in rows for m in r.cells})


def _reported(row: Row, models: Sequence[str]) -> str:
    if not row.comparable:
        return "—"
    vals = [_fmt(row.reported[m]) for m in models if m in row.reported]
    return " / ".join(vals) if vals else "—"


def format_table(rows: Sequence[Row], fmt: str = "md") -> str:
    """The comparison table as Markdown, CSV or JSON."""
    models = _models(rows)
    if fmt == "json":
        payload = [
            {
                "benchmark": r.benchmark,
                "dataset": r.dataset,
                "split": r.split,
                "shots": r.shots,
                "metric": r.metric,
                "protocol": r.protocol,
                "comparable": r.comparable,
                "footnote": r.footnote,
                "cells": {
                    m: {"value": r.cells[m], "parts": r.parts[m], "delta": r.delta(m)}
                    for m in r.cells
                },
                "reported": r.reported if r.comparable else {},
            }
            for r in rows
        ]
        return json.dumps(payload, indent=1) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(
            ["benchmark", "dataset", "split", "shots", "metric", "protocol", "model"]
            + ["value", "parts", "reported", "delta"]
        )
        for r in rows:
            for m in models:
                if m not in r.cells:
                    continue
                rep = r.reported.get(m) if r.comparable else None
                d = r.delta(m)
                w.writerow(
                    [r.benchmark, r.dataset, r.split, r.shots, r.metric, r.protocol, m]
                    + [r.cells[m], r.parts[m], "" if rep is None else rep, "" if d is None else d]
                )
        return buf.getvalue()
    if fmt != "md":
        raise ValueError(f"format must be md, csv or json, got {fmt!r}")
    header = ["benchmark · metric", "shots", *models, "reported"]
    body = [
        [r.label(), "—" if r.shots is None else str(r.shots)]
        + [_cell(r, m) for m in models]
        + [_reported(r, models)]
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) + " |" for b in body
    ]
    notes = footnote_lines(rows)
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def gate_failures(rows: Sequence[Row], reference: Sequence[Mapping[str, Any]]) -> list[str]:
    """Cells of status-R reference rows whose |Δ| exceeds the row's tolerance."""
    fails = []
    for r in rows:
        for m, reported in r.reported.items():
            d = r.delta(m)
            if d is None:
                continue
            for e in reference:
                if (
                    e.get("status") == "R"
                    and e.get("tolerance") is not None
                    and e.get("value") is not None
                    and m in _ref_models(e)
                    and e.get("benchmark") == r.benchmark
                    and e.get("dataset") == r.dataset
                    and e.get("metric") == r.metric
                    and float(e.get("value")) == reported
                    and abs(d) > float(e["tolerance"])
                ):
                    fails.append(f"{r.label()} {m}: Δ {d:+.2f} > {e['tolerance']}")
    return fails


# ------------------------------------------------------------------------------------------------
# chart (PIL only)

_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def draw_chart(rows: Sequence[Row], path: str | Path) -> Path:
    """Grouped bar chart: per row one bar per model (and a grey bar for the reported value)."""
    from PIL import Image, ImageDraw, ImageFont

    models = _models(rows)
    series = [*models, "reported"]
    colors = {m: _COLORS[i % len(_COLORS)] for i, m in enumerate(models)}
    colors["reported"] = (150, 150, 150)
    bar, gap, left, top, plot_h = 14, 18, 50, 30, 260
    group_w = bar * len(series) + gap
    width = max(left + group_w * max(len(rows), 1) + 20, 360)
    height = top + plot_h + 40 + 14 * len(rows) + 16 * len(series)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    values = [v for r in rows for v in r.cells.values() if not math.isnan(v)]
    values += [v for r in rows if r.comparable for v in r.reported.values()]
    vmax = max([100.0 if max(values, default=0) > 1 else 1.0, *values])
    base_y = top + plot_h
    draw.line([(left, top), (left, base_y), (width - 10, base_y)], fill="black")
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = base_y - frac * plot_h
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((4, y - 6), f"{frac * vmax:.0f}", fill="black", font=font)
    for i, r in enumerate(rows):
        x0 = left + 10 + i * group_w
        for j, s in enumerate(series):
            v = r.cells.get(s) if s != "reported" else None
            if s == "reported" and r.comparable and r.reported:
                v = sum(r.reported.values()) / len(r.reported)
            if v is None or math.isnan(v):
                continue
            h = max(0.0, min(v / vmax, 1.0)) * plot_h
            x = x0 + j * bar
            draw.rectangle([x, base_y - h, x + bar - 2, base_y], fill=colors[s])
        label = f"{i + 1}"
        draw.text((x0, base_y + 4), label, fill="black", font=font)
    y = base_y + 24
    for i, r in enumerate(rows):
        shots = "" if r.shots is None else f", {r.shots}-shot"
        draw.text((left, y), f"{i + 1}: {r.label()}{shots}", fill="black", font=font)
        y += 14
    for s in series:
        draw.rectangle([left, y + 3, left + 10, y + 11], fill=colors[s])
        draw.text((left + 16, y), s, fill="black", font=font)
        y += 16
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, format="PNG")
    return out


# ------------------------------------------------------------------------------------------------
# command


def main_report(
    results: Sequence[str | Path],
    *,
    reference: str | Path | None = None,
    fmt: str = "md",
    chart: str | Path | None = None,
    output: str | Path | None = None,
    gate: bool = False,
) -> int:
    """`promptseg bench report`: print (or write) the table; exit 1 if `gate` and a gate fails."""
    if reference is None and DEFAULT_REFERENCE.is_file():
        reference = DEFAULT_REFERENCE
    ref = load_reference(reference)
    rows = build_rows(load_results(results), ref)
    text = format_table(rows, fmt)
    if output:
        Path(output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    if chart:
        draw_chart(rows, chart)
    if gate:
        fails = gate_failures(rows, ref)
        for f in fails:
            print(f"GATE FAILED: {f}", file=sys.stderr)
        return 1 if fails else 0
    return 0
