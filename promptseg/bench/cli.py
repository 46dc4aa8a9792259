"""`promptseg eval ...` and `promptseg bench ...` sub-commands (benchmarks.md §5.1)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_commands"]


def _load_model(args: argparse.Namespace) -> Any:
    import torch

    from ..zoo import create_model, model_info

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if getattr(args, "no_tf32", False):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return create_model(
        args.model,
        pretrained=bool(model_info(args.model).weights) or args.checkpoint is not None,
        checkpoint_path=args.checkpoint,
        device=args.device,
        dtype=dtypes[args.dtype],
    )


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
    n = {"pascal5i": 4, "coco20i": 4, "fss1000": 1, "lvis92i": 10}[dataset]
    return list(range(n)) if fold == "all" else [fold if not fold.isdigit() else int(fold)]


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
    p.add_argument("--save-preds", action="store_true", help="write one PNG per episode")
    p.add_argument(
        "--trust-pickle", action="store_true", help="unpickle split files of unknown sha256"
    )
    _common(p)
    p.set_defaults(func=cmd_eval_fss)
