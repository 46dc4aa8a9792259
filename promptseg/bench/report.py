"""`promptseg bench report`: side-by-side table of result.json files against reference.yaml.

Rows are keyed by (benchmark, dataset, split, shots, metric, protocol class). The protocol class
is what decides whether numbers of different models may share a row: scoring at the model-native
resolution or at the original size, reference episodes or not, all images or a subset, the
dataset's vocabulary or another one. Each model's own resolution and threshold are per-cell
details listed in the row's footnote, so e.g. SINE (518 px, 0.7) and DiffewS (512 px, 0.25) land in
one row. Folds are aggregated as the mean of the per-fold values, FSIS seeds as the mean of
the per-seed APs. A cell is compared with a reference.yaml row only if model, metric, scoring
resolution, threshold and the fold / seed set all match; a run covering only part of the reference's
folds or seeds is shown without a delta and marked partial. Best-threshold (oracle) values get rows
of their own, labelled as such, and are only ever compared with oracle reference values.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_REFERENCE",
    "Cell",
    "ChartBar",
    "ChartLayout",
    "Row",
    "build_rows",
    "chart_layout",
    "default_chart_path",
    "draw_chart",
    "format_table",
    "GateCheck",
    "gate_checks",
    "gate_failures",
    "load_reference",
    "load_results",
    "main_report",
]

DEFAULT_REFERENCE = Path(__file__).with_name("reference.yaml")
"""The published numbers shipped with promptseg (package data), used without --reference."""

# Headline metrics per benchmark, named as the eval commands write them into result.json.
# refer: fixed-threshold values are written as `<name>@<t>` (e.g. mIoU@0.3), the best-threshold
# values in the result's `oracle` block; the report names those `<name>_best`.
HEADLINE: dict[str, tuple[str, ...]] = {
    "fss": ("mIoU", "FB-IoU"),
    "fsis": ("AP", "AP50", "box AP", "box AP50"),
    "ovseg": ("PQ", "AP", "mIoU"),
    "vos": ("J&F-Mean", "J-Mean", "F-Mean"),
    "refer": ("mIoU", "IoU_FG", "AP"),
    "perseg": ("mIoU", "mAcc"),
}
ORACLE_METRICS = ("mIoU", "IoU_FG")
ORACLE = "oracle"

# what a benchmark aggregates over: fss folds, fsis seeds (reference.yaml `folds` / `seeds`)
PART_KIND: dict[str, str] = {"fss": "fold", "fsis": "seed"}

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
    "perseg": "PerSeg",
}


@dataclass
class Cell:
    """One model's number in a row, with the protocol details that belong to the model."""

    value: float
    parts: list[Any]  # folds (fss) or seeds (fsis) aggregated; [None] otherwise
    resolution: str
    threshold: Any  # the model's threshold as the run recorded it
    names: set[str]  # concrete model names behind the column (one per fold for {f} tags)
    memory: int | None = None  # vos: frames of video memory the run used
    oracle_t: float | None = None  # threshold an oracle value was taken at
    reported: float | None = None  # matched reference value (full fold / seed coverage only)
    ref_id: str | None = None
    partial: str | None = None  # e.g. "fold 0 of 0–3": no delta
    whole: list[Any] | None = None  # partial cells: the folds / seeds a complete run covers

    def detail(self) -> str:
        """Resolution, threshold (and video memory) of this model's run, for the footnote."""
        text = f"res. {self.resolution}"
        if self.oracle_t is not None:
            text += f", oracle t = {self.oracle_t:g}"
        elif self.threshold is not None:
            text += f", threshold {self.threshold}"
        if self.memory is not None:
            text += f", memory {self.memory}"
        return text


@dataclass
class Row:
    """One table row: (benchmark, dataset, split, shots, metric, protocol class) and its cells."""

    benchmark: str
    dataset: str
    split: str | None
    shots: Any
    metric: str  # result name; refer: `mIoU@0.3`, oracle: `mIoU_best`
    protocol: str  # protocol class, e.g. "model-native res. · reference episodes"
    native: bool  # the protocol of the published numbers: may be compared with reference.yaml
    variant: int = 0  # > 0: same key, but a model ran twice (other threshold) or other episodes
    cells: dict[str, Cell] = field(default_factory=dict)
    digests: dict[Any, str] = field(default_factory=dict)  # fold -> episode digest of the row
    footnote: int | None = None

    @property
    def key(self) -> tuple[Any, ...]:
        """What identifies the row (variant included)."""
        return (
            self.benchmark,
            self.dataset,
            self.split,
            self.shots,
            self.metric,
            self.protocol,
            self.variant,
        )

    @property
    def oracle(self) -> bool:
        """Best-threshold value chosen on the test set itself."""
        return _metric_threshold(self.metric) == ORACLE

    def label(self) -> str:
        """`COCO-20i mIoU (4-fold mean) [1]`."""
        name = DATASET_LABEL.get(self.dataset, self.dataset)
        agg = ""
        kind = PART_KIND.get(self.benchmark)
        covered = _row_parts(self)
        if kind and len(covered) > 1:
            agg = f" ({len(covered)}-{kind} mean)"
        elif kind == "fold" and covered and self.dataset != "fss1000":
            agg = f" (fold {covered[0]})"
        mark = f" [{self.footnote}]" if self.footnote is not None else ""
        return f"{name} {_metric_label(self.metric)}{agg}{mark}"

    def delta(self, model: str) -> float | None:
        """Reproduced − reported, when the cell matched a reference value with full coverage."""
        cell = self.cells.get(model)
        if cell is None or cell.reported is None:
            return None
        return cell.value - cell.reported


