"""The model a command names: --model, --checkpoint, --random-weights, --device, --config.

Shared by every command that builds a model (segment, encode-prompt, segment-video, compare,
and each eval), so they check their flags alike and say the same about random weights.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

RANDOM_WEIGHTS_SEED = 0  # --random-weights builds the same model at every run

__all__ = ["RANDOM_WEIGHTS_SEED", "check_model_args", "model_from_args"]


def check_model_args(args: argparse.Namespace) -> bool:
    """Check --model / --checkpoint / --random-weights before any weights are read; True when
    weights are to be loaded.

    Models without a checkpoint converter (the `test_*` models) hold no weights to load.
    """
    from .zoo import check_device, model_info

    card = model_info(args.model)
    check_device(args.device)
    takes_weights = card.converter is not None
    if args.random_weights:
        if args.checkpoint is not None:
            raise ValueError("give --checkpoint FILE or --random-weights, not both")
        if os.environ.get("RANK", "0") == "0":  # once per job under torchrun
            print(
                f"promptseg: {card.name} with RANDOM weights (seed {RANDOM_WEIGHTS_SEED}, the same "
                "at every run): the masks mean nothing (for trying the command and the pipeline "
                "only)",
                file=sys.stderr,
            )
        return False
    if takes_weights and not card.weights and args.checkpoint is None:
        raise ValueError(
            f"--model {card.name} has no released weights: pass --checkpoint FILE (or FOLDER) "
            "with weights of your own, or --random-weights to try it with random weights"
        )
    if args.checkpoint is not None:
        if not takes_weights:
            raise ValueError(f"--model {args.model} takes no weights; leave --checkpoint out")
        if not Path(args.checkpoint).exists():
            raise FileNotFoundError(
                f"--checkpoint {args.checkpoint!r} does not exist; give a weights file or a "
                "save_pretrained folder"
            )
    return takes_weights


def model_from_args(args: argparse.Namespace, **options: Any) -> Any:
    """The model of --model with --checkpoint, --random-weights, --cache-dir, --device and
    --config (checked first); `options` go to create_model (e.g. dtype)."""
    import torch

    from .overrides import parse_key_values
    from .zoo import create_model

    pretrained = check_model_args(args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)  # random weights: the same model at every run
        return create_model(
            args.model,
            pretrained=pretrained,
            checkpoint_path=args.checkpoint,
            cache_dir=getattr(args, "cache_dir", None),
            device=args.device,
            config=parse_key_values(args.config),
            **options,
        )
