"""DiffewS (Zhu et al., 2024): few-shot segmentation as one-step image-to-mask diffusion.

    backbone = diffusers_unet  (backbones/diffusers_unet.py; stock UNet2DConditionModel, trained)
    vae      = AutoencoderKL   (diffusers; frozen, kept in float32)
    + conv_in_ref              (the reference input conv: [image latent ; mask latent] -> UNet)

References ("supports") go through the UNet with `conv_in_ref`; every self-attention layer stores
their keys and values (the K/V bank, layers/kv_bank.py). The query goes through the stock
`conv_in` and attends to [own tokens ; all shots' tokens]. The UNet's output at t = 1 is the
negated mask latent; the VAE decodes it and the mask is the channel mean above a threshold
relative to the map's maximum. The bank is this family's prompt embedding: encoded once per
support set, reused for any number of query images. Text conditioning is the constant embedding
of the empty prompt (`empty_prompt_embedding`), stored with the weights.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor, nn

from ..imageio import load_image, load_mask
from ..layers.kv_bank import KVBank, kv_bank_processors
from ..prompt_files import read_prompt_file, tensors_sha256, warn_other_model
from ..prompts import Prompt, SupportSet, VisualPrompt, reference_label
from ..registry import lookup, register_model
from ..result import SegmentationResult
from ..transforms import resize_logits, resize_mask
from .base import ImageEmbedding, PromptSegModel

__all__ = ["DiffewS", "SupportBank", "quantized_map", "relative_threshold"]

TIMESTEP = 1  # constant, training and test
PROMPT_FORMAT = "promptseg.diffews_support"


@dataclass
class SupportBank:
    """One support set: its latents [K, 8, h, w] ([image ; mask] per shot) and, once a UNet pass
    has run them, the keys and values [K, N_l, C_l] of every self-attention layer.

    The first query decoded against a bank runs one fused UNet call [query ; supports] and keeps
    the references' keys and values; every later query only runs its own pass against them.
    """

    latents: Tensor
    layers: dict[str, tuple[Tensor, Tensor]] | None = None

    @property
    def shots(self) -> int:
        return int(self.latents.shape[0])


def quantized_map(decoded: Tensor) -> Tensor:
    """VAE output [B, 3, H, W] in ~[-1, 1] -> the official map P in [0, 1]: clamp, scale to
    0..255, floor to uint8 (numpy `astype`), /255."""
    p = 255.0 * (0.5 * decoded.clamp(-1, 1) + 0.5)
    return torch.floor(p.clamp(0, 255)) / 255.0


def relative_threshold(p: Tensor, tau: float) -> Tensor:
    """The official relative threshold of maps P [B, 3, H, W]: tau x the maximum over all three
    channels and every pixel (not over the channel mean) -> [B]. A pixel is foreground when the
    channel mean is strictly above it, so an all-zero map gives an empty mask."""
    return tau * p.flatten(1).amax(dim=1)


class _InputConvs(nn.Module):
    """UNet input conv for a batch [queries ; references]: `conv_in` on the first `n_query` rows
    (their first `query_channels` channels), `conv_in_ref` on the rest."""

    def __init__(self, conv_in: nn.Conv2d, conv_in_ref: nn.Conv2d, n_query: int) -> None:
        super().__init__()
        self.conv_in, self.conv_in_ref, self.n_query = conv_in, conv_in_ref, n_query

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv_in.in_channels
        if self.n_query == 0:
            return self.conv_in_ref(x)
        if self.n_query == x.shape[0]:
            return self.conv_in(x[:, :c])
        n = self.n_query
        return torch.cat([self.conv_in(x[:n, :c]), self.conv_in_ref(x[n:])])


@register_model("diffews")
class DiffewS(PromptSegModel):
    """One-shot and k-shot references -> one mask per support set (relative threshold)."""

    levels = ("semantic",)
    default_threshold = 0.25  # relative: tau_r x the map's maximum
    threshold_meaning = "relative: a pixel is kept above this fraction of the decoded map's maximum"
    fp32_modules = ("vae",)
    input_component = {"default": "vae"}
    image_cache_size = 2

    def __init__(self, card: Any) -> None:
        super().__init__(card)
        cfg = card.config
        backbone = dict(cfg["backbone"])
        self.backbone = lookup("backbone", backbone.pop("name"))(output="unet_taps", **backbone)
        self.vae = AutoencoderKL.from_config(dict(cfg["vae"])).requires_grad_(False)
        conv_in = self.backbone.unet.conv_in
        self.conv_in_ref = nn.Conv2d(
            2 * conv_in.in_channels, conv_in.out_channels, conv_in.kernel_size, padding=1
        )
        with torch.no_grad():  # official init: conv_in repeated over both latents, halved
            self.conv_in_ref.weight.copy_(torch.cat([conv_in.weight] * 2, dim=1) / 2)
            self.conv_in_ref.bias.copy_(conv_in.bias)
        length, width = cfg["text_tokens"], self.backbone.unet.config.cross_attention_dim
        self.register_buffer("empty_prompt_embedding", torch.zeros(1, length, width))
        self.threshold_mode = cfg.get("threshold_mode", "relative")
        if self.threshold_mode not in ("relative", "absolute"):
            raise ValueError(
                f"threshold_mode must be 'relative' or 'absolute', got {self.threshold_mode!r}"
            )
        self.scaling = float(self.vae.config.scaling_factor)
        self.bank = KVBank()
        self.backbone.set_attention_processor(kv_bank_processors(self.backbone.unet, self.bank))

    # -- latents ------------------------------------------------------------------------------
    def latents(
        self, pixels: Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Pixels in [-1, 1] [B, 3, H, W] -> scaled latents [B, 4, H/8, W/8]: the posterior mean
        (inference), or a posterior sample (`sample=True`, as in training)."""
        posterior = self.vae.encode(pixels.float()).latent_dist
        z = posterior.sample(generator) if sample else posterior.mean
        return self.scaling * z

    def encode_image(self, pixels: Tensor, input: str = "default") -> Tensor:
        """The query latent z_q [1, 4, h, w] (cached per image)."""
        return self.latents(pixels)

    def unet_pass(self, x: Tensor, n_query: int, text_context: Tensor | None = None) -> Tensor:
        """One UNet call at t = 1 with the empty prompt (`empty_prompt_embedding`, or another
        [1, L, C] `text_context`, e.g. the 77-token one of training); input convs per row."""
        unet = self.backbone.unet
        conv_in = unet.conv_in
        unet.conv_in = _InputConvs(conv_in, self.conv_in_ref, n_query)
        context = self.empty_prompt_embedding if text_context is None else text_context
        try:
            text = context.expand(x.shape[0], -1, -1).to(self.dtype)
            out = self.backbone.forward_features(
                x.to(self.dtype), timestep=TIMESTEP, encoder_hidden_states=text
            )
        finally:
            unet.conv_in = conv_in
        return out["sample"]

    # -- prompts -------------------------------------------------------------------------------
    def mask_pixels(self, mask: Tensor, size: tuple[int, int]) -> Tensor:
        """bool mask [H, W] -> white-on-black RGB [1, 3, *size] in {-1, +1} (nearest resize),
        what the VAE encodes for a support mask (and a training target)."""
        mask = resize_mask(mask, size).float()
        return (2.0 * mask - 1.0).expand(1, 3, -1, -1).to(self.device)

    def support_latents(self, images: list[Tensor], masks: list[Tensor], **sample: Any) -> Tensor:
        """[z_s ; z_m] [K, 8, h, w] of uint8 images [3, H, W] and bool masks [H, W] (same size):
        image latents, then latents of the masks drawn as +-1 RGB."""
        pixels = torch.cat([self.preprocess(image) for image in images])  # [K, 3, S, S]
        size = tuple(pixels.shape[-2:])
        drawn = torch.cat([self.mask_pixels(mask, size) for mask in masks]).to(pixels)
        return torch.cat([self.latents(pixels, **sample), self.latents(drawn, **sample)], dim=1)

    def _support_latents(self, shots: tuple[VisualPrompt, ...]) -> Tensor:
        """support_latents of prompt shots (loaded, masks resized to their images)."""
        images = [load_image(shot.image) for shot in shots]
        masks = [
            load_mask(s.mask, size=tuple(i.shape[-2:])) for s, i in zip(shots, images, strict=True)
        ]
        return self.support_latents(images, masks)

    @torch.inference_mode()
    def encode_prompt(self, prompts: list[Prompt], level: str | None = None) -> list[SupportBank]:
        """One bank per support set (a VisualPrompt is a 1-shot set): the VAE latents now, the
        keys and values with the first query (or `support_pass`)."""
        banks = []
        for prompt in prompts:
            shots = prompt.shots if isinstance(prompt, SupportSet) else (prompt,)
            if not all(isinstance(s, VisualPrompt) for s in shots):
                raise TypeError(f"DiffewS takes reference images with masks, not {prompt!r}")
            banks.append(SupportBank(self._support_latents(shots)))
        return banks

    def as_prompt_embedding(self, obj: Any) -> list[SupportBank] | None:
        """A SupportBank or a list of them (encode_prompt / load_prompt_embedding) as a batch."""
        if isinstance(obj, SupportBank):
            obj = [obj]
        if isinstance(obj, list | tuple) and obj and all(isinstance(b, SupportBank) for b in obj):
            return [b if b.latents.device == self.device else SupportBank(b.latents.to(self.device))
                    for b in obj]  # fmt: skip
        return None

    def save_prompt_embedding(self, embeddings: Any, path: str | os.PathLike[str]) -> None:
        """Write support sets as safetensors: their latents (the keys and values are recomputed
        within the first query's fused UNet call, at no extra cost)."""
        banks = self.as_prompt_embedding(embeddings)
        if banks is None:
            raise TypeError(
                "expected what encode_prompt returned (a SupportBank or a list of them), got "
                f"{type(embeddings).__name__}"
            )
        tensors = {f"{i}.latents": b.latents.detach().float().cpu().contiguous()
                   for i, b in enumerate(banks)}  # fmt: skip
        meta = {"format": PROMPT_FORMAT, "version": "1", "model": self.card.name,
                "prompts": str(len(banks)), "sha256": tensors_sha256(tensors)}  # fmt: skip
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(tensors, str(path), metadata=meta)

    def load_prompt_embedding(self, path: str | os.PathLike[str]) -> list[SupportBank]:
        """Read support sets written by save_prompt_embedding (checked), on this device."""
        tensors, meta = read_prompt_file(
            path, "DiffewS", PROMPT_FORMAT, "write one with model.save_prompt_embedding"
        )
        if meta.get("version") != "1":
            raise ValueError(f"{path}: unknown DiffewS prompt file version {meta.get('version')!r}")
        if meta.get("sha256") != tensors_sha256(tensors):
            raise ValueError(
                f"{path}: its tensors do not match the checksum written with them (the file was "
                "changed or damaged); encode the references again"
            )
        if not meta.get("prompts", "").isdigit():
            raise ValueError(f"{path}: metadata 'prompts' must be a count, got {meta!r}")
        n, channels = int(meta["prompts"]), 2 * self.backbone.unet.config.in_channels
        keys = [f"{i}.latents" for i in range(n)]
        if n < 1 or sorted(tensors) != sorted(keys):
            raise ValueError(f"{path}: expected tensors {keys}, found {sorted(tensors)}")
        for key in keys:
            t = tensors[key]
            if t.ndim != 4 or t.shape[1] != channels or not t.is_floating_point():
                raise ValueError(
                    f"{path}: {key} must be float latents [shots, {channels}, h, w], got "
                    f"{t.dtype} {tuple(t.shape)}"
                )
            if not torch.isfinite(t).all():
                raise ValueError(f"{path}: {key} holds NaN or infinite values")
        warn_other_model(meta, self.card.name, path)
        return [SupportBank(tensors[k].to(self.device)) for k in keys]

    @torch.inference_mode()
    def support_pass(self, bank: SupportBank) -> SupportBank:
        """Run the references alone (the official first call) and keep their keys and values."""
        if bank.layers is None:
            with self.bank_mode("write"):
                self.unet_pass(bank.latents, n_query=0)
                bank.layers = dict(self.bank.store)
        return bank

    @contextlib.contextmanager
    def bank_mode(self, mode: str, n_query: int = 0, layers: dict | None = None) -> Iterator[None]:
        """The attention layers' K/V bank in `mode` for one UNet call, emptied afterwards."""
        self.bank.store = dict(layers or {})
        self.bank.set_mode(mode, n_query)
        try:
            yield
        finally:
            self.bank.set_mode("off")
            self.bank.clear()

    # -- decode and postprocess ----------------------------------------------------------------
    def query_pass(self, z_q: Tensor, bank: SupportBank) -> Tensor:
        """UNet output v [B, 4, h, w] of queries z_q [B, 4, h, w] against a bank: one fused call
        [queries ; supports] the first time (the bank keeps the keys and values), then a call of
        the queries alone reading them."""
        if bank.layers is not None:
            with self.bank_mode("read", layers=bank.layers):
                return self.unet_pass(z_q, n_query=z_q.shape[0])
        n = z_q.shape[0]
        channels = bank.latents.shape[1]
        queries = F.pad(z_q, (0, 0, 0, 0, 0, channels - z_q.shape[1]))  # zero extra channels
        with self.bank_mode("fused", n_query=n):
            v = self.unet_pass(torch.cat([queries, bank.latents.to(queries)]), n_query=n)[:n]
            bank.layers = dict(self.bank.store)
        return v

    def decode(
        self, features: dict[str, Tensor], prompt_embeddings: list[SupportBank], level: str
    ) -> Tensor:
        """The quantised map P [P, 3, S, S] of the query against every support set."""
        return self.decode_many([features], prompt_embeddings, level)[0]

    def decode_many(
        self, features: list[dict[str, Tensor]], prompt_embeddings: list[SupportBank], level: str
    ) -> list[Tensor]:
        """Maps [P, 3, S, S] of each query: all queries in one UNet call per support set."""
        z_q = torch.cat([f["default"] for f in features])  # [B, 4, h, w]
        maps = []
        for bank in prompt_embeddings:
            v = self.query_pass(z_q, bank)
            decoded = self.vae.decode(-v.float() / self.scaling).sample  # mask latent = -v
            maps.append(quantized_map(decoded))  # [B, 3, S, S]
        return list(torch.stack(maps, dim=1).unbind(0))  # B x [P, 3, S, S]

    def postprocess(
        self,
        raw: Tensor,
        embedding: ImageEmbedding,
        prompts: list[Prompt],
        *,
        level: str,
        threshold: float,
        size: tuple[int, int],
        return_logits: bool,
    ) -> SegmentationResult:
        """Soft map (channel mean) resized bilinearly to `size`, then the threshold: relative to
        the map's maximum over all channels at the processing resolution (default), or absolute."""
        soft = resize_logits(raw.mean(dim=1), size)  # [P, H, W]
        if self.threshold_mode == "relative":
            thr = relative_threshold(raw, threshold)
        else:
            thr = torch.full((raw.shape[0],), float(threshold))
        masks = (soft > thr[:, None, None]).cpu()
        area = masks.sum(dim=(1, 2))
        probs = soft.cpu()
        scores = torch.where(area > 0, (probs * masks).sum(dim=(1, 2)) / area.clamp(min=1), 0.0)
        n = raw.shape[0]
        return SegmentationResult(
            masks=masks,
            scores=scores.float(),
            labels=[reference_label(i) for i in range(n)],
            prompt_index=torch.arange(n),
            level=[level] * n,
            logits=raw.mean(dim=1).float().cpu() if return_logits else None,
            meta={
                "threshold_mode": self.threshold_mode,
                "score": "mean of the soft map inside the mask",
            },
        )
