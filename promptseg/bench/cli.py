"""`promptseg eval ...` and `promptseg bench ...` sub-commands (see benchmarks/README.md).

Every `eval` command is one row of `EVALS`: its options, the eval function they feed and the
summary line it prints; `cmd_eval` and `_add_eval` serve them all.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

__all__ = ["EVALS", "add_commands"]


@dataclass(frozen=True)
class Option:
    """One `add_argument` of a command; `keyword`: the keyword argument of the command's function
    it becomes (None: the command reads it itself, e.g. --model)."""

    flag: str
    keyword: str | None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        """The attribute argparse stores the value in (--save-preds -> save_preds)."""
        return self.flag.removeprefix("--").replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Declare this option on `parser`."""
        parser.add_argument(self.flag, **self.settings)


def _arg(flag: str, keyword: str | None = None, **settings: Any) -> Option:
    """An option passed on to the command's function, by default as the keyword `dest` names."""
    option = Option(flag, keyword, settings)
    return option if keyword else replace(option, keyword=option.dest)


def _own(flag: str, **settings: Any) -> Option:
    """An option the command reads itself (model loading, fold expansion)."""
    return Option(flag, None, settings)


Summary = Callable[[argparse.Namespace, str, dict[str, Any]], str]
"""(args, model name, result dict) -> the line(s) an eval command prints per run."""


@dataclass(frozen=True)
class EvalCommand:
    """One `promptseg eval NAME`: help texts, options, eval function and summary line."""

    help: str
    description: str
    function: str  # "<module of promptseg.bench>:<function>", imported when the command runs
    options: tuple[Option, ...]
    summary: Summary
    runs: Callable[[argparse.Namespace], Iterable[dict[str, Any]]] = lambda args: [{}]
    """Keyword arguments of each eval call (fss: one call per fold of `--fold all`)."""


FSS_DATASET = _arg(
    "--dataset", required=True, choices=["pascal5i", "coco20i", "fss1000", "lvis92i"]
)
SPLITS_DIR = _arg(
    "--splits-dir",
    help="a folder laid out like hsnet's data/splits/ (default: the data root's splits/ folder "
    "if it has one, as `bench make-mini` writes, else downloaded into the cache)",
)
SEED = _arg("--seed", type=int, default=0)
TRUST_PICKLE = _arg(
    "--trust-pickle",
    action="store_true",
    help="unpickle split files of unknown sha256 (once: the hash is recorded)",
)
SHOTS = _arg("--shots", type=int, default=1)

COMMON = (
    _own("--model", required=True, help="model name (arch.tag)"),
    _arg("--data-root", required=True, help="folder holding the dataset (real layout)"),
    _own("--checkpoint", help="weights file instead of the cache/hub"),
    _own(
        "--random-weights",
        action="store_true",
        help="evaluate a model whose weights you do not have with random ones (meaningless "
        "numbers; for trying the pipeline)",
    ),
    _own("--device", help="cpu, cuda, ... (default cpu)"),
    _own("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32"),
    _own("--no-tf32", action="store_true", help="disable TF32 (parity runs)"),
    _own(
        "--config",
        action="append",
        metavar="KEY=VALUE",
        help="override the model's config: dotted key, YAML value (repeatable), e.g. head.layers=2",
    ),
    _arg("--out", default="runs", help="results root (default ./runs)"),
    _arg("--resume", action="store_true", help="continue an interrupted run"),
    _arg(
        "--overwrite",
        action="store_true",
        help="replace the result.json of a finished run (without it, an existing one is an error)",
    ),
)
"""Options every `eval` command takes, after its own."""


def _load_model(args: argparse.Namespace) -> Any:
    """The model of `--model` (with `--config` overrides); its card records the weights' sha256."""
    import torch

    from ..model_args import model_from_args
    from .runner import DTYPE_NAMES

    dtypes = {name: dtype for dtype, name in DTYPE_NAMES.items()}
    if args.no_tf32:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return model_from_args(args, dtype=dtypes[args.dtype])


def _folds(dataset: str, fold: str) -> list[int | str]:
    """The folds `--fold` names ('all': every fold; FSS-1000's only split is `test`)."""
    if fold != "all":
        return [fold if not fold.isdigit() else int(fold)]
    if dataset == "fss1000":
        return ["test"]
    return list(range({"pascal5i": 4, "coco20i": 4, "lvis92i": 10}[dataset]))


def _line(template: str) -> Summary:
    """A summary from a str.format template over args, name (model), r (result), m (metrics)."""
    return lambda args, name, r: template.format(args=args, name=name, r=r, m=r["metrics"])


