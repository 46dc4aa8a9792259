"""ODISE checkpoints -> promptseg's native layout.

An ODISE release `.pth` holds only the trained modules; the frozen Stable Diffusion v1.3 and CLIP
ViT-L/14-336 come from their own files (components `odise_sd13`, `openai_clip_vit_l14_336`).
Native layout (one flat state dict):
- `backbone.captioner.*`            official `backbone.feature_extractor.*` (implicit captioner)
- `backbone.feature_projections.{i}.*`  official `backbone.feature_projections.{i}.0.*`
- `head.pixel_decoder.*`, `head.predictor.*`  official `sem_seg_head.*`, 1:1
- `text_head.*`                     official `category_head.*` (label) / `word_head.*` (caption)
- `backbone.unet.*`, `backbone.vae.*`  diffusers UNet2DConditionModel / AutoencoderKL, converted
  from `sd-v1-3.ckpt` by diffusers' own LDM conversion functions
- `clip.*`                          open_clip `CLIP` = OpenAI CLIP keys
- `empty_prompt_embedding` [1, 77, 768]  SD's text encoder on "" (computed once here)
`criterion.empty_weight` (a training buffer) is dropped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointFormatError, WeightsNotFoundError
from ..registry import register_converter
from .common import expect_no_leftovers, rename_keys, strip_prefix

__all__ = [
    "CLIP_COMPONENT",
    "OFFICIAL_FILES",
    "SD_COMPONENT",
    "SD_V1_INFERENCE_CONFIG",
    "clip_to_native",
    "convert_odise",
    "detect_layout",
    "diffusers_configs",
    "empty_prompt_embedding",
    "folder_to_native",
    "load_checkpoint",
    "official_files",
    "read_folder",
    "odise_to_native",
    "official_keys",
    "sd_to_native",
]

StateDict = dict[str, torch.Tensor]
Require = Callable[[str], StateDict]

SD_COMPONENT = "odise_sd13"
CLIP_COMPONENT = "openai_clip_vit_l14_336"
CLIP_MODEL_CONFIG = "ViT-L-14-336-quickgelu"  # open_clip name: OpenAI weights need QuickGELU

#: The values of CompVis `configs/stable-diffusion/v1-inference.yaml` that diffusers' LDM
#: conversion reads (SD v1.3 is run with it).
SD_V1_INFERENCE_CONFIG: dict[str, Any] = {
    "model": {
        "params": {
            "linear_start": 0.00085,
            "linear_end": 0.012,
            "timesteps": 1000,
            "scale_factor": 0.18215,
            "unet_config": {
                "params": {
                    "image_size": 32,
                    "in_channels": 4,
                    "out_channels": 4,
                    "model_channels": 320,
                    "attention_resolutions": [4, 2, 1],
                    "num_res_blocks": 2,
                    "channel_mult": [1, 2, 4, 4],
                    "num_heads": 8,
                    "use_spatial_transformer": True,
                    "transformer_depth": 1,
                    "context_dim": 768,
                    "legacy": False,
                }
            },
            "first_stage_config": {
                "params": {
                    "embed_dim": 4,
                    "ddconfig": {
                        "double_z": True,
                        "z_channels": 4,
                        "resolution": 256,
                        "in_channels": 3,
                        "out_ch": 3,
                        "ch": 128,
                        "ch_mult": [1, 2, 4, 4],
                        "num_res_blocks": 2,
                        "attn_resolutions": [],
                        "dropout": 0.0,
                    },
                }
            },
        }
    }
}

#: The files a folder for `folder_to_native` holds, under their official names.
OFFICIAL_FILES = {
    "label": (
        "odise_label_coco_50e-b67d2efc.pth",
        "https://github.com/NVlabs/ODISE/releases/download/v1.0.0/odise_label_coco_50e-b67d2efc.pth",
    ),
    "caption": (
        "odise_caption_coco_50e-853cc971.pth",
        "https://github.com/NVlabs/ODISE/releases/download/v1.0.0/"
        "odise_caption_coco_50e-853cc971.pth",
    ),
    "sd": (
        "sd-v1-3.ckpt",
        "https://huggingface.co/CompVis/stable-diffusion-v-1-3-original/resolve/main/sd-v1-3.ckpt",
    ),
    "clip": (
        "ViT-L-14-336px.pt",
        "https://openaipublic.azureedge.net/clip/models/"
        "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
    ),
}

# Stable Diffusion checkpoint entries ODISE does not use: LDM's DDPM schedule buffers, the EMA
# bookkeeping and the learned-variance table of a training checkpoint.
_SD_UNUSED_NAMES = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
    }
)
_SD_UNET, _SD_VAE, _SD_TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
_SD_UNUSED_PREFIXES = ("model_ema.", "first_stage_model.loss.")

_CLIP_SCALARS = ("input_resolution", "context_length", "vocab_size")  # ints in the JIT file

# "" through openai/clip-vit-large-patch14's tokenizer as ldm's FrozenCLIPEmbedder calls it
# (padding="max_length", 77, truncation): BOS, EOS, then padding with its pad token, which is
# <|endoftext|> = EOS. Writing the ids needs no tokenizer files; open_clip's tokenizer pads with 0,
# which changes positions 2..76 of the output.
BOS, EOS, TEXT_TOKENS = 49406, 49407, 77
EMPTY_PROMPT_IDS = (BOS, EOS) + (EOS,) * (TEXT_TOKENS - 2)

# -- the official ODISE key list ------------------------------------------------------------------

_CAPTIONER = (
    "alpha_cond",
    "alpha_cond_time_embed",
    "clip_project.positional_embedding",
    "clip_project.linear.weight",
    "clip_project.linear.bias",
    "time_embed_project.positional_embedding",
    "time_embed_project.linear.weight",
    "time_embed_project.linear.bias",
)
NUM_PROJECTIONS, SHORTCUT_PROJECTIONS = 8, (2, 3, 4, 5)  # taps 2..5 are not 512 channels wide
ENCODER_LAYERS, DECODER_LAYERS, INPUT_LEVELS = 6, 9, 3
_WB = ("weight", "bias")
_MHA = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
_FFN = tuple(f"{m}.{p}" for m in ("linear1", "linear2", "norm") for p in _WB)


def _with(prefix: str, names: Iterable[str]) -> list[str]:
    """`prefix + name` for each name."""
    return [prefix + n for n in names]


def _projection_keys(i: int) -> list[str]:
    convs = ("conv1", "conv2", "conv3") + (("shortcut",) if i in SHORTCUT_PROJECTIONS else ())
    return [f"{c}.{p}" for c in convs for p in ("weight", "norm.weight", "norm.bias")]


def _pixel_decoder_keys() -> list[str]:
    keys = [f"input_proj.{i}.{j}.{p}" for i in range(INPUT_LEVELS) for j in (0, 1) for p in _WB]
    keys.append("transformer.level_embed")
    layer = [
        f"self_attn.{m}.{p}"
        for m in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
        for p in _WB
    ]
    layer += [f"{m}.{p}" for m in ("norm1", "linear1", "linear2", "norm2") for p in _WB]
    for i in range(ENCODER_LAYERS):
        keys += _with(f"transformer.encoder.layers.{i}.", layer)
    keys += ["mask_features.weight", "mask_features.bias"]
    keys += ["adapter_1.weight", "adapter_1.norm.weight", "adapter_1.norm.bias"]
    keys += ["layer_1.weight", "layer_1.norm.weight", "layer_1.norm.bias"]
    return keys


def _predictor_keys(caption: bool) -> list[str]:
    keys = []
    for i in range(DECODER_LAYERS):
        keys += _with(f"transformer_self_attention_layers.{i}.self_attn.", _MHA)
        keys += _with(f"transformer_self_attention_layers.{i}.norm.", _WB)
        keys += _with(f"transformer_cross_attention_layers.{i}.multihead_attn.", _MHA)
        keys += _with(f"transformer_cross_attention_layers.{i}.norm.", _WB)
        keys += _with(f"transformer_ffn_layers.{i}.", _FFN)
    keys += ["decoder_norm.weight", "decoder_norm.bias"]
    keys += ["query_feat.weight", "query_embed.weight", "level_embed.weight"]
    keys += [f"mask_embed.layers.{i}.{p}" for i in range(3) for p in _WB]
    keys.append("post_mask_embed.logit_scale")
    keys += [f"post_mask_embed.pool_proj.{i}.{p}" for i in (0, 1) for p in _WB]
    keys += _with("post_mask_embed.mask_embed.0.", _WB)
    keys += [f"post_mask_embed.mask_embed.1.layers.{i}.{p}" for i in range(3) for p in _WB]
    if caption:
        keys += ["class_embed.weight", "class_embed.bias"]
    return keys


def official_keys(classifier: str) -> list[str]:
    """Every key of the released ODISE `.pth` ("label": 399, "caption": 400)."""
    if classifier not in ("label", "caption"):
        raise ValueError(f"classifier must be 'label' or 'caption', got {classifier!r}")
    keys = _with("backbone.feature_extractor.", _CAPTIONER)
    for i in range(NUM_PROJECTIONS):
        keys += _with(f"backbone.feature_projections.{i}.0.", _projection_keys(i))
    keys += _with("sem_seg_head.pixel_decoder.", _pixel_decoder_keys())
    keys += _with("sem_seg_head.predictor.", _predictor_keys(classifier == "caption"))
    keys.append("criterion.empty_weight")
    if classifier == "label":
        keys += ["category_head.text_proj.weight", "category_head.text_proj.bias"]
        keys.append("category_head.null_embed")
    else:
        keys += ["word_head.text_proj.weight", "word_head.text_proj.bias"]
    return keys


_OFFICIAL_RULES = [
    (r"backbone\.feature_extractor\.(.+)", r"backbone.captioner.\1"),
    (r"backbone\.feature_projections\.(\d+)\.0\.(.+)", r"backbone.feature_projections.\1.\2"),
    (r"sem_seg_head\.((?:pixel_decoder|predictor)\..+)", r"head.\1"),
    (r"(?:category_head|word_head)\.(.+)", r"text_head.\1"),
    (r"criterion\..+", ""),  # the loss's class-weight buffer, training only
]


def _fp32(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Floating tensors as float32 (no copy when already float32)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def _listed(keys: Iterable[str], limit: int = 10) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _unwrap(state_dict: Mapping[str, Any], wrapper: str) -> Mapping[str, Any]:
    """`ckpt[wrapper]` if the checkpoint is wrapped (detectron2 "model", Lightning "state_dict")."""
    inner = state_dict.get(wrapper)
    return inner if isinstance(inner, Mapping) else state_dict


def odise_to_native(state_dict: Mapping[str, Any]) -> tuple[StateDict, str]:
    """The ODISE release `.pth` content (`ckpt["model"]` or the dict itself) -> (native dict of
    the trained modules, "label" | "caption"); unknown or missing keys are an error."""
    state = dict(_unwrap(state_dict, "model"))
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    label = any(k.startswith("category_head.") for k in state)
    caption = any(k.startswith("word_head.") for k in state)
    if label == caption:
        found = "both category_head.* and word_head.*" if label else "neither"
        raise CheckpointFormatError(
            f"cannot tell the ODISE variant: the checkpoint has {found} (label model: "
            "category_head.*, caption model: word_head.*); is it an ODISE release .pth?"
        )
    classifier = "label" if label else "caption"
    expected = set(official_keys(classifier))
    unknown = set(state) - expected
    missing = expected - set(state) - {"criterion.empty_weight"}
    if unknown or missing:
        parts = [f"{len(unknown)} unexpected: {_listed(unknown)}"] if unknown else []
        parts += [f"{len(missing)} missing: {_listed(missing)}"] if missing else []
        raise CheckpointFormatError(
            f"ODISE {classifier} checkpoint does not have the released keys ({'; '.join(parts)}). "
            f"Use odise_{classifier}_coco_50e-*.pth from {OFFICIAL_FILES[classifier][1]}"
        )
    native, unmatched = rename_keys(state, _OFFICIAL_RULES)
    expect_no_leftovers(unmatched, f"ODISE {classifier} checkpoint")
    return _fp32(native), classifier


# -- Stable Diffusion v1.3 ----------------------------------------------------------------------


def _check_sd_keys(ckpt: Mapping[str, torch.Tensor]) -> None:
    """The checkpoint has an LDM UNet and VAE, and nothing this converter does not know."""
    absent = [p for p in (_SD_UNET, _SD_VAE) if not any(k.startswith(p) for k in ckpt)]
    if absent:
        raise CheckpointFormatError(
            f"not a Stable Diffusion (LDM) checkpoint: no {' / '.join(p + '*' for p in absent)} "
            f"keys. ODISE needs sd-v1-3.ckpt from {OFFICIAL_FILES['sd'][1]}"
        )
    known = (_SD_UNET, _SD_VAE, _SD_TEXT, *_SD_UNUSED_PREFIXES)
    unknown = [k for k in ckpt if not k.startswith(known) and k not in _SD_UNUSED_NAMES]
    expect_no_leftovers(unknown, "Stable Diffusion checkpoint")


def _not_converted(
    convert: Callable[[StateDict], StateDict], source: Mapping[str, torch.Tensor], prefix: str
) -> list[str]:
    """Keys under `prefix` whose tensor `convert` leaves unused (diffusers skips unknown keys):
    run on distinct meta tensors, an output that is neither one of them nor a view of one."""
    markers = {k: torch.empty(v.shape, device="meta") for k, v in source.items()}
    out = [v for v in convert(markers).values() if v is not None]
    used = {id(v) for v in out} | {id(v._base) for v in out if v._base is not None}
    return [
        k
        for k, marker in markers.items()
        if k.startswith(prefix) and not k.startswith(_SD_UNUSED_PREFIXES) and id(marker) not in used
    ]


def _check_against_model(
    converted: StateDict, model: torch.nn.Module, what: str, dropped: list[str]
) -> None:
    """`converted` loads strictly into `model` (built on the meta device): same keys, shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    if dropped:
        problems.append(f"{len(dropped)} checkpoint key(s) not converted: {_listed(dropped)}")
    unfilled = [k for k, v in converted.items() if v is None]
    if unfilled:
        problems.append(f"{len(unfilled)} key(s) without a source tensor: {_listed(unfilled)}")
    given = {k for k, v in converted.items() if v is not None}
    if missing := set(expected) - given:
        problems.append(f"{len(missing)} missing: {_listed(missing)}")
    if unexpected := given - set(expected):
        problems.append(f"{len(unexpected)} unexpected: {_listed(unexpected)}")
    wrong = [
        f"{k} {tuple(converted[k].shape)} (expected {expected[k]})"
        for k in sorted(given & set(expected))
        if tuple(converted[k].shape) != expected[k]
    ]
    if wrong:
        problems.append(f"{len(wrong)} wrongly shaped: {', '.join(wrong[:5])}")
    if problems:
        raise CheckpointFormatError(
            f"the {what} converted from the Stable Diffusion checkpoint does not match the "
            f"diffusers model of its config ({'; '.join(problems)}). Is the original config the "
            "one the checkpoint was trained with (SD v1: v1-inference.yaml)?"
        )


