"""ODISE converter: release .pth keys (spec odise.md §8.2), SD v1 LDM -> diffusers, the empty-prompt
embedding, OpenAI CLIP -> open_clip, and the whole folder of official files.

The SD side runs on tests/data/odise_ldm_tiny.safetensors: a tiny checkpoint made with the real
CompVis LDM modules (its metadata says how), with reference feature taps computed by LDM code.
"""

from __future__ import annotations

import inspect

import open_clip
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

import promptseg
from promptseg.convert import odise as conv
from promptseg.convert.common import strip_prefix
from promptseg.errors import CheckpointFormatError, WeightsNotFoundError
from promptseg.registry import lookup
from promptseg.zoo import build_model
from tests.odise_fixtures import (
    REAL,
    TEXT_PREFIX,
    TINY,
    TINY_CLIP,
    official_shapes,
    official_state_dict,
    save_lightning_checkpoint,
    save_openai_style_archive,
    tiny_clip_state,
    tiny_original_config,
    tiny_sd,
)


def diffusers_models(unet_config: dict, vae_config: dict) -> tuple:
    groups = int(tiny_sd()[2]["norm_num_groups"])  # the fixture's LDM used fewer than 32 groups
    unet = UNet2DConditionModel.from_config({**unet_config, "norm_num_groups": groups})
    vae = AutoencoderKL.from_config({**vae_config, "norm_num_groups": groups})
    return unet.eval(), vae.eval()


# -- the ODISE .pth -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("classifier", "count", "params"), [("label", 399, 28_067_009), ("caption", 400, 28_066_755)]
)
def test_official_key_list_matches_spec(classifier, count, params):
    shapes = official_shapes(classifier, REAL)
    assert len(shapes) == count
    assert sorted(conv.official_keys(classifier)) == sorted(shapes)
    trainable = [s for k, s in shapes.items() if not k.startswith("criterion.")]
    assert sum(torch.Size(s).numel() for s in trainable) == params  # the spec's count


@pytest.mark.parametrize("classifier", ["label", "caption"])
def test_real_shapes_convert_to_the_model_keys(classifier):
    """Released keys at real shapes (meta) -> exactly the ODISE model's own keys and shapes."""
    native, found = conv.odise_to_native({"model": official_state_dict(classifier, REAL, "meta")})
    assert found == classifier
    assert len(native) == (398 if classifier == "label" else 399)
    assert not any(k.startswith("criterion") for k in native)
    card = promptseg.model_info(f"odise_sd13_m2f.{classifier}_coco50e")
    with torch.device("meta"):
        model = build_model(card)
    frozen = ("clip.", "backbone.unet.", "backbone.vae.", "empty_prompt_embedding")
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(frozen)}
    assert {k: v.shape for k, v in native.items()} == expected


def test_renames_and_values():
    state = official_state_dict("label", TINY)
    native, _ = conv.odise_to_native({f"module.{k}": v for k, v in state.items()})
    pairs = {
        "backbone.captioner.alpha_cond": "backbone.feature_extractor.alpha_cond",
        "backbone.feature_projections.3.shortcut.norm.bias":
            "backbone.feature_projections.3.0.shortcut.norm.bias",
        "head.pixel_decoder.transformer.level_embed":
            "sem_seg_head.pixel_decoder.transformer.level_embed",
        "head.predictor.post_mask_embed.logit_scale":
            "sem_seg_head.predictor.post_mask_embed.logit_scale",
        "text_head.null_embed": "category_head.null_embed",
        "text_head.text_proj.weight": "category_head.text_proj.weight",
    }  # fmt: skip
    for new, old in pairs.items():
        assert torch.equal(native[new], state[old]), new
    assert len(native) == len(state) - 1