# ------------------------------------------------------------------------------------------------
# loading


def load_results(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Parse result.json files; a folder is searched recursively for result.json."""
    out = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such result.json file or runs folder")
        files = sorted(path.rglob("result.json")) if path.is_dir() else [path]
        for f in files:
            data = json.loads(f.read_text(encoding="utf-8"))
            if data.get("schema_version") != 1:
                raise ValueError(
                    f"{f}: unsupported schema_version {data.get('schema_version')!r} "
                    "(this promptseg reads schema 1; re-run the eval with this version)"
                )
            data["_path"] = str(f)
            out.append(data)
    return out


def load_reference(path: str | Path | None) -> list[dict[str, Any]]:
    """The rows of reference.yaml (a list, or a mapping with a `rows` list)."""
    if path is None:
        return []
    import yaml

    if not Path(path).is_file():
        raise FileNotFoundError(f"reference file {path} not found (bench report --reference)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # safe either way; libyaml is faster
    data = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=loader)
    rows = data.get("rows", []) if isinstance(data, Mapping) else data
    return list(rows or [])


# ------------------------------------------------------------------------------------------------
# metric names and protocol classes


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _metric_threshold(metric: str) -> float | str | None:
    """The threshold a metric name is defined at: `mIoU@0.3` -> 0.3, `mIoU_best` -> oracle."""
    base, sep, t = metric.partition("@")
    if sep:
        return float(t)
    if base.endswith("_best"):
        return ORACLE
    return None


def _metric_base(metric: str) -> str:
    return metric.partition("@")[0]


def _metric_label(metric: str) -> str:
    t = _metric_threshold(metric)
    if t == ORACLE:
        return f"{metric} (oracle: best t on the test set)"
    if t is not None:
        return f"{_metric_base(metric)} (t = {t:g})"
    return metric


def _metric_order(bench: str, metric: str) -> tuple[int, str]:
    names = HEADLINE.get(bench, ())
    base = _metric_base(metric).removesuffix("_best")
    rank = names.index(base) if base in names else len(names)
    return (rank + (len(names) + 1 if metric.endswith("_best") else 0), metric)


def _headline(result: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict[str, float]:
    """The headline metrics of one result (or one FSIS seed), by the names the evals write."""
    bench = str(result.get("benchmark"))
    names = HEADLINE.get(bench)
    if names is None:
        return {k: float(v) for k, v in metrics.items() if _is_number(v) and k[:1] != "_"}
    out = {n: float(metrics[n]) for n in names if _is_number(metrics.get(n))}
    if bench == "refer":  # fixed-threshold values: `<name>@<t>`
        for k, v in metrics.items():
            if "@" in k and _metric_base(k) in names and _is_number(v):
                out[k] = float(v)
    return out


def _oracle(result: Mapping[str, Any]) -> dict[str, tuple[float, float | None]]:
    """refer: `<name>_best` -> (value, threshold) from the result's oracle block."""
    block = result.get("oracle") or {}
    out = {}
    for name in ORACLE_METRICS:
        if _is_number(block.get(name)):
            t = block.get(f"{name}_t")
            out[f"{name}_best"] = (float(block[name]), float(t) if _is_number(t) else None)
    return out


def _protocol_class(result: Mapping[str, Any]) -> tuple[str, bool]:
    """(protocol class shared by comparable runs, is it the published numbers' protocol?)."""
    proto = result.get("protocol") or {}
    bench = result.get("benchmark")
    model_res = str(proto.get("resolution", "")).startswith("model")
    native = model_res or bench not in ("fss", "refer")
    parts = ["model-native res." if model_res else "original size"]
    if bench == "fss":
        if proto.get("reference_episodes", True):
            parts.append("reference episodes")
        else:
            native = False
            parts.append(
                f"non-reference episodes (seed {result.get('seed')}, "
                f"{result.get('n_episodes')} per fold)"
            )
    if proto.get("subset"):
        native = False
        parts.append(f"first {result.get('n_images')} images")
    vocabulary = proto.get("vocabulary")
    if vocabulary not in (None, "dataset class names"):
        native = False
        parts.append(f"vocabulary {vocabulary}")
    return " · ".join(parts), native


def _fold_templates(reference: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, Any], str]:
    """(benchmark, model name, fold) -> column of a one-checkpoint-per-fold tag (`..._fold{f}`)."""
    out = {}
    for e in reference:
        tag = e.get("tag")
        if isinstance(tag, str) and "{f}" in tag:
            for f in e.get("folds") or ():
                concrete = f"{e['model']}.{tag.replace('{f}', str(f))}"
                out[(str(e.get("benchmark")), concrete, f)] = f"{e['model']}.{tag}"
    return out


