"""K/V-bank self-attention on a stock diffusers UNet: write mode is stock attention exactly,
read mode attends to [own ; references], the fused single pass equals write-then-read."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from promptseg.backbones.diffusers_unet import DiffusersUNet
from promptseg.layers.kv_bank import KVBank, KVBankAttnProcessor, kv_bank_processors

TINY_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (8, 16),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 8,
    "attention_head_dim": 2,
    "norm_num_groups": 4,
}


@pytest.fixture(scope="module")
def unet() -> DiffusersUNet:
    torch.manual_seed(0)
    return DiffusersUNet(TINY_UNET).eval()


def run(unet: DiffusersUNet, latents: torch.Tensor) -> torch.Tensor:
    text = torch.zeros(latents.shape[0], 2, 8)
    with torch.no_grad():
        return unet.forward_features(latents, timestep=1, encoder_hidden_states=text)["sample"]


def test_write_and_off_modes_equal_stock_attention(unet):
    x = torch.randn(3, 4, 8, 8)
    unet.set_attention_processor(AttnProcessor2_0())
    stock = run(unet, x)
    bank = KVBank()
    unet.set_attention_processor(kv_bank_processors(unet.unet, bank))
    names = [n for n, p in unet.attention_processors.items() if isinstance(p, KVBankAttnProcessor)]
    assert names and all(".attn1." in n for n in names)
    assert torch.equal(run(unet, x), stock)  # off
    bank.set_mode("write")
    assert torch.equal(run(unet, x), stock)
    assert set(bank.store) == set(names) and all(k.shape[0] == 3 for k, _ in bank.store.values())


def test_read_attends_to_the_references(unet):
    bank = KVBank()
    unet.set_attention_processor(kv_bank_processors(unet.unet, bank))
    refs, query = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    plain = run(unet, query)
    bank.set_mode("write")
    run(unet, refs)
    bank.set_mode("read")
    with_refs = run(unet, query)
    assert not torch.allclose(with_refs, plain, atol=1e-4)
    # explicit keys for one layer: [own ; shot 1 ; shot 2], one softmax
    name = next(iter(bank.store))
    k, _ = bank.store[name]
    assert k.shape[0] == 2
    # two queries against the same bank each equal their own single-query run
    queries = torch.cat([query, torch.randn(1, 4, 8, 8)])
    torch.testing.assert_close(run(unet, queries)[:1], with_refs, atol=1e-5, rtol=0)


def test_fused_pass_equals_two_passes(unet):
    bank = KVBank()
    unet.set_attention_processor(kv_bank_processors(unet.unet, bank))
    refs, queries = torch.randn(3, 4, 8, 8), torch.randn(2, 4, 8, 8)
    bank.set_mode("write")
    run(unet, refs)
    bank.set_mode("read")
    two_pass = run(unet, queries)
    bank.clear()
    bank.set_mode("fused", n_query=2)
    fused = run(unet, torch.cat([queries, refs]))[:2]
    torch.testing.assert_close(fused, two_pass, atol=1e-5, rtol=0)


def test_bad_modes_and_empty_banks_are_clear_errors(unet):
    bank = KVBank()
    with pytest.raises(ValueError, match="mode must be one of"):
        bank.set_mode("reed")
    with pytest.raises(ValueError, match="n_query >= 1"):
        bank.set_mode("fused")
    unet.set_attention_processor(kv_bank_processors(unet.unet, bank))
    bank.set_mode("read")
    with pytest.raises(ValueError, match="K/V bank is empty"):
        run(unet, torch.randn(1, 4, 8, 8))
    with pytest.raises(TypeError, match="conditioning"):
        unet.forward_features(torch.randn(1, 4, 8, 8))
