"""Shared layers (promptseg.layers) against explicit formulas written here, masks included."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import Tensor, nn

from promptseg.layers.attention import (
    CrossAttentionBlock,
    FeedForwardBlock,
    SelfAttentionBlock,
    cross_attention_mask,
    per_head_mask,
)
from promptseg.layers.mlp import MLP
from promptseg.layers.position import sine_position_embedding

D, H = 16, 4  # width, heads
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
NORMS = pytest.mark.parametrize("pre_norm", [True, False], ids=["pre", "post"])


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    """Non-trivial values for every parameter (biases and LayerNorm affine included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / max(1, p.shape[-1]) ** 0.5)
    return module


def _reference_attention(
    mha: nn.MultiheadAttention, q: Tensor, k: Tensor, v: Tensor, blocked: Tensor | None
) -> Tensor:
    """out_proj(softmax(Q K^T / sqrt(d_head) with blocked = -inf) V), heads split by hand."""
    b, lq, d = q.shape
    heads = mha.num_heads
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)

    def split(x: Tensor, w: Tensor, bias: Tensor) -> Tensor:  # [B, L, D] -> [B, h, L, D/h]
        return (x @ w.T + bias).view(b, x.shape[1], heads, d // heads).transpose(1, 2)

    qh, kh, vh = split(q, wq, bq), split(k, wk, bk), split(v, wv, bv)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(d // heads)  # [B, h, Lq, Lk]
    if blocked is not None:
        mask = blocked if blocked.dim() == 2 else blocked[:, None]  # same for every head
        scores = scores.masked_fill(mask, float("-inf"))
    out = (scores.softmax(-1) @ vh).transpose(1, 2).reshape(b, lq, d)
    return out @ mha.out_proj.weight.T + mha.out_proj.bias


def _blocked(shape: tuple[int, ...], seed: int) -> Tensor:
    """Random bool mask (True = blocked) with key 0 always open, so no row blocks every key."""
    m = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.5
    m[..., 0] = False
    return m


def _ln(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    """LayerNorm over the last dim with `norm`'s affine parameters (eps 1e-5)."""
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias


def _data(*shape: int, seed: int, dtype: torch.dtype) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------------------------------------
# sub-layers


@DTYPES
@NORMS
@pytest.mark.parametrize("mask", [None, "shared", "per_item"])
@pytest.mark.parametrize("with_pos", [True, False], ids=["pos", "no_pos"])
def test_self_attention_block(dtype, pre_norm, mask, with_pos) -> None:
    block = _randomise(SelfAttentionBlock(D, H, pre_norm), 0).to(dtype)
    x = _data(2, 7, D, seed=1, dtype=dtype)
    pos = _data(2, 7, D, seed=2, dtype=dtype) if with_pos else None
    blocked = {None: None, "shared": _blocked((7, 7), 3), "per_item": _blocked((2, 7, 7), 3)}[mask]
    with torch.no_grad():
        got = block(x, pos, blocked)
        h = _ln(x, block.norm) if pre_norm else x
        qk = h if pos is None else h + pos
        want = x + _reference_attention(block.self_attn, qk, qk, h, blocked)
        want = want if pre_norm else _ln(want, block.norm)
    torch.testing.assert_close(got, want, rtol=0, atol=TOL[dtype])


@DTYPES
@NORMS
@pytest.mark.parametrize("mask", [None, "shared", "per_item"])
def test_cross_attention_block(dtype, pre_norm, mask) -> None:
    block = _randomise(CrossAttentionBlock(D, H, pre_norm), 4).to(dtype)
    x, pos = _data(3, 5, D, seed=5, dtype=dtype), _data(3, 5, D, seed=6, dtype=dtype)
    mem, mem_pos = _data(3, 9, D, seed=7, dtype=dtype), _data(3, 9, D, seed=8, dtype=dtype)
    blocked = {None: None, "shared": _blocked((5, 9), 9), "per_item": _blocked((3, 5, 9), 9)}[mask]
    with torch.no_grad():
        got = block(x, mem, pos, mem_pos, blocked)
        h = _ln(x, block.norm) if pre_norm else x
        want = x + _reference_attention(block.multihead_attn, h + pos, mem + mem_pos, mem, blocked)
        want = want if pre_norm else _ln(want, block.norm)
    torch.testing.assert_close(got, want, rtol=0, atol=TOL[dtype])


def test_per_item_masks_reach_the_right_item() -> None:
    """Item b's mask rows are used for item b in every head (batch-major head expansion)."""
    block = _randomise(CrossAttentionBlock(D, H, pre_norm=True), 10)
    x, mem = torch.randn(2, 3, D), torch.randn(2, 6, D)
    blocked = _blocked((2, 3, 6), 11)
    with torch.no_grad():
        both = block(x, mem, blocked=blocked)
        one = [block(x[j : j + 1], mem[j : j + 1], blocked=blocked[j]) for j in range(2)]
    torch.testing.assert_close(both, torch.cat(one), rtol=0, atol=1e-6)
    expanded = per_head_mask(blocked, H)
    assert expanded.shape == (2 * H, 3, 6)
    for b in range(2):
        for h in range(H):
            assert torch.equal(expanded[b * H + h], blocked[b])
    shared = blocked[0]
    assert per_head_mask(shared, H) is shared and per_head_mask(None, H) is None


@DTYPES
@NORMS
def test_feed_forward_block(dtype, pre_norm) -> None:
    block = _randomise(FeedForwardBlock(D, 32, pre_norm), 12).to(dtype)
    x = _data(2, 5, D, seed=13, dtype=dtype)
    with torch.no_grad():
        got = block(x)
        h = _ln(x, block.norm) if pre_norm else x
        hidden = (h @ block.linear1.weight.T + block.linear1.bias).clamp(min=0)
        want = x + hidden @ block.linear2.weight.T + block.linear2.bias
        want = want if pre_norm else _ln(want, block.norm)
    torch.testing.assert_close(got, want, rtol=0, atol=TOL[dtype])


def test_official_parameter_names() -> None:
    attn = {"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}
    norm = {"norm.weight", "norm.bias"}
    sa = set(SelfAttentionBlock(D, H, True).state_dict())
    ca = set(CrossAttentionBlock(D, H, False).state_dict())
    ffn = set(FeedForwardBlock(D, 32, True).state_dict())
    assert sa == {f"self_attn.{k}" for k in attn} | norm
    assert ca == {f"multihead_attn.{k}" for k in attn} | norm
    assert ffn == {"linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"} | norm
    mlp = set(MLP(D, 8, 3).state_dict())
    assert mlp == {f"layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")}


# ---------------------------------------------------------------------------------------------
# masked-attention rule


def test_cross_attention_mask_rule() -> None:
    logits = torch.randn(1, 3, 16, 16)
    logits[0, 2] = -10.0  # would block every key
    m = cross_attention_mask(logits, (4, 4))
    want = F.interpolate(logits, size=(4, 4), mode="bilinear", align_corners=False)
    want = want.sigmoid().flatten(2) < 0.5
    assert m.shape == (1, 3, 16) and torch.equal(m[0, :2], want[0, :2])
    assert not m[0, 2].any()  # fully blocked rows are fully unblocked


def test_fully_blocked_row_attends_everywhere() -> None:
    """A query whose mask logits block every key attends to all keys (finite, = no mask)."""
    block = _randomise(CrossAttentionBlock(D, H, pre_norm=True), 14)
    logits = torch.randn(2, 3, 8, 8)
    logits[1, 0] = -10.0
    blocked = cross_attention_mask(logits, (2, 2))  # [2, 3, 4]
    x, mem = torch.randn(2, 3, D), torch.randn(2, 4, D)
    with torch.no_grad():
        got = block(x, mem, blocked=blocked)
        free = block(x[1:], mem[1:])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[1, 0], free[0, 0], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# LayerNorm2d, MLP, position embedding


@DTYPES
def test_timm_layernorm2d_is_channel_layernorm(dtype) -> None:
    """timm's LayerNorm2d = per-pixel normalisation over channels, eps 1e-6, affine."""
    norm = _randomise(LayerNorm2d(6), 15).to(dtype)
    assert norm.eps == 1e-6 and set(norm.state_dict()) == {"weight", "bias"}
    x = _data(2, 6, 5, 4, seed=16, dtype=dtype) * 3 + 1
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    want = (x - mean) / torch.sqrt(var + 1e-6) * norm.weight[:, None, None]
    want = want + norm.bias[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(norm(x), want, rtol=0, atol=TOL[dtype])


def test_mlp_formula() -> None:
    mlp = _randomise(MLP(D, 8, 3), 17)
    x = torch.randn(4, D)
    want = x
    for i, layer in enumerate(mlp.layers):
        want = want @ layer.weight.T + layer.bias
        want = want if i == 2 else want.clamp(min=0)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), want, rtol=0, atol=1e-6)
    assert [tuple(layer.weight.shape) for layer in mlp.layers] == [(D, D), (D, D), (8, D)]


def test_sine_position_embedding_values() -> None:
    pe = sine_position_embedding(4, 6, 16)  # [24, 16] = [y(8) | x(8)], sin/cos interleaved
    y = 2 / (4 + 1e-6) * 2 * math.pi  # row 1 -> cumsum 2
    x = 5 / (6 + 1e-6) * 2 * math.pi  # col 4 -> cumsum 5
    cell = pe[1 * 6 + 4]
    assert pe.shape == (24, 16) and pe.dtype == torch.float32
    assert math.isclose(cell[0].item(), math.sin(y), abs_tol=1e-6)
    assert math.isclose(cell[1].item(), math.cos(y), abs_tol=1e-6)
    assert math.isclose(cell[2].item(), math.sin(y / 10000 ** (2 / 8)), abs_tol=1e-6)
    assert math.isclose(cell[8].item(), math.sin(x), abs_tol=1e-6)
    assert math.isclose(cell[9].item(), math.cos(x), abs_tol=1e-6)