def _refer_summary(args: argparse.Namespace, name: str, result: dict[str, Any]) -> str:
    """Each fixed threshold's mIoU / IoU_FG, AP and the oracle threshold."""
    m, o = result["metrics"], result["oracle"]
    fixed = "  ".join(
        f"t={t:g}: mIoU {m[f'mIoU@{t:g}']:.2f} IoU_FG {m[f'IoU_FG@{t:g}']:.2f}"
        for t in result["protocol"]["thresholds"]
    )
    return (
        f"refer {args.dataset} {name}: {fixed}  AP {m['AP']:.2f}  "
        f"(oracle: mIoU {o['mIoU']:.2f} at t={o['mIoU_t']:g}; {result['n_samples']} samples)"
    )


def _ovseg_summary(args: argparse.Namespace, name: str, result: dict[str, Any]) -> str:
    """PQ / AP / mIoU of the tasks run, and a second line naming the skipped tasks, if any."""
    m = result["metrics"]
    shown = "  ".join(f"{k} {m[k]:.2f}" for k in ("PQ", "AP", "mIoU") if k in m)
    skipped = "; ".join(f"{k} skipped: {v}" for k, v in result["skipped_tasks"].items())
    line = f"ovseg {args.dataset} {name}: {shown}  ({result['n_images']} images)"
    return f"{line}\n{skipped}" if skipped else line


def _fsis_summary(args: argparse.Namespace, name: str, result: dict[str, Any]) -> str:
    """Seed-mean novel-class segm AP and AP50."""
    m = result["metrics"]
    return (
        f"fsis {args.dataset} {args.shots}-shot {name}: segm nAP {m['AP']:.2f}  "
        f"AP50 {m['AP50']:.2f}  (mean of {len(result['seeds'])} seeds)"
    )


EVALS: dict[str, EvalCommand] = {
    "fss": EvalCommand(
        help="Few-shot semantic segmentation (PASCAL-5i, COCO-20i, FSS-1000, LVIS-92i).",
        description="Few-shot semantic segmentation: hsnet episodes, mIoU and FB-IoU.",
        function="fss:eval_fss",
        options=(
            FSS_DATASET,
            _own("--fold", default="0", help="fold number or 'all' (FSS-1000: 0 / test)"),
            SHOTS,
            SPLITS_DIR,
            SEED,
            _arg("--episodes", type=int, help="first N episodes only (smoke runs)"),
            _arg("--resolution", choices=["model", "original"], default="model"),
            _arg("--threshold", type=float, help="the model's threshold (default: the tag's)"),
            _arg(
                "--batch-size",
                type=int,
                default=1,
                help="support sets of B episodes encoded per encode_prompt call; queries are "
                "decoded one at a time (default 1)",
            ),
            _arg(
                "--workers",
                type=int,
                default=0,
                help="threads reading the episodes' images ahead of the model (default 0: inline)",
            ),
            _arg("--save-preds", action="store_true", help="write one PNG per episode"),
            TRUST_PICKLE,
        ),
        summary=_line(
            "fss {args.dataset} fold {r[fold]} {args.shots}-shot {name}: mIoU {m[mIoU]:.2f}  "
            "FB-IoU {m[FB-IoU]:.2f}  ({r[n_episodes]} episodes, digest {r[episode_digest]:.12})"
        ),
        runs=lambda args: [{"fold": fold} for fold in _folds(args.dataset, args.fold)],
    ),
    "vos": EvalCommand(
        help="Semi-supervised video object segmentation (DAVIS-2017 / DAVIS-2016 val).",
        description="DAVIS J&F: indexed PNGs per frame, per-object J/F (DAVIS-16: SINE's "
        "merged-objects variant).",
        function="vos:eval_vos",
        options=(
            _arg("--dataset", required=True, choices=["davis17-val", "davis16-val"]),
            _arg("--save-pngs", action="store_true", help="keep <run>/pngs after scoring"),
        ),
        summary=_line(
            "vos {args.dataset} {name}: J&F {m[J&F-Mean]:.2f}  J {m[J-Mean]:.2f}  "
            "F {m[F-Mean]:.2f}  ({r[n_sequences]} sequences, {r[n_objects]} objects)"
        ),
    ),
    "refer": EvalCommand(
        help="Referring segmentation (PhraseCut test, CLIPSeg metrics).",
        description="PhraseCut test: mIoU (per phrase), IoU_FG (cumulative), AP; best "
        "thresholds reported as 'oracle'.",
        function="refer:eval_refer",
        options=(
            _arg("--dataset", required=True, choices=["phrasecut-test"]),
            _arg("--thresholds", default="paper", help="'paper' (t=0.3) or a list like 0.3,0.5"),
        ),
        summary=_refer_summary,
    ),
    "ovseg": EvalCommand(
        help="Open-vocabulary panoptic / instance / semantic (ODISE: COCO, ADE, A-847, PC, PAS).",
        description="PQ (panopticapi), mask AP (COCOeval segm), mIoU (detectron2) with one "
        "vocabulary per dataset (its prompt-engineered one by default).",
        function="ovseg:eval_ovseg",
        options=(
            _arg(
                "--dataset",
                required=True,
                choices=["coco-panoptic", "ade150", "ade847", "pc59", "pc459", "pas21"],
            ),
            _arg("--tasks", default="pq,ap,miou", help="comma list of pq, ap, miou"),
            _arg(
                "--vocabulary",
                default="auto",
                help="prompt-engineered (the dataset's built-in vocabulary, ODISE's protocol), "
                "names (the dataset's class names), or a file of one class per line (synonyms: "
                "a,b); default auto: the model's own protocol (ODISE: prompt-engineered)",
            ),
            _arg("--images", type=int, help="first N images only (smoke runs)"),
        ),
        summary=_ovseg_summary,
    ),
    "fsis": EvalCommand(
        help="Few-shot instance segmentation (COCO-NOVEL, COCO2VOC), mean over seeds.",
        description="TFA shots, novel-class segm AP (COCOeval; box AP from mask boxes), seed mean.",
        function="fsis:eval_fsis",
        options=(
            _arg("--dataset", required=True, choices=["coco-novel", "coco2voc"]),
            SHOTS,
            _arg("--seeds", default="0-9", help="'0-9' or a comma list"),
            _arg("--images", type=int, help="first N test images only (smoke runs)"),
        ),
        summary=_fsis_summary,
    ),
    "perseg": EvalCommand(
        help="One-shot personalised segmentation (PerSeg, Personalize-SAM mIoU / mAcc).",
        description="PerSeg: image 00 and its mask are the prompt; every other image of the "
        "object is scored at its original size; mIoU / mAcc = mean over objects.",
        function="perseg:eval_perseg",
        options=(
            _arg(
                "--save-preds",
                action="store_true",
                help="write <run>/preds/<object>/<nn>.png (0/255)",
            ),
        ),
        summary=_line(
            "perseg {name}: mIoU {m[mIoU]:.2f}  mAcc {m[mAcc]:.2f}  "
            "({r[n_objects]} objects, {r[n_images]} query images)"
        ),
    ),
}
"""`promptseg eval NAME` -> its command, in the order `promptseg eval --help` lists them."""