def test_unknown_missing_and_ambiguous_keys_are_named():
    state = official_state_dict("caption", TINY)
    state["sem_seg_head.predictor.extra_head.weight"] = torch.zeros(1)
    del state["sem_seg_head.predictor.class_embed.bias"]
    with pytest.raises(CheckpointFormatError) as info:
        conv.odise_to_native(state)
    assert "sem_seg_head.predictor.extra_head.weight" in str(info.value)
    assert "sem_seg_head.predictor.class_embed.bias" in str(info.value)
    both = {**official_state_dict("label", TINY), "word_head.text_proj.bias": torch.zeros(8)}
    with pytest.raises(CheckpointFormatError, match="both category_head"):
        conv.odise_to_native(both)
    without = official_state_dict("label", TINY)
    del without["criterion.empty_weight"]  # a training buffer: optional
    assert len(conv.odise_to_native(without)[0]) == len(without)


# -- Stable Diffusion ------------------------------------------------------------------------------


def test_sd_to_native_loads_strictly_and_reproduces_ldm_taps():
    ckpt, refs, meta = tiny_sd()
    native, unet_config, vae_config = conv.sd_to_native(
        {"state_dict": ckpt}, tiny_original_config()
    )
    assert unet_config["flip_sin_to_cos"] is True and unet_config["freq_shift"] == 0
    assert vae_config["scaling_factor"] == 0.18215
    unet, vae = diffusers_models(unet_config, vae_config)
    unet.load_state_dict(strip_prefix(native, "backbone.unet."), strict=True)
    vae.load_state_dict(strip_prefix(native, "backbone.vae."), strict=True)
    assert len(native) == sum(k.startswith(("model.", "first_stage_model.")) for k in ckpt)
    q = ckpt["first_stage_model.decoder.mid.attn_1.q.weight"]  # a 1x1 conv in LDM, linear here
    assert torch.equal(vae.decoder.mid_block.attentions[0].to_q.weight, q[:, :, 0, 0])
    assert torch.equal(unet.conv_in.weight, ckpt["model.diffusion_model.input_blocks.0.0.weight"])

    blocks = [vae.encoder.down_blocks[2].resnets[1], vae.encoder.down_blocks[3].resnets[1]]
    blocks += [unet.up_blocks[i].resnets[2] for i in range(4)]
    blocks += [vae.decoder.up_blocks[0].resnets[2], vae.decoder.up_blocks[1].resnets[2]]
    taps = []
    for block in blocks:
        block.register_forward_pre_hook(lambda m, args: taps.append(args[0]) and None)
    cond_emb = refs["cond_emb"]
    unet.time_embedding.register_forward_hook(lambda m, args, out: out + cond_emb)
    scale = vae_config["scaling_factor"]
    sqrt_abar = torch.tensor(float(meta["sqrt_alphas_cumprod_0"]))
    sqrt_one_minus = torch.tensor(float(meta["sqrt_one_minus_alphas_cumprod_0"]))
    with torch.no_grad():
        z0 = scale * vae.quant_conv(vae.encoder(refs["x"] * 2 - 1))[:, :4]
        unet(sqrt_abar * z0 + sqrt_one_minus * refs["noise"], 0, encoder_hidden_states=refs["cond"])
        vae.decoder(vae.post_quant_conv(z0 / scale))
    for i in range(8):
        torch.testing.assert_close(taps[i], refs[f"tap{i}"], atol=3e-4, rtol=1e-4)  # max 1.2e-4


