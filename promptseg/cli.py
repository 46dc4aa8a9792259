"""The `promptseg` command: list, info, download, convert and segment."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .errors import PromptsegError

DEFAULT_MODEL = "clipseg_vitb16_rd64.refined"


def cmd_list(args: argparse.Namespace) -> int:
    from .zoo import list_models, model_info

    for name in list_models(args.filter, pretrained=args.pretrained, capability=args.capability):
        card = model_info(name)
        print(f"{name:40s} {','.join(sorted(card.capabilities)):45s} {card.description}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .weights import native_checkpoint_path
    from .zoo import model_info

    card = model_info(args.name)
    native = native_checkpoint_path(card, args.cache_dir)
    print(f"name:          {card.name}")
    print(f"description:   {card.description}")
    print(f"family:        {card.family}")
    print(f"capabilities:  {', '.join(sorted(card.capabilities))}")
    if card.paper:
        print(f"paper:         {card.paper}")
    print(f"licence:       {card.license or 'n/a'}")
    print(f"threshold:     {card.default_threshold}")
    print(f"data config:   {json.dumps(card.data_config)}")
    print(f"config:        {json.dumps(card.config)}")
    print(f"cached at:     {native} ({'present' if native.is_file() else 'not downloaded'})")
    for i, route in enumerate(card.weights, 1):
        requires = f", needs {', '.join(route.requires)}" if route.requires else ""
        print(f"weights option {i} (converter {route.converter}{requires}):")
        for source in route.files:
            print(f"  - {source.describe()}")
    if card.reported:
        print("reported in the paper:")
        for table, numbers in card.reported.items():
            print(f"  {table}: " + ", ".join(f"{k} {v}" for k, v in numbers.items()))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .weights import fetch_native, native_checkpoint_path
    from .zoo import model_info

    card = model_info(args.name)
    native = native_checkpoint_path(card, args.cache_dir)
    if native.is_file() and not args.force:
        print(f"{card.name}: already cached at {native}")
        return 0
    fetch_native(card, cache_dir=args.cache_dir)
    print(f"{card.name}: converted weights cached at {native}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .weights import (
        blame_file,
        checkpoint_hint,
        convert_checkpoint,
        load_native_state_dict,
        load_state_dict_file,
        native_checkpoint_path,
        save_state_dict_file,
    )
    from .zoo import build_model, model_info

    card = model_info(args.name)
    with blame_file(args.file, checkpoint_hint(card, args.cache_dir)):
        state = convert_checkpoint(card, load_state_dict_file(args.file), cache_dir=args.cache_dir)
    load_native_state_dict(build_model(card), state, str(args.file))  # verify before caching
    out = args.output or native_checkpoint_path(card, args.cache_dir)
    save_state_dict_file(state, out)
    print(f"{args.file} -> {out} ({len(state)} tensors)")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from .prompts import TextPrompt, VisualPrompt
    from .zoo import create_model

    prompts = [TextPrompt(t) for t in args.text or []]
    prompts += [VisualPrompt(img, mask) for img, mask in args.ref or []]
    if not prompts:
        raise SystemExit("segment: give at least one --text T or --ref IMAGE MASK")
    model = create_model(
        args.model,
        pretrained=True,
        checkpoint_path=args.checkpoint,
        cache_dir=args.cache_dir,
        device=args.device,
    )
    result = model.segment(args.image, prompts, threshold=args.threshold)
    paths = result.save(args.output)
    areas = result.masks.sum(dim=(1, 2))
    for label, score, area in zip(result.labels, result.scores, areas, strict=True):
        print(f"{label!r}: score {float(score):.3f}, {int(area)} pixels")
    print(f"wrote {len(paths)} files to {args.output}")
    return 0


def cmd_segment_video(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .imageio import save_label_png
    from .zoo import create_model

    folder, first = Path(args.frames), Path(args.first_mask).resolve()
    suffixes = {".jpg", ".jpeg", ".png", ".bmp"}
    frames = sorted(
        p
        for p in (folder.iterdir() if folder.is_dir() else ())
        if p.suffix.lower() in suffixes and p.resolve() != first
    )
    if not frames:
        raise FileNotFoundError(f"no frames (.jpg/.png) in {folder}; give a folder of video frames")
    model = create_model(
        args.model, checkpoint_path=args.checkpoint, cache_dir=args.cache_dir, device=args.device
    )
    out = Path(args.output)
    labels = model.segment_video(
        frames, args.first_mask, **({"memory": args.memory} if args.memory else {})
    )
    for frame, label_map in zip(frames, labels, strict=True):
        save_label_png(out / f"{frame.stem}.png", label_map)
    print(f"wrote {len(frames)} palette PNGs to {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train_sine

    config = TrainConfig.from_yaml(args.config)
    for key in ("steps", "out", "device"):
        if getattr(args, key) is not None:
            setattr(config, key, getattr(args, key))
    losses = train_sine(config)
    print(f"{len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}; weights in {config.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptseg",
        description="Prompt-conditioned image segmentation: CLIPSeg, SINE, DiffewS, ODISE.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    def cache(p: argparse.ArgumentParser) -> None:
        p.add_argument("--cache-dir", help="weights cache (default: $PROMPTSEG_CACHE or ~/.cache)")

    p = add("list", cmd_list, "List model names (arch.tag) with their capabilities.")
    p.add_argument("filter", nargs="?", default="", help="fnmatch pattern, e.g. 'clipseg*'")
    p.add_argument("--pretrained", action="store_true", help="only names with released weights")
    p.add_argument("--capability", help="only models with this capability, e.g. visual")

    p = add("info", cmd_info, "Show a model's card: config, weight sources, paper numbers.")
    p.add_argument("name")
    cache(p)

    p = add("download", cmd_download, "Download and convert a model's weights into the cache.")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="download again even if cached")
    cache(p)

    p = add(
        "convert",
        cmd_convert,
        "Convert a checkpoint file you have (official, transformers, ...) into the cache.",
    )
    p.add_argument("name", help="model name the file belongs to")
    p.add_argument("file", help="checkpoint file or save_pretrained directory")
    p.add_argument("-o", "--output", help="write here instead of the cache")
    cache(p)

    p = add("segment", cmd_segment, "Segment an image; writes mask PNGs, overlay.png, result.json.")
    p.add_argument("image")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL})")
    p.add_argument("--text", action="append", metavar="T", help="text prompt (repeatable)")
    p.add_argument(
        "--ref", nargs=2, action="append", metavar=("IMAGE", "MASK"), help="visual prompt"
    )
    p.add_argument("--threshold", type=float, help="probability threshold (default: the tag's)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--checkpoint", help="weights file to use instead of the cache/hub")
    p.add_argument("-o", "--output", default="out", help="output folder (default ./out)")
    cache(p)

    p = add(
        "segment-video",
        cmd_segment_video,
        "Video object segmentation: follow the objects of a first-frame mask through a video.",
    )
    p.add_argument("frames", help="folder of frames, processed in sorted file-name order")
    p.add_argument("--first-mask", required=True, help="label PNG of frame 0 (object k = value k)")
    p.add_argument("--model", default="sine_dinov2l.coco_ade_o365", help="a video-capable model")
    p.add_argument("--memory", type=int, help="memory frames per object (DAVIS-17 6, DAVIS-16 2)")
    p.add_argument("--device", help="cpu, cuda, ... (default cpu)")
    p.add_argument("--checkpoint", help="weights file to use instead of the cache/hub")
    p.add_argument("-o", "--output", default="out", help="output folder for palette PNGs")
    cache(p)

    p = add("train", cmd_train, "Fine-tune a model's trainable parts (SINE) on a COCO dataset.")
    p.add_argument("family", choices=["sine"], help="model family to train")
    p.add_argument("--config", required=True, help="YAML: model, annotations, images, steps, ...")
    p.add_argument("--steps", type=int, help="override the config's number of steps")
    p.add_argument("--out", help="override the config's output folder")
    p.add_argument("--device", help="cpu, cuda, ...")

    from .bench.cli import add_commands

    add_commands(sub)
    return parser


def _command_name(args: argparse.Namespace) -> str:
    sub = getattr(args, "benchmark", None) or getattr(args, "tool", None)
    return f"{args.command} {sub}" if sub else args.command


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; errors print one line, not a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (PromptsegError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"promptseg {_command_name(args)}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
