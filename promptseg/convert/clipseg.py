"""CLIPSeg checkpoints -> the native layout: `backbone.visual.*`, `text_encoder.*`, `head.*`.

Layouts read:
- HF transformers `CLIPSegForImageSegmentation` (hub repos CIDAS/clipseg-*, or a save_pretrained
  directory): `clip.*` in HF CLIP names + `decoder.*` with split q/k/v.
- Official decoder-only `.pth` (rd64-uni, rd16-uni, rd64-uni-refined): `film_mul`, `reduces.k`,
  `blocks.k.self_attn.in_proj_*`, `trans_conv*`, maybe the dead `reduce.*`; the CLIP weights come
  from OpenAI's ViT-B/16 (component `openai_clip_vitb16`, OpenAI/open_clip key names).
- The full official module state dict: the same plus `clip_model.*` (OpenAI names) and `model.*`
  (a duplicate of `clip_model.visual.*`).
- promptseg's own native files, including the first layout (whole CLIP under `backbone.clip.*`,
  decoder blocks with `qkv` / `proj` / `fc1` / `fc2`), updated to the current one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import CheckpointFormatError
from ..registry import register_converter
from .common import expect_no_leftovers, pack_qkv, rename_keys, strip_prefix

__all__ = [
    "hf_to_native",
    "official_to_native",
    "first_native_to_native",
    "convert_clipseg",
    "detect_layout",
]

StateDict = dict[str, torch.Tensor]
Require = Callable[[str], StateDict]
CLIP_COMPONENT = "openai_clip_vitb16"

_HF_CLIP_RULES = [
    (r"vision_model\.embeddings\.class_embedding", "visual.class_embedding"),
    (r"vision_model\.embeddings\.patch_embedding\.weight", "visual.conv1.weight"),
    (r"vision_model\.embeddings\.position_embedding\.weight", "visual.positional_embedding"),
    (r"vision_model\.pre_layrnorm\.(\w+)", r"visual.ln_pre.\1"),
    (r"vision_model\.post_layernorm\.(\w+)", r"visual.ln_post.\1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.(.*)", r"visual.transformer.resblocks.\1.\2"),
    (r"text_model\.embeddings\.token_embedding\.weight", "token_embedding.weight"),
    (r"text_model\.embeddings\.position_embedding\.weight", "positional_embedding"),
    (r"text_model\.encoder\.layers\.(\d+)\.(.*)", r"transformer.resblocks.\1.\2"),
    (r"text_model\.final_layer_norm\.(\w+)", r"ln_final.\1"),
    (r"visual_projection\.weight", "visual.proj"),
    (r"text_projection\.weight", "text_projection"),
    (r"logit_scale", "logit_scale"),
    (r".*position_ids", ""),
]
_HF_BLOCK_RULES = [
    (r"(.*)\.self_attn\.qkv\.(weight|bias)", r"\1.attn.in_proj_\2"),
    (r"(.*)\.self_attn\.out_proj\.(weight|bias)", r"\1.attn.out_proj.\2"),
    (r"(.*)\.layer_norm1\.(weight|bias)", r"\1.ln_1.\2"),
    (r"(.*)\.layer_norm2\.(weight|bias)", r"\1.ln_2.\2"),
    (r"(.*)\.mlp\.fc1\.(weight|bias)", r"\1.mlp.c_fc.\2"),
    (r"(.*)\.mlp\.fc2\.(weight|bias)", r"\1.mlp.c_proj.\2"),
    (r"(.*)", r"\1"),
]
_HF_DECODER_RULES = [
    (r"(film_mul|film_add|reduces\.\d+)\.(weight|bias)", r"head.\1.\2"),
    (r"layers\.(\d+)\.self_attn\.qkv\.(weight|bias)", r"head.blocks.\1.self_attn.in_proj_\2"),
    (r"layers\.(\d+)\.self_attn\.out_proj\.(.*)", r"head.blocks.\1.self_attn.out_proj.\2"),
    (r"layers\.(\d+)\.layer_norm([12])\.(weight|bias)", r"head.blocks.\1.norm\2.\3"),
    (r"layers\.(\d+)\.mlp\.fc([12])\.(weight|bias)", r"head.blocks.\1.linear\2.\3"),
    (r"transposed_convolution\.(.*)", r"head.upsample.\1"),
]
_OFFICIAL_DECODER_RULES = [  # the official blocks are torch TransformerEncoderLayers, as ours
    (r"(film_mul|film_add|reduces\.\d+)\.(weight|bias)", r"head.\1.\2"),
    (r"blocks\.(\d+)\.(.*)", r"head.blocks.\1.\2"),
    (r"trans_conv\.(.*)", r"head.upsample.\1"),
    (r"reduce\.(weight|bias)", ""),  # dead weight of the official module
]
_OPENAI_CLIP_RULES = [
    (r"visual\.(.*)", r"backbone.visual.\1"),
    (
        r"(transformer\..*|token_embedding\..*|positional_embedding|ln_final\..*)",
        r"text_encoder.\1",
    ),
    (r"text_projection", "text_encoder.text_projection"),
    (r"logit_scale|input_resolution|context_length|vocab_size", ""),
]
_FIRST_NATIVE_RULES = [  # promptseg's first native layout -> the current one
    (r"backbone\.clip\.(.*)", r"\1"),  # then through _OPENAI_CLIP_RULES
    (r"head\.blocks\.(\d+)\.qkv\.(weight|bias)", r"head.blocks.\1.self_attn.in_proj_\2"),
    (r"head\.blocks\.(\d+)\.proj\.(weight|bias)", r"head.blocks.\1.self_attn.out_proj.\2"),
    (r"head\.blocks\.(\d+)\.fc([12])\.(weight|bias)", r"head.blocks.\1.linear\2.\3"),
    (r"(head\..*)", r"\1"),
]


def _openai_clip_to_native(clip: StateDict) -> StateDict:
    """OpenAI / open_clip CLIP keys -> `backbone.visual.*` + `text_encoder.*`, as float32."""
    native, unmatched = rename_keys(clip, _OPENAI_CLIP_RULES)
    expect_no_leftovers(unmatched, "OpenAI CLIP weights")
    return {k: v.float() for k, v in native.items()}


def first_native_to_native(state_dict: StateDict) -> StateDict:
    """promptseg's first native layout (`backbone.clip.*`, `qkv`/`proj`/`fc*`) -> current."""
    renamed, unmatched = rename_keys(state_dict, _FIRST_NATIVE_RULES)
    expect_no_leftovers(unmatched, "promptseg CLIPSeg file (first layout)")
    head = {k: v for k, v in renamed.items() if k.startswith("head.")}
    clip = {k: v for k, v in renamed.items() if not k.startswith("head.")}
    return {**_openai_clip_to_native(clip), **head}