# ------------------------------------------------------------------------------------------------
# aggregation


@dataclass
class _Group:
    """All parts (folds / seeds) of one model run under one protocol and model settings."""

    native: bool
    names: set[str] = field(default_factory=set)
    parts: dict[Any, dict[str, float]] = field(default_factory=dict)
    oracle_t: dict[Any, dict[str, float | None]] = field(default_factory=dict)
    digests: dict[Any, str] = field(default_factory=dict)


def _groups(
    results: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]]
) -> dict[tuple[Any, ...], _Group]:
    templates = _fold_templates(reference)
    groups: dict[tuple[Any, ...], _Group] = {}
    for r in results:
        bench = str(r["benchmark"])
        proto = r.get("protocol") or {}
        protocol, native = _protocol_class(r)
        name = str((r.get("model") or {}).get("name", "?"))
        column = templates.get((bench, name, r.get("fold")), name)
        key = (
            bench,
            r["dataset"],
            r.get("split"),
            r.get("shots"),
            protocol,
            column,
            str(proto.get("resolution", "?")),
            json.dumps(proto.get("threshold"), default=str),
            proto.get("memory"),
        )
        g = groups.setdefault(key, _Group(native))
        g.names.add(name)
        oracle = _oracle(r)
        if bench == "fsis" and r.get("per_seed"):
            for s in r["per_seed"]:  # seeds: mean of the per-seed APs
                g.parts[s["seed"]] = _headline(r, s)
        else:
            part = r.get("fold") if bench == "fss" else None
            values = _headline(r, r.get("metrics") or {})
            values.update({m: v for m, (v, _) in oracle.items()})
            g.parts[part] = values
            g.oracle_t[part] = {m: t for m, (_, t) in oracle.items()}
            if r.get("episode_digest"):
                g.digests[part] = str(r["episode_digest"])
    return groups


def _digests_agree(row: Row, digests: Mapping[Any, str]) -> bool:
    return all(row.digests.get(f, d) == d for f, d in digests.items())


def build_rows(
    results: Sequence[Mapping[str, Any]], reference: Sequence[Mapping[str, Any]] = ()
) -> list[Row]:
    """Aggregate folds / seeds, group comparable cells into rows, match reference values."""
    rows: dict[tuple[Any, ...], list[Row]] = {}
    # runs covering more folds / seeds first: they take the first row of a key, a model's
    # further runs (e.g. a threshold sweep on one fold) the next ones
    groups = sorted(
        _groups(results, reference).items(), key=lambda kv: (-len(kv[1].parts), str(kv[0]))
    )
    for key, g in groups:
        bench, dataset, split, shots, protocol, column, resolution, threshold, memory = key
        metrics = {m for values in g.parts.values() for m in values}
        for metric in sorted(metrics):
            covered = sorted((p for p, v in g.parts.items() if metric in v), key=str)
            finite = [g.parts[p][metric] for p in covered if not math.isnan(g.parts[p][metric])]
            oracle_ts = [g.oracle_t.get(p, {}).get(metric) for p in covered]
            cell = Cell(
                value=sum(finite) / len(finite) if finite else math.nan,
                parts=covered,
                resolution=resolution,
                threshold=json.loads(threshold),
                memory=memory,
                names=set(g.names),
                oracle_t=oracle_ts[0] if len(oracle_ts) == 1 else None,
            )
            variants = rows.setdefault((bench, dataset, split, shots, metric, protocol), [])
            row = next(
                (r for r in variants if column not in r.cells and _digests_agree(r, g.digests)),
                None,
            )
            if row is None:
                row = Row(bench, dataset, split, shots, metric, protocol, g.native, len(variants))
                variants.append(row)
            row.cells[column] = cell
            row.digests.update(g.digests)
    out = [r for variants in rows.values() for r in variants]
    out.sort(
        key=lambda r: (
            r.benchmark,
            r.dataset,
            str(r.split),
            str(r.shots),
            not r.native,
            r.protocol,
            _metric_order(r.benchmark, r.metric),
            r.variant,
        )
    )
    _attach_reference(out, reference)
    _mark_partial(out)
    _footnotes(out)
    return out