Command = Callable[[argparse.Namespace], int]


def _warnings_as_lines(command: Command) -> Command:
    """Print promptseg's own warnings once each, as one `promptseg CMD: warning: TEXT` line
    (not in the warnings module's format, with a source line, once per place that warned); under
    torchrun only rank 0 prints them (every rank reads the same data and would say the same)."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        name = " ".join(x for x in (args.command, getattr(args, "benchmark", None)) if x)
        name = " ".join(x for x in (name, getattr(args, "tool", None)) if x)
        seen: set[str] = set()
        show = warnings.showwarning

        def show_line(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: IO[str] | None = None,
            line: str | None = None,
        ) -> None:
            if not _from_promptseg(category, filename):
                show(message, category, filename, lineno, file, line)
            elif str(message) not in seen and os.environ.get("RANK", "0") == "0":
                seen.add(str(message))
                print(f"promptseg {name}: warning: {message}", file=sys.stderr, flush=True)

        with warnings.catch_warnings():
            warnings.showwarning = show_line
            return command(args)

    return run


def _from_promptseg(category: type[Warning], filename: str) -> bool:
    """A warning of a promptseg class, or raised from promptseg's code."""
    package = Path(__file__).resolve().parents[1]
    return category.__module__.startswith("promptseg") or Path(filename).resolve().is_relative_to(
        package
    )


@_warnings_as_lines
def cmd_eval(args: argparse.Namespace) -> int:
    """Load the model, call the benchmark's eval function per run, print each summary line."""
    import importlib

    spec = EVALS[args.benchmark]
    module, _, name = spec.function.partition(":")
    evaluate = getattr(importlib.import_module(f".{module}", __package__), name)
    from .distributed import Shard, eval_device, finish_group, init_from_env

    args.device = eval_device(args.device)
    created = init_from_env(args.device)
    ok = False
    try:
        model = _load_model(args)
        options = _keywords(args, (*spec.options, *COMMON))
        main = Shard.current().main
        for run in spec.runs(args):
            result = evaluate(model, **options, **run)
            if main:  # the other ranks of a torchrun launch print nothing
                print(spec.summary(args, model.card.name, result))
        ok = True
    finally:
        if created:
            finish_group(wait=ok)
    return 0