def test_diffusion_pyramid_window_taps_reproduce_ldm_taps():
    """The backbone's own tap driver (VAE posterior mean, fixed seed-42 noise at t = 0, cond_emb on
    the time embedding, hooks that stop early) equals the LDM reference taps."""
    from promptseg.backbones.diffusion_pyramid import DiffusionPyramid

    ckpt, refs, meta = tiny_sd()
    native, unet_config, vae_config = conv.sd_to_native(
        {"state_dict": ckpt}, tiny_original_config()
    )
    groups = int(meta["norm_num_groups"])
    backbone = DiffusionPyramid(
        {**unet_config, "norm_num_groups": groups},
        {**vae_config, "norm_num_groups": groups},
        caption_dim=16,
        window=refs["x"].shape[-1],
        projection_dim=128,
    ).eval()
    missing, unexpected = backbone.load_state_dict(strip_prefix(native, "backbone."), strict=False)
    assert not unexpected  # only the trained parts are left at their random init
    assert {k.split(".")[0] for k in missing} == {"captioner", "feature_projections"}
    assert torch.equal(backbone.noise, refs["noise"])
    with torch.no_grad():
        taps = backbone.window_taps(refs["x"], refs["cond"], refs["cond_emb"])
    for i in range(8):
        torch.testing.assert_close(taps[i], refs[f"tap{i}"], atol=3e-4, rtol=1e-4)


def test_default_config_is_the_zoo_sd_v13():
    unet_config, vae_config = conv.diffusers_configs()
    zoo = promptseg.model_info("odise_sd13_m2f").config
    for cls, ours, theirs in ((UNet2DConditionModel, unet_config, zoo["unet"]),
                              (AutoencoderKL, vae_config, zoo["vae"])):  # fmt: skip
        defaults = {
            k: p.default
            for k, p in inspect.signature(cls.__init__).parameters.items()
            if k != "self"
        }
        assert {**defaults, **ours} == {**defaults, **theirs}


def test_sd_unknown_keys_are_named():
    ckpt, _, _ = tiny_sd()
    config = tiny_original_config()
    extra = {**ckpt, "model.diffusion_model.extra_block.weight": torch.zeros(2)}
    with pytest.raises(CheckpointFormatError, match="model.diffusion_model.extra_block.weight"):
        conv.sd_to_native(extra, config)
    with pytest.raises(CheckpointFormatError, match="lora_unet_x"):
        conv.sd_to_native({**ckpt, "lora_unet_x": torch.zeros(1)}, config)
    no_out = {k: v for k, v in ckpt.items() if k != "model.diffusion_model.out.2.bias"}
    with pytest.raises(CheckpointFormatError, match="missing: conv_out.bias"):
        conv.sd_to_native(no_out, config)
    no_vae = {k: v for k, v in ckpt.items() if not k.startswith("first_stage_model.")}
    with pytest.raises(CheckpointFormatError, match="first_stage_model"):
        conv.sd_to_native(no_vae, config)
    ignored = {**ckpt, "betas": torch.zeros(1000), "model_ema.decay": torch.tensor(0.9999)}
    assert len(conv.sd_to_native(ignored, config)[0]) == len(conv.sd_to_native(ckpt, config)[0])


@pytest.mark.parametrize("names", ["transformers4", "transformers5"])
def test_empty_prompt_embedding(names):
    ckpt, refs, _ = tiny_sd()
    if names == "transformers5":  # no `text_model.` level, no position_ids buffer
        prefix = "cond_stage_model.transformer."
        ckpt = {k.replace(TEXT_PREFIX, prefix): v for k, v in ckpt.items()}
        del ckpt[f"{prefix}embeddings.position_ids"]
    embedding = conv.empty_prompt_embedding({"state_dict": ckpt})
    assert embedding.shape == (1, 77, 8)
    torch.testing.assert_close(embedding, refs["empty_prompt_embedding"], atol=1e-6, rtol=0)


# -- CLIP ------------------------------------------------------------------------------------------


