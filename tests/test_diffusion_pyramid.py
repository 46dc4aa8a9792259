"""ODISE's diffusion backbone (specs/odise.md §2-§3): window layout, noise and schedule check
values, the taps of a stock diffusers UNet + VAE, the cond_emb injection, projection into the
pyramid, averaging of overlapping windows, batching, dtype and trainable parts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from promptseg.backbones.diffusers_unet import BlockInputs
from promptseg.backbones.diffusion_pyramid import (
    DiffusionPyramid,
    average_windows,
    fixed_noise,
    noise_scales,
    window_boxes,
)

TINY_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 32, 64, 96],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 64, 128, 128],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 8,
}
# width 256: a bottleneck of 64 = 2 channels per GroupNorm group (ODISE: 4). With 1, the
# projection of the 1x1 UNet tap (nearest-upsampled, spatially constant) has zero variance per
# group and turns float noise into output
CAPTION_DIM, WINDOW, WIDTH = 24, 64, 256
# tap channels: VAE encoder levels 2, 3; UNet up blocks, h + skip (the downsampler of the level
# below, or conv_in): 96+64, 64+32, 32+32, 32+32 (SD: 1280+1280, 1280+640, 640+320, 320+320);
# VAE decoder up blocks 0, 1
TAP_CHANNELS = (128, 128, 160, 96, 64, 64, 128, 128)
TAP_STRIDES = (4, 8, 32, 32, 16, 8, 8, 4)  # UNet up block 0 runs at stride 64, clamped
# batch size changes the float rounding (~1e-6 in the taps); the projections' per-channel
# GroupNorm over 2x2..16x16 maps amplifies it (outputs up to ~10)
BATCH_ATOL = 1e-4


@pytest.fixture(scope="module")
def backbone() -> DiffusionPyramid:
    torch.manual_seed(0)
    model = DiffusionPyramid(
        TINY_UNET, TINY_VAE, caption_dim=CAPTION_DIM, window=WINDOW, projection_dim=WIDTH
    ).eval()
    with torch.no_grad():  # open the zero-initialised gates so the captioner matters
        model.captioner.alpha_cond.fill_(0.5)
        model.captioner.alpha_cond_time_embed.fill_(0.5)
    return model


class Embedder(nn.Module):
    """A stand-in for the model's CLIP image embedding: pooled pixels -> linear; records calls."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 16, CAPTION_DIM)
        self.calls: list[torch.Tensor] = []

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        self.calls.append(windows)
        return self.proj(F.adaptive_avg_pool2d(windows, 4).flatten(1))


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    torch.manual_seed(1)
    return Embedder().requires_grad_(False)


@pytest.fixture(scope="module")
def empty_prompt() -> torch.Tensor:
    return torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(2))


def image(b: int, h: int, w: int, seed: int = 3) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def run(backbone, embedder, empty_prompt, pixels):
    with torch.no_grad():
        return backbone(pixels, image_embedder=embedder, text_embedding=empty_prompt)


# ----------------------------------------------------------------------------------------------
# pure functions


def test_window_layout_of_the_spec_example_and_of_a_short_image():
    boxes = window_boxes(1024, 1408, 512)
    assert len(boxes) == 6
    assert sorted({(y1, y2) for y1, y2, _, _ in boxes}) == [(0, 512), (512, 1024)]
    assert [(x1, x2) for _, _, x1, x2 in boxes[:3]] == [(0, 512), (512, 1024), (896, 1408)]
    assert boxes[3] == (512, 1024, 0, 512)  # row-major
    # shorter side below the window: squares of that side, stride = side
    assert window_boxes(448, 960, 512) == [(0, 448, 0, 448), (0, 448, 448, 896), (0, 448, 512, 960)]
    assert window_boxes(512, 512, 512) == [(0, 512, 0, 512)]


def test_fixed_noise_check_values_at_512():
    noise = fixed_noise(4, 64)
    assert noise.shape == (1, 4, 64, 64) and noise.dtype == torch.float32
    assert noise.flatten()[:4].tolist() == pytest.approx(
        [1.9269153, 1.4872841, 0.9007172, -2.1055210], abs=1e-7
    )
    assert noise.double().sum().item() == pytest.approx(149.76482, abs=1e-4)


