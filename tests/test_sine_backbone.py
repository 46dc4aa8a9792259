"""DINOv2 adapter: parity with timm at 518, DINOv2's position interpolation elsewhere, caching."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from promptseg.backbones.dinov2 import DINOv2, dinov2_position_table
from promptseg.registry import BACKBONES

TINY = {"embed_dim": 64, "depth": 2, "num_heads": 4}


def _tiny() -> DINOv2:
    """Tiny DINOv2 with every weight random and non-trivial (pos table std 1, LayerScale 0.5)."""
    torch.manual_seed(0)
    model = DINOv2(None, **TINY).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.5 if "gamma" in name else 1.0 if "pos_embed" in name else 0.05)
    return model


def _timm_twin(model: DINOv2, **kwargs) -> torch.nn.Module:
    """A plain timm DINOv2 ViT with the adapter's weights (any pos table shape via kwargs)."""
    twin = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, num_classes=0, **TINY, **kwargs
    ).eval()
    state = {k[len("vit.") :]: v for k, v in model.state_dict().items()}
    if "img_size" in kwargs and kwargs["img_size"] != 518:
        state.pop("pos_embed")
        twin.load_state_dict(state, strict=False)
    else:
        twin.load_state_dict(state, strict=True)
    return twin


def _timm_prenorm(vit: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Last block output before `norm`, CLS dropped, [B, C, gh, gw], by timm's own code path."""
    (out,) = vit.forward_intermediates(
        pixels,
        indices=[len(vit.blocks) - 1],
        norm=False,
        output_fmt="NCHW",
        intermediates_only=True,
    )
    return out


def _cubic(x: float, a: float = -0.75) -> float:
    x = abs(x)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def _dinov2_weights(out: int, old: int) -> torch.Tensor:
    """[out, old] cubic weights (A=-0.75) sampling at (i + 0.5) * old / (out + 0.1) - 0.5."""
    w = torch.zeros(out, old, dtype=torch.float64)
    for i in range(out):
        src = (i + 0.5) * old / (out + 0.1) - 0.5
        base = math.floor(src)
        t = src - base
        for k, dist in zip(range(base - 1, base + 3), (1 + t, t, 1 - t, 2 - t), strict=True):
            w[i, min(max(k, 0), old - 1)] += _cubic(dist)
    return w


def _expected_table(pos_embed: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """Independent DINOv2 interpolation: separable cubic convolution with clamped borders."""
    m = math.isqrt(pos_embed.shape[1] - 1)
    grid = pos_embed[0, 1:].double().reshape(m, m, -1)
    out = torch.einsum("ij,jkc,lk->ilc", _dinov2_weights(gh, m), grid, _dinov2_weights(gw, m))
    return torch.cat([pos_embed[0, :1].double(), out.reshape(gh * gw, -1)])[None].float()


def test_registered_and_frozen():
    model = DINOv2(None, **TINY)
    assert BACKBONES["dinov2"] is DINOv2
    assert model.feature_info.channels == (64,) and model.feature_info.strides == (14,)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(k.startswith("vit.") for k in model.state_dict())
    assert "vit.mask_token" not in model.state_dict() and "vit.reg_token" not in model.state_dict()


def test_equals_timm_at_518():
    model = _tiny()
    pixels = torch.randn(2, 3, 518, 518)
    with torch.no_grad():
        ours = model.forward_features(pixels)["map"]
        ref = _timm_prenorm(_timm_twin(model), pixels)
    assert ours.shape == (2, 64, 37, 37)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    assert model.position_table((37, 37)).equal(model.vit.pos_embed)  # no interpolation at 37


@pytest.mark.parametrize("size", [(896, 896), (1036, 1036), (518, 896)])
def test_dinov2_interpolation_not_timm_dynamic(size):
    model = _tiny()
    gh, gw = size[0] // 14, size[1] // 14
    table = _expected_table(model.vit.pos_embed, gh, gw)
    torch.testing.assert_close(model.position_table((gh, gw)), table, rtol=0, atol=1e-4)

    pixels = torch.randn(1, 3, *size)
    static = _timm_twin(model, img_size=size)  # timm at this size, fed the expected table
    with torch.no_grad():
        static.pos_embed.copy_(table)
        ours = model.forward_features(pixels)["map"]
        expected = _timm_prenorm(static, pixels)
        dynamic = _timm_prenorm(_timm_twin(model, dynamic_img_size=True), pixels)
    assert ours.shape == (1, 64, gh, gw)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
    gap = (ours - dynamic).abs().max() / expected.abs().max()
    assert gap > 1e-2, f"timm's dynamic resize should differ, relative gap {gap:.2e}"


def test_position_cache_hits_and_invalidates():
    model = _tiny()
    first = model.position_table((64, 64))
    assert model.position_table((64, 64)) is first  # cached
    pixels = torch.randn(1, 3, 896, 896)
    with torch.no_grad():
        before = model.forward_features(pixels)["map"]
        model.vit.pos_embed.mul_(-1.0)  # in-place edit: version counter moves
    flipped = model.position_table((64, 64))
    assert flipped is not first
    torch.testing.assert_close(flipped, -first)

    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["vit.pos_embed"].normal_()
    model.load_state_dict(state)
    fresh = _expected_table(state["vit.pos_embed"], 64, 64)
    torch.testing.assert_close(model.position_table((64, 64)), fresh, rtol=0, atol=1e-4)

    model.vit.pos_embed = torch.nn.Parameter(torch.zeros_like(model.vit.pos_embed))  # replaced
    assert model.position_table((64, 64)).abs().max() == 0
    with torch.no_grad():
        after = model.forward_features(pixels)["map"]
    assert not torch.allclose(before, after)


def test_unfrozen_gets_gradients_through_the_table():
    model = DINOv2(None, frozen=False, **TINY)
    out = model.forward_features(torch.randn(1, 3, 896, 896))["map"]
    out.square().mean().backward()
    assert model.vit.pos_embed.grad is not None and model.vit.pos_embed.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("arch", "width", "params"),
    [
        ("vit_small_patch14_dinov2", 384, None),
        ("vit_base_patch14_dinov2", 768, None),
        ("vit_large_patch14_dinov2", 1024, 304_368_640 - 1024),  # spec count minus mask_token
    ],
)
def test_full_size_shapes_on_meta(arch, width, params):
    with torch.device("meta"):
        model = DINOv2(arch)
        tokens = model.forward_features(torch.empty(2, 3, 896, 896))["map"]
        tokens_vos = model.forward_features(torch.empty(1, 3, 1036, 1036))["map"]
    assert model.feature_info.out_channels == width
    assert tokens.shape == (2, width, 64, 64)
    assert tokens_vos.shape == (1, width, 74, 74)
    if params is not None:
        assert sum(p.numel() for p in model.parameters()) == params
        assert len(model.state_dict()) == 342


def test_bad_inputs_and_configs():
    model = DINOv2(None, **TINY)
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        model.forward_features(torch.zeros(1, 3, 900, 900))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.forward_features(torch.zeros(3, 896, 896))
    with pytest.raises(ValueError, match="unknown DINOv2 arch"):
        DINOv2("vit_large_patch14_reg4_dinov2")
    with pytest.raises(ValueError, match="embed_dim, depth and num_heads"):
        DINOv2(None, embed_dim=64)


def test_position_table_rejects_non_square_source():
    with pytest.raises(ValueError, match="square"):
        dinov2_position_table(torch.zeros(1, 1 + 6, 8), (4, 4))
