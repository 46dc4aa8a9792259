"""The `promptseg` command: list, info, download, convert and segment."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import PromptsegError
from .model_args import model_from_args
from .vocabularies import PRESETS

DEFAULT_MODEL = "clipseg_vitb16_rd64.refined"
DEFAULT_VIDEO_MODEL = "sine_dinov2l.coco_ade_o365"


def cmd_list(args: argparse.Namespace) -> int:
    from .zoo import list_models, model_info

    if args.backbones or args.heads:
        return _list_components(backbones=args.backbones, heads=args.heads)
    rows = [
        (name, ",".join(sorted(model_info(name).capabilities)), model_info(name).description)
        for name in list_models(args.filter, pretrained=args.pretrained, capability=args.capability)
    ]
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(2)]
    for name, capabilities, description in rows:
        print(f"{name:{widths[0]}s}  {capabilities:{widths[1]}s}  {description}")
    return 0


def _list_components(*, backbones: bool, heads: bool) -> int:
    """Registered backbones (the feature kinds they provide) and heads (the kind they need)."""
    from .contracts import FEATURE_KINDS
    from .registry import registered

    rows = []
    if backbones:
        for name, cls in registered("backbone").items():
            rows.append((f"backbone {name}", f"provides {', '.join(cls.provides)}", cls))
    if heads:
        for name, cls in registered("head").items():
            rows.append((f"head {name}", f"needs {cls.needs}", cls))
    width = max(len(r[0]) for r in rows)
    kind_width = max(len(r[1]) for r in rows)
    for label, contract, cls in rows:
        summary = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{label:{width}s}  {contract:{kind_width}s}  {summary}")
    print("\nfeature kinds:")
    for kind, text in FEATURE_KINDS.items():
        print(f"  {kind}: {text}")
    return 0


def _card_of(args: argparse.Namespace):
    """The model card of --model / NAME with the --config overrides merged in."""
    from .overrides import parse_key_values
    from .zoo import model_info

    name = getattr(args, "model", None) or args.name
    return model_info(name, config=parse_key_values(getattr(args, "config", None)))


def _need_file(path: str, what: str) -> None:
    """Raise FileNotFoundError naming the flag when `path` is not an existing file."""
    if not Path(path).is_file():
        problem = "is a folder, not a file" if Path(path).is_dir() else "does not exist"
        raise FileNotFoundError(f"{what} {path!r} {problem}; give the path of an existing file")


def _need_folder(path: str, what: str) -> None:
    """Raise FileNotFoundError naming the flag when `path` is not an existing folder."""
    if not Path(path).is_dir():
        problem = "is a file, not a folder" if Path(path).is_file() else "does not exist"
        raise FileNotFoundError(f"{what} {path!r} {problem}; give the path of an existing folder")


def _check_prompt_files(args: argparse.Namespace) -> None:
    """Every --ref / --shot image and mask must be an existing file."""
    for image, mask in args.ref or []:
        _need_file(image, "--ref IMAGE")
        _need_file(mask, "--ref MASK")
    for shot in args.shot or []:
        for path, what in zip(shot[:2], ("--shot IMAGE", "--shot MASK"), strict=False):
            _need_file(path, what)


def cmd_info(args: argparse.Namespace) -> int:
    from .weights import cache_root, native_checkpoint_path

    card = _card_of(args)
    native = native_checkpoint_path(card, args.cache_dir)
    print(f"name:          {card.name}")
    print(f"description:   {card.description}")
    print(f"family:        {card.family}")
    print(f"capabilities:  {', '.join(sorted(card.capabilities))}")
    if card.paper:
        print(f"paper:         {card.paper}")
    print(f"licence:       {card.license or 'n/a'}")
    print(f"threshold:     {_threshold_text(card)}")
    print(f"data config:   {json.dumps(card.data_config)}")
    print(f"config:        {json.dumps(card.config)}")
    if card.converter is None:
        print("weights:       none to load (a test model: it runs as it is)")
    elif not card.weights:
        print(
            "weights:       none released: use --checkpoint FILE with weights of your own, or "
            "--random-weights to try it (meaningless masks)"
        )
    else:
        print(f"cached at:     {native} ({'present' if native.is_file() else 'not downloaded'})")
    for i, route in enumerate(card.weights, 1):
        requires = f", needs {', '.join(route.requires)}" if route.requires else ""
        print(f"weights option {i} (converter {route.converter}{requires}):")
        for source in route.files:
            print(f"  - {source.describe()}")
            if source.kind == "manual":
                place = cache_root(args.cache_dir) / card.name / source.filename
                print(f"    save the file {source.filename} at {place}")
    if card.reported:
        print("reported in the paper:")
        for table, numbers in card.reported.items():
            print(f"  {table}: " + ", ".join(f"{k} {v}" for k, v in numbers.items()))
    elif card.pretrained:
        print("reported in the paper: none published for these weights")
    return 0


def _threshold_text(card: Any) -> str:
    """The threshold `segment` uses when none is given, and what it applies to."""
    from .registry import lookup

    family = lookup("model family", card.family)
    value = card.default_threshold
    if value is None:
        value = family.default_threshold
    if value is None:
        return "none (the model's own decision rule; --threshold is not used by default)"
    return f"{value} ({family.threshold_meaning})"


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
        checkpoint_architecture,
        checkpoint_hint,
        convert_checkpoint,
        load_native_state_dict,
        native_checkpoint_path,
        read_checkpoint,
        save_state_dict_file,
    )
    from .zoo import build_model, card_for_checkpoint

    card = _card_of(args)
    if card.converter is None:
        raise ValueError(f"{card.name} takes no weights; there is nothing to convert for it")
    if not Path(args.file).exists():
        raise FileNotFoundError(
            f"FILE {args.file!r} does not exist; give a checkpoint file or a folder "
            f"(save_pretrained, or the official files `promptseg info {card.name}` lists)"
        )
    if args.output is not None and Path(args.output).is_dir():
        raise ValueError(f"--output {args.output!r} is a folder; give the file to write")
    with blame_file(args.file, checkpoint_hint(card, args.cache_dir)):
        read, _ = read_checkpoint(card, args.file)
        state = convert_checkpoint(card, read, cache_dir=args.cache_dir)
    architecture = checkpoint_architecture(card, args.file)
    model = build_model(card_for_checkpoint(card, args.file))
    load_native_state_dict(model, state, str(args.file))  # verify before caching
    out = args.output or native_checkpoint_path(card, args.cache_dir)
    save_state_dict_file(state, out, architecture=architecture)
    print(f"{args.file} -> {out} ({len(state)} tensors)")
    return 0


def _prompts_from_args(args: argparse.Namespace) -> list:
    """--text, --ref (one-shot each) and --shot (all together one k-shot SupportSet) -> prompts."""
    from .prompts import SupportSet, TextPrompt, VisualPrompt

    prompts: list = [TextPrompt(t) for t in args.text or []]
    prompts += [VisualPrompt(img, mask) for img, mask in args.ref or []]
    if args.shot:
        prompts.append(SupportSet([s for shot in args.shot for s in _shot_prompts(shot)]))
    if args.vocab is not None or args.preset:
        prompts.append(_vocabulary_from_args(args))
    return prompts


def _vocabulary_from_args(args: argparse.Namespace) -> Any:
    """--vocab and --preset -> one Vocabulary (user classes first, as the ODISE demo orders)."""
    from .prompts import Vocabulary

    user = None
    if args.vocab is not None:
        try:
            user = Vocabulary(args.vocab)
        except ValueError as exc:
            raise ValueError(f"--vocab {args.vocab!r}: {exc}") from None
    presets = tuple(args.preset or ())
    if user is not None and not presets:
        return user
    if user is None and len(presets) == 1:
        return Vocabulary.preset(presets[0])
    return Vocabulary.with_presets(user, presets)


def _shot_prompts(shot: list[str]) -> list:
    """`IMAGE MASK [CLASS]` -> one VisualPrompt per object of MASK.

    A mask with one foreground value is one object; a label map (several values, e.g. a
    palette PNG) gives one object per value, with that value as its object id across shots.
    """
    from .imageio import load_label_map
    from .prompts import VisualPrompt

    if len(shot) not in (2, 3):
        raise ValueError(f"--shot takes IMAGE MASK [CLASS], got {len(shot)} values: {shot}")
    image, mask = shot[:2]
    try:
        class_id = int(shot[2]) if len(shot) == 3 else 0
    except ValueError:
        raise ValueError(f"--shot CLASS must be an integer class id, got {shot[2]!r}") from None
    labels = load_label_map(mask)
    values = [int(v) for v in labels.unique() if v != 0]
    if len(values) <= 1:
        return [VisualPrompt(image, mask, class_id=class_id)]
    return [VisualPrompt(image, labels == v, class_id=class_id, object_id=v) for v in values]


def cmd_segment(args: argparse.Namespace) -> int:

    _need_file(args.image, "IMAGE")
    _check_prompt_files(args)
    prompts = _prompts_from_args(args)
    if bool(prompts) == bool(args.prompt_file):
        raise ValueError(
            "segment: give prompts (--text T, --ref IMAGE MASK, --shot IMAGE MASK [CLASS], "
            "--vocab CLASSES, --preset NAME) or --prompt-file FILE from `promptseg "
            "encode-prompt`, not both and not neither"
        )
    if args.prompt_file:
        _need_file(args.prompt_file, "--prompt-file")
    if Path(args.output).is_file():
        raise ValueError(f"--output {args.output!r} is a file; give a folder to write into")
    model = model_from_args(args)
    if args.prompt_file:
        prompts = model.load_prompt_embedding(args.prompt_file)
    result = model.segment(args.image, prompts, level=args.level, threshold=args.threshold)
    paths = result.save(args.output)
    areas = result.masks.sum(dim=(1, 2))
    for label, level, score, area in zip(
        result.labels, result.level, result.scores, areas, strict=True
    ):
        print(f"{label!r} ({level}): score {float(score):.3f}, {int(area)} pixels")
    print(f"wrote {len(paths)} files to {args.output}")
    return 0


def cmd_encode_prompt(args: argparse.Namespace) -> int:

    _check_prompt_files(args)
    prompts = _prompts_from_args(args)
    if not prompts:
        raise ValueError(
            "encode-prompt: give --shot IMAGE MASK [CLASS] (repeatable), --ref, --vocab or --preset"
        )
    if Path(args.output).is_dir():
        raise ValueError(f"--output {args.output!r} is a folder; give the file to write")
    model = model_from_args(args)
    model.save_prompt_embedding(model.encode_prompt(model.prepare_prompts(prompts)), args.output)
    print(f"encoded {len(prompts)} prompt(s) into {args.output}")
    return 0


def cmd_segment_video(args: argparse.Namespace) -> int:
    import inspect

    from .imageio import save_label_png

    if args.first_mask is None and args.masks_dir is None:
        raise ValueError("give the first frame's labels with --first-mask PNG or --masks-dir DIR")
    if args.memory is not None and args.memory < 1:
        raise ValueError(f"--memory is a number of frames, at least 1; got {args.memory}")
    if not args.fps > 0:
        raise ValueError(f"--fps must be a positive frame rate, got {args.fps}")
    _need_folder(args.frames, "FRAMES")
    if args.first_mask is not None:
        _need_file(args.first_mask, "--first-mask")
    if Path(args.output).is_file():
        raise ValueError(f"--output {args.output!r} is a file; give a folder to write into")
    folder = Path(args.frames)
    annotations: dict[str, Path] = {}  # frame stem -> label PNG
    if args.masks_dir is not None:
        masks_dir = Path(args.masks_dir)
        if not masks_dir.is_dir():
            raise FileNotFoundError(f"--masks-dir {masks_dir} is not a folder of label PNGs")
        annotations = {p.stem: p for p in sorted(masks_dir.iterdir()) if p.suffix.lower() == ".png"}
    skip = {p.resolve() for p in annotations.values()}
    if args.first_mask is not None:
        skip.add(Path(args.first_mask).resolve())
    suffixes = {".jpg", ".jpeg", ".png", ".bmp"}
    frames = sorted(
        p
        for p in (folder.iterdir() if folder.is_dir() else ())
        if p.suffix.lower() in suffixes and p.resolve() not in skip
    )
    if not frames:
        raise FileNotFoundError(f"no frames (.jpg/.png) in {folder}; give a folder of video frames")
    stems = {p.stem for p in frames}
    unmatched = sorted(name for name in annotations if name not in stems)
    if unmatched:
        raise ValueError(
            f"--masks-dir {args.masks_dir}: {unmatched[0]}.png matches no frame in {folder}; "
            "name each label PNG after its frame (YouTube-VOS Annotations/<video>/ layout)"
        )
    first_mask = args.first_mask or annotations.get(frames[0].stem)
    if first_mask is None:
        raise ValueError(
            f"no mask for the first frame {frames[0].name}: give --first-mask or put "
            f"{frames[0].stem}.png in --masks-dir {args.masks_dir}"
        )
    later = {t: annotations[p.stem] for t, p in enumerate(frames) if t and p.stem in annotations}
    model = model_from_args(args)
    options = {"memory": args.memory} if args.memory else {}
    if later:
        if "masks" not in inspect.signature(model.segment_video).parameters:
            raise ValueError(
                f"{args.model} cannot add objects at later frames; --masks-dir may only hold "
                f"the first frame's mask ({frames[0].stem}.png) for this model"
            )
        options["masks"] = later
    out = Path(args.output)
    labels = model.segment_video(frames, first_mask, **options)
    (out / "overlay").mkdir(parents=True, exist_ok=True)
    overlays = []
    for frame, label_map in zip(frames, labels, strict=True):
        save_label_png(out / f"{frame.stem}.png", label_map)
        overlay = video_overlay(frame, label_map)
        overlay.save(out / "overlay" / f"{frame.stem}.png")
        if args.gif:
            overlays.append(overlay)
    print(f"wrote {len(frames)} palette PNGs to {out} and their overlays to {out / 'overlay'}")
    if overlays:
        gif = out / "overlay.gif"
        duration = round(1000 / args.fps)
        overlays[0].save(gif, save_all=True, append_images=overlays[1:], duration=duration, loop=0)
        print(f"wrote {gif} ({len(overlays)} frames at {args.fps} fps)")
    return 0


def video_overlay(frame: str | Path, label_map: Any) -> Any:
    """One frame with its objects drawn as `segment` draws masks ("object k", colour k)."""
    import torch

    from .imageio import load_image
    from .result import SegmentationResult

    ids = torch.as_tensor(label_map)
    top = int(ids.max()) if ids.numel() else 0
    objects = torch.arange(1, top + 1)  # every id up to the largest: stable colours per object
    masks = ids[None] == objects[:, None, None]
    present = masks.flatten(1).any(1)
    result = SegmentationResult(
        masks=masks[present],
        scores=torch.ones(int(present.sum())),
        labels=[f"object {k}" for k in objects[present].tolist()],
        prompt_index=objects[present] - 1,
        level=["identity"] * int(present.sum()),
        image=load_image(frame),
    )
    return result.overlay()


def cmd_compare(args: argparse.Namespace) -> int:
    """Run --models on IMAGE (or each image of a folder) with every prompt: grids and tables."""
    import time

    from .compare import compare

    if not Path(args.image).exists():
        raise FileNotFoundError(
            f"IMAGE {args.image!r} does not exist; give an image file or a folder of images"
        )
    _check_prompt_files(args)
    prompts = _prompts_from_args(args)
    if not prompts:
        raise ValueError(
            "compare: give at least one prompt (--text T, --ref IMAGE MASK, --shot IMAGE MASK "
            "[CLASS], --vocab CLASSES, --preset NAME); each is one row of the grid"
        )
    if args.gt is not None and not Path(args.gt).exists():
        raise FileNotFoundError(
            f"--gt {args.gt!r} does not exist; give a mask file (a folder of <image stem>.png "
            "masks when IMAGE is a folder)"
        )
    if Path(args.image).is_dir() and args.gt is not None and not Path(args.gt).is_dir():
        raise ValueError(
            f"IMAGE {args.image!r} is a folder: --gt must be a folder of <image stem>.png masks"
        )
    if Path(args.output).is_file():
        raise ValueError(f"--output {args.output!r} is a file; give a folder to write into")
    if args.cell_width < 96:
        raise ValueError(f"--cell-width must be at least 96 pixels, got {args.cell_width}")

    def build(name: str) -> Any:
        from .zoo import model_info

        random = args.random_weights and model_info(name).converter is not None  # test models
        one = {"model": name, "checkpoint": None, "config": None, "random_weights": random}
        return model_from_args(argparse.Namespace(**{**vars(args), **one}))

    def progress(message: str) -> None:
        print(f"compare: {message}", file=sys.stderr)

    result = compare(
        args.image,
        prompts,
        args.models,
        gt=args.gt,
        threshold=args.threshold,
        build=build,
        progress=progress,
    )
    start = time.perf_counter()
    paths = result.save(args.output, cell_width=args.cell_width)
    saved = time.perf_counter() - start
    timings = result.timings()
    builds = ", ".join(f"{k} {v:.2f} s" for k, v in timings["build_s"].items())
    print(
        f"{len(result.images)} image(s) x {len(result.models)} model(s) x "
        f"{len(result.prompts)} prompt(s) in {timings['total_s']:.2f} s "
        f"(build: {builds}; {timings['mean_image_s']:.3f} s per image)"
    )
    for row in result.ranking() or []:
        iou = "-" if row["mean_iou"] is None else f"{row['mean_iou']:.3f}"
        print(f"rank {row['rank'] or '-'}: {row['model']} mean IoU {iou}")
    print(f"wrote {len(paths)} files to {args.output} in {saved:.2f} s")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .overrides import parse_key_values
    from .registry import lookup

    _need_file(args.train_config, "--config")
    train = lookup("trainer", args.family)
    model_config = parse_key_values(args.model_config) or None
    if args.random_weights:
        print("promptseg: training from RANDOM weights (pretrained: false)", file=sys.stderr)
    summary = train(
        args.train_config,
        steps=args.steps,
        out=args.out,
        device=args.device,
        model_config=model_config,
        pretrained=False if args.random_weights else None,
    )
    if summary:  # empty on the ranks > 0 of a torchrun run
        print(summary)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Serve the side-by-side page (promptseg.demo) until interrupted."""
    from .demo import launch

    launch(
        args.models,
        port=args.port,
        host=args.host,
        random_weights=args.random_weights,
        device=args.device,
        cache_dir=args.cache_dir,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .registry import registered

    levels = sorted({lvl for cls in registered("model family").values() for lvl in cls.levels})
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

    def config_arg(p: argparse.ArgumentParser, dest: str = "config") -> None:
        p.add_argument(
            "--config",
            dest=dest,
            action="append",
            metavar="KEY=VALUE",
            help="override the model's configuration (repeatable; dotted keys, YAML values), "
            "e.g. --config head.layers=2 or --config backbone.name=timm_vit",
        )

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default cpu)")
        p.add_argument("--checkpoint", help="weights file to use instead of the cache/hub")
        p.add_argument(
            "--random-weights",
            action="store_true",
            help="build the model with random weights (meaningless masks; to try a command or "
            "a model whose weights you do not have)",
        )
        config_arg(p)
        cache(p)

    def prompt_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--text", action="append", metavar="T", help="text prompt (repeatable)")
        p.add_argument(
            "--ref",
            nargs=2,
            action="append",
            metavar=("IMAGE", "MASK"),
            help="a one-shot visual prompt (repeatable: each --ref is segmented on its own)",
        )
        p.add_argument(
            "--shot",
            nargs="+",
            action="append",
            metavar="IMAGE MASK [CLASS]",
            help="a reference of one k-shot prompt (repeatable: all --shot together form one "
            "prompt); CLASS is an integer class id (default 0); a label-map MASK gives one "
            "object per value",
        )
        p.add_argument(
            "--vocab",
            metavar="CLASSES",
            help="open vocabulary: classes separated by ';', synonyms by ',' (e.g. "
            "'black cat,cat;dog'), all of them things",
        )
        p.add_argument(
            "--preset",
            action="append",
            choices=PRESETS,
            help="a built-in vocabulary (repeatable; after --vocab: things first, then stuff)",
        )

    p = add("list", cmd_list, "List model names (arch.tag) with their capabilities.")
    p.add_argument(
        "filter",
        nargs="?",
        default="",
        help="fnmatch pattern, e.g. 'clipseg*'; without wildcards, a substring (e.g. sine)",
    )
    p.add_argument("--pretrained", action="store_true", help="only names with released weights")
    p.add_argument("--capability", help="only models with this capability, e.g. visual")
    p.add_argument(
        "--backbones", action="store_true", help="list registered backbones and their contracts"
    )
    p.add_argument(
        "--heads", action="store_true", help="list registered heads and the features they need"
    )

    p = add("info", cmd_info, "Show a model's card: config, weight sources, paper numbers.")
    p.add_argument("name")
    config_arg(p)
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
    p.add_argument(
        "file",
        help="checkpoint file, save_pretrained / pipeline directory, or a folder of a family's "
        "official files under their release names (ODISE: its .pth, sd-v1-3.ckpt, "
        "ViT-L-14-336px.pt)",
    )
    p.add_argument("-o", "--output", help="write here instead of the cache")
    config_arg(p)
    cache(p)

    p = add("segment", cmd_segment, "Segment an image; writes mask PNGs, overlay.png, result.json.")
    p.add_argument("image")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL})")
    prompt_args(p)
    p.add_argument("--prompt-file", help="an encoded prompt written by `promptseg encode-prompt`")
    p.add_argument(
        "--level",
        choices=levels,
        help="which outputs (default: the model's first level). SINE: identity (the same "
        "objects), instance (scored instances), semantic (one mask per class); open-vocabulary "
        "models: panoptic too; all: every level the model has, from one pass",
    )
    p.add_argument("--threshold", type=float, help="probability threshold (default: the tag's)")
    model_args(p)
    p.add_argument("-o", "--output", default="out", help="output folder (default ./out)")

    p = add(
        "encode-prompt",
        cmd_encode_prompt,
        "Encode a prompt once (SINE k-shot prototypes, a DiffewS support bank, an ODISE "
        "vocabulary's text embeddings) into a file that "
        "`segment --prompt-file` reuses for any number of images.",
    )
    p.add_argument("--model", default="sine_dinov2l.coco_ade_o365", help="model name")
    prompt_args(p)
    model_args(p)
    p.add_argument("-o", "--output", required=True, help="file to write (.safetensors)")

    p = add(
        "segment-video",
        cmd_segment_video,
        "Video object segmentation: follow the objects of a first-frame mask (and of later "
        "annotated frames, --masks-dir) through a video.",
    )
    p.add_argument("frames", help="folder of frames, processed in sorted file-name order")
    p.add_argument(
        "--first-mask",
        help="label PNG of frame 0 (object k = value k); optional with --masks-dir, and used "
        "instead of that folder's mask of frame 0",
    )
    p.add_argument(
        "--masks-dir",
        help="folder of label PNGs named after their frames (YouTube-VOS Annotations/<video>/): "
        "objects whose label first appears in a later frame's PNG are followed from that frame",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_VIDEO_MODEL,
        help=f"a video-capable model (default {DEFAULT_VIDEO_MODEL})",
    )
    p.add_argument("--memory", type=int, help="memory frames per object (DAVIS-17 6, DAVIS-16 2)")
    p.add_argument("--gif", action="store_true", help="also write overlay.gif of the overlays")
    p.add_argument("--fps", type=float, default=10.0, help="frame rate of --gif (default 10)")
    model_args(p)
    p.add_argument(
        "-o",
        "--output",
        default="out",
        help="output folder: one palette PNG per frame (frame 0's is the model's prediction, "
        "not a copy of the given mask) and overlay/<frame>.png",
    )

    p = add(
        "compare",
        cmd_compare,
        "Run several models on the same image (or each image of a folder) with every prompt: "
        "grid.png (a column per model, a row per prompt), compare.md and compare.json.",
    )
    p.add_argument("image", help="an image, or a folder of images (one grid each, one summary)")
    p.add_argument("--models", nargs="+", required=True, metavar="NAME", help="models to compare")
    prompt_args(p)
    p.add_argument(
        "--gt",
        metavar="MASK",
        help="ground-truth mask (for a folder: a folder of <image stem>.png masks): each cell "
        "shows the IoU of the union of its masks, and the table ranks the models by mean IoU",
    )
    p.add_argument("--threshold", type=float, help="probability threshold (default: each tag's)")
    p.add_argument(
        "--cell-width", type=int, default=384, help="width of a grid cell in pixels (default 384)"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="build every model with random weights (marked in the grid and tables; masks "
        "mean nothing)",
    )
    cache(p)
    p.add_argument("-o", "--output", default="out", help="output folder (default ./out)")

    p = add(
        "train",
        cmd_train,
        "Fine-tune a model's trainable parts (SINE, DiffewS, ODISE) on a COCO-format dataset.",
    )
    p.add_argument(
        "family",
        choices=sorted(registered("trainer")),
        help="model family to train (families with a trainer)",
    )
    p.add_argument(
        "--config",
        dest="train_config",
        required=True,
        help="YAML of the training keys (examples/train_sine.yaml documents each one; "
        "examples/train_sine_tiny.yaml runs in a minute on a CPU)",
    )
    p.add_argument(
        "--model-config",
        action="append",
        metavar="KEY=VALUE",
        help="override the model's configuration (repeatable), e.g. "
        "--model-config backbone.name=open_clip_vit",
    )
    p.add_argument("--steps", type=int, help="override the config's number of steps")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="start from random weights whatever the config's `pretrained` says",
    )
    p.add_argument("--out", help="override the config's output folder")
    p.add_argument("--device", help="cpu, cuda, ...")

    p = add(
        "demo",
        cmd_demo,
        'Serve a local page (Gradio; pip install "promptseg[demo]") that runs models side '
        "by side on an uploaded image: overlays, scores, times, mask and JSON downloads.",
    )
    p.add_argument(
        "--models",
        nargs="+",
        metavar="NAME",
        help="models to offer (default: released models whose weights are cached, then "
        "test_colorkey, clipseg_test_tiny, sine_test_tiny)",
    )
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="run every model with random weights (marked so on the page; masks mean nothing)",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default cpu)")
    cache(p)

    from .bench.cli import add_commands

    add_commands(sub)
    return parser


def _command_name(args: argparse.Namespace) -> str:
    sub = getattr(args, "benchmark", None) or getattr(args, "tool", None)
    return f"{args.command} {sub}" if sub else args.command


# Python words in library messages -> what a command-line user types (most specific first)
CLI_WORDS = (
    (
        "`checkpoint_path=<file>` (Python) / `--checkpoint <file>` (command line)",
        "--checkpoint FILE",
    ),
    ("SINEPrompt.save or model.save_prompt_embedding", "`promptseg encode-prompt`"),
    ("model.save_prompt_embedding", "`promptseg encode-prompt`"),
    ("promptseg.list_models()", "`promptseg list`"),
    ("`checkpoint_path=`", "--checkpoint FILE"),
    ("checkpoint_path=", "--checkpoint FILE"),
    ("build it with pretrained=False", "use --random-weights"),
    ("pretrained=False", "--random-weights"),
)


def in_cli_words(message: str) -> str:
    """A library message with its Python spellings replaced by the command line's."""
    for python, cli in CLI_WORDS:
        message = message.replace(python, cli)
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; errors print one line, not a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (PromptsegError, ValueError, TypeError, OSError) as exc:
        message = in_cli_words(str(exc))
        print(f"promptseg {_command_name(args)}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
