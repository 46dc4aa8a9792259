"""SINE converter on synthetic state dicts with the official key names and shapes (sine.md §5)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from promptseg.convert.sine import (
    convert_sine,
    detect_layout,
    dinov2_component,
    official_to_native,
)
from promptseg.errors import CheckpointFormatError
from promptseg.registry import CONVERTERS

Shapes = dict[str, tuple[int, ...]]


def dinov2_release_shapes(dim: int = 1024, depth: int = 24) -> Shapes:
    """`dinov2_vitl14_pretrain.pth` keys and shapes as listed in the spec (incl. mask_token)."""
    shapes: Shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1370, dim),
        "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, 14, 14),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update(
            {
                b + "norm1.weight": (dim,),
                b + "norm1.bias": (dim,),
                b + "attn.qkv.weight": (3 * dim, dim),
                b + "attn.qkv.bias": (3 * dim,),
                b + "attn.proj.weight": (dim, dim),
                b + "attn.proj.bias": (dim,),
                b + "ls1.gamma": (dim,),
                b + "norm2.weight": (dim,),
                b + "norm2.bias": (dim,),
                b + "mlp.fc1.weight": (4 * dim, dim),
                b + "mlp.fc1.bias": (4 * dim,),
                b + "mlp.fc2.weight": (dim, 4 * dim),
                b + "mlp.fc2.bias": (dim,),
                b + "ls2.gamma": (dim,),
            }
        )
    return shapes


def _attn(prefix: str) -> Shapes:
    return {
        prefix + "in_proj_weight": (768, 256),
        prefix + "in_proj_bias": (768,),
        prefix + "out_proj.weight": (256, 256),
        prefix + "out_proj.bias": (256,),
    }


def _ln(prefix: str, dim: int = 256) -> Shapes:
    return {prefix + "weight": (dim,), prefix + "bias": (dim,)}


def _ffn(prefix: str) -> Shapes:
    return {
        prefix + "linear1.weight": (2048, 256),
        prefix + "linear1.bias": (2048,),
        prefix + "linear2.weight": (256, 2048),
        prefix + "linear2.bias": (256,),
        **_ln(prefix + "norm."),
    }


def _layer(prefix: str, ffns: tuple[str, ...]) -> Shapes:
    shapes = {
        **_attn(prefix + "transformer_self_attention_layer.self_attn."),
        **_ln(prefix + "transformer_self_attention_layer.norm."),
        **_attn(prefix + "transformer_cross_attention_layer.multihead_attn."),
        **_ln(prefix + "transformer_cross_attention_layer.norm."),
    }
    for f in ffns:
        shapes.update(_ffn(f"{prefix}{f}."))
    return shapes


def sine_decoder_shapes(enc_dim: int = 1024) -> Shapes:
    """Official SINE keys except the encoder: neck + transformer_decoder (spec §5)."""
    td = "transformer_decoder."
    shapes: Shapes = {
        "image_encoder.neck.0.weight": (256, enc_dim, 1, 1),
        **_ln("image_encoder.neck.1."),
        "image_encoder.neck.2.weight": (256, 256, 3, 3),
        **_ln("image_encoder.neck.3."),
        td + "temp": (),
        td + "logit_scale": (),
        **_layer(td + "fusion_layers.0.", ("transformer_ffn_layer",)),
        **_ln(td + "decoder_norm."),
        td + "mask_feat_layer.0.weight": (256, 128, 2, 2),
        td + "mask_feat_layer.0.bias": (128,),
        **_ln(td + "mask_feat_layer.1.", 128),
        td + "mask_feat_layer.3.weight": (128, 256, 2, 2),
        td + "mask_feat_layer.3.bias": (256,),
        td + "query_feat.weight": (200, 256),
        td + "query_embed.weight": (200, 256),
        td + "query_grained_embed.weight": (3, 256),
        td + "neg_class_embed.weight": (1, 256),
        td + "id_class_embed.weight": (2, 256),
        td + "id_class_embed.bias": (2,),
    }
    for i in range(6):
        shapes.update(
            _layer(
                f"{td}transformer_layers.{i}.", ("transformer_ffn_layer1", "transformer_ffn_layer2")
            )
        )
    for i in range(3):
        shapes.update(_ln(f"{td}mask_embed.layers.{i}."))
        shapes[f"{td}mask_embed.layers.{i}.weight"] = (256, 256)
    return shapes


def materialize(shapes: Shapes, start: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Zero-memory tensors of the given shapes, each filled with its own distinct value."""
    return {
        k: torch.full((), float(start + i), dtype=dtype).expand(s)
        for i, (k, s) in enumerate(shapes.items())
    }


def numel(shapes: Shapes) -> int:
    return sum(torch.Size(s).numel() for s in shapes.values())


def native_name(official: str) -> str | None:
    """Hand-written expectation of the native name of an official key (None = dropped)."""
    if official.endswith("mask_token") or official.startswith("criterion."):
        return None
    for old, new in (
        ("image_encoder.encoder.", "backbone.vit."),
        ("image_encoder.neck.", "head.neck."),
        ("transformer_decoder.", "head."),
    ):
        if official.startswith(old):
            return new + official[len(old) :]
    raise AssertionError(official)