# ------------------------------------------------------------------------------------------------
# reference matching


def _entry_name(entry: Mapping[str, Any]) -> str:
    tag = entry.get("tag")
    return f"{entry.get('model')}.{tag}" if tag else str(entry.get("model"))


def _same_shots(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return int(a) == int(b)


def _canonical_resolution(text: str) -> str:
    """'model:518' and 'model:518x518' are the same scoring size."""
    size = text.removeprefix("model:")
    if size != text and "x" not in size:
        return f"model:{size}x{size}"
    return text


def _resolution_ok(ref: Any, resolution: str) -> bool:
    """A scoring resolution in reference.yaml ('model:518', 'model:HxW', 'original') must equal
    the run's; other text describes the model input and is not compared."""
    if ref is None:
        return True
    ref = str(ref)
    if ref != "original" and not ref.startswith("model:"):
        return True
    return _canonical_resolution(ref) == _canonical_resolution(resolution)


def _threshold_ok(ref: Any, threshold: Any, defined_by_metric: bool) -> bool:
    """Numbers must be equal; oracle only matches oracle; text / null is not compared, except
    for metrics defined at a threshold (`mIoU@0.3`), which need the same number."""
    if ref == ORACLE or threshold == ORACLE:
        return ref == threshold
    if _is_number(ref):
        return _is_number(threshold) and abs(float(ref) - float(threshold)) < 1e-9
    return not defined_by_metric


def _fmt_parts(parts: Sequence[Any]) -> str:
    """[0, 1, 2, 3] -> '0–3'; [0, 2] -> '0, 2'."""
    if all(isinstance(p, int) for p in parts) and len(parts) > 2:
        ints = sorted(parts)
        if ints == list(range(ints[0], ints[-1] + 1)):
            return f"{ints[0]}–{ints[-1]}"
    return ", ".join(map(str, parts))


def _coverage(entry: Mapping[str, Any], bench: str, parts: Sequence[Any]) -> str | None:
    """'full' if the run covers exactly the reference's folds / seeds, a 'partial: …' note if it
    covers a subset of them, None if it covers others."""
    kind = PART_KIND.get(bench)
    want = entry.get("folds" if kind == "fold" else "seeds") if kind else None
    if not want:
        return "full"
    have = {str(p) for p in parts}
    wanted = {str(w) for w in want}
    if have == wanted:
        return "full"
    if have < wanted:
        return f"partial: {kind}s {_fmt_parts(parts)} of {_fmt_parts(list(want))}"
    return None


def _attach_reference(rows: Sequence[Row], reference: Sequence[Mapping[str, Any]]) -> None:
    for row in rows:
        if not row.native:
            continue
        base, metric_t = _metric_base(row.metric), _metric_threshold(row.metric)
        for column, cell in row.cells.items():
            threshold = metric_t if metric_t is not None else cell.threshold
            match: tuple[Mapping[str, Any], str] | None = None
            for e in reference:
                if (
                    e.get("value") is None
                    or e.get("benchmark") != row.benchmark
                    or e.get("dataset") != row.dataset
                    or e.get("metric") != base
                    or (e.get("split") not in (None, row.split) and row.split is not None)
                    or not _same_shots(e.get("shots"), row.shots)
                    or _entry_name(e) not in {column, *cell.names}
                    or not _resolution_ok(e.get("resolution"), cell.resolution)
                    or not _threshold_ok(e.get("threshold"), threshold, metric_t is not None)
                ):
                    continue
                cov = _coverage(e, row.benchmark, cell.parts)
                if cov == "full":
                    match = (e, cov)
                    break
                if cov is not None and match is None:
                    match = (e, cov)
            if match is None:
                continue
            entry, cov = match
            cell.ref_id = str(entry.get("id"))
            if cov == "full":
                cell.reported = float(entry["value"])
            else:
                cell.partial = cov
                cell.whole = list(entry.get("folds" if row.benchmark == "fss" else "seeds") or [])


def _row_parts(row: Row) -> list[Any]:
    return sorted({p for c in row.cells.values() for p in c.parts if p is not None}, key=str)


def _mark_partial(rows: Sequence[Row]) -> None:
    """A cell aggregating fewer folds / seeds than the row's other cells is marked partial."""
    for row in rows:
        kind = PART_KIND.get(row.benchmark)
        covered = _row_parts(row)
        for cell in row.cells.values():
            if kind and cell.partial is None and cell.reported is None:
                if len(cell.parts) < len(covered):
                    cell.partial = (
                        f"partial: {kind}s {_fmt_parts(cell.parts)} of {_fmt_parts(covered)}"
                    )
                    cell.whole = list(covered)


def _footnotes(rows: Sequence[Row]) -> None:
    """Each row's per-model details (resolution, threshold) as a footnote; equal texts share it."""
    numbers: dict[str, int] = {}
    for r in rows:
        text = _footnote_text(r)
        r.footnote = numbers.setdefault(text, len(numbers) + 1)


def _footnote_text(row: Row) -> str:
    text = "; ".join(f"{m}: {c.detail()}" for m, c in sorted(row.cells.items()))
    if not row.native:
        text += f" — {row.protocol}: not the published protocol, never compared"
    return text


def footnote_lines(rows: Sequence[Row]) -> list[str]:
    """`[n] text` for every footnote number used by the rows."""
    seen: dict[int, str] = {}
    for r in rows:
        if r.footnote is not None:
            seen.setdefault(r.footnote, _footnote_text(r))
    return [f"[{n}] {text}" for n, text in sorted(seen.items())]


# ------------------------------------------------------------------------------------------------
# formatting


def _fmt(v: float | None, digits: int = 1) -> str:
    if v is None:
        return "—"
    if math.isnan(v):
        return "nan"
    return f"{v:.{digits}f}"


def _cell_text(row: Row, model: str) -> str:
    cell = row.cells.get(model)
    if cell is None:
        return ""
    text = _fmt(cell.value)
    d = row.delta(model)
    if d is not None:
        text += f" ({_signed(d).replace('-', '−')})"
    elif cell.partial:
        text += f" ({cell.partial})"
    return text


def _models(rows: Sequence[Row]) -> list[str]:
    return sorted({m for r in rows for m in r.cells})


def _reported_text(row: Row, models: Sequence[str]) -> str:
    present = [m for m in models if m in row.cells]
    if not any(row.cells[m].reported is not None for m in present):
        return "—"
    text = " / ".join(_fmt(row.cells[m].reported) for m in present)
    return f"{text} (oracle)" if row.oracle else text


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
                "oracle": r.oracle,
                "protocol": r.protocol,
                "native_protocol": r.native,
                "footnote": r.footnote,
                "cells": {
                    m: {
                        "value": c.value,
                        "parts": c.parts,
                        "resolution": c.resolution,
                        "threshold": c.threshold,
                        "oracle_t": c.oracle_t,
                        "reported": c.reported,
                        "delta": r.delta(m),
                        "partial": c.partial,
                        "reference_id": c.ref_id,
                    }
                    for m, c in r.cells.items()
                },
            }
            for r in rows
        ]
        return json.dumps(payload, indent=1) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(
            ["benchmark", "dataset", "split", "shots", "metric", "oracle", "protocol", "model"]
            + ["value", "parts", "resolution", "threshold", "reported", "delta", "partial"]
            + ["reference_id"]
        )
        for r in rows:
            for m in models:
                c = r.cells.get(m)
                if c is None:
                    continue
                d = r.delta(m)
                w.writerow(
                    [r.benchmark, r.dataset, r.split, r.shots, r.metric, r.oracle, r.protocol, m]
                    + [c.value, _fmt_parts(c.parts), c.resolution, c.threshold]
                    + ["" if c.reported is None else c.reported, "" if d is None else d]
                    + [c.partial or "", c.ref_id or ""]
                )
        return buf.getvalue()
    if fmt != "md":
        raise ValueError(f"format must be md, csv or json, got {fmt!r}")
    header = ["benchmark · metric", "protocol", "shots", *models, "reported"]
    body = [
        [r.label(), r.protocol, "—" if r.shots is None else str(r.shots)]
        + [_cell_text(r, m) for m in models]
        + [_reported_text(r, models)]
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


@dataclass(frozen=True)
class GateCheck:
    """One reproduced value compared with a gated (status R) reference value."""

    text: str  # `COCO-20i mIoU (4-fold mean) [1] sine_dinov2l.coco_ade_o365: Δ -0.20 (id)`
    passed: bool


def gate_checks(rows: Sequence[Row], reference: Sequence[Mapping[str, Any]]) -> list[GateCheck]:
    """Every cell matched to a status-R reference row with a tolerance, passed if |Δ| <= it."""
    by_id = {str(e.get("id")): e for e in reference}
    checks = []
    for r in rows:
        for m, cell in r.cells.items():
            d = r.delta(m)
            entry = by_id.get(str(cell.ref_id))
            if d is None or entry is None:
                continue
            tol = entry.get("tolerance")
            if entry.get("status") == "R" and tol is not None:
                passed = abs(d) <= float(tol)
                sign = "<=" if passed else ">"
                text = f"{r.label()} {m}: Δ {d:+.2f} {sign} {tol} ({entry.get('id')})"
                checks.append(GateCheck(text, passed))
    return checks


def gate_failures(rows: Sequence[Row], reference: Sequence[Mapping[str, Any]]) -> list[str]:
    """Cells matched to a status-R reference row whose |Δ| exceeds the row's tolerance."""
    return [c.text for c in gate_checks(rows, reference) if not c.passed]


# ------------------------------------------------------------------------------------------------
# chart (PIL only)

_COLORS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]
_PAPER = (120, 120, 120)  # published values
_GREY = (90, 90, 90)
_GRID = (225, 225, 225)
_BAND = (246, 246, 246)