def test_clip_state_dict_to_native():
    state = tiny_clip_state()
    native = conv.clip_to_native(state, TINY_CLIP)
    assert all(k.startswith("clip.") for k in native)
    assert "clip.input_resolution" not in native and "clip.vocab_size" not in native
    assert all(v.dtype == torch.float32 for v in native.values())
    model = open_clip.model.CLIP(**TINY_CLIP)
    model.load_state_dict(strip_prefix(native, "clip."), strict=True)
    assert torch.equal(model.visual.proj, state["visual.proj"].float())
    del state["ln_final.bias"]
    with pytest.raises(CheckpointFormatError, match="ln_final.bias"):
        conv.clip_to_native(state, TINY_CLIP)
    with pytest.raises(CheckpointFormatError, match="missing"):  # the ViT-L/14-336 default
        conv.clip_to_native(tiny_clip_state())


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_clip_jit_archive(tmp_path):
    path = tmp_path / "ViT-L-14-336px.pt"
    model = save_openai_style_archive(path)
    native = conv.clip_to_native(path, TINY_CLIP)
    assert len(native) == len(model.state_dict()) - 3
    assert torch.equal(native["clip.visual.conv1.weight"], model.visual.conv1.weight)
    assert conv.load_checkpoint(path).keys() == model.state_dict().keys()


# -- the whole conversion ----------------------------------------------------------------------


def tiny_require(name: str) -> dict:
    return {conv.SD_COMPONENT: tiny_sd()[0], conv.CLIP_COMPONENT: tiny_clip_state()}[name]


@pytest.fixture
def tiny_defaults(monkeypatch):
    """The converter's SD and CLIP defaults at the tiny fixture's sizes."""
    config = tiny_original_config()
    monkeypatch.setattr(conv, "SD_V1_INFERENCE_CONFIG", config)
    monkeypatch.setattr(conv, "_clip_model_config", lambda: TINY_CLIP)


def test_convert_odise_end_to_end(tiny_defaults):
    state = official_state_dict("label", TINY)
    converter = lookup("converter", "odise")
    native = converter({"model": state}, tiny_require)
    sd_count = sum(k.startswith(("model.", "first_stage_model.")) for k in tiny_sd()[0])
    assert len(native) == 398 + sd_count + len(tiny_clip_state(scalars=False)) + 1
    torch.testing.assert_close(
        native["empty_prompt_embedding"], tiny_sd()[1]["empty_prompt_embedding"], atol=1e-6, rtol=0
    )
    assert torch.equal(native["text_head.null_embed"], state["category_head.null_embed"])
    assert converter(native, None) is native  # promptseg's own layout passes through
    with pytest.raises(CheckpointFormatError, match=conv.SD_COMPONENT):
        converter(state, None)
    with pytest.raises(CheckpointFormatError, match="unknown ODISE checkpoint layout"):
        converter({"encoder.weight": torch.zeros(1)}, None)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_folder_to_native(tmp_path, tiny_defaults):
    with pytest.raises(WeightsNotFoundError) as info:
        conv.folder_to_native(tmp_path, "caption")
    for name in ("odise_caption_coco_50e-853cc971.pth", "sd-v1-3.ckpt", "ViT-L-14-336px.pt"):
        assert str(tmp_path / name) in str(info.value)
    assert "huggingface.co/CompVis/stable-diffusion-v-1-3-original" in str(info.value)

    save_lightning_checkpoint(tmp_path / "sd-v1-3.ckpt", tiny_sd()[0])
    for tag in ("label", "caption"):
        model = {"model": official_state_dict(tag, TINY)}
        torch.save(model, tmp_path / conv.OFFICIAL_FILES[tag][0])
    save_openai_style_archive(tmp_path / "ViT-L-14-336px.pt")

    label = conv.folder_to_native(tmp_path, "label")
    caption = conv.folder_to_native(tmp_path, "caption")
    assert "text_head.null_embed" in label and "text_head.null_embed" not in caption
    assert "head.predictor.class_embed.weight" in caption
    assert torch.equal(
        label["backbone.unet.conv_in.weight"], caption["backbone.unet.conv_in.weight"]
    )


def test_load_checkpoint_refuses_other_objects(tmp_path):
    path = tmp_path / "odise_label_coco_50e-b67d2efc.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": print}, path)
    with pytest.raises(CheckpointFormatError, match="builtins.print"):
        conv.load_checkpoint(path)
