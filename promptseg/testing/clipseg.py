"""A random transformers CLIPSeg and its promptseg twin on identical weights (parity, speed)."""

from __future__ import annotations

import torch

from ..convert.clipseg import hf_to_native
from ..zoo import build_model, model_info

TINY = dict(vision=(64, 4, 4), text=(32, 2, 4), proj=32, taps=[1, 2, 3], reduce=16, ffn=64)
LOGIT_STD = 5.0
FULL = dict(vision=(768, 12, 12), text=(512, 12, 8), proj=512, taps=[3, 6, 9], reduce=64, ffn=2048)


def hf_model(spec: dict, refined: bool, reduce_dim: int | None = None):
    """A random transformers CLIPSeg with perturbed LayerNorms/biases and a scaled head."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation
    from transformers.models.clipseg.configuration_clipseg import (
        CLIPSegTextConfig,
        CLIPSegVisionConfig,
    )

    vw, vl, vh = spec["vision"]
    tw, tl, th = spec["text"]
    cfg = CLIPSegConfig(
        text_config=CLIPSegTextConfig(
            hidden_size=tw, intermediate_size=4 * tw, num_hidden_layers=tl, num_attention_heads=th
        ).to_dict(),
        vision_config=CLIPSegVisionConfig(
            hidden_size=vw,
            intermediate_size=4 * vw,
            num_hidden_layers=vl,
            num_attention_heads=vh,
            patch_size=16,
            image_size=224,
        ).to_dict(),
        projection_dim=spec["proj"],
        extract_layers=spec["taps"],
        reduce_dim=reduce_dim or spec["reduce"],
        decoder_num_attention_heads=4,
        decoder_intermediate_size=spec["ffn"],
        use_complex_transposed_convolution=refined,
    )
    torch.manual_seed(0)
    model = CLIPSegForImageSegmentation(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.05 * torch.randn_like(p))
        # scale the last layer so logits spread like a trained model's (std ~5): parity is then
        # checked at the magnitudes real masks are thresholded at, with an absolute tolerance
        last = [m for m in model.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)][-1]
        probe = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        ids = torch.tensor([[49406, 320, 1615, 49407]])
        logits = model(input_ids=ids, pixel_values=probe).logits
        scale = LOGIT_STD / float(logits.std())
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    return model


def ours_from(hf, name: str, head: dict | None = None):
    """promptseg's model `name` (head config overrides merged in) with `hf`'s weights."""
    model = build_model(model_info(name, head=head)).eval()
    model.load_state_dict(hf_to_native(hf.state_dict()), strict=True)
    return model


def openai_clip_state(model) -> dict:
    """A promptseg CLIPSeg's CLIP weights under OpenAI CLIP key names (`visual.*`, text tower)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("backbone.visual."):
            out[k[len("backbone.") :]] = v
        elif k.startswith("text_encoder."):
            out[k[len("text_encoder.") :]] = v
    return out