Box = tuple[int, int, int, int]
Measure = Callable[..., tuple[int, int]]
"""`measure(text, style="text") -> (width, height)` of a text in pixels."""


@dataclass
class ChartText:
    """A text drawn at (x, y), its top-left corner."""

    x: int
    y: int
    text: str
    style: str = "text"  # title | text | small
    color: tuple[int, int, int] = (0, 0, 0)


@dataclass
class ChartBar:
    """One model's bar of one row: the reproduced value, and the published one beside it."""

    row: int
    model: str
    box: Box | None  # (x0, y0, x1, y1); None for a nan value
    partial: bool  # drawn hatched: fewer folds / seeds than a complete run
    label: str  # text right of the bar, e.g. "64.3 (-0.2)" or "21.0 (1/4 folds, partial)"
    paper_box: Box | None = None  # the published value's bar, just below
    paper_label: str | None = None


@dataclass
class ChartLayout:
    """Everything `draw_chart` draws, in pixels; sizes follow the measured labels."""

    width: int
    height: int
    plot: Box  # the area bars grow in (x0 = value 0, x1 = vmax)
    vmax: float
    colors: dict[str, tuple[int, int, int]]
    texts: list[ChartText] = field(default_factory=list)
    bars: list[ChartBar] = field(default_factory=list)
    swatches: list[tuple[Box, str]] = field(default_factory=list)  # legend: box, model or key
    bands: list[Box] = field(default_factory=list)  # row backgrounds
    ticks: list[tuple[int, str]] = field(default_factory=list)  # (x, label) of the value axis