def _keywords(args: argparse.Namespace, options: Iterable[Option]) -> dict[str, Any]:
    """The keyword arguments `options` become, with the values argparse put in `args`."""
    return {o.keyword: getattr(args, o.dest) for o in options if o.keyword}


def _add_eval(eval_sub: argparse._SubParsersAction, name: str, spec: EvalCommand) -> None:
    """`promptseg eval NAME`: its own options, then the common ones."""
    p = eval_sub.add_parser(name, help=spec.help, description=spec.description)
    for option in (*spec.options, *COMMON):
        option.add_to(p)
    p.set_defaults(func=cmd_eval)


# ------------------------------------------------------------------------------------------------
# bench episodes | verify-splits | make-mini | report | run


EPISODES_OPTIONS = (
    FSS_DATASET,
    _arg("--fold", required=True, help="fold number (FSS-1000: test)"),
    _arg("--shots", type=int, required=True),
    SEED,
    _arg("--episodes", "n", type=int, help="first N episodes only"),
    SPLITS_DIR,
    _arg("--data-root", help="dataset root (FSS-1000 / LVIS-92i)"),
    TRUST_PICKLE,
    _arg("--out", help="write the episodes TSV here (e.g. episodes.tsv)"),
)
"""`bench episodes`: the options, and the keyword arguments of `episodes_tsv` they become."""


@_warnings_as_lines
def cmd_bench_episodes(args: argparse.Namespace) -> int:
    from .tools import episodes_tsv

    digest, n = episodes_tsv(**_keywords(args, EPISODES_OPTIONS))
    print(digest)
    where = f" -> {args.out}" if args.out else ""
    print(
        f"{args.dataset} fold {args.fold} {args.shots}-shot seed {args.seed}: {n} episodes{where}",
        file=sys.stderr,
    )
    return 0


@_warnings_as_lines
def cmd_bench_verify_splits(args: argparse.Namespace) -> int:
    from .tools import format_verify_table, verify_splits

    rows = verify_splits(args.splits_dir, data_root=args.data_root)
    print(format_verify_table(rows))
    bad = [r for r in rows if r["status"] != "OK"]
    print(f"{len(rows) - len(bad)}/{len(rows)} split files OK", file=sys.stderr)
    return 1 if bad else 0


def cmd_bench_make_mini(args: argparse.Namespace) -> int:
    from .tools import make_mini

    written = make_mini(args.out, args.datasets, seed=args.seed)
    for name, path in written.items():
        print(f"{name}\t{path}")
    return 0


def cmd_bench_report(args: argparse.Namespace) -> int:
    from .report import main_report

    return main_report(
        args.results,
        reference=args.reference,
        fmt=args.format,
        chart=args.chart,
        output=args.output,
        gate=args.gate,
    )


def cmd_bench_run(args: argparse.Namespace) -> int:
    """Run each suite line as `python -m promptseg ...` in a fresh process, so that nothing a run
    sets process-wide (TF32 flags, caches, RNG state) reaches the next one."""
    from .tools import suite_commands

    variables = dict(v.split("=", 1) for v in args.set or [])
    if args.data_root:
        variables["DATA_ROOT"] = args.data_root
    commands = suite_commands(args.suite, variables)
    launcher = _launcher(args.launcher, args.nproc_per_node)
    failed = 0
    for i, argv in enumerate(commands, 1):
        extra = ["--out", args.out] if args.out else []
        shown = " ".join([*launcher[1:], "-m", "promptseg"]) if launcher else "promptseg"
        print(f"[{i}/{len(commands)}] {shown} {' '.join(argv + extra)}", flush=True)
        if not args.dry_run and _run_promptseg([*argv, *extra], launcher) != 0:
            failed += 1
    if args.dry_run:
        evals = f"{len(commands)} eval{'s' * (len(commands) != 1)}"
        print(f"would run {evals} (dry run: nothing was run)")
        return 0
    print(f"{len(commands) - failed} of {len(commands)} runs succeeded")
    return 1 if failed else 0


def _launcher(name: str, nproc: int | None) -> list[str]:
    """The argv before `-m promptseg` of each run: none (a plain `python -m promptseg`) or
    `python -m torch.distributed.run --nproc_per_node N` (one sharded eval on N processes)."""
    if nproc is not None and nproc < 1:
        raise ValueError(f"--nproc-per-node must be >= 1, got {nproc}")
    if name == "none":
        if nproc is not None:
            raise ValueError("--nproc-per-node needs --launcher torchrun")
        return []
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc or 1)]