def test_noise_scales_of_the_ldm_linear_schedule_at_t0():
    signal, noise = noise_scales(0)
    assert signal == pytest.approx(0.9995749096, abs=1e-7)
    assert noise == pytest.approx(0.0291547595, abs=1e-9)
    for value in (signal, noise):  # float32 values, as the reference's buffers
        assert torch.tensor(value, dtype=torch.float32).item() == value


def test_average_windows_averages_only_where_windows_overlap():
    boxes = window_boxes(4, 10, 4)
    assert [(x1, x2) for _, _, x1, x2 in boxes] == [(0, 4), (4, 8), (6, 10)]
    per_window = torch.tensor([1.0, 2.0, 4.0]).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    out = average_windows(per_window, boxes, (4, 10), stride=2)  # grid 2 x 5
    assert out.shape == (1, 1, 2, 5)
    assert out[0, 0, 0].tolist() == [1.0, 1.0, 2.0, (2.0 + 4.0) / 2, 4.0]  # cells 0-1, 2-3, 3-4


# ----------------------------------------------------------------------------------------------
# structure


def test_modules_keys_and_trainable_parts(backbone):
    fresh = DiffusionPyramid(
        TINY_UNET, TINY_VAE, caption_dim=CAPTION_DIM, window=WINDOW, projection_dim=128
    )
    assert fresh.captioner.alpha_cond.abs().sum() == 0
    assert fresh.captioner.alpha_cond_time_embed.abs().sum() == 0
    state = fresh.state_dict()
    assert {k.split(".")[0] for k in state} == {"unet", "vae", "captioner", "feature_projections"}
    time_dim = fresh.unet.time_embedding.linear_2.out_features
    shapes = {k[len("captioner.") :]: tuple(v.shape) for k, v in state.items() if "captioner" in k}
    assert shapes == {
        "alpha_cond": (1, 77, 32),
        "clip_project.positional_embedding": (1, 77, 32),
        "clip_project.linear.weight": (32, CAPTION_DIM),
        "clip_project.linear.bias": (32,),
        "alpha_cond_time_embed": (time_dim,),
        "time_embed_project.positional_embedding": (1, 1, time_dim),
        "time_embed_project.linear.weight": (time_dim, CAPTION_DIM),
        "time_embed_project.linear.bias": (time_dim,),
    }
    assert len(fresh.feature_projections) == 8
    for i, channels in enumerate(TAP_CHANNELS):  # width 128: taps 0, 1, 6, 7 need no shortcut
        names = ["conv1", "conv2", "conv3"] + (["shortcut"] if i in (2, 3, 4, 5) else [])
        expected = {f"{c}.{p}" for c in names for p in ("weight", "norm.weight", "norm.bias")}
        prefix = f"feature_projections.{i}."
        assert {k[len(prefix) :] for k in state if k.startswith(prefix)} == expected
        assert state[prefix + "conv1.weight"].shape == (32, channels, 1, 1)
        assert state[prefix + "conv2.weight"].shape == (32, 32, 3, 3)
        assert state[prefix + "conv3.weight"].shape == (128, 32, 1, 1)
        assert state[prefix + "conv1.norm.weight"].shape == (32,)
    assert "noise" not in state and fresh.noise.shape == (1, 4, 8, 8)
    assert torch.equal(fresh.noise, fixed_noise(4, 8))
    assert not any(p.requires_grad for p in [*fresh.unet.parameters(), *fresh.vae.parameters()])
    trainable = [*fresh.captioner.parameters(), *fresh.feature_projections.parameters()]
    assert all(p.requires_grad for p in trainable)
    assert sum(p.numel() for p in fresh.parameters() if p.requires_grad) == sum(
        p.numel() for p in trainable
    )
    info = backbone.feature_info
    assert info.kind == "pyramid" and info.keys == ("res2", "res3", "res4", "res5")
    assert info.channels == (WIDTH,) * 4 and info.strides == (4, 8, 16, 32)
    assert backbone.tap_strides == TAP_STRIDES
    fresh.train()
    assert fresh.captioner.training and not fresh.unet.training and not fresh.vae.training


