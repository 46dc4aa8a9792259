"""A stock diffusers `UNet2DConditionModel` as a conditioned backbone (DiffewS; ODISE builds on it).

Built from a diffusers UNet config (the `config.json` of a pipeline's `unet/` folder), never a
fork. `forward_features(latents, timestep=, encoder_hidden_states=)` returns the UNet's output
as `{"sample": ...}`. Attention processors (e.g. the K/V bank of `layers/kv_bank.py` on the
`attn1` layers) are installed with `set_attention_processor`. `BlockInputs` taps intermediate
maps of a stock diffusers model (the inputs of chosen blocks) by pre-forward hooks, and can stop
the forward once it has them all (ODISE's `diffusion_pyramid`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from ..contracts import FeatureInfo
from ..registry import register_backbone
from .base import Backbone

__all__ = ["DiffusersUNet", "BlockInputs"]


class _AllInputsRecorded(Exception):
    """Raised by a stopping `BlockInputs` hook once every watched block has its input."""


class BlockInputs:
    """Records the first positional input of each block while open (pre-forward hooks).

    `with BlockInputs(blocks, stop=True) as taps: model(...)` then `taps.inputs` (in `blocks`
    order). With `stop=True` the forward is interrupted as soon as every block has received its
    input, so the layers after the last tap never run; the interruption ends at the `with`.
    """

    def __init__(self, blocks: Sequence[nn.Module], *, stop: bool = False) -> None:
        self.blocks = list(blocks)
        self.stop = stop
        self._inputs: list[torch.Tensor | None] = [None] * len(self.blocks)
        self._handles: list[Any] = []

    def __enter__(self) -> BlockInputs:
        self._inputs = [None] * len(self.blocks)
        self._handles = [
            block.register_forward_pre_hook(partial(self._record, i))
            for i, block in enumerate(self.blocks)
        ]
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return isinstance(exc, _AllInputsRecorded) and exc.args[0] is self

    def _record(self, index: int, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._inputs[index] is None:
            self._inputs[index] = args[0]
        if self.stop and all(x is not None for x in self._inputs):
            raise _AllInputsRecorded(self)

    @property
    def inputs(self) -> list[torch.Tensor]:
        """The recorded inputs, one per block; an error names the blocks that never ran."""
        missing = [i for i, x in enumerate(self._inputs) if x is None]
        if missing:
            names = [type(self.blocks[i]).__name__ for i in missing]
            raise RuntimeError(
                f"blocks {missing} ({', '.join(names)}) were not called by the forward run inside "
                "BlockInputs; tap blocks that the model's forward actually runs"
            )
        return list(self._inputs)


@register_backbone("diffusers_unet")
class DiffusersUNet(Backbone):
    """Conditioned UNet: latents + timestep + encoder hidden states -> {"sample": output}."""

    provides = ("unet_taps",)

    def __init__(
        self, unet: Mapping[str, Any], *, output: str | None = None, frozen: bool = False
    ) -> None:
        super().__init__(output)
        self.unet = UNet2DConditionModel.from_config(dict(unet))
        if frozen:
            self.requires_grad_(False)

    @property
    def feature_info(self) -> FeatureInfo:
        return FeatureInfo("unet_taps", ("sample",), (int(self.unet.config.out_channels),), (1,))

    def attention_owner(self) -> nn.Module:
        return self.unet

    def forward_features(self, pixels: torch.Tensor, **conditioning: Any) -> dict[str, Any]:
        """latents [B, C, h, w] + timestep= + encoder_hidden_states= -> {"sample": output}."""
        missing = {"timestep", "encoder_hidden_states"} - set(conditioning)
        if missing:
            raise TypeError(f"the UNet needs conditioning {sorted(missing)} besides the latents")
        return {"sample": self.unet(pixels, **conditioning).sample}