_SIZES = {"title": 18, "text": 13, "small": 11}
_CHART_TITLE = "Reproduced vs published results"
_AXIS_LABEL = "score (the row's metric, x100; higher is better)"
_PLOT_W, _BAR_H, _PAPER_H, _PAD = 460, 14, 8, 16


def _fonts() -> dict[str, Any]:
    """DejaVu Sans if installed, else Pillow's own font (scalable from Pillow 10.1 on)."""
    from PIL import ImageFont

    fonts: dict[str, Any] = {}
    for style, size in _SIZES.items():
        name = "DejaVuSans-Bold.ttf" if style == "title" else "DejaVuSans.ttf"
        try:
            fonts[style] = ImageFont.truetype(name, size)
        except OSError:
            try:
                fonts[style] = ImageFont.load_default(size=size)
            except TypeError:  # Pillow < 10.1: one bitmap size
                fonts[style] = ImageFont.load_default()
    return fonts


def _measure(fonts: Mapping[str, Any]) -> Measure:
    """The size of a text drawn in one of `fonts`."""
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str, style: str = "text") -> tuple[int, int]:
        width = draw.textbbox((0, 0), text or " ", font=fonts[style])[2]
        height = draw.textbbox((0, 0), "Hg", font=fonts[style])[3]
        return int(math.ceil(width)), int(math.ceil(height))

    return size


def _signed(v: float) -> str:
    """+0.3 / -0.3 / ±0.0, the sign of the value as rounded to one decimal."""
    v = round(v, 1)
    return f"{'+' if v > 0 else '-' if v < 0 else '±'}{abs(v):.1f}"


def _bar_label(row: Row, model: str) -> str:
    """The value, its difference to the published one, or how much of the run is there."""
    cell = row.cells[model]
    text = _fmt(cell.value)
    d = row.delta(model)
    if d is not None:
        return f"{text} ({_signed(d)} vs paper)"
    if cell.partial:
        kind = PART_KIND.get(row.benchmark, "part")
        if cell.whole:
            return f"{text} ({len(cell.parts)}/{len(cell.whole)} {kind}s, partial)"
        return f"{text} (partial)"
    return text


def _row_title(row: Row) -> str:
    shots = "" if row.shots is None else f", {row.shots}-shot"
    return f"{row.label()}{shots}"


