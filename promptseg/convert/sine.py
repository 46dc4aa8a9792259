"""SINE checkpoints -> promptseg's native layout (`backbone.vit.*` + `head.*`).

Layouts read:
- the official state dict (DeepSpeed `zero_to_fp32` output, no wrapper): `image_encoder.neck.*`,
  `transformer_decoder.*`, maybe `criterion.empty_weight` (ignored) and the frozen encoder
  `image_encoder.encoder.*` in DINOv2 names (`mask_token` dropped);
- its decoder-only form: then the DINOv2 weights come from component `dinov2_vit{s,b,l}14`
  (chosen by the neck's input width), in DINOv2's release format (`dinov2_vitl14_pretrain.pth`,
  timm names + `mask_token`) or timm's hub format (no `mask_token`).
Native names: `backbone.vit.<timm key>`, `head.neck.<0..3>.*`, `head.<decoder key>` unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from ..errors import CheckpointFormatError
from ..registry import register_converter
from .common import expect_no_leftovers, rename_keys, strip_prefix

__all__ = [
    "DINOV2_COMPONENTS",
    "convert_sine",
    "detect_layout",
    "dinov2_component",
    "dinov2_to_native",
    "official_to_native",
]

StateDict = dict[str, torch.Tensor]
Require = Callable[[str], StateDict]

#: DINOv2 (no registers) component name per embedding width.
DINOV2_COMPONENTS = {384: "dinov2_vits14", 768: "dinov2_vitb14", 1024: "dinov2_vitl14"}
ENCODER_PREFIX = "image_encoder.encoder."

_BLOCK_PARAMS = (
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "ls1.gamma",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
    "ls2.gamma",
)
_EMBED_PARAMS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")
_ENCODER_RULES = [
    (r"(cls_token|pos_embed|patch_embed\.proj\.(?:weight|bias)|norm\.(?:weight|bias))", r"\1"),
    (r"blocks\.(\d+)\.(" + "|".join(re.escape(p) for p in _BLOCK_PARAMS) + ")", r"blocks.\1.\2"),
    (r"mask_token", ""),  # DINOv2's masked-modelling token, unused at inference
]

_ATTN = r"(?:in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)"
_LN = r"norm\.(?:weight|bias)"
_LIN = r"(?:linear1|linear2|norm)\.(?:weight|bias)"
_LAYER = (
    rf"(?:transformer_self_attention_layer\.(?:self_attn\.{_ATTN}|{_LN})"
    rf"|transformer_cross_attention_layer\.(?:multihead_attn\.{_ATTN}|{_LN}))"
)
_FUSION = rf"fusion_layers\.\d+\.(?:{_LAYER}|transformer_ffn_layer\.{_LIN})"
_MFORMER = rf"transformer_layers\.\d+\.(?:{_LAYER}|transformer_ffn_layer[12]\.{_LIN})"
_HEAD_RULES = [
    (
        r"image_encoder\.neck\.(0\.weight|1\.weight|1\.bias|2\.weight|3\.weight|3\.bias)",
        r"head.neck.\1",
    ),
    (r"transformer_decoder\.(temp|logit_scale)", r"head.\1"),
    (rf"transformer_decoder\.({_FUSION})", r"head.\1"),
    (rf"transformer_decoder\.({_MFORMER})", r"head.\1"),
    (r"transformer_decoder\.(decoder_norm\.(?:weight|bias))", r"head.\1"),
    (r"transformer_decoder\.(mask_feat_layer\.[013]\.(?:weight|bias))", r"head.\1"),
    (
        r"transformer_decoder\.((?:query_feat|query_embed|query_grained_embed|neg_class_embed)"
        r"\.weight)",
        r"head.\1",
    ),
    (r"transformer_decoder\.(id_class_embed\.(?:weight|bias))", r"head.\1"),
    (r"transformer_decoder\.(mask_embed\.layers\.\d+\.(?:weight|bias))", r"head.\1"),
    (r"criterion\..*", ""),  # loss buffers (empty_weight) saved by zero_to_fp32
]


def _fp32(state_dict: StateDict) -> StateDict:
    """Floating tensors as float32 (no copy when already float32)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def dinov2_to_native(state_dict: StateDict, what: str = "DINOv2 encoder weights") -> StateDict:
    """DINOv2 release / timm hub ViT (no registers) -> `backbone.vit.*`, checked to be complete."""
    if "reg_token" in state_dict or "register_tokens" in state_dict:
        raise CheckpointFormatError(
            "this DINOv2 checkpoint has register tokens (a *_reg variant); SINE uses the plain "
            "DINOv2 ViT without registers"
        )
    encoder, unmatched = rename_keys(state_dict, _ENCODER_RULES)
    expect_no_leftovers(unmatched, what)
    blocks = sorted({int(k.split(".")[1]) for k in encoder if k.startswith("blocks.")})
    expected = [*_EMBED_PARAMS, "norm.weight", "norm.bias"]
    expected += [f"blocks.{i}.{p}" for i in range(len(blocks)) for p in _BLOCK_PARAMS]
    missing = [k for k in expected if k not in encoder]
    if missing:
        shown = ", ".join(missing[:10]) + (
            f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
        )
        raise CheckpointFormatError(f"{what}: {len(missing)} missing key(s): {shown}")
    return {f"backbone.vit.{k}": v for k, v in _fp32(encoder).items()}