def diffusers_configs(
    original_config: Mapping[str, Any] | None = None,
    checkpoint: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(UNet2DConditionModel config, AutoencoderKL config) of an LDM config (default: SD's
    v1-inference), by diffusers' own reading; `checkpoint` lets diffusers tell SD versions apart
    (default sample sizes)."""
    from diffusers.loaders import single_file_utils as ldm

    config = dict(original_config or SD_V1_INFERENCE_CONFIG)
    checkpoint = checkpoint or {}
    unet_config = ldm.create_unet_diffusers_config_from_ldm(config, checkpoint)
    # LDM's timestep embedding is [cos, sin] with no shift
    unet_config.update(flip_sin_to_cos=True, freq_shift=0)
    vae_config = ldm.create_vae_diffusers_config_from_ldm(config, checkpoint)
    return unet_config, vae_config


def sd_to_native(
    ldm_state_dict: Mapping[str, Any], original_config: Mapping[str, Any] | None = None
) -> tuple[StateDict, dict[str, Any], dict[str, Any]]:
    """`sd-v1-3.ckpt` content (`ckpt["state_dict"]` or the dict) -> (`backbone.unet.*` +
    `backbone.vae.*`, diffusers UNet config, diffusers VAE config), by diffusers' own LDM
    conversion; both are checked to load strictly into the diffusers models of those configs.

    `original_config` is the LDM config the checkpoint belongs to (default: SD's v1-inference).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as ldm

    ckpt = dict(_unwrap(ldm_state_dict, "state_dict"))
    _check_sd_keys(ckpt)
    unet_config, vae_config = diffusers_configs(original_config, ckpt)
    unet = ldm.convert_ldm_unet_checkpoint(ckpt, unet_config, extract_ema=False)
    vae = ldm.convert_ldm_vae_checkpoint(ckpt, vae_config)
    # built only to list keys and shapes; no parameter's shape depends on GroupNorm's group
    # count, and 1 group fits any width (LDM hard-codes 32; tiny test models patch that)
    with torch.device("meta"):
        unet_model = UNet2DConditionModel.from_config({**unet_config, "norm_num_groups": 1})
        vae_model = AutoencoderKL.from_config({**vae_config, "norm_num_groups": 1})
    unet_dropped = _not_converted(
        lambda c: ldm.convert_ldm_unet_checkpoint(c, unet_config, extract_ema=False), ckpt, _SD_UNET
    )
    vae_dropped = _not_converted(
        lambda c: ldm.convert_ldm_vae_checkpoint(c, vae_config), ckpt, _SD_VAE
    )
    _check_against_model(unet, unet_model, "UNet", unet_dropped)
    _check_against_model(vae, vae_model, "VAE", vae_dropped)
    native = {f"backbone.unet.{k}": v for k, v in unet.items()}
    native.update({f"backbone.vae.{k}": v for k, v in vae.items()})
    return _fp32(native), unet_config, vae_config


def _text_config(weights: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """CLIPTextConfig values read off the text encoder's tensor shapes."""
    try:
        vocab, width = weights["embeddings.token_embedding.weight"].shape
        positions = weights["embeddings.position_embedding.weight"].shape[0]
        intermediate = weights["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointFormatError(
            f"the Stable Diffusion text encoder (cond_stage_model.transformer.*) has no {exc}; "
            "it is not a Hugging Face CLIPTextModel state dict"
        ) from exc
    layers = len({k.split(".")[2] for k in weights if k.startswith("encoder.layers.")})
    return {
        "vocab_size": int(vocab),
        "hidden_size": int(width),
        "intermediate_size": int(intermediate),
        "num_hidden_layers": layers,
        # CLIP text towers use 64-wide heads (ViT-L/14: 768 / 64 = 12); narrower test models, one
        "num_attention_heads": max(1, int(width) // 64),
        "max_position_embeddings": int(positions),
    }


def empty_prompt_embedding(ldm_state_dict: Mapping[str, Any]) -> torch.Tensor:
    """SD's text encoder (`cond_stage_model.transformer.*`) on "" as ldm's FrozenCLIPEmbedder
    encodes it: full `last_hidden_state` [1, 77, C] (after the final LayerNorm), float32."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..weights import EMBEDDING_FILE

    ckpt = _unwrap(ldm_state_dict, "state_dict")
    weights = strip_prefix(ckpt, f"{_SD_TEXT}transformer.")
    if not weights:
        raise CheckpointFormatError(
            "the Stable Diffusion checkpoint has no text encoder (cond_stage_model.transformer.*),"
            f" needed once for the empty-prompt embedding; use sd-v1-3.ckpt from "
            f"{OFFICIAL_FILES['sd'][1]}, or put that embedding beside the files as "
            f"{EMBEDDING_FILE} (a tensor `embedding` [1, 77, C])"
        )
    # transformers < 5 names start with `text_model.`, transformers 5 drops that level
    weights = strip_prefix(weights, "text_model.") or weights
    # a buffer older transformers saved (0..76); the model builds the same positions itself
    weights.pop("embeddings.position_ids", None)
    text_config = _text_config(weights)
    if text_config["vocab_size"] <= EOS or text_config["max_position_embeddings"] < TEXT_TOKENS:
        raise CheckpointFormatError(
            f"the text encoder has {text_config['vocab_size']} tokens and "
            f"{text_config['max_position_embeddings']} positions; SD v1's CLIP text encoder has "
            f"49408 tokens (BOS {BOS}, EOS {EOS}) and {TEXT_TOKENS} positions"
        )
    model = CLIPTextModel(CLIPTextConfig(**text_config, bos_token_id=BOS, eos_token_id=EOS))
    if all(k.startswith("text_model.") for k in model.state_dict()):
        weights = {f"text_model.{k}": v for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(_fp32(weights), strict=False)
    if missing or unexpected:
        raise CheckpointFormatError(
            "the Stable Diffusion text encoder does not match a CLIPTextModel of its shapes "
            f"(missing: {_listed(missing) or 'none'}; unexpected: {_listed(unexpected) or 'none'})"
        )
    with torch.no_grad():
        hidden = model.eval()(input_ids=torch.tensor([EMPTY_PROMPT_IDS])).last_hidden_state
    return hidden.float().contiguous()


# -- CLIP ViT-L/14-336 --------------------------------------------------------------------------


def _clip_model_config() -> dict[str, Any]:
    import open_clip

    return open_clip.get_model_config(CLIP_MODEL_CONFIG)


def clip_to_native(
    state_dict_or_jit_path: Mapping[str, torch.Tensor] | str | os.PathLike[str],
    config: Mapping[str, Any] | None = None,
) -> StateDict:
    """OpenAI CLIP weights (the `ViT-L-14-336px.pt` TorchScript archive, or a state dict with
    its keys) -> `clip.*`, checked to load strictly into `open_clip.model.CLIP(**config)`.

    `config`: an open_clip model config (embed_dim, quick_gelu, vision_cfg, text_cfg); default
    open_clip's `ViT-L-14-336-quickgelu`.
    """
    import open_clip

    if isinstance(state_dict_or_jit_path, (str, os.PathLike)):
        state = _clip_file_state(Path(state_dict_or_jit_path))
    else:
        state = dict(state_dict_or_jit_path)
    state = {k: v for k, v in state.items() if k not in _CLIP_SCALARS}
    config = dict(config or _clip_model_config())
    with torch.device("meta"):
        expected = {
            k: tuple(v.shape) for k, v in open_clip.model.CLIP(**config).state_dict().items()
        }
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != expected[k]
    ]
    if missing or unexpected or wrong:
        raise CheckpointFormatError(
            "the CLIP weights do not match open_clip's CLIP of the configured size "
            f"(missing: {_listed(missing) or 'none'}; unexpected: {_listed(unexpected) or 'none'}; "
            f"wrongly shaped: {', '.join(wrong[:5]) or 'none'}). ODISE needs OpenAI's "
            f"ViT-L-14-336px.pt from {OFFICIAL_FILES['clip'][1]}"
        )
    return {f"clip.{k}": v for k, v in _fp32(state).items()}  # the JIT file is float16


def _clip_file_state(path: Path) -> StateDict:
    """The state dict of OpenAI's CLIP file (a TorchScript archive, or a torch.save state dict)."""
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{path} does not exist; get ViT-L-14-336px.pt from {OFFICIAL_FILES['clip'][1]}"
        )
    return load_checkpoint(path)


# -- files ----------------------------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike[str]) -> StateDict:
    """A release file as a flat {name: tensor} dict, read by the core's one checkpoint reader
    (`weights.load_state_dict_file`: a TorchScript archive's state dict, or a torch.save file
    under weights_only with Lightning objects as inert stubs), unwrapped from `model` /
    `state_dict`."""
    from ..weights import load_state_dict_file

    return load_state_dict_file(path)


def official_files(folder: str | os.PathLike[str], classifier: str) -> dict[str, Path]:
    """The files of a folder `folder_to_native` reads, by role ("odise", "sd", "clip"); an error
    naming each missing file, the path it belongs at and its URL."""
    if classifier not in ("label", "caption"):
        raise ValueError(f"classifier must be 'label' or 'caption', got {classifier!r}")
    folder = Path(folder)
    patterns = {
        "odise": (classifier, f"odise_{classifier}_*.pth"),
        "sd": ("sd", OFFICIAL_FILES["sd"][0]),
        "clip": ("clip", OFFICIAL_FILES["clip"][0]),
    }
    found, absent = {}, []
    for role, (kind, pattern) in patterns.items():
        path, hint = _official_file(folder, kind, pattern)
        if path is None:
            absent.append(hint)
        else:
            found[role] = path
    if absent:
        raise WeightsNotFoundError(
            f"{folder} lacks {len(absent)} of the files ODISE ({classifier}) is converted from; "
            "download each to the path shown:\n  " + "\n  ".join(absent)
        )
    return found


def _official_file(folder: Path, kind: str, pattern: str) -> tuple[Path | None, str]:
    """(the file in `folder` matching `pattern`, or None; a line saying where it comes from)."""
    name, url = OFFICIAL_FILES[kind]
    found = sorted(p for p in folder.glob(pattern) if p.is_file())
    if len(found) > 1:
        raise CheckpointFormatError(
            f"{folder} holds several files matching {pattern}: {', '.join(p.name for p in found)}; "
            "keep one"
        )
    return (found[0] if found else None), f"{folder / name}  <-  {url}"


def folder_to_native(folder: str | os.PathLike[str], tag: str) -> StateDict:
    """A folder with the official files under their release names (the ODISE `.pth` of `tag`,
    "label" | "caption", `sd-v1-3.ckpt`, `ViT-L-14-336px.pt` or a CLIP state dict under that
    name) -> the full native state dict. The files are read as they are (no sha256 check)."""
    from ..weights import read_empty_prompt_embedding

    files = official_files(folder, tag)
    components = {SD_COMPONENT: files["sd"], CLIP_COMPONENT: files["clip"]}
    odise = files["odise"]
    native = convert_odise(
        load_checkpoint(odise),
        lambda name: load_checkpoint(components[name]),
        text_embedding=read_empty_prompt_embedding(Path(folder)),  # instead of SD's text encoder
    )
    found = "label" if "text_head.null_embed" in native else "caption"
    if found != tag:
        raise CheckpointFormatError(f"{odise} is an ODISE {found} checkpoint, not {tag}")
    return native


def read_folder(folder: Path, config: Mapping[str, Any]) -> tuple[StateDict, list[Path]]:
    """The core's hook for `checkpoint_path=FOLDER` / `promptseg convert NAME FOLDER`: the
    official files of the model's classifier (config `classifier`) -> (native state dict, the
    files read, in the order their sha256 are listed)."""
    classifier = config.get("classifier", "label")
    files = official_files(folder, classifier)
    return folder_to_native(folder, classifier), [files[r] for r in ("odise", "sd", "clip")]


read_folder.layout = (
    "the official files under their release names: odise_label_coco_50e-*.pth and/or "
    "odise_caption_coco_50e-*.pth (each tag picks its own), sd-v1-3.ckpt and ViT-L-14-336px.pt"
)


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """'native' | 'official' | 'unknown' from telltale keys."""
    keys = list(_unwrap(state_dict, "model"))
    if any(k.startswith(("backbone.captioner.", "head.predictor.")) for k in keys):
        return "native"
    official = re.compile(r"(module\.)?(sem_seg_head|backbone\.feature_extractor)\.")
    if any(official.match(k) for k in keys):
        return "official"
    return "unknown"


@register_converter("odise")
def convert_odise(
    state_dict: StateDict,
    require: Require | None = None,
    text_embedding: torch.Tensor | None = None,
) -> StateDict:
    """ODISE release `.pth` (+ the SD v1.3 and CLIP components through `require`), or promptseg's
    own file -> the full native state dict (what `checkpoint_path=` accepts). The empty-prompt
    embedding is computed from SD's text encoder unless `text_embedding` [1, 77, C] is given."""
    layout = detect_layout(state_dict)
    if layout == "native":
        return state_dict
    if layout == "unknown":
        raise CheckpointFormatError(
            "unknown ODISE checkpoint layout (expected an ODISE release .pth with "
            f"sem_seg_head.* keys, or promptseg's own); keys: {_listed(state_dict, 6)}"
        )
    native, _ = odise_to_native(state_dict)
    if require is None:
        raise CheckpointFormatError(
            f"an ODISE .pth holds only the trained modules; the frozen Stable Diffusion v1.3 "
            f"({SD_COMPONENT}: {OFFICIAL_FILES['sd'][1]}) and CLIP ({CLIP_COMPONENT}: "
            f"{OFFICIAL_FILES['clip'][1]}) are needed too"
        )
    sd = require(SD_COMPONENT)
    sd_native, _, _ = sd_to_native(sd)
    native.update(sd_native)
    native.update(clip_to_native(require(CLIP_COMPONENT)))
    if text_embedding is None:
        text_embedding = empty_prompt_embedding(sd)
    native["empty_prompt_embedding"] = text_embedding
    return native


convert_odise.read_folder = read_folder  # read by create_model(checkpoint_path=FOLDER)