def _run_promptseg(argv: list[str], launcher: Sequence[str] = ()) -> int:
    """Exit status of `python -m promptseg ARGV` (after `launcher`, e.g. torchrun's argv), its
    output copied to ours as it comes."""
    import os
    import subprocess
    import threading

    command = [*launcher, "-m", "promptseg", *argv] if launcher else None
    command = command or [sys.executable, "-m", "promptseg", *argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines as they are printed, not at exit
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as run:
        copies = [
            threading.Thread(target=_copy_output, args=(run.stdout, sys.stdout)),
            threading.Thread(target=_copy_output, args=(run.stderr, sys.stderr)),
        ]
        for thread in copies:
            thread.start()
        for thread in copies:
            thread.join()
        return run.wait()


def _copy_output(pipe: IO[bytes], stream: IO[str]) -> None:
    """Copy a child's output pipe to a text stream chunk by chunk (progress bars included)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in iter(lambda: pipe.read1(1 << 16), b""):
        stream.write(decoder.decode(chunk))
        stream.flush()


def _add_bench(sub: argparse._SubParsersAction) -> None:
    """`promptseg bench` and its tools: episodes, verify-splits, make-mini, report, run."""
    p_bench = sub.add_parser("bench", help="Benchmark tools (episodes, splits, mini data).")
    bench = p_bench.add_subparsers(dest="tool", required=True, metavar="TOOL")

    p = bench.add_parser("episodes", help="Write the reference episodes and print their digest.")
    for option in EPISODES_OPTIONS:
        option.add_to(p)
    p.set_defaults(func=cmd_bench_episodes)

    p = bench.add_parser("verify-splits", help="sha256 of your split files vs hsnet's.")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--splits-dir",
        help="folder laid out like hsnet's data/splits/ (default: the download cache)",
    )
    where.add_argument(
        "--data-root",
        help="dataset root in the Matcher/SINE layout (VOC2012/splits/val/fold0.txt, "
        "COCO2014/splits/val/fold0.pkl, FSS-1000/splits/test.txt)",
    )
    p.set_defaults(func=cmd_bench_verify_splits)

    p = bench.add_parser("make-mini", help="Write the miniature CI datasets.")
    p.add_argument("--out", required=True, help="data root to write")
    p.add_argument("--datasets", default="all", help="'all' or a comma-separated list")
    SEED.add_to(p)
    p.set_defaults(func=cmd_bench_make_mini)

    p = bench.add_parser("report", help="Comparison table of result.json files vs reference.")
    p.add_argument("results", nargs="+", help="result.json files (or folders searched for them)")
    p.add_argument(
        "--reference",
        help="published numbers to compare with (default: the reference.yaml shipped with "
        "promptseg, promptseg/bench/reference.yaml)",
    )
    p.add_argument("--format", choices=["md", "csv", "json"], default="md")
    p.add_argument("--chart", help="PNG bar chart path (default: report.png in the runs folder)")
    p.add_argument("--output", "-o", help="write the table here instead of stdout")
    p.add_argument(
        "--gate",
        action="store_true",
        help="exit 1 if a reproduced value misses its reference value's tolerance, or if no "
        "value could be checked",
    )
    p.set_defaults(func=cmd_bench_report)

    p = bench.add_parser("run", help="Run every eval of a suite file (benchmarks/suites/*.yaml).")
    p.add_argument("suite", help="suite YAML with a `runs:` list of promptseg eval commands")
    p.add_argument("--data-root", help="value of ${DATA_ROOT} in the suite")
    p.add_argument("--set", action="append", metavar="VAR=VALUE", help="other ${VAR} values")
    p.add_argument("--out", help="results root passed to every run (default: each run's own)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument(
        "--launcher",
        choices=["none", "torchrun"],
        default="none",
        help="torchrun: run each eval sharded over --nproc-per-node processes "
        "(python -m torch.distributed.run; one GPU each on CUDA)",
    )
    p.add_argument("--nproc-per-node", type=int, help="processes per eval with --launcher torchrun")
    p.set_defaults(func=cmd_bench_run)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `eval` and `bench` with their own sub-commands on the main parser."""
    p_eval = sub.add_parser("eval", help="Evaluate a model on a benchmark (writes result.json).")
    eval_sub = p_eval.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, spec in EVALS.items():
        _add_eval(eval_sub, name, spec)
    _add_bench(sub)
