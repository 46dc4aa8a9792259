"""Backbones and heads compose through the registry; overrides merge; contracts are checked."""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

import promptseg
from promptseg.backbones.diffusers_unet import DiffusersUNet
from promptseg.cli import main
from promptseg.contracts import FeatureInfo
from promptseg.errors import IncompatibleComponentsError, UnsupportedPromptError
from promptseg.heads.film_decoder import FiLMDecoder
from promptseg.models.base import PromptSegModel, compose
from promptseg.registry import MODELS, register_model
from promptseg.result import SegmentationResult
from promptseg.weights import save_state_dict_file
from promptseg.zoo import build_model, model_info
from tests.test_kv_bank import TINY_UNET

VITSEG = {"name": "timm_vit", "arch": "vit_base_patch16_224.augreg_in21k"}
# a timm ViT of the tiny CLIPSeg's width, so the rest of a tiny CLIPSeg checkpoint fits it
TINY_VIT = {"name": "timm_vit", "arch": "vit_base_patch16_224", "embed_dim": 64, "depth": 4,
            "num_heads": 4}  # fmt: skip
CLIP_FOR_SINE = {"name": "open_clip_vit", "embed_dim": 32, "width": 32, "layers": 2, "heads": 2,
                 "patch_size": 16}  # fmt: skip


def test_vitseg_builds_segments_and_trains():
    """CLIPSeg's ViTSeg baseline: CLIP's image tower swapped for an ImageNet ViT (timm)."""
    torch.manual_seed(0)
    model = promptseg.create_model("clipseg_vitb16_rd64", pretrained=False, backbone=VITSEG)
    assert type(model.backbone).__name__ == "TimmViT" and model.card.replaced == ("backbone",)
    assert model.backbone.feature_info.keys == ("block3", "block6", "block9")
    assert "text_encoder" in dict(model.named_children())  # CLIP's text tower is kept
    assert "visual" not in model.capabilities
    img = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    res = model.segment(img, ["a cat", "a dog"])
    assert res.masks.shape == (2, 60, 80) and 0 < res.masks.float().mean() < 1
    with pytest.raises(UnsupportedPromptError):
        model.segment(img, promptseg.VisualPrompt(img, np.ones((60, 80), bool)))

    # one training step of the decoder on the frozen ViT features
    model.train()
    pixels = torch.randn(1, 3, 352, 352)
    target = (torch.rand(1, 352, 352) > 0.5).float()
    optimiser = torch.optim.SGD([p for p in model.head.parameters() if p.requires_grad], lr=0.1)
    before = model.head.film_mul.weight.detach().clone()
    cond = model.embed_texts(["a cat"])
    logits = model.decode({"default": model.encode_image(pixels)}, cond, "semantic")
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())  # frozen
    optimiser.step()
    assert not torch.equal(before, model.head.film_mul.weight)


def test_replaced_backbone_skips_its_checkpoint_keys(tmp_path):
    torch.manual_seed(0)
    clipseg = build_model(model_info("clipseg_test_tiny"))
    path = tmp_path / "tiny.safetensors"
    save_state_dict_file(clipseg.state_dict(), path)
    with pytest.warns(UserWarning, match="skipped .* key.* of the replaced backbone"):
        vitseg = promptseg.create_model(
            "clipseg_test_tiny", checkpoint_path=path, backbone=TINY_VIT
        )
    torch.testing.assert_close(vitseg.head.film_mul.weight, clipseg.head.film_mul.weight)
    torch.testing.assert_close(
        vitseg.text_encoder.token_embedding.weight, clipseg.text_encoder.token_embedding.weight
    )
    res = vitseg.segment(np.zeros((32, 40, 3), np.uint8), "a cup")
    assert res.masks.shape == (1, 32, 40)


def test_sine_head_on_a_clip_vit_segments(scene):
    torch.manual_seed(0)
    model = promptseg.create_model("sine_test_tiny", pretrained=False, backbone=CLIP_FOR_SINE)
    assert type(model.backbone).__name__ == "OpenCLIPViT"
    assert model.backbone.feature_info.kind == "feature_map"
    img, a, b = scene
    prompt = promptseg.SupportSet([promptseg.VisualPrompt(img, a), promptseg.VisualPrompt(img, b)])
    for level in ("semantic", "instance", "identity"):
        res = model.segment(img, prompt, level=level)
        assert res.masks.shape[-2:] == img.shape[:2]