def test_invalid_arguments_say_what_to_do(backbone, embedder, empty_prompt):
    with pytest.raises(ValueError, match="multiple of 128"):
        DiffusionPyramid(TINY_UNET, TINY_VAE, projection_dim=100)
    with pytest.raises(ValueError, match="divisible"):
        DiffusionPyramid(TINY_UNET, TINY_VAE, window=96)
    with pytest.raises(ValueError, match="padded to multiples of 32"):
        run(backbone, embedder, empty_prompt, image(1, 64, 80))
    with pytest.raises(ValueError, match=r"empty-prompt embedding \[1, 77, 32\]"):
        run(backbone, embedder, empty_prompt[:, :10], image(1, 64, 64))


# ----------------------------------------------------------------------------------------------
# taps


def conditioning(backbone, n: int, seed: int = 4):
    g = torch.Generator().manual_seed(seed)
    time_dim = backbone.unet.time_embedding.linear_2.out_features
    return torch.randn(n, 77, 32, generator=g), torch.randn(n, time_dim, generator=g)


def test_taps_shapes_and_early_stop(backbone):
    windows = image(2, WINDOW, WINDOW)
    cond, cond_emb = conditioning(backbone, 2)
    calls = []
    late = [backbone.unet.conv_out, backbone.unet.up_blocks[3].resnets[-1]]
    late += [backbone.vae.decoder.up_blocks[2], backbone.vae.decoder.conv_out]
    handles = [m.register_forward_hook(lambda m, a, o: calls.append(m)) for m in late]
    try:
        with torch.no_grad():
            taps = backbone.window_taps(windows, cond, cond_emb)
    finally:
        for h in handles:
            h.remove()
    sizes = [16, 8, 1, 2, 4, 8, 8, 16]  # 64 window: encoder /4 /8, UNet /64../8, decoder /8 /4
    assert [tuple(t.shape) for t in taps] == [
        (2, c, s, s) for c, s in zip(TAP_CHANNELS, sizes, strict=True)
    ]
    assert calls == []  # nothing after the last tap of the UNet and of the decoder ran
    assert all(not block._forward_pre_hooks for block in backbone.tap_blocks)
    assert not backbone.unet.time_embedding._forward_hooks