def dinov2_component(neck_in_channels: int) -> str:
    """Component name of the DINOv2 encoder a SINE neck of that input width was trained on."""
    if neck_in_channels not in DINOV2_COMPONENTS:
        raise CheckpointFormatError(
            f"SINE neck takes {neck_in_channels} channels; no DINOv2 encoder has that width "
            f"(known: {sorted(DINOV2_COMPONENTS)})"
        )
    return DINOV2_COMPONENTS[neck_in_channels]


@register_converter("sine_official")
def official_to_native(state_dict: StateDict, require: Require | None = None) -> StateDict:
    """Official SINE state dict (full, or decoder-only + the DINOv2 component) -> native."""
    layout = detect_layout(state_dict)
    if layout == "dinov2":
        raise CheckpointFormatError(
            "this is a DINOv2 checkpoint, not SINE; pass the SINE weights (pytorch_model.bin)"
        )
    decoder = {k: v for k, v in state_dict.items() if not k.startswith(ENCODER_PREFIX)}
    head, unmatched = rename_keys(decoder, _HEAD_RULES)
    expect_no_leftovers(unmatched, "official SINE checkpoint")
    if "head.neck.0.weight" not in head:
        raise CheckpointFormatError(
            "official SINE checkpoint has no image_encoder.neck.0.weight; cannot tell the encoder"
        )
    if head["head.neck.0.weight"].ndim != 4:
        raise CheckpointFormatError(
            "official SINE checkpoint: image_encoder.neck.0.weight has shape "
            f"{tuple(head['head.neck.0.weight'].shape)}, expected a 1x1 conv [out, in, 1, 1]"
        )
    width = int(head["head.neck.0.weight"].shape[1])
    encoder = strip_prefix(state_dict, ENCODER_PREFIX)
    what = f"official SINE checkpoint ({ENCODER_PREFIX}*)"
    if not encoder:
        name = dinov2_component(width)
        if require is None:
            raise CheckpointFormatError(
                f"this SINE file holds only the decoder; the DINOv2 weights ({name}, e.g. "
                f"{name}_pretrain.pth) are needed too"
            )
        encoder = require(name)
        if detect_layout(encoder) != "dinov2":
            sample = ", ".join(sorted(encoder)[:6])
            raise CheckpointFormatError(
                f"component {name} is not a DINOv2 state dict; keys: {sample}"
            )
        what = f"DINOv2 component {name}"
    backbone = dinov2_to_native(encoder, what)
    cls_token = backbone["backbone.vit.cls_token"]
    if cls_token.ndim == 0:
        raise CheckpointFormatError(f"{what}: cls_token is a scalar, expected [1, 1, width]")
    enc_width = int(cls_token.shape[-1])
    if enc_width != width:
        raise CheckpointFormatError(
            f"DINOv2 encoder width {enc_width} does not match the SINE neck input {width} "
            f"(expected {dinov2_component(width)})"
        )
    return {**backbone, **_fp32(head)}


def detect_layout(state_dict: StateDict) -> str:
    """'native' | 'official' | 'official_decoder' | 'dinov2' | 'unknown' from telltale keys."""
    if any(k.startswith(("head.", "backbone.")) for k in state_dict):
        return "native"
    if any(k.startswith(("transformer_decoder.", "image_encoder.")) for k in state_dict):
        if any(k.startswith(ENCODER_PREFIX) for k in state_dict):
            return "official"
        return "official_decoder"
    if "pos_embed" in state_dict and "blocks.0.attn.qkv.weight" in state_dict:
        return "dinov2"
    return "unknown"


@register_converter("sine")
def convert_sine(state_dict: StateDict, require: Require | None = None) -> StateDict:
    """Any SINE layout promptseg knows -> native (what `checkpoint_path=` accepts)."""
    layout = detect_layout(state_dict)
    if layout == "native":
        return state_dict
    if layout in ("official", "official_decoder"):
        return official_to_native(state_dict, require)
    sample = ", ".join(sorted(state_dict)[:6])
    hint = (
        "this is a DINOv2 checkpoint, not SINE; pass the SINE weights (pytorch_model.bin)"
        if layout == "dinov2"
        else "expected official keys (transformer_decoder.*, image_encoder.neck.*) or promptseg's "
        "own (head.*, backbone.vit.*)"
    )
    raise CheckpointFormatError(f"unknown SINE checkpoint layout ({hint}); keys: {sample}, ...")