def test_train_sine_on_the_combination(tmp_path, capsys):
    from tests.test_sine_train import tiny_config, write_coco  # noqa: F401  (dataset fixture)

    ann = write_coco(tmp_path)
    config = tiny_config(
        tmp_path, annotations=str(ann), images=str(tmp_path), steps=1, warmup_steps=0
    )
    cfg = tmp_path / "train.yaml"
    import yaml

    data = {k: v for k, v in vars(config).items() if k != "model_config"}
    data["jitter_scale"] = list(data["jitter_scale"])
    cfg.write_text(yaml.safe_dump(data))
    args = ["train", "sine", "--config", str(cfg)]
    for key, value in CLIP_FOR_SINE.items():
        args += ["--model-config", f"backbone.{key}={value}"]
    assert main(args) == 0, capsys.readouterr().err
    assert "1 steps, loss" in capsys.readouterr().out


def test_incompatible_pair_names_both_contracts():
    unet = {"name": "diffusers_unet", "unet": TINY_UNET}
    with pytest.raises(IncompatibleComponentsError, match="diffusers_unet.*unet_taps.*vit_tokens"):
        promptseg.create_model("clipseg_test_tiny", pretrained=False, backbone=unet)
    with pytest.raises(IncompatibleComponentsError, match="mformer"):
        compose(unet, {"name": "mformer"})


def test_overrides_merge_and_unknown_keys_fail():
    model = promptseg.create_model(
        "sine_test_tiny",
        pretrained=False,
        config={"head": {"layers": 1}},
        data_config={"input_size": [56, 56]},
    )
    assert len(model.head.transformer_layers) == 1
    assert model.card.config["head"]["layers"] == 1 and model.card.config["head"]["dim"] == 32
    assert model.card.data_config["input_size"] == [56, 56]
    assert model.input_size((100, 80)) == (56, 56)
    with pytest.raises(ValueError, match="no key 'head.layrs'.*layers"):
        promptseg.create_model("sine_test_tiny", pretrained=False, config={"head": {"layrs": 1}})
    with pytest.raises(ValueError, match="no key 'bogus'"):
        promptseg.create_model("sine_test_tiny", pretrained=False, config={"bogus": 1})
    with pytest.raises(ValueError, match="data_config has no key 'input_sizes'"):
        model_info("sine_test_tiny", data_config={"input_sizes": [1, 1]})
    with pytest.raises(ValueError, match="dinov2.*takes no 'depht'"):
        model_info("clipseg_test_tiny", backbone={"name": "dinov2", "depht": 2})
    with pytest.raises(promptseg.UnknownModelError, match="unknown backbone 'timm_vt'.*timm_vit"):
        model_info("clipseg_test_tiny", backbone={"name": "timm_vt"})


def test_cli_config_flag_and_component_listing(capsys):
    assert main(["info", "sine_test_tiny", "--config", "head.layers=1"]) == 0
    assert '"layers": 1' in capsys.readouterr().out
    assert main(["info", "sine_test_tiny", "--config", "head.nope=1"]) == 2
    assert "no key 'head.nope'" in capsys.readouterr().err
    assert main(["list", "--backbones", "--heads"]) == 0
    out = capsys.readouterr().out
    for line in ("backbone dinov2", "backbone timm_vit", "head film_decoder", "head mformer"):
        assert line in out
    assert "needs vit_tokens" in out and "provides feature_map" in out


def test_attention_processors_install_on_diffusers_backbones():
    from diffusers.models.attention_processor import AttnProcessor

    unet = DiffusersUNet(TINY_UNET)
    processors = unet.attention_processors
    assert processors and all("attn" in name for name in processors)
    unet.set_attention_processor(AttnProcessor())
    assert all(isinstance(p, AttnProcessor) for p in unet.attention_processors.values())
    x = torch.randn(1, 4, 8, 8)
    out = unet.forward_features(x, timestep=1, encoder_hidden_states=torch.randn(1, 2, 8))
    assert out["sample"].shape == x.shape  # conditioning reaches the backbone
    clip = build_model(model_info("clipseg_test_tiny")).backbone
    with pytest.raises(TypeError, match="no diffusers attention layers"):
        clip.set_attention_processor(AttnProcessor())