def test_cond_emb_added_after_the_time_mlp_equals_class_label_route(backbone):
    """The hook on the time embedding == diffusers' class-embedding route (Identity + labels)."""
    windows = image(2, WINDOW, WINDOW)
    cond, cond_emb = conditioning(backbone, 2)
    with torch.no_grad():
        taps = backbone.window_taps(windows, cond, cond_emb)
        without = backbone.window_taps(windows, cond, torch.zeros_like(cond_emb))
        vae = backbone.vae
        moments = vae.quant_conv(vae.encoder(windows * 2 - 1))
        latent = 0.18215 * moments[:, :4]
        noisy = 0.9995749096 * latent + 0.0291547595 * fixed_noise(4, 8)
        unet = copy.deepcopy(backbone.unet)
        unet.class_embedding = nn.Identity()
        with BlockInputs([b.resnets[-1] for b in unet.up_blocks]) as reference:
            unet(noisy, 0, encoder_hidden_states=cond, class_labels=cond_emb)
    for ours, theirs in zip(taps[2:6], reference.inputs, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (taps[2] - without[2]).abs().max() > 1e-2  # cond_emb matters
    for i in (0, 1, 6, 7):  # VAE taps do not depend on the conditioning
        torch.testing.assert_close(taps[i], without[i], atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# the pyramid


def test_pyramid_shapes_for_a_padded_128x192_input(backbone, embedder, empty_prompt):
    embedder.calls.clear()
    out = run(backbone, embedder, empty_prompt, image(1, 128, 192))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "res2": (1, WIDTH, 32, 48),
        "res3": (1, WIDTH, 16, 24),
        "res4": (1, WIDTH, 8, 12),
        "res5": (1, WIDTH, 4, 6),
    }
    assert [tuple(w.shape) for w in embedder.calls] == [(6, 3, WINDOW, WINDOW)]  # one batch
    assert all(torch.isfinite(v).all() and v.min() >= 0 for v in out.values())  # after a ReLU


def test_overlapping_windows_are_averaged(backbone, embedder, empty_prompt):
    pixels = image(1, 64, 160)  # windows at columns [0, 64), [64, 128), [96, 160)
    out = run(backbone, embedder, empty_prompt, pixels)
    crops = [run(backbone, embedder, empty_prompt, pixels[..., x : x + 64]) for x in (0, 64, 96)]
    for name, stride in zip(("res2", "res3", "res4", "res5"), (4, 8, 16, 32), strict=True):
        a, half = 64 // stride, 32 // stride
        f0, f1, f2 = (c[name] for c in crops)
        expected = torch.cat(
            [f0, f1[..., :half], (f1[..., half:] + f2[..., :half]) / 2, f2[..., half:]], dim=-1
        )
        assert expected.shape[-1] == 160 // stride and a == 2 * half
        torch.testing.assert_close(out[name], expected, atol=BATCH_ATOL, rtol=0)


def test_a_window_smaller_than_the_window_size_is_upsampled(backbone, embedder, empty_prompt):
    pixels = image(1, 32, 64)  # side 32: two 32x32 windows, each resized to 64
    embedder.calls.clear()
    out = run(backbone, embedder, empty_prompt, pixels)
    crops = torch.cat([pixels[..., :32], pixels[..., 32:]])
    upsampled = F.interpolate(crops, size=(64, 64), mode="bicubic", align_corners=False)
    (seen,) = embedder.calls
    torch.testing.assert_close(seen, upsampled, atol=0, rtol=0)
    with torch.no_grad():
        cond, cond_emb = backbone.captioner(embedder(upsampled), empty_prompt)
        per_window = backbone.project_taps(backbone.window_taps(upsampled, cond, cond_emb), 32)
    for name, stride in zip(("res2", "res3", "res4", "res5"), (4, 8, 16, 32), strict=True):
        assert out[name].shape[-2:] == (32 // stride, 64 // stride)
        expected = torch.cat([per_window[name][:1], per_window[name][1:]], dim=-1)
        torch.testing.assert_close(out[name], expected, atol=BATCH_ATOL, rtol=0)


def test_two_images_equal_two_single_runs(backbone, embedder, empty_prompt):
    pixels = torch.cat([image(1, 64, 128, seed=5), image(1, 64, 128, seed=6)])
    both = run(backbone, embedder, empty_prompt, pixels)
    for i in range(2):
        single = run(backbone, embedder, empty_prompt, pixels[i : i + 1])
        for name in both:
            torch.testing.assert_close(both[name][i : i + 1], single[name], atol=BATCH_ATOL, rtol=0)


def test_gradients_reach_captioner_and_projections_only(backbone, embedder, empty_prompt):
    model = copy.deepcopy(backbone).train()
    out = model(image(1, 64, 64), image_embedder=embedder, text_embedding=empty_prompt)
    sum(v.square().mean() for v in out.values()).backward()
    for name, p in [
        *model.captioner.named_parameters(),
        *model.feature_projections.named_parameters(),
    ]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for p in [*model.unet.parameters(), *model.vae.parameters()]:
        assert not p.requires_grad and p.grad is None


def test_bfloat16_follows_the_module(backbone, embedder, empty_prompt):
    pixels = image(1, 64, 64)
    reference = run(backbone, embedder, empty_prompt, pixels)
    half = copy.deepcopy(backbone).to(torch.bfloat16)
    out = run(half, lambda w: embedder(w.float()), empty_prompt, pixels)
    with torch.no_grad():
        cond = backbone.captioner(embedder(pixels), empty_prompt)
        taps = backbone.window_taps(pixels, *cond)
        half_taps = half.window_taps(pixels, *(c.bfloat16() for c in cond))
    for ours, theirs in zip(taps, half_taps, strict=True):
        assert theirs.dtype == torch.bfloat16
        assert (theirs.float() - ours).norm() / ours.norm() < 0.03  # bf16: ~1.5 %
    for name, value in out.items():
        assert value.dtype == torch.bfloat16
        assert F.cosine_similarity(value.float().flatten(), reference[name].flatten(), 0) > 0.99
