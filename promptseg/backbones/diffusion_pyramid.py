"""ODISE's diffusion backbone: Stable Diffusion UNet + VAE taps over sliding windows -> a pyramid.

The padded image is cut into square windows of side min(window, H, W), stride = side (the last
one per axis shifted back to end at the border), each resized to `window` (bicubic, no antialias)
when smaller. Per window:
the implicit captioner turns the window's CLIP image embedding (supplied by the model) into the
UNet's text conditioning and a time-embedding offset; the VAE encodes the window (posterior
mean), the fixed seed-42 noise is added at t = 0, the UNet runs once, and the VAE decoder runs on
the clean latent. Eight block inputs are tapped (2 VAE encoder, 4 UNet decoder, 2 VAE decoder),
resized nearest to the window's grid at their stride (clamped to 4..32), projected by GroupNorm
bottleneck blocks and summed per stride. Windows are averaged where they overlap.

The UNet and VAE are stock diffusers models, frozen; only the captioner and the projections are
trained. All windows of all images go through one UNet call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor, nn

from ..contracts import FeatureInfo
from ..registry import register_backbone
from .diffusers_unet import BlockInputs, DiffusersUNet

__all__ = [
    "DiffusionPyramid",
    "ImplicitCaptioner",
    "BottleneckProjection",
    "window_boxes",
    "fixed_noise",
    "noise_scales",
    "average_windows",
]

CONTEXT_TOKENS = 77  # SD v1's text-encoder length: tokens of the captioner's conditioning
NOISE_SEED = 42
GROUPS = 32  # GroupNorm groups of the projections (detectron2 "GN")
MIN_STRIDE, MAX_STRIDE = 4, 32
LEVELS = {4: "res2", 8: "res3", 16: "res4", 32: "res5"}
# SD v1's `ldm_linear` noise schedule
BETA_START, BETA_END, TRAIN_STEPS = 0.00085, 0.012, 1000


# ----------------------------------------------------------------------------------------------
# small pure functions


def window_starts(length: int, size: int) -> list[int]:
    """Starts of windows of `size` covering [0, length) with stride `size`; the last one is
    shifted back to end at `length` (so it overlaps its neighbour)."""
    count = max(length - 1, 0) // size + 1
    return [min(i * size + size, length) - size for i in range(count)]


def window_boxes(height: int, width: int, window: int) -> list[tuple[int, int, int, int]]:
    """ODISE's sliding windows (y1, y2, x1, x2) over a padded height x width image, row-major:
    squares of side c = min(window, height, width), stride c, last ones shifted back."""
    side = min(window, height, width)
    return [
        (y, y + side, x, x + side)
        for y in window_starts(height, side)
        for x in window_starts(width, side)
    ]


def fixed_noise(channels: int, size: int) -> Tensor:
    """The latent noise ODISE adds to every window: seed-42 CPU normal [1, channels, size, size]
    (regenerated here; the reference does not store it)."""
    generator = torch.Generator().manual_seed(NOISE_SEED)
    return torch.randn(1, channels, size, size, generator=generator)


def noise_scales(timestep: int = 0) -> tuple[float, float]:
    """q_sample's (sqrt(abar_t), sqrt(1 - abar_t)) of SD's ldm_linear schedule, computed in
    float64 and rounded to float32 as the reference's buffers are."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, TRAIN_STEPS, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, dim=0)[timestep]
    return float(abar.sqrt().float()), float((1 - abar).sqrt().float())


def clamped_stride(stride: int) -> int:
    """A tap's stride clamped to the pyramid's range 4..32."""
    return min(max(stride, MIN_STRIDE), MAX_STRIDE)


