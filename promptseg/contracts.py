"""Feature contracts: what a backbone provides and what a decoder head needs.

A backbone states the kinds of features it can return (`provides`) and, once built for one kind,
describes them with a `FeatureInfo` (channels, strides, keys). A head states the one kind it
`needs`. Any backbone that provides the kind a head needs can be plugged into it; other pairs
raise `IncompatibleComponentsError` naming both contracts.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import IncompatibleComponentsError

__all__ = ["FEATURE_KINDS", "FeatureInfo", "check_compatible"]

#: kind -> what `forward_features` returns for it (shown by `promptseg list --backbones`).
FEATURE_KINDS: dict[str, str] = {
    "vit_tokens": "ViT token taps with a class token: {'block<i>': [B, 1 + gh*gw, C]} for the "
    "tapped blocks (0-based), CLS first, one stride (the patch size)",
    "feature_map": "a single-scale map {'map': [B, C, H/s, W/s]}",
    "pyramid": "a multi-scale pyramid {'res2'..'res5': [B, C_i, H/s_i, W/s_i]}, strides 4-32",
    "unet_taps": "conditioned-UNet taps {name: [B, C_i, H/s_i, W/s_i]} of a diffusion UNet run "
    "with conditioning (timestep, encoder hidden states)",
}


@dataclass(frozen=True)
class FeatureInfo:
    """What a built backbone returns: contract kind, and per output key its channels and stride."""

    kind: str
    keys: tuple[str, ...]
    channels: tuple[int, ...]
    strides: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.kind not in FEATURE_KINDS:
            raise ValueError(f"unknown feature kind {self.kind!r}; known: {sorted(FEATURE_KINDS)}")
        if not len(self.keys) == len(self.channels) == len(self.strides):
            raise ValueError("FeatureInfo needs one channel count and one stride per key")

    @property
    def out_channels(self) -> int:
        """Channels of the last (deepest) output."""
        return self.channels[-1]


def check_compatible(backbone: str, provides: tuple[str, ...], head: str, needs: str) -> None:
    """Raise IncompatibleComponentsError unless the backbone provides the head's kind."""
    if needs in provides:
        return
    raise IncompatibleComponentsError(
        f"backbone {backbone!r} provides {', '.join(provides)} features "
        f"({'; '.join(FEATURE_KINDS[k] for k in provides)}), but head {head!r} needs "
        f"{needs} ({FEATURE_KINDS[needs]}). Pick a backbone that provides {needs} "
        "(promptseg list --backbones shows each backbone's contract)."
    )
