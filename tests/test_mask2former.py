"""Mask2Former head for ODISE: deformable attention, pixel decoder, masked decoder, key layout.

Multi-scale deformable attention is checked against explicit bilinear interpolation written
here and against tensors stored from the official pure-PyTorch fallback
(`ms_deform_attn_core_pytorch`, NVlabs/ODISE 2b187e4). The head runs on a tiny random config.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from promptseg.contracts import FeatureInfo
from promptseg.heads.mask2former import (
    Mask2FormerHead,
    PooledMaskEmbed,
    hard_mask_pool,
    reference_points,
)
from promptseg.layers.deform_attn import MSDeformAttn, ms_deform_attn
from promptseg.registry import lookup

DATA = Path(__file__).parent / "data"
KEYS = ("res2", "res3", "res4", "res5")
STRIDES = (4, 8, 16, 32)
CHANNELS = (24, 40, 48, 64)
TINY = dict(
    hidden_dim=32,
    num_queries=4,
    nheads=2,
    dim_feedforward=64,
    dec_layers=4,  # > 3, so the level cycle wraps around
    enc_layers=1,
    enc_dim_feedforward=64,
    conv_dim=32,
    mask_dim=32,
)
H, W = 64, 96  # image size; the pyramid is H/s x W/s


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Non-trivial values for every parameter (norm affines, biases, logit scale included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p.shape[-1] if p.dim() else 1
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    return module


def _pyramid(batch: int, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(batch, c, H // s, W // s, generator=gen).to(dtype)
        for k, c, s in zip(KEYS, CHANNELS, STRIDES, strict=True)
    }


def _tiny_head(class_head: bool = True, seed: int = 0) -> Mask2FormerHead:
    info = FeatureInfo("pyramid", KEYS, CHANNELS, STRIDES)
    head = Mask2FormerHead.from_features(info, class_head=class_head, **TINY)
    return _randomise(head, seed).eval()


@pytest.fixture(scope="module")
def head() -> Mask2FormerHead:
    return _tiny_head()


# ----------------------------------------------------------------------------------------------
# multi-scale deformable attention


def _bilinear_zero_padded(image: Tensor, x: float, y: float) -> Tensor:
    """Value of image [C, h, w] at normalised (x, y): pixel centres at (i + 0.5) / size,
    the four neighbours weighted bilinearly, neighbours outside the map count as zero."""
    _, h, w = image.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(image.shape[0], dtype=image.dtype)
    for xi, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
        for yi, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
            if 0 <= xi < w and 0 <= yi < h:
                out += wx * wy * image[:, yi, xi]
    return out


def _ms_deform_attn_loops(
    value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor
) -> Tensor:
    """Direct definition: per query and head, sum over levels and points of weight x sample."""
    b, _, heads, dh = value.shape
    _, lq, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(b, lq, heads, dh, dtype=value.dtype)
    for n in range(b):
        for m in range(heads):
            for lvl, (h, w) in enumerate(shapes):
                image = value[n, starts[lvl] : starts[lvl + 1], m].T.reshape(dh, h, w)
                for q in range(lq):
                    for p in range(points):
                        x, y = locations[n, q, m, lvl, p].tolist()
                        sample = _bilinear_zero_padded(image, x, y)
                        out[n, q, m] += weights[n, q, m, lvl, p] * sample
    return out.reshape(b, lq, heads * dh)


def test_ms_deform_attn_equals_explicit_bilinear_sampling() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 6), (3, 2), (1, 5)]
    b, heads, dh, lq, points = 2, 3, 4, 5, 2
    value = torch.randn(b, sum(h * w for h, w in shapes), heads, dh, generator=gen)
    locations = torch.rand(b, lq, heads, len(shapes), points, 2, generator=gen) * 1.6 - 0.3
    assert (locations < 0).any() and (locations > 1).any()  # zero padding is exercised
    weights = torch.rand(b, lq, heads, len(shapes), points, generator=gen)
    out = ms_deform_attn(value, shapes, locations, weights)
    ref = _ms_deform_attn_loops(value.double(), shapes, locations.double(), weights.double())
    assert out.shape == (b, lq, heads * dh)
    assert (out.double() - ref).abs().max() <= 1e-5


def test_ms_deform_attn_equals_official_fallback() -> None:
    """Stored inputs/outputs of the official `ms_deform_attn_core_pytorch` (3 levels, 2 heads,
    locations in [-0.2, 1.2])."""
    stored = safetensors.torch.load_file(DATA / "msda_official_tiny.safetensors")
    shapes = [tuple(s) for s in stored["spatial_shapes"].tolist()]
    out = ms_deform_attn(
        stored["value"], shapes, stored["sampling_locations"], stored["attention_weights"]
    )
    assert out.shape == stored["output"].shape == (2, 6, 8)
    assert (out - stored["output"]).abs().max() <= 1e-6


def test_ms_deform_attn_rejects_mismatched_shapes() -> None:
    value = torch.zeros(1, 10, 1, 2)
    locations, weights = torch.zeros(1, 1, 1, 1, 1, 2), torch.ones(1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"spatial_shapes \[\(3, 3\)\]"):
        ms_deform_attn(value, [(3, 3)], locations, weights)


def test_msdeformattn_samples_at_offset_cells() -> None:
    """Zero offsets at cell centres read the cell itself; an offset of one cell in x reads the
    right neighbour (zero past the border); attention is a softmax over (level, point)."""
    torch.manual_seed(0)
    attn = MSDeformAttn(dim=8, levels=1, heads=2, points=1)
    with torch.no_grad():
        nn.init.zeros_(attn.sampling_offsets.bias)
    h, w = 3, 4
    value = torch.randn(2, h * w, 8)
    ref = reference_points(h, w)[None]  # [1, h*w, 2]
    out = attn(torch.randn(2, h * w, 8), ref, value, [(h, w)])
    assert torch.allclose(out, attn.output_proj(attn.value_proj(value)), atol=1e-6)

    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0, 1.0, 0.0]))  # (x, y) per head
    out = attn(torch.randn(2, h * w, 8), ref, value, [(h, w)])
    projected = attn.value_proj(value).view(2, h, w, 8)
    shifted = torch.cat([projected[:, :, 1:], torch.zeros(2, h, 1, 8)], dim=2)
    assert torch.allclose(out, attn.output_proj(shifted.reshape(2, h * w, 8)), atol=1e-6)


def test_msdeformattn_initialisation() -> None:
    heads, levels, points = 8, 3, 4
    attn = MSDeformAttn(dim=32, levels=levels, heads=heads, points=points)
    rings = attn.sampling_offsets.bias.view(heads, levels, points, 2)
    for h in range(heads):
        angle = 2 * math.pi * h / heads
        direction = torch.tensor([math.cos(angle), math.sin(angle)])
        direction = direction / direction.abs().max()
        for p in range(points):
            expected = (p + 1) * direction.expand(levels, 2)
            assert torch.allclose(rings[h, :, p], expected, atol=1e-6)
    assert not attn.sampling_offsets.weight.any()
    assert not attn.attention_weights.weight.any() and not attn.attention_weights.bias.any()
    assert not attn.value_proj.bias.any() and not attn.output_proj.bias.any()


def test_reference_points_are_cell_centres() -> None:
    pts = reference_points(2, 4)
    expected = [((i + 0.5) / 4, (j + 0.5) / 2) for j in range(2) for i in range(4)]
    assert torch.allclose(pts, torch.tensor(expected))


# ----------------------------------------------------------------------------------------------
# head


def test_registered_for_pyramids(head: Mask2FormerHead) -> None:
    assert lookup("head", "mask2former") is Mask2FormerHead
    assert Mask2FormerHead.needs == "pyramid"
    decoder = head.pixel_decoder
    assert decoder.fpn_keys == ["res2"] and decoder.encoder_keys == ["res3", "res4", "res5"]
    # input_proj runs coarse to fine: res5, res4, res3; adapter_1 reads res2
    assert [p[0].in_channels for p in decoder.input_proj] == [64, 48, 40]
    assert decoder.adapter_1.in_channels == 24


def test_forward_shapes(head: Mask2FormerHead) -> None:
    with torch.no_grad():
        out = head(_pyramid(2, seed=1))
    assert out["pred_masks"].shape == (2, 4, H // 4, W // 4)
    assert out["pred_logits"].shape == (2, 4, 2)
    assert out["mask_embed"].shape == (2, 4, 32)
    assert out["logit_scale"].shape == ()
    assert len(out["aux"]) == TINY["dec_layers"]
    for stage in out["aux"]:
        assert {k: tuple(v.shape) for k, v in stage.items() if k != "logit_scale"} == {
            "pred_masks": (2, 4, H // 4, W // 4),
            "pred_logits": (2, 4, 2),
            "mask_embed": (2, 4, 32),
        }
    no_class = _tiny_head(class_head=False)
    with torch.no_grad():
        out = no_class(_pyramid(1, seed=1))
    assert out["pred_logits"] is None and "class_embed" not in dict(
        no_class.predictor.named_children()
    )


def test_batch_items_are_independent(head: Mask2FormerHead) -> None:
    feats = _pyramid(2, seed=2)
    with torch.no_grad():
        both = head(feats)
        singles = [head({k: v[i : i + 1] for k, v in feats.items()}) for i in range(2)]
    for key in ("pred_masks", "pred_logits", "mask_embed"):
        stacked = torch.cat([s[key] for s in singles])
        assert (both[key] - stacked).abs().max() <= 1e-5, key
        for j, stage in enumerate(both["aux"]):
            stacked = torch.cat([s["aux"][j][key] for s in singles])
            assert (stage[key] - stacked).abs().max() <= 1e-5, (j, key)


def _capture_cross_attention(head: Mask2FormerHead) -> tuple[list, list]:
    """Forward-pre hooks recording (memory length, blocked mask) of each cross-attention."""
    seen: list[tuple[int, Tensor]] = []

    def record(module: nn.Module, args: tuple) -> None:
        _, memory, _, _, blocked = args
        seen.append((memory.shape[1], blocked.clone()))

    hooks = [
        layer.register_forward_pre_hook(record)
        for layer in head.predictor.transformer_cross_attention_layers
    ]
    return seen, hooks


def _expected_blocked(mask_logits: Tensor, size: tuple[int, int]) -> Tensor:
    """The rule written out: bilinear to the level, sigmoid < 0.5 blocks; a query blocking
    every key is unblocked everywhere."""
    small = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
    blocked = small.sigmoid().flatten(2) < 0.5
    full = blocked.sum(-1) == blocked.shape[-1]
    blocked[full] = False
    return blocked


def test_layer_l_reads_level_l_mod_3_through_the_previous_mask() -> None:
    head = _tiny_head(seed=1)
    with torch.no_grad():  # zero-mean mask features: masks neither all-open nor all-closed
        head.pixel_decoder.mask_features.bias.zero_()
    seen, hooks = _capture_cross_attention(head)
    try:
        with torch.no_grad():
            out = head(_pyramid(2, seed=3))
    finally:
        for hook in hooks:
            hook.remove()
    sizes = [(H // 32, W // 32), (H // 16, W // 16), (H // 8, W // 8)]  # levels 0, 1, 2
    assert len(seen) == TINY["dec_layers"]
    for layer, (memory_len, blocked) in enumerate(seen):
        h, w = sizes[layer % 3]
        assert memory_len == h * w
        expected = _expected_blocked(out["aux"][layer]["pred_masks"], (h, w))
        assert torch.equal(blocked, expected)
        assert blocked.any() and not blocked.all()


def test_fully_blocked_queries_attend_everywhere() -> None:
    """Constant mask features make each query's mask constant: queries with a negative logit
    would block every key, so they are reset to attend everywhere (no NaN)."""
    head = _tiny_head(seed=4)
    with torch.no_grad():
        head.pixel_decoder.mask_features.weight.zero_()
    seen, hooks = _capture_cross_attention(head)
    try:
        with torch.no_grad():
            out = head(_pyramid(1, seed=5))
    finally:
        for hook in hooks:
            hook.remove()
    initial = out["aux"][0]["pred_masks"]
    assert (initial < 0).flatten(1).all(-1).any()  # at least one query fully negative
    assert not seen[0][1].any()
    assert all(torch.isfinite(v).all() for v in (out["pred_masks"], out["mask_embed"]))


def test_aux_false_gives_the_same_last_prediction(head: Mask2FormerHead) -> None:
    feats = _pyramid(1, seed=6)
    with torch.no_grad():
        full, last_only = head(feats), head(feats, aux=False)
    assert last_only["aux"] == []
    for key in ("pred_masks", "pred_logits", "mask_embed", "logit_scale"):
        assert torch.equal(full[key], last_only[key])


def test_missing_level_is_named(head: Mask2FormerHead) -> None:
    feats = _pyramid(1, seed=0)
    del feats["res2"]
    with pytest.raises(KeyError, match="res2"):
        head(feats)
    with pytest.raises(ValueError, match="at least 3 pyramid levels"):
        Mask2FormerHead({"res4": 8, "res5": 8}, {"res4": 16, "res5": 32})


def test_pooled_mask_embed_formula() -> None:
    torch.manual_seed(0)
    module = _randomise(PooledMaskEmbed(hidden_dim=16, mask_dim=8), seed=7)
    feats = torch.randn(2, 8, 5, 6)
    logits = torch.randn(2, 3, 5, 6)
    logits[1, 2] = -1.0  # an empty mask pools to zeros
    d = torch.randn(2, 3, 16)
    z, scale = module(d, feats, logits)

    inside = (logits.sigmoid() > 0.5).float()
    pooled = (feats[:, None] * inside[:, :, None]).sum((-2, -1)) / (
        inside.sum((-2, -1))[..., None] + 1e-8
    )  # [B, Q, C]
    assert not pooled[1, 2].any()
    assert torch.allclose(hard_mask_pool(feats, logits), pooled, atol=1e-6)
    ln1, lin = module.pool_proj
    x = lin(F.layer_norm(pooled, (8,), ln1.weight, ln1.bias)) + d
    ln2, mlp = module.mask_embed
    h = F.layer_norm(x, (16,), ln2.weight, ln2.bias)
    h = F.relu(mlp.layers[0](h))
    h = F.relu(mlp.layers[1](h))
    assert torch.allclose(z, mlp.layers[2](h), atol=1e-5)
    assert torch.allclose(scale, module.logit_scale.exp())
    with torch.no_grad():
        module.logit_scale.fill_(5.0)  # exp(5) = 148 -> clamped
    assert module(d, feats, logits)[1].item() == 100.0
    assert PooledMaskEmbed(4, 4).logit_scale.item() == pytest.approx(math.log(1 / 0.07))


# ----------------------------------------------------------------------------------------------
# precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pixel_decoder_stays_float32_in_a_half_model(dtype: torch.dtype) -> None:
    reference = _tiny_head(seed=8)
    half = copy.deepcopy(reference).to(dtype)
    assert all(p.dtype == torch.float32 for p in half.pixel_decoder.parameters())
    assert all(p.dtype == dtype for p in half.predictor.parameters())
    assert all(  # no precision lost on the way through `.to(dtype)`
        torch.equal(a, b)
        for a, b in zip(
            half.pixel_decoder.parameters(), reference.pixel_decoder.parameters(), strict=True
        )
    )
    feats = _pyramid(1, seed=9, dtype=dtype)
    with torch.no_grad():
        mask_features, levels = half.pixel_decoder(feats)
        ref_features, ref_levels = reference.pixel_decoder({k: v.float() for k, v in feats.items()})
        out = half(feats)
        ref = reference({k: v.float() for k, v in feats.items()})
    assert mask_features.dtype == torch.float32
    assert torch.equal(mask_features, ref_features)
    assert all(torch.equal(a, b) for a, b in zip(levels, ref_levels, strict=True))
    assert out["pred_masks"].dtype == out["mask_embed"].dtype == dtype
    # the decoder itself runs in half precision: close to float32, not equal
    assert torch.allclose(out["mask_embed"].float(), ref["mask_embed"], atol=0.02)


def test_pixel_decoder_ignores_autocast() -> None:
    head = _tiny_head(seed=10)
    feats = _pyramid(1, seed=11)
    with torch.no_grad():
        plain, plain_levels = head.pixel_decoder(feats)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto, auto_levels = head.pixel_decoder(feats)
    assert auto.dtype == torch.float32 and torch.equal(auto, plain)
    assert all(torch.equal(a, b) for a, b in zip(auto_levels, plain_levels, strict=True))


# ----------------------------------------------------------------------------------------------
# checkpoint layout (specs/odise.md §8.2, `sem_seg_head.` stripped)


def _spec_keys(class_head: bool) -> dict[str, tuple[int, ...]]:
    """The §8.2 table for `sem_seg_head.*` at the ODISE config (512-channel pyramid)."""
    keys: dict[str, tuple[int, ...]] = {}

    def linear(prefix: str, out: int, inp: int) -> None:
        keys[f"{prefix}.weight"], keys[f"{prefix}.bias"] = (out, inp), (out,)

    def norm(prefix: str, dim: int = 256) -> None:
        keys[f"{prefix}.weight"], keys[f"{prefix}.bias"] = (dim,), (dim,)

    pd = "pixel_decoder"
    for j in range(3):
        keys[f"{pd}.input_proj.{j}.0.weight"] = (256, 512, 1, 1)
        keys[f"{pd}.input_proj.{j}.0.bias"] = (256,)
        norm(f"{pd}.input_proj.{j}.1")
    keys[f"{pd}.transformer.level_embed"] = (3, 256)
    for i in range(6):
        layer = f"{pd}.transformer.encoder.layers.{i}"
        linear(f"{layer}.self_attn.sampling_offsets", 192, 256)
        linear(f"{layer}.self_attn.attention_weights", 96, 256)
        linear(f"{layer}.self_attn.value_proj", 256, 256)
        linear(f"{layer}.self_attn.output_proj", 256, 256)
        norm(f"{layer}.norm1")
        linear(f"{layer}.linear1", 1024, 256)
        linear(f"{layer}.linear2", 256, 1024)
        norm(f"{layer}.norm2")
    keys[f"{pd}.mask_features.weight"], keys[f"{pd}.mask_features.bias"] = (256, 256, 1, 1), (256,)
    keys[f"{pd}.adapter_1.weight"] = (256, 512, 1, 1)
    norm(f"{pd}.adapter_1.norm")
    keys[f"{pd}.layer_1.weight"] = (256, 256, 3, 3)
    norm(f"{pd}.layer_1.norm")

    pr = "predictor"
    for i in range(9):
        for block, attn in (("self_attention", "self_attn"), ("cross_attention", "multihead_attn")):
            prefix = f"{pr}.transformer_{block}_layers.{i}"
            keys[f"{prefix}.{attn}.in_proj_weight"] = (768, 256)
            keys[f"{prefix}.{attn}.in_proj_bias"] = (768,)
            linear(f"{prefix}.{attn}.out_proj", 256, 256)
            norm(f"{prefix}.norm")
        linear(f"{pr}.transformer_ffn_layers.{i}.linear1", 2048, 256)
        linear(f"{pr}.transformer_ffn_layers.{i}.linear2", 256, 2048)
        norm(f"{pr}.transformer_ffn_layers.{i}.norm")
    norm(f"{pr}.decoder_norm")
    keys[f"{pr}.query_feat.weight"] = keys[f"{pr}.query_embed.weight"] = (100, 256)
    keys[f"{pr}.level_embed.weight"] = (3, 256)
    for i in range(3):
        linear(f"{pr}.mask_embed.layers.{i}", 256, 256)
    keys[f"{pr}.post_mask_embed.logit_scale"] = ()
    norm(f"{pr}.post_mask_embed.pool_proj.0")
    linear(f"{pr}.post_mask_embed.pool_proj.1", 256, 256)
    norm(f"{pr}.post_mask_embed.mask_embed.0")
    for i in range(3):
        linear(f"{pr}.post_mask_embed.mask_embed.1.layers.{i}", 256, 256)
    if class_head:
        linear(f"{pr}.class_embed", 2, 256)
    return keys


@pytest.mark.parametrize(
    ("class_head", "n_keys", "n_params"),
    [(False, 303, 20_299_969), (True, 305, 20_300_483)],
    ids=["label", "caption"],
)
def test_state_dict_matches_the_official_layout(
    class_head: bool, n_keys: int, n_params: int
) -> None:
    """Keys and shapes at the default config equal §8.2; with the other modules of §8.2 these
    counts add up to the spec's 399 / 400 keys and 28,067,009 / 28,066,755 parameters."""
    with torch.device("meta"):
        head = Mask2FormerHead(class_head=class_head)
    ours = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    spec = _spec_keys(class_head)
    assert sorted(set(ours) ^ set(spec)) == []
    assert ours == spec
    assert len(ours) == n_keys
    assert sum(math.prod(s) for s in spec.values()) == n_params
    assert sum(p.numel() for p in head.parameters()) == n_params