def average_windows(
    features: Tensor, boxes: list[tuple[int, int, int, int]], size: tuple[int, int], stride: int
) -> Tensor:
    """Per-window maps [B * n, C, side/s, side/s] (image-major, n = len(boxes)) of images of
    `size` (H, W) -> [B, C, H/s, W/s], each cell the mean of the windows covering it."""
    grid = (size[0] // stride, size[1] // stride)
    per_image = features.unflatten(0, (-1, len(boxes)))
    out = features.new_zeros(per_image.shape[0], features.shape[1], *grid)
    count = features.new_zeros(grid)
    for k, (y1, y2, x1, x2) in enumerate(boxes):
        rows, cols = slice(y1 // stride, y2 // stride), slice(x1 // stride, x2 // stride)
        out[:, :, rows, cols] += per_image[:, k]
        count[rows, cols] += 1
    return out / count


@contextmanager
def added_to_output(module: nn.Module, offset: Tensor) -> Iterator[None]:
    """While open, `module`'s output has `offset` added (the UNet time embedding + cond_emb)."""
    handle = module.register_forward_hook(lambda _m, _args, out: out + offset.to(out.dtype))
    try:
        yield
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------------
# trainable parts


class PositionalLinear(nn.Module):
    """Linear projection of one vector to a sequence: x [N, in] -> linear(x) + table [N, L, out]."""

    def __init__(self, in_features: int, out_features: int, length: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.positional_embedding = nn.Parameter(torch.zeros(1, length, out_features))
        nn.init.trunc_normal_(self.positional_embedding, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)[:, None] + self.positional_embedding


class ImplicitCaptioner(nn.Module):
    """CLIP image embedding -> UNet text conditioning and time-embedding offset.

    cond = U + tanh(alpha_cond) * (W_c e + b_c + P_c); cond_emb = tanh(alpha_t) * (W_t e + b_t +
    P_t). Both gates start at zero, so training starts from the empty prompt U.
    """

    def __init__(self, caption_dim: int, context_dim: int, time_dim: int) -> None:
        super().__init__()
        self.clip_project = PositionalLinear(caption_dim, context_dim, CONTEXT_TOKENS)
        self.alpha_cond = nn.Parameter(torch.zeros(1, CONTEXT_TOKENS, context_dim))
        self.time_embed_project = PositionalLinear(caption_dim, time_dim, 1)
        self.alpha_cond_time_embed = nn.Parameter(torch.zeros(time_dim))

    def forward(self, embedding: Tensor, text_embedding: Tensor) -> tuple[Tensor, Tensor]:
        """embedding [N, caption_dim], empty-prompt text_embedding [1, 77, context_dim] ->
        cond [N, 77, context_dim], cond_emb [N, time_dim]."""
        cond = text_embedding + self.alpha_cond.tanh() * self.clip_project(embedding)
        cond_emb = self.alpha_cond_time_embed.tanh() * self.time_embed_project(embedding)[:, 0]
        return cond, cond_emb


class ConvNorm(nn.Conv2d):
    """Bias-free conv -> GroupNorm(32) stored as `.norm` (detectron2's Conv2d key layout)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
        )
        self.norm = nn.GroupNorm(GROUPS, out_channels)
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(super().forward(x))


class BottleneckProjection(nn.Module):
    """ResNet bottleneck with GroupNorm projecting one tap to the pyramid width:
    1x1 -> 3x3 -> 1x1 (width/4 inside), shortcut 1x1 only when the channels change."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        inner = out_channels // 4
        self.conv1 = ConvNorm(in_channels, inner, 1)
        self.conv2 = ConvNorm(inner, inner, 3)
        self.conv3 = ConvNorm(inner, out_channels, 1)
        self.shortcut = (
            ConvNorm(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        """x [N, C_in, h, w] -> [N, out_channels, h, w]."""
        out = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


# ----------------------------------------------------------------------------------------------
# the backbone


@register_backbone("diffusion_pyramid")
class DiffusionPyramid(DiffusersUNet):
    """Frozen SD UNet + VAE over sliding windows, implicit captioner, GN projections -> pyramid."""

    provides = ("pyramid",)

    def __init__(
        self,
        unet: Mapping[str, Any],
        vae: Mapping[str, Any],
        *,
        caption_dim: int = 768,
        window: int = 512,
        projection_dim: int = 512,
        output: str | None = None,
    ) -> None:
        super().__init__(unet, output=output, frozen=True)
        self.vae = AutoencoderKL.from_config(dict(vae)).requires_grad_(False)
        if projection_dim % (4 * GROUPS):
            raise ValueError(
                f"projection_dim must be a multiple of {4 * GROUPS} (its bottleneck, a quarter of "
                f"it, is group-normalised in {GROUPS} groups), got {projection_dim}; a toy "
                f"config can use {4 * GROUPS}"
            )
        vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        unet_factor = 2 ** (len(self.unet.config.down_block_types) - 1)
        if window % (vae_factor * unet_factor):
            raise ValueError(
                f"window must be divisible by the VAE's and the UNet's downsampling together "
                f"({vae_factor} x {unet_factor}), got {window}"
            )
        self.window = window
        self.projection_dim = projection_dim
        self.captioner = ImplicitCaptioner(
            caption_dim,
            int(self.unet.config.cross_attention_dim),
            self.unet.time_embedding.linear_2.out_features,
        )
        self.tap_blocks, strides = self._tap_blocks(vae_factor, unet_factor)
        self.tap_strides = tuple(clamped_stride(s) for s in strides)
        if sorted(set(self.tap_strides)) != sorted(LEVELS):
            raise ValueError(
                f"the taps' clamped strides {self.tap_strides} must cover {sorted(LEVELS)}; "
                "ODISE needs a 4-level VAE (stride-8 latent) and a UNet with 4 down blocks"
            )
        self.feature_projections = nn.ModuleList(
            BottleneckProjection(block.in_channels, projection_dim) for block in self.tap_blocks
        )
        latent_size = window // vae_factor
        noise = fixed_noise(int(self.vae.config.latent_channels), latent_size)
        self.register_buffer("noise", noise, persistent=False)

    def _tap_blocks(self, vae_factor: int, unet_factor: int) -> tuple[list[nn.Module], list[int]]:
        """The 8 tapped resnets (their inputs are the taps) and their pixel strides."""
        encoder, decoder = self.vae.encoder.down_blocks, self.vae.decoder.up_blocks
        up = self.unet.up_blocks
        if len(encoder) < 4 or len(up) < 4:
            raise ValueError(
                f"ODISE taps VAE encoder levels 2 and 3 and four UNet up blocks; this VAE has "
                f"{len(encoder)} levels and this UNet {len(up)} up blocks"
            )
        blocks = [encoder[2].resnets[-1], encoder[3].resnets[-1]]
        strides = [2**2, 2**3]  # encoder level i runs at stride 2^i
        blocks += [up[i].resnets[-1] for i in range(4)]
        strides += [vae_factor * unet_factor // 2**i for i in range(4)]
        blocks += [decoder[0].resnets[-1], decoder[1].resnets[-1]]
        strides += [vae_factor, vae_factor // 2]
        return blocks, strides

    @property
    def feature_info(self) -> FeatureInfo:
        keys = tuple(LEVELS.values())
        return FeatureInfo("pyramid", keys, (self.projection_dim,) * 4, tuple(LEVELS))

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def train(self, mode: bool = True) -> DiffusionPyramid:
        super().train(mode)
        self.unet.eval()
        self.vae.eval()
        return self

    def window_taps(self, windows: Tensor, cond: Tensor, cond_emb: Tensor) -> list[Tensor]:
        """The 8 raw taps of windows [N, 3, window, window] in [0, 1] under conditioning cond
        [N, 77, context_dim] and cond_emb [N, time_dim], in tap order."""
        vae, dtype = self.vae, self.dtype
        x = ((windows - 0.5) / 0.5).to(dtype)
        with BlockInputs(self.tap_blocks[:2]) as encoder_taps:
            moments = vae.encoder(x)
        if vae.quant_conv is not None:
            moments = vae.quant_conv(moments)
        mean = moments.chunk(2, dim=1)[0]  # posterior mean, [N, 4, w/8, w/8]
        latent = vae.config.scaling_factor * mean
        signal_scale, noise_scale = noise_scales(0)
        noisy = signal_scale * latent + noise_scale * self.noise.to(dtype)
        with (
            BlockInputs(self.tap_blocks[2:6], stop=True) as unet_taps,
            added_to_output(self.unet.time_embedding, cond_emb),
        ):
            self.unet(noisy, 0, encoder_hidden_states=cond.to(dtype))
        clean = mean if vae.post_quant_conv is None else vae.post_quant_conv(mean)
        with BlockInputs(self.tap_blocks[6:], stop=True) as decoder_taps:
            vae.decoder(clean)  # decodes z0 / scaling_factor = the posterior mean
        return [*encoder_taps.inputs, *unet_taps.inputs, *decoder_taps.inputs]

    def project_taps(self, taps: list[Tensor], side: int) -> dict[str, Tensor]:
        """Taps of windows of `side` pixels -> per-window pyramid {res2..res5: [N, P, side/s,
        side/s]}: nearest resize to side // s, projection, sum per stride in tap order."""
        levels: dict[str, Tensor] = {}
        for tap, stride, projection in zip(
            taps, self.tap_strides, self.feature_projections, strict=True
        ):
            size = (side // stride, side // stride)
            if tap.shape[-2:] != size:
                tap = F.interpolate(tap, size=size, mode="nearest")
            name = LEVELS[stride]
            projected = projection(tap)
            levels[name] = projected if name not in levels else levels[name] + projected
        return {name: levels[name] for name in LEVELS.values()}

    def forward_features(
        self,
        pixels: Tensor,
        *,
        image_embedder: Callable[[Tensor], Tensor],
        text_embedding: Tensor,
    ) -> dict[str, Tensor]:
        """pixels [B, 3, Hp, Wp] in [0, 1] (padded), image_embedder(windows [N, 3, w, w] in
        [0, 1]) -> [N, caption_dim], empty-prompt text_embedding [1, 77, context_dim] ->
        {res2..res5: [B, projection_dim, Hp/s, Wp/s]} for s = 4, 8, 16, 32."""
        b, _, height, width = pixels.shape
        if height % MAX_STRIDE or width % MAX_STRIDE:
            raise ValueError(
                f"pixels must be padded to multiples of {MAX_STRIDE} (ODISE pads bottom/right to "
                f"multiples of 64), got {height}x{width}"
            )
        context = self.captioner.alpha_cond.shape[1:]
        if tuple(text_embedding.shape) != (1, *context):
            raise ValueError(
                f"text_embedding must be the empty-prompt embedding [1, {context[0]}, "
                f"{context[1]}], got {list(text_embedding.shape)}"
            )
        boxes = window_boxes(height, width, self.window)
        side = boxes[0][1] - boxes[0][0]
        windows = torch.stack(
            [pixels[i, :, y1:y2, x1:x2] for i in range(b) for y1, y2, x1, x2 in boxes]
        ).float()  # [B * n, 3, side, side]
        if side != self.window:
            size = (self.window, self.window)
            windows = F.interpolate(windows, size=size, mode="bicubic", align_corners=False)
        embedding = image_embedder(windows).to(self.dtype)
        if embedding.shape != (len(windows), self.captioner.clip_project.linear.in_features):
            raise ValueError(
                f"image_embedder must return [{len(windows)}, "
                f"{self.captioner.clip_project.linear.in_features}] (one embedding per window), "
                f"got {list(embedding.shape)}"
            )
        cond, cond_emb = self.captioner(embedding, text_embedding.to(self.dtype))
        per_window = self.project_taps(self.window_taps(windows, cond, cond_emb), side)
        size = (height, width)
        return {
            name: average_windows(per_window[name].float(), boxes, size, stride).to(self.dtype)
            for stride, name in LEVELS.items()
        }