def _wrap(text: str, width: int, size: Measure, style: str) -> list[str]:
    """Greedy word wrap of `text` to `width` pixels."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and size(f"{lines[-1]} {word}", style)[0] <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def chart_layout(rows: Sequence[Row], measure: Measure | None = None) -> ChartLayout:
    """Where every text and bar of the report chart goes (horizontal bars, one group per row).

    `measure(text, style) -> (w, h)`: text size in pixels (default: the chart's fonts).
    """
    size = measure or _measure(_fonts())
    models = _models(rows)
    colors = {m: _COLORS[i % len(_COLORS)] for i, m in enumerate(models)}
    values = [c.value for r in rows for c in r.cells.values() if not math.isnan(c.value)]
    values += [c.reported for r in rows for c in r.cells.values() if c.reported is not None]
    vmax = max([100.0 if max(values, default=0) > 1 else 1.0, *values])
    line_h = size("Hg")[1] + 3
    small_h = size("Hg", "small")[1] + 2

    # widths: row labels | plot | bar labels
    titles = [_row_title(r) for r in rows]
    label_w = max(
        [size(t)[0] for t in titles] + [size(r.protocol, "small")[0] for r in rows] + [120]
    )
    bar_texts = [_bar_label(r, m) for r in rows for m in r.cells]
    bar_texts += [f"paper {_fmt(c.reported)}" for r in rows for c in r.cells.values()]
    text_w = max([size(t, "small")[0] for t in bar_texts] + [40])
    x_plot = _PAD + label_w + 12
    plot_x1 = x_plot + _PLOT_W
    width = plot_x1 + 8 + text_w + _PAD
    keys = [(m, m) for m in models]
    if any(c.reported is not None for r in rows for c in r.cells.values()):
        keys += [("paper", "published value (same protocol, all folds / seeds)")]
    if any(c.partial for r in rows for c in r.cells.values()):
        keys += [("partial", "partial run: fewer folds / seeds, not compared")]
    widest_key = max([size(text)[0] + 20 for _, text in keys] + [0])
    width = max(width, size(_CHART_TITLE, "title")[0] + 2 * _PAD, widest_key + 2 * _PAD)
    layout = ChartLayout(width, 0, (x_plot, 0, plot_x1, 0), vmax, colors)
    texts = layout.texts

    # title and legend
    y = _PAD
    texts.append(ChartText(_PAD, y, _CHART_TITLE, "title"))
    y += size(_CHART_TITLE, "title")[1] + 8
    x = _PAD
    for key, text in keys:
        w = 14 + 6 + size(text)[0] + 18
        if x > _PAD and x + w > width - _PAD:
            x, y = _PAD, y + line_h + 2
        layout.swatches.append(((x, y + 2, x + 14, y + 14), key))
        texts.append(ChartText(x + 20, y, text))
        x += w
    y += line_h + 12

    # rows
    plot_y0 = y
    for i, row in enumerate(rows):
        top = y
        texts.append(ChartText(_PAD, y + 2, titles[i]))
        texts.append(ChartText(_PAD, y + 2 + line_h, row.protocol, "small", _GREY))
        yb = y + 4
        for m in sorted(row.cells):
            cell = row.cells[m]
            box = None
            if not math.isnan(cell.value):
                x1 = x_plot + max(1, round(min(cell.value / vmax, 1.0) * _PLOT_W))
                box = (x_plot, yb, x1, yb + _BAR_H)
            bar = ChartBar(i, m, box, cell.partial is not None, _bar_label(row, m))
            texts.append(ChartText((box[2] if box else x_plot) + 6, yb + 1, bar.label, "small"))
            yb += _BAR_H + 2
            if cell.reported is not None:
                x1 = x_plot + max(1, round(min(cell.reported / vmax, 1.0) * _PLOT_W))
                bar.paper_box = (x_plot, yb, x1, yb + _PAPER_H)
                bar.paper_label = f"paper {_fmt(cell.reported)}"
                texts.append(ChartText(x1 + 6, yb - 3, bar.paper_label, "small", _GREY))
                yb += _PAPER_H + 4
            yb += 4
            layout.bars.append(bar)
        y = max(yb, y + 2 * line_h + 6) + 4
        layout.bands.append((_PAD // 2, top, width - _PAD // 2, y))
    plot_y1 = y
    layout.plot = (x_plot, plot_y0, plot_x1, plot_y1)

    # value axis: ticks, axis label
    step = vmax / 5
    for k in range(6):
        tick = k * step
        layout.ticks.append(
            (x_plot + round(k / 5 * _PLOT_W), f"{tick:.0f}" if vmax > 1 else f"{tick:.1f}")
        )
    y = plot_y1 + 6
    for tx, text in layout.ticks:
        texts.append(ChartText(tx - size(text, "small")[0] // 2, y, text, "small"))
    y += small_h + 4
    texts.append(ChartText(x_plot + (_PLOT_W - size(_AXIS_LABEL)[0]) // 2, y, _AXIS_LABEL))
    y += line_h + 10

    # footnotes: each model's resolution / threshold per row
    for note in footnote_lines(rows):
        for line in _wrap(note, width - 2 * _PAD, size, "small"):
            texts.append(ChartText(_PAD, y, line, "small", _GREY))
            y += small_h
    layout.height = y + _PAD
    return layout


def _hatched(img: Any, box: Box, color: tuple[int, int, int]) -> None:
    """Fill `box` with diagonal stripes of `color` on a paler tint of it, and outline it."""
    from PIL import Image, ImageDraw

    x0, y0, x1, y1 = box
    w, h = max(x1 - x0, 1), max(y1 - y0, 1)
    tint = tuple(round(255 - 0.3 * (255 - c)) for c in color)  # the colour, paler
    tile = Image.new("RGB", (w, h), tint)
    draw = ImageDraw.Draw(tile)
    for k in range(-h, w, 6):
        draw.line([(k, h), (k + h, 0)], fill=color, width=2)
    img.paste(tile, (x0, y0))
    ImageDraw.Draw(img).rectangle(box, outline=color, width=1)


def draw_chart(rows: Sequence[Row], path: str | Path) -> Path:
    """Horizontal grouped bar chart: per row one bar per model, the published value below it
    (grey), partial runs hatched; title, legend, value axis and the table's footnotes."""
    from PIL import Image, ImageDraw

    fonts = _fonts()
    layout = chart_layout(rows, _measure(fonts))
    img = Image.new("RGB", (layout.width, layout.height), "white")
    draw = ImageDraw.Draw(img)
    for i, band in enumerate(layout.bands):
        if i % 2 == 0:
            draw.rectangle(band, fill=_BAND)
    x0, y0, x1, y1 = layout.plot
    for tx, _ in layout.ticks:
        draw.line([(tx, y0), (tx, y1)], fill=_GRID)
        draw.line([(tx, y1), (tx, y1 + 4)], fill="black")
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill="black")
    for box, key in layout.swatches:
        if key == "paper":
            draw.rectangle((box[0], box[1] + 3, box[2], box[3] - 3), fill=_PAPER)
        elif key == "partial":
            _hatched(img, box, (60, 60, 60))
        else:
            draw.rectangle(box, fill=layout.colors[key])
    for bar in layout.bars:
        color = layout.colors[bar.model]
        if bar.box is not None and bar.partial:
            _hatched(img, bar.box, color)
        elif bar.box is not None:
            draw.rectangle(bar.box, fill=color)
        if bar.paper_box is not None:
            draw.rectangle(bar.paper_box, fill=_PAPER)
    for t in layout.texts:  # em dash: not in every fallback font
        draw.text((t.x, t.y), t.text.replace("—", "-"), fill=t.color, font=fonts[t.style])
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, format="PNG")
    return out