def hf_clip_to_openai(hf_clip: StateDict) -> StateDict:
    """HF `CLIPModel` keys (no `clip.` prefix) -> OpenAI CLIP keys (packed in_proj, proj^T)."""
    sd = pack_qkv(hf_clip, r"(.*)\.self_attn\.(q)_proj\.(weight|bias)", r"\1.self_attn.qkv.\3")
    sd, unmatched = rename_keys(sd, _HF_CLIP_RULES)
    expect_no_leftovers(unmatched, "HF CLIP weights")
    sd, _ = rename_keys(sd, _HF_BLOCK_RULES)
    for key in ("visual.proj", "text_projection"):
        if key in sd:
            if sd[key].ndim != 2:
                raise CheckpointFormatError(
                    f"HF CLIP weights: {key} has shape {tuple(sd[key].shape)}, expected a matrix"
                )
            sd[key] = sd[key].t().contiguous()
    return sd


@register_converter("clipseg_hf")
def hf_to_native(state_dict: StateDict, require: Require | None = None) -> StateDict:
    """transformers CLIPSegForImageSegmentation state dict -> native."""
    clip = hf_clip_to_openai(strip_prefix(state_dict, "clip."))
    decoder = pack_qkv(
        strip_prefix(state_dict, "decoder."),
        r"(.*)\.self_attn\.(q)_proj\.(weight|bias)",
        r"\1.self_attn.qkv.\3",
    )
    head, unmatched = rename_keys(decoder, _HF_DECODER_RULES)
    expect_no_leftovers(unmatched, "HF CLIPSeg decoder")
    other = [k for k in state_dict if not k.startswith(("clip.", "decoder."))]
    expect_no_leftovers(other, "HF CLIPSeg checkpoint")
    return {**_openai_clip_to_native(clip), **{k: v.float() for k, v in head.items()}}


@register_converter("clipseg_official")
def official_to_native(state_dict: StateDict, require: Require | None = None) -> StateDict:
    """Official decoder weights (+ `clip_model.*` if present, else the OpenAI CLIP component)."""
    clip = strip_prefix(state_dict, "clip_model.")
    decoder = {k: v for k, v in state_dict.items() if not k.startswith(("clip_model.", "model."))}
    head, unmatched = rename_keys(decoder, _OFFICIAL_DECODER_RULES)
    expect_no_leftovers(unmatched, "official CLIPSeg decoder")
    if not clip:
        if require is None:
            raise CheckpointFormatError(
                "this official CLIPSeg file holds only the decoder; the OpenAI CLIP ViT-B/16 "
                "weights are needed too"
            )
        clip = require(CLIP_COMPONENT)
    return {**_openai_clip_to_native(clip), **{k: v.float() for k, v in head.items()}}


def detect_layout(state_dict: StateDict) -> str:
    """'native' | 'first_native' | 'hf' | 'official' | 'openai_clip' | 'unknown' (by key)."""
    if any(k.startswith("backbone.clip.") for k in state_dict):
        return "first_native"
    if any(k.startswith(("head.", "backbone.", "text_encoder.")) for k in state_dict):
        return "native"
    if any(k.startswith("decoder.") for k in state_dict):
        return "hf"
    if "film_mul.weight" in state_dict or "reduces.0.weight" in state_dict:
        return "official"
    if "visual.conv1.weight" in state_dict:
        return "openai_clip"
    return "unknown"


@register_converter("clipseg")
def convert_clipseg(state_dict: StateDict, require: Require | None = None) -> StateDict:
    """Any CLIPSeg layout promptseg knows -> native (what `checkpoint_path=` accepts)."""
    layout = detect_layout(state_dict)
    if layout == "native":
        return state_dict
    if layout == "first_native":
        return first_native_to_native(state_dict)
    if layout == "hf":
        return hf_to_native(state_dict, require)
    if layout == "official":
        return official_to_native(state_dict, require)
    sample = ", ".join(sorted(state_dict)[:6])
    hint = (
        "this is a plain CLIP checkpoint, not CLIPSeg"
        if layout == "openai_clip"
        else "expected transformers CLIPSeg keys (decoder.film_mul.weight, clip.*), official keys "
        "(film_mul.weight, reduces.0.weight, ...) or promptseg's own (head.film_mul.weight)"
    )
    raise CheckpointFormatError(f"unknown CLIPSeg checkpoint layout ({hint}); keys: {sample}, ...")
