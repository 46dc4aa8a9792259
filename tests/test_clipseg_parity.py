"""CLIPSeg equals transformers' CLIPSegForImageSegmentation on the same random weights."""

from __future__ import annotations

import pytest
import torch

from promptseg.testing.clipseg import FULL, TINY, hf_model, ours_from

pytest.importorskip("transformers")


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Within 1e-4 absolute; hf_model's logits spread like a trained model's (std ~5)."""
    assert theirs.std() > 1.0
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("refined", [False, True])
@pytest.mark.parametrize("size", [64, 96])
def test_tiny_text_and_visual_parity(refined: bool, size: int) -> None:
    hf = hf_model(TINY, refined)
    ours = ours_from(hf, "clipseg_test_tiny", {"refined": refined})
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, size, size)
    ids = ours.text_encoder.tokenize(["a cup", "something to fill", "wood"])
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=pixels.expand(3, -1, -1, -1))
        cond = ours.text_encoder(ids)
        logits = ours.decode({"default": ours.encode_image(pixels)}, cond)
        torch.testing.assert_close(cond, out.conditional_embeddings, atol=1e-5, rtol=1e-5)
        assert_logits_close(logits, out.logits)
        # visual prompt: the same conditional-vector path, from an image embedding
        support = torch.randn(2, 3, size, size)
        hf_vis = hf.clip.get_image_features(pixel_values=support)
        hf_vis = getattr(hf_vis, "pooler_output", hf_vis)
        vis = ours.backbone.encode_image(support)
        torch.testing.assert_close(vis, hf_vis, atol=1e-5, rtol=1e-5)
        out = hf(conditional_embeddings=vis, pixel_values=pixels.expand(2, -1, -1, -1))
        assert_logits_close(ours.decode({"default": ours.encode_image(pixels)}, vis), out.logits)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,refined,reduce_dim",
    [
        ("clipseg_vitb16_rd64.refined", True, 64),
        ("clipseg_vitb16_rd64.uni", False, 64),
        ("clipseg_vitb16_rd16.uni", False, 16),
    ],
)
def test_full_size_352_parity(name: str, refined: bool, reduce_dim: int) -> None:
    """The released configs at 352 px: text prompts and a visual prompt's conditional path."""
    hf = hf_model(FULL, refined, reduce_dim)
    ours = ours_from(hf, name)
    torch.manual_seed(2)
    pixels = torch.randn(1, 3, 352, 352)
    ids = ours.text_encoder.tokenize(["a glass", "something to fill"])
    support = torch.randn(1, 3, 352, 352)
    with torch.no_grad():
        out = hf(input_ids=ids, pixel_values=pixels.expand(2, -1, -1, -1))
        image = ours.encode_image(pixels)
        logits = ours.decode({"default": image}, ours.text_encoder(ids))
        hf_vis = hf.clip.get_image_features(pixel_values=support)
        hf_vis = getattr(hf_vis, "pooler_output", hf_vis)
        vis = ours.backbone.encode_image(support)
        vis_out = hf(conditional_embeddings=hf_vis, pixel_values=pixels)
        vis_logits = ours.decode({"default": image}, vis)
    assert logits.shape == (2, 352, 352)
    assert_logits_close(logits, out.logits)
    torch.testing.assert_close(vis, hf_vis, atol=1e-4, rtol=1e-5)
    assert_logits_close(vis_logits, vis_out.logits)