def test_spec_tables_match_spec_counts():
    # the spec's verified parameter counts: DINOv2-L 304,368,640 incl. mask_token; neck 852,992;
    # decoder 17,924,228 (trainable total 18,777,220)
    assert numel(dinov2_release_shapes()) == 304_368_640
    dec = sine_decoder_shapes()
    neck = {k: s for k, s in dec.items() if k.startswith("image_encoder.neck.")}
    assert numel(neck) == 852_992
    assert numel(dec) - numel(neck) == 17_924_228
    assert len(dinov2_release_shapes()) == 343  # timm's 342 + mask_token


def _full_official() -> dict[str, torch.Tensor]:
    enc = {"image_encoder.encoder." + k: s for k, s in dinov2_release_shapes().items()}
    shapes = {**enc, **sine_decoder_shapes(), "criterion.empty_weight": (2,)}
    return materialize(shapes)


def test_full_official_checkpoint():
    sd = _full_official()
    assert detect_layout(sd) == "official"
    native = CONVERTERS["sine"](sd)
    expected = {native_name(k): k for k in sd if native_name(k) is not None}
    assert set(native) == set(expected)
    assert len(native) == 532
    prefixes = Counter(
        ".".join(k.split(".")[:2]) if not k.startswith("head.transformer_layers") else "head.tl"
        for k in native
    )
    assert prefixes["backbone.vit"] == 342
    assert prefixes["head.neck"] == 6
    assert prefixes["head.fusion_layers"] == 18
    assert prefixes["head.tl"] == 6 * 24
    assert sum(1 for k in native if k.startswith("head.")) == 190
    for new, old in expected.items():
        assert native[new].shape == sd[old].shape, new
        assert native[new].dtype == torch.float32
        corner = (0,) * sd[old].ndim  # each key has its own fill value: values follow the key
        assert native[new][corner] == sd[old][corner], new
    assert "backbone.vit.mask_token" not in native


def test_decoder_only_uses_required_dinov2_release():
    decoder = materialize({**sine_decoder_shapes(), "criterion.empty_weight": (2,)})
    release = materialize(dinov2_release_shapes(), start=10_000)
    assert detect_layout(decoder) == "official_decoder"
    assert detect_layout(release) == "dinov2"
    asked = []

    def require(name: str) -> dict[str, torch.Tensor]:
        asked.append(name)
        return release

    native = official_to_native(decoder, require)
    assert asked == ["dinov2_vitl14"]
    assert len(native) == 532
    assert native["backbone.vit.blocks.23.ls2.gamma"].shape == (1024,)
    assert torch.equal(native["backbone.vit.pos_embed"], release["pos_embed"])
    with pytest.raises(CheckpointFormatError, match="dinov2_vitl14"):
        official_to_native(decoder)  # no require: the message names the component


def test_decoder_only_with_timm_hub_encoder_and_half_precision():
    shapes = sine_decoder_shapes(enc_dim=384)
    decoder = {k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}
    timm_hub = materialize(
        {k: s for k, s in dinov2_release_shapes(384, 12).items() if k != "mask_token"}
    )
    asked = []
    native = convert_sine(decoder, lambda name: asked.append(name) or timm_hub)
    assert asked == ["dinov2_vits14"]
    assert sum(k.startswith("backbone.vit.blocks.") for k in native) == 12 * 14
    assert all(v.dtype == torch.float32 for v in native.values())


def test_component_names():
    assert [dinov2_component(d) for d in (384, 768, 1024)] == [
        "dinov2_vits14",
        "dinov2_vitb14",
        "dinov2_vitl14",
    ]
    with pytest.raises(CheckpointFormatError, match="1536"):
        dinov2_component(1536)


def test_encoder_width_mismatch_is_an_error():
    decoder = materialize(sine_decoder_shapes(enc_dim=1024))
    vitb = materialize(dinov2_release_shapes(768, 12))
    with pytest.raises(CheckpointFormatError, match="768"):
        official_to_native(decoder, lambda name: vitb)


def test_unknown_key_is_named():
    sd = _full_official()
    sd["transformer_decoder.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointFormatError, match=r"transformer_decoder\.extra_head\.weight"):
        convert_sine(sd)
    sd = _full_official()
    sd["image_encoder.encoder.reg_token"] = torch.zeros(1, 4, 1024)
    with pytest.raises(CheckpointFormatError, match="register"):
        convert_sine(sd)


def test_incomplete_encoder_is_an_error():
    sd = _full_official()
    del sd["image_encoder.encoder.blocks.7.mlp.fc1.bias"]
    with pytest.raises(CheckpointFormatError, match=r"blocks\.7\.mlp\.fc1\.bias"):
        convert_sine(sd)


def test_dinov2_file_gets_a_clear_error():
    release = materialize(dinov2_release_shapes(384, 2))
    for fn in (convert_sine, official_to_native):
        with pytest.raises(CheckpointFormatError, match="this is a DINOv2 checkpoint, not SINE"):
            fn(release)


def test_native_and_unknown_layouts():
    native = {"head.temp": torch.zeros(()), "backbone.vit.cls_token": torch.zeros(1, 1, 8)}
    assert detect_layout(native) == "native"
    assert convert_sine(native) is native
    assert detect_layout({"foo.weight": torch.zeros(1)}) == "unknown"
    with pytest.raises(CheckpointFormatError, match="unknown SINE checkpoint layout"):
        convert_sine({"foo.weight": torch.zeros(1)})