def test_the_official_head_gives_the_same_outputs():
    """The official vendored Mask2Former pixel decoder + ODISE's masked-attention decoder (with
    PooledMaskEmbed and the caption class head), run on a tiny random configuration: the stored
    outputs equal ours on the same seeded weights and inputs (the file's metadata says how)."""
    stored = safetensors.torch.load_file(
        Path(__file__).parent / "data" / "mask2former_official_tiny.safetensors"
    )
    channels = [24, 40, 48, 64]
    head = Mask2FormerHead(
        {f"res{i}": c for i, c in zip(range(2, 6), channels, strict=True)},
        {f"res{i}": 2**i for i in range(2, 6)},
        hidden_dim=32, num_queries=6, nheads=2, dim_feedforward=64, dec_layers=4, enc_layers=2,
        enc_dim_feedforward=64, conv_dim=32, mask_dim=32, class_head=True,
    ).eval()  # fmt: skip
    generator = torch.Generator().manual_seed(3)
    state = head.state_dict()
    with torch.no_grad():
        for key in sorted(state):
            t = state[key]
            if t.is_floating_point():
                scale = max(1, t.shape[-1] if t.dim() else 1) ** 0.5
                t.copy_(torch.randn(t.shape, generator=generator) / scale)
    generator = torch.Generator().manual_seed(4)
    features = {
        f"res{i}": torch.randn(2, c, 64 // 2**i, 96 // 2**i, generator=generator)
        for i, c in zip(range(2, 6), channels, strict=True)
    }
    with torch.no_grad():
        mask_features, levels = head.pixel_decoder(features)
        out = head(features)
    torch.testing.assert_close(mask_features, stored["out.mask_features"], atol=1e-5, rtol=1e-5)
    for i, level in enumerate(levels):
        torch.testing.assert_close(level, stored[f"out.level{i}"], atol=1e-5, rtol=1e-5)
    for key in ("pred_masks", "pred_logits", "mask_embed"):
        torch.testing.assert_close(out[key], stored[f"out.{key}"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["aux"][0]["pred_masks"], stored["out.aux0.pred_masks"])
    assert float(out["logit_scale"]) == pytest.approx(float(stored["out.logit_scale"]))