# ------------------------------------------------------------------------------------------------
# command


def default_chart_path(results: Sequence[str | Path], output: str | Path | None = None) -> Path:
    """Where the chart goes without --chart: beside the -o table, else in the runs folder given."""
    if output:
        return Path(output).with_suffix(".png")
    folders = [Path(p) if Path(p).is_dir() else Path(p).parent for p in results]
    return Path(os.path.commonpath([str(f.resolve()) for f in folders])) / "report.png"


def main_report(
    results: Sequence[str | Path],
    *,
    reference: str | Path | None = None,
    fmt: str = "md",
    chart: str | Path | None = None,
    output: str | Path | None = None,
    gate: bool = False,
) -> int:
    """`promptseg bench report`: print (or write) the table and write the PNG chart (default
    `<runs>/report.png`); with `gate`, exit 1 unless every gated value is within tolerance and
    at least one was checked."""
    if reference is None:
        reference = DEFAULT_REFERENCE
    ref = load_reference(reference)
    if gate and not ref:
        raise ValueError(
            f"--gate: {reference} holds no reference values to gate against; pass --reference "
            "with a reference.yaml that has `rows:`"
        )
    loaded = load_results(results)
    if not loaded:
        raise FileNotFoundError(
            f"no result.json under {', '.join(map(str, results))}: run `promptseg eval …` "
            "(or `promptseg bench run SUITE`) first, or pass the folder its --out wrote to"
        )
    rows = build_rows(loaded, ref)
    text = format_table(rows, fmt)
    if output:
        Path(output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    chart_path = draw_chart(rows, chart or default_chart_path(results, output))
    print(f"chart: {chart_path}", file=sys.stderr)
    if not gate:
        return 0
    checks = gate_checks(rows, ref)
    for c in checks:
        if not c.passed:
            print(f"GATE FAILED: {c.text}", file=sys.stderr)
    if not checks:
        print(
            f"GATE FAILED: nothing to gate: no result matched a gated (status R) value of "
            f"{reference} in model, metric, resolution, threshold and folds / seeds (see the "
            "table's reported column)",
            file=sys.stderr,
        )
        return 1
    failed = sum(not c.passed for c in checks)
    if failed:
        return 1
    print(f"gate passed: {len(checks)} value(s) within tolerance of {reference}", file=sys.stderr)
    return 0