class _TwoParts(PromptSegModel):
    """A family registered outside the core: a fp32 'vae' beside a cast 'backbone'."""

    levels = ("semantic",)
    fp32_modules = ("vae",)
    input_component = {"default": "vae"}

    def __init__(self, card: Any) -> None:
        super().__init__(card)
        self.vae = torch.nn.Conv2d(3, 2, 1)
        self.backbone = torch.nn.Conv2d(2, 1, 1)

    def encode_image(self, pixels: torch.Tensor, input: str = "default") -> torch.Tensor:
        return self.backbone(self.vae(pixels).to(self.dtype))

    def encode_prompt(self, prompts: list, level: str | None = None) -> list:
        return prompts

    def decode(self, features: dict, prompt_embeddings: Any, level: str) -> torch.Tensor:
        return features["default"][:, 0].expand(len(prompt_embeddings), -1, -1)

    def postprocess(self, raw, embedding, prompts, *, level, threshold, size, return_logits):
        masks = torch.nn.functional.interpolate(raw[None].float(), size=size)[0] > 0
        return SegmentationResult(
            masks=masks,
            scores=torch.ones(len(prompts)),
            labels=[str(p.text) for p in prompts],
            prompt_index=torch.arange(len(prompts)),
            level=[level] * len(prompts),
        )


def test_a_family_added_outside_the_core_with_per_component_dtypes():
    if "test_two_parts" not in MODELS:
        register_model("test_two_parts")(_TwoParts)
    card = replace(model_info("test_colorkey"), family="test_two_parts", data_config={
        "input_size": [16, 16], "mean": [0.5] * 3, "std": [0.5] * 3})  # fmt: skip
    model = build_model(card)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    model.to(torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.backbone.weight.dtype == torch.bfloat16
    assert model.vae.weight.dtype == torch.float32  # pinned
    img = np.zeros((20, 30, 3), np.uint8)
    assert model.preprocess(torch.from_numpy(img).permute(2, 0, 1)).dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = model.segment(img, "a cup", output_size="input")
    assert res.masks.shape == (1, 16, 16) and res.meta["input_size"] == (16, 16)


def test_film_decoder_batch_equals_single_images():
    torch.manual_seed(0)
    info = FeatureInfo("vit_tokens", ("block1", "block2"), (24, 24), (16, 16))
    head = FiLMDecoder(info, cond_dim=8, reduce_dim=16, heads=4, ffn=32).eval()
    taps = [torch.randn(2, 1 + 16, 24) for _ in range(2)]
    cond = torch.randn(3, 8)
    with torch.no_grad():
        reduced = head.project(taps)  # [2 taps, 2 images, T, D]
        batched = head(reduced, cond, torch.tensor([0, 1, 1]))
        first = head(head.project([t[:1] for t in taps]), cond[:1])
        second = head(head.project([t[1:] for t in taps]), cond[1:])
    torch.testing.assert_close(batched, torch.cat([first, second]), atol=1e-5, rtol=0)


def test_a_library_model_config_is_replaced_whole():
    """`unet`, `vae` and `clip` are diffusers / open_clip configs: an override replaces the whole
    dict (the library that builds it validates it), other keys merge as usual."""
    import promptseg

    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D"],
        "block_out_channels": [4],
        "latent_channels": 4,
        "norm_num_groups": 2,
    }
    card = promptseg.model_info("diffews_test_tiny", config={"vae": vae, "text_tokens": 3})
    assert card.config["vae"] == vae  # nothing of the zoo's VAE left (e.g. its sample_size)
    assert card.config["text_tokens"] == 3
    assert card.config["backbone"] == promptseg.model_info("diffews_test_tiny").config["backbone"]
    with pytest.raises(TypeError, match="whole model config"):
        promptseg.model_info("diffews_test_tiny", config={"vae": 3})
