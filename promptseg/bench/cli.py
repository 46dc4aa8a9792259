"""`promptseg eval ...` and `promptseg bench ...` sub-commands (benchmarks.md §5.1)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_commands"]


def _load_model(args: argparse.Namespace) -> Any:
    """The model of `--model`, with `weights_sha256` set for the result JSON."""
    import torch

    from ..zoo import create_model, model_info
    from .runner import DTYPE_NAMES, weights_sha256

    dtypes = {name: dtype for dtype, name in DTYPE_NAMES.items()}
    if getattr(args, "no_tf32", False):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    pretrained = bool(model_info(args.model).weights) or args.checkpoint is not None
    model = create_model(
        args.model,
        pretrained=pretrained,
        checkpoint_path=args.checkpoint,
        device=args.device,
        dtype=dtypes[args.dtype],
    )
    model.weights_sha256 = weights_sha256(
        model.card, checkpoint_path=args.checkpoint, pretrained=pretrained
    )
    return model


def cmd_eval_fss(args: argparse.Namespace) -> int:
    from .fss import eval_fss

    model = _load_model(args)
    folds = _folds(args.dataset, args.fold)
    for fold in folds:
        result = eval_fss(
            model,
            dataset=args.dataset,
            fold=fold,
            shots=args.shots,
            data_root=args.data_root,
            splits_dir=args.splits_dir,
            seed=args.seed,
            episodes=args.episodes,
            resolution=args.resolution,
            threshold=args.threshold,
            batch_size=args.batch_size,
            workers=args.workers,
            out=args.out,
            resume=args.resume,
            save_preds=args.save_preds,
            trust_pickle=args.trust_pickle,
        )
        m = result["metrics"]
        print(
            f"fss {args.dataset} fold {result['fold']} {args.shots}-shot {model.card.name}: "
            f"mIoU {m['mIoU']:.2f}  FB-IoU {m['FB-IoU']:.2f}  ({result['n_episodes']} episodes, "
            f"digest {result['episode_digest'][:12]})"
        )
    return 0


def _folds(dataset: str, fold: str) -> list[int | str]:
    """The folds `--fold` names ('all': every fold; FSS-1000's only split is `test`)."""
    if fold != "all":
        return [fold if not fold.isdigit() else int(fold)]
    if dataset == "fss1000":
        return ["test"]
    return list(range({"pascal5i": 4, "coco20i": 4, "lvis92i": 10}[dataset]))


def _common(p: argparse.ArgumentParser) -> None:
    """Options every `eval` command takes."""
    p.add_argument("--model", required=True, help="model name (arch.tag)")
    p.add_argument("--data-root", required=True, help="folder holding the dataset (real layout)")
    p.add_argument("--checkpoint", help="weights file instead of the cache/hub")
    p.add_argument("--device", help="cpu, cuda, ... (default cpu)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--no-tf32", action="store_true", help="disable TF32 (parity runs)")
    p.add_argument("--out", default="runs", help="results root (default ./runs)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `eval` and `bench` with their own sub-commands on the main parser."""
    p_eval = sub.add_parser("eval", help="Evaluate a model on a benchmark (writes result.json).")
    eval_sub = p_eval.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")

    p = eval_sub.add_parser(
        "fss",
        help="Few-shot semantic segmentation (PASCAL-5i, COCO-20i, FSS-1000, LVIS-92i).",
        description="Few-shot semantic segmentation: hsnet episodes, mIoU and FB-IoU.",
    )
    p.add_argument(
        "--dataset", required=True, choices=["pascal5i", "coco20i", "fss1000", "lvis92i"]
    )
    p.add_argument("--fold", default="0", help="fold number or 'all' (FSS-1000: 0 / test)")
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--splits-dir", help="a folder laid out like hsnet's data/splits/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episodes", type=int, help="first N episodes only (smoke runs)")
    p.add_argument("--resolution", choices=["model", "original"], default="model")
    p.add_argument("--threshold", type=float, help="the model's threshold (default: the tag's)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="support sets of B episodes encoded per encode_prompt call; queries are decoded "
        "one at a time (default 1)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="threads reading the episodes' images ahead of the model (default 0: inline)",
    )
    p.add_argument("--save-preds", action="store_true", help="write one PNG per episode")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="unpickle split files of unknown sha256 (once: the hash is recorded)",
    )
    _common(p)
    p.set_defaults(func=cmd_eval_fss)

    _add_vos_refer_bench(sub, eval_sub)  # eval vos, eval refer, bench episodes/verify-splits/...
    _add_ovseg_fsis_report(sub, eval_sub)  # eval ovseg, eval fsis, bench report
    add_suite_runner(sub)  # bench run
    _add_perseg(eval_sub)  # eval perseg


# ------------------------------------------------------------------------------------------------
# eval perseg


def cmd_eval_perseg(args: argparse.Namespace) -> int:
    from .perseg import eval_perseg

    model = _load_model(args)
    result = eval_perseg(
        model,
        data_root=args.data_root,
        out=args.out,
        resume=args.resume,
        save_preds=args.save_preds,
    )
    m = result["metrics"]
    print(
        f"perseg {model.card.name}: mIoU {m['mIoU']:.2f}  mAcc {m['mAcc']:.2f}  "
        f"({result['n_objects']} objects, {result['n_images']} query images)"
    )
    return 0


def _add_perseg(eval_sub: argparse._SubParsersAction) -> None:
    p = eval_sub.add_parser(
        "perseg",
        help="One-shot personalised segmentation (PerSeg, Personalize-SAM mIoU / mAcc).",
        description="PerSeg: image 00 and its mask are the prompt; every other image of the "
        "object is scored at its original size; mIoU / mAcc = mean over objects.",
    )
    p.add_argument(
        "--save-preds", action="store_true", help="write <run>/preds/<object>/<nn>.png (0/255)"
    )
    _common(p)
    p.set_defaults(func=cmd_eval_perseg)


# ------------------------------------------------------------------------------------------------
# eval vos, eval refer, bench episodes | verify-splits | make-mini


def cmd_eval_vos(args: argparse.Namespace) -> int:
    from .vos import eval_vos

    model = _load_model(args)
    result = eval_vos(
        model,
        dataset=args.dataset,
        data_root=args.data_root,
        out=args.out,
        resume=args.resume,
        save_pngs=args.save_pngs,
    )
    m = result["metrics"]
    print(
        f"vos {args.dataset} {model.card.name}: J&F {m['J&F-Mean']:.2f}  J {m['J-Mean']:.2f}  "
        f"F {m['F-Mean']:.2f}  ({result['n_sequences']} sequences, {result['n_objects']} objects)"
    )
    return 0


def cmd_eval_refer(args: argparse.Namespace) -> int:
    from .refer import eval_refer

    model = _load_model(args)
    result = eval_refer(
        model,
        dataset=args.dataset,
        data_root=args.data_root,
        thresholds=args.thresholds,
        out=args.out,
        resume=args.resume,
    )
    m, o = result["metrics"], result["oracle"]
    fixed = "  ".join(
        f"t={t:g}: mIoU {m[f'mIoU@{t:g}']:.2f} IoU_FG {m[f'IoU_FG@{t:g}']:.2f}"
        for t in result["protocol"]["thresholds"]
    )
    print(
        f"refer {args.dataset} {model.card.name}: {fixed}  AP {m['AP']:.2f}  "
        f"(oracle: mIoU {o['mIoU']:.2f} at t={o['mIoU_t']:g}; {result['n_samples']} samples)"
    )
    return 0


def cmd_bench_episodes(args: argparse.Namespace) -> int:
    import sys

    from .tools import episodes_tsv

    digest, n = episodes_tsv(
        args.dataset,
        args.fold,
        args.shots,
        seed=args.seed,
        n=args.episodes,
        splits_dir=args.splits_dir,
        data_root=args.data_root,
        trust_pickle=args.trust_pickle,
        out=args.out,
    )
    print(digest)
    where = f" -> {args.out}" if args.out else ""
    print(
        f"{args.dataset} fold {args.fold} {args.shots}-shot seed {args.seed}: {n} episodes{where}",
        file=sys.stderr,
    )
    return 0


def cmd_bench_verify_splits(args: argparse.Namespace) -> int:
    import sys

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


def _bench_subparsers(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The `bench` parser's sub-commands (created here unless already registered)."""
    p_bench = sub.choices.get("bench")
    if p_bench is None:
        p_bench = sub.add_parser("bench", help="Benchmark tools (episodes, splits, mini data).")
    for action in p_bench._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return p_bench.add_subparsers(dest="tool", required=True, metavar="TOOL")


def _add_vos_refer_bench(
    sub: argparse._SubParsersAction, eval_sub: argparse._SubParsersAction
) -> None:
    p = eval_sub.add_parser(
        "vos",
        help="Semi-supervised video object segmentation (DAVIS-2017 / DAVIS-2016 val).",
        description="DAVIS J&F: indexed PNGs per frame, per-object J/F (DAVIS-16: SINE's "
        "merged-objects variant).",
    )
    p.add_argument("--dataset", required=True, choices=["davis17-val", "davis16-val"])
    p.add_argument("--save-pngs", action="store_true", help="keep <run>/pngs after scoring")
    _common(p)
    p.set_defaults(func=cmd_eval_vos)

    p = eval_sub.add_parser(
        "refer",
        help="Referring segmentation (PhraseCut test, CLIPSeg metrics).",
        description="PhraseCut test: mIoU (per phrase), IoU_FG (cumulative), AP; best "
        "thresholds reported as 'oracle'.",
    )
    p.add_argument("--dataset", required=True, choices=["phrasecut-test"])
    p.add_argument("--thresholds", default="paper", help="'paper' (t=0.3) or a list like 0.3,0.5")
    _common(p)
    p.set_defaults(func=cmd_eval_refer)

    bench = _bench_subparsers(sub)
    p = bench.add_parser("episodes", help="Write the reference episodes and print their digest.")
    p.add_argument(
        "--dataset", required=True, choices=["pascal5i", "coco20i", "fss1000", "lvis92i"]
    )
    p.add_argument("--fold", required=True, help="fold number (FSS-1000: test)")
    p.add_argument("--shots", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episodes", type=int, help="first N episodes only")
    p.add_argument("--splits-dir", help="a folder laid out like hsnet's data/splits/")
    p.add_argument("--data-root", help="dataset root (FSS-1000 / LVIS-92i)")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="unpickle split files of unknown sha256 (once: the hash is recorded)",
    )
    p.add_argument("--out", help="write the episodes TSV here (e.g. episodes.tsv)")
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
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_bench_make_mini)


# ------------------------------------------------------------------------------------------------
# eval ovseg, eval fsis, bench report


def cmd_eval_ovseg(args: argparse.Namespace) -> int:
    from .ovseg import eval_ovseg

    model = _load_model(args)
    result = eval_ovseg(
        model,
        dataset=args.dataset,
        data_root=args.data_root,
        tasks=args.tasks,
        vocabulary_file=args.vocabulary,
        images=args.images,
        out=args.out,
        resume=args.resume,
    )
    shown = "  ".join(
        f"{k} {result['metrics'][k]:.2f}" for k in ("PQ", "AP", "mIoU") if k in result["metrics"]
    )
    skipped = "; ".join(f"{k} skipped: {v}" for k, v in result["skipped_tasks"].items())
    print(f"ovseg {args.dataset} {model.card.name}: {shown}  ({result['n_images']} images)")
    if skipped:
        print(skipped)
    return 0


def cmd_eval_fsis(args: argparse.Namespace) -> int:
    from .fsis import eval_fsis

    model = _load_model(args)
    result = eval_fsis(
        model,
        dataset=args.dataset,
        shots=args.shots,
        seeds=args.seeds,
        data_root=args.data_root,
        images=args.images,
        out=args.out,
        resume=args.resume,
    )
    m = result["metrics"]
    print(
        f"fsis {args.dataset} {args.shots}-shot {model.card.name}: segm nAP {m['AP']:.2f}  "
        f"AP50 {m['AP50']:.2f}  (mean of {len(result['seeds'])} seeds)"
    )
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


def _add_ovseg_fsis_report(
    sub: argparse._SubParsersAction, eval_sub: argparse._SubParsersAction
) -> None:
    p = eval_sub.add_parser(
        "ovseg",
        help="Open-vocabulary panoptic / instance / semantic (ODISE: COCO, ADE, A-847, PC, PAS).",
        description="PQ (panopticapi), mask AP (COCOeval segm), mIoU (detectron2) with the "
        "dataset's class names as vocabulary.",
    )
    p.add_argument(
        "--dataset",
        required=True,
        choices=["coco-panoptic", "ade150", "ade847", "pc59", "pc459", "pas21"],
    )
    p.add_argument("--tasks", default="pq,ap,miou", help="comma list of pq, ap, miou")
    p.add_argument("--vocabulary", help="class names file, one class per line (synonyms: a,b)")
    p.add_argument("--images", type=int, help="first N images only (smoke runs)")
    _common(p)
    p.set_defaults(func=cmd_eval_ovseg)

    p = eval_sub.add_parser(
        "fsis",
        help="Few-shot instance segmentation (COCO-NOVEL, COCO2VOC), mean over seeds.",
        description="TFA shots, novel-class segm AP (COCOeval; box AP from mask boxes), seed mean.",
    )
    p.add_argument("--dataset", required=True, choices=["coco-novel", "coco2voc"])
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--seeds", default="0-9", help="'0-9' or a comma list")
    p.add_argument("--images", type=int, help="first N test images only (smoke runs)")
    _common(p)
    p.set_defaults(func=cmd_eval_fsis)

    bench = _bench_subparsers(sub)
    p = bench.add_parser("report", help="Comparison table of result.json files vs reference.")
    p.add_argument("results", nargs="+", help="result.json files (or folders searched for them)")
    p.add_argument("--reference", help="reference.yaml (default: benchmarks/reference.yaml)")
    p.add_argument("--format", choices=["md", "csv", "json"], default="md")
    p.add_argument("--chart", help="PNG bar chart path (default: report.png in the runs folder)")
    p.add_argument("--output", "-o", help="write the table here instead of stdout")
    p.add_argument("--gate", action="store_true", help="exit 1 if a reference.yaml gate fails")
    p.set_defaults(func=cmd_bench_report)


def cmd_bench_run(args: argparse.Namespace) -> int:
    from ..cli import main
    from .tools import suite_commands

    variables = dict(v.split("=", 1) for v in args.set or [])
    if args.data_root:
        variables["DATA_ROOT"] = args.data_root
    commands = suite_commands(args.suite, variables)
    failed = 0
    for i, argv in enumerate(commands, 1):
        extra = ["--out", args.out] if args.out else []
        print(f"[{i}/{len(commands)}] promptseg {' '.join(argv + extra)}", flush=True)
        if not args.dry_run and main(argv + extra) != 0:
            failed += 1
    print(f"{len(commands) - failed} of {len(commands)} runs succeeded")
    return 1 if failed else 0


def add_suite_runner(sub: argparse._SubParsersAction) -> None:
    """`promptseg bench run SUITE.yaml`: every eval invocation a paper table needs, in order."""
    p = _bench_subparsers(sub).add_parser(
        "run", help="Run every eval of a suite file (benchmarks/suites/*.yaml)."
    )
    p.add_argument("suite", help="suite YAML with a `runs:` list of promptseg eval commands")
    p.add_argument("--data-root", help="value of ${DATA_ROOT} in the suite")
    p.add_argument("--set", action="append", metavar="VAR=VALUE", help="other ${VAR} values")
    p.add_argument("--out", help="results root passed to every run (default: each run's own)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.set_defaults(func=cmd_bench_run)
