"""K/V-bank self-attention: query images attend to their own tokens and to reference tokens.

A diffusers attention processor for the self-attention (`attn1`) layers of a UNet. References
("supports") attend only to themselves, so their projected keys and values of each layer can be
stored once (`write`) and reused for any number of query images (`read`): each query's keys and
values are [own ; shot 1 ; ... ; shot K], one joint softmax, no mask. `fused` does both in one
UNet call of batch [queries ; supports] with the same numbers as the two passes. Installed with
`Backbone.set_attention_processor` (stock `AttnProcessor2_0` stays on the other layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KVBank", "KVBankAttnProcessor", "kv_bank_processors"]

MODES = ("off", "write", "read", "fused")


@dataclass
class KVBank:
    """Per-layer reference keys and values [K, N_l, C_l] shared by a UNet's K/V processors.

    `mode`: "off" (plain self-attention), "write" (store every row's k, v), "read" (every row is
    a query attending to [own ; stored]), "fused" (the first `n_query` rows are queries, the
    rest references: references self-attend and are stored, queries read them).
    """

    mode: str = "off"
    n_query: int = 0
    store: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def set_mode(self, mode: str, n_query: int = 0) -> None:
        """Switch mode (checked); "fused" needs the number of query rows leading the batch."""
        if mode not in MODES:
            raise ValueError(f"K/V bank mode must be one of {MODES}, got {mode!r}")
        if mode == "fused" and n_query < 1:
            raise ValueError(f"fused mode needs n_query >= 1 query rows, got {n_query}")
        self.mode, self.n_query = mode, int(n_query)

    def clear(self) -> None:
        """Forget the stored keys and values."""
        self.store.clear()


def _heads(x: Tensor, heads: int) -> Tensor:
    """[B, N, C] -> [B, heads, N, C / heads]."""
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _per_query(bank: Tensor, n_query: int) -> Tensor:
    """Stored [K, N, C] of K references -> [n_query, K*N, C] (shot order kept)."""
    flat = bank.reshape(1, -1, bank.shape[-1])
    return flat.expand(n_query, -1, -1)


class KVBankAttnProcessor:
    """attn1 processor with a K/V bank; in "off" and "write" modes it computes exactly what the
    stock `AttnProcessor2_0` does for a self-attention layer without masks or norms."""

    def __init__(self, bank: KVBank, name: str) -> None:
        self.bank, self.name = bank, name

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        **kwargs: object,
    ) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{self.name}: the K/V bank is for self-attention without a mask")
        if attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_q is not None:
            raise ValueError(f"{self.name}: the K/V bank supports plain attention layers only")
        shape = hidden_states.shape
        x = hidden_states.flatten(2).transpose(1, 2) if hidden_states.ndim == 4 else hidden_states
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)  # [B, N, C]
        mode, n = self.bank.mode, self.bank.n_query
        if mode == "write":
            self.bank.store[self.name] = (k, v)
        elif mode == "fused":
            if not 0 < n < x.shape[0]:
                raise ValueError(f"fused batch of {x.shape[0]} rows cannot hold {n} queries")
            ref_k, ref_v = k[n:], v[n:]
            self.bank.store[self.name] = (ref_k, ref_v)
            out_ref = self._attend(attn, q[n:], ref_k, ref_v)
            out_q = self._attend(
                attn,
                q[:n],
                torch.cat([k[:n], _per_query(ref_k, n)], dim=1),
                torch.cat([v[:n], _per_query(ref_v, n)], dim=1),
            )
            return self._finish(attn, torch.cat([out_q, out_ref]), shape, hidden_states)
        elif mode == "read":
            if self.name not in self.bank.store:
                raise ValueError(f"{self.name}: the K/V bank is empty; run the references first")
            ref_k, ref_v = self.bank.store[self.name]
            b = x.shape[0]
            k = torch.cat([k, _per_query(ref_k.to(k.dtype), b)], dim=1)
            v = torch.cat([v, _per_query(ref_v.to(v.dtype), b)], dim=1)
        return self._finish(attn, self._attend(attn, q, k, v), shape, hidden_states)

    @staticmethod
    def _attend(attn: torch.nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Multi-head SDPA of q [B, Nq, C] over k, v [B, Nk, C] -> [B, Nq, C] (no projection)."""
        out = F.scaled_dot_product_attention(
            _heads(q, attn.heads), _heads(k, attn.heads), _heads(v, attn.heads)
        )
        return out.transpose(1, 2).reshape(q.shape[0], -1, q.shape[-1]).to(q.dtype)

    @staticmethod
    def _finish(attn: torch.nn.Module, x: Tensor, shape: torch.Size, residual: Tensor) -> Tensor:
        """Output projection and dropout, back to the input's layout, residual / rescale."""
        x = attn.to_out[1](attn.to_out[0](x))
        if len(shape) == 4:
            x = x.transpose(1, 2).reshape(shape)
        if attn.residual_connection:
            x = x + residual
        return x / attn.rescale_output_factor


def kv_bank_processors(unet: torch.nn.Module, bank: KVBank) -> dict[str, object]:
    """A full processor dict for `unet.set_attn_processor`: K/V bank on every `attn1`, the
    current processor everywhere else (diffusers needs one entry per attention layer)."""
    return {
        name: KVBankAttnProcessor(bank, name) if ".attn1." in name else processor
        for name, processor in unet.attn_processors.items()
    }
