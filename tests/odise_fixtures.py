"""Synthetic ODISE release files for tests: the official key layout of an ODISE `.pth` (spec
odise.md §8.2), the tiny Stable Diffusion LDM checkpoint of tests/data (made with the CompVis LDM
modules), OpenAI-style CLIP archives, Lightning pickles, and whole folders of official files at a
size `odise_test_tiny` (with `TINY_MODEL_CONFIG`) loads.
"""

from __future__ import annotations

import copy
import json
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from unittest import mock

import numpy as np
import open_clip
import safetensors
import safetensors.torch
import torch

import promptseg
from promptseg.convert import odise as conv

FIXTURE = Path(__file__).parent / "data" / "odise_ldm_tiny.safetensors"
TEXT_PREFIX = "cond_stage_model.transformer.text_model."

# spec §8.2 shapes of the release; TINY: the same structure at small widths
REAL = dict(clip=768, context=768, tokens=77, time=1280, bottleneck=128, proj=512, hidden=256,
            taps=(512, 512, 2560, 1920, 960, 640, 512, 512), enc_ff=1024, dec_ff=2048,
            queries=100, offsets=192, weights=96, classes=134)  # fmt: skip
TINY = dict(clip=8, context=8, tokens=77, time=16, bottleneck=4, proj=8, hidden=8,
            taps=(8, 8, 12, 6, 6, 4, 8, 8), enc_ff=16, dec_ff=16,
            queries=5, offsets=48, weights=24, classes=3)  # fmt: skip
TINY_CLIP = dict(
    embed_dim=8,
    quick_gelu=True,
    vision_cfg=dict(image_size=28, layers=1, width=16, patch_size=14, head_width=8),
    text_cfg=dict(context_length=77, vocab_size=64, width=16, heads=2, layers=1),
)


def official_shapes(classifier: str, d: dict) -> dict[str, tuple[int, ...]]:
    """Every key of an ODISE release .pth with its shape, written from the spec's §8.2 table."""
    h, c, t = d["hidden"], d["clip"], d["time"]
    s = {
        "backbone.feature_extractor.alpha_cond": (1, d["tokens"], d["context"]),
        "backbone.feature_extractor.clip_project.positional_embedding": (
            1,
            d["tokens"],
            d["context"],
        ),
        "backbone.feature_extractor.clip_project.linear.weight": (d["context"], c),
        "backbone.feature_extractor.clip_project.linear.bias": (d["context"],),
        "backbone.feature_extractor.alpha_cond_time_embed": (t,),
        "backbone.feature_extractor.time_embed_project.positional_embedding": (1, 1, t),
        "backbone.feature_extractor.time_embed_project.linear.weight": (t, c),
        "backbone.feature_extractor.time_embed_project.linear.bias": (t,),
    }
    b, p = d["bottleneck"], d["proj"]
    for i, ci in enumerate(d["taps"]):
        convs = {"conv1": (b, ci, 1, 1), "conv2": (b, b, 3, 3), "conv3": (p, b, 1, 1)}
        if 2 <= i <= 5:
            convs["shortcut"] = (p, ci, 1, 1)
        for name, shape in convs.items():
            pre = f"backbone.feature_projections.{i}.0.{name}"
            s[f"{pre}.weight"] = shape
            s[f"{pre}.norm.weight"] = s[f"{pre}.norm.bias"] = (shape[0],)
    pd = "sem_seg_head.pixel_decoder."
    for i in range(3):
        s[f"{pd}input_proj.{i}.0.weight"] = (h, p, 1, 1)
        for k in ("0.bias", "1.weight", "1.bias"):
            s[f"{pd}input_proj.{i}.{k}"] = (h,)
    s[f"{pd}transformer.level_embed"] = (3, h)
    for i in range(6):
        layer = f"{pd}transformer.encoder.layers.{i}."
        for name, rows in (("sampling_offsets", d["offsets"]), ("attention_weights", d["weights"]),
                           ("value_proj", h), ("output_proj", h)):  # fmt: skip
            s[f"{layer}self_attn.{name}.weight"], s[f"{layer}self_attn.{name}.bias"] = (
                (rows, h),
                (rows,),
            )
        s[f"{layer}linear1.weight"], s[f"{layer}linear1.bias"] = (d["enc_ff"], h), (d["enc_ff"],)
        s[f"{layer}linear2.weight"], s[f"{layer}linear2.bias"] = (h, d["enc_ff"]), (h,)
        for norm in ("norm1", "norm2"):
            s[f"{layer}{norm}.weight"] = s[f"{layer}{norm}.bias"] = (h,)
    s[f"{pd}mask_features.weight"], s[f"{pd}mask_features.bias"] = (h, h, 1, 1), (h,)
    s[f"{pd}adapter_1.weight"] = (h, p, 1, 1)
    s[f"{pd}layer_1.weight"] = (h, h, 3, 3)
    for name in ("adapter_1", "layer_1"):
        s[f"{pd}{name}.norm.weight"] = s[f"{pd}{name}.norm.bias"] = (h,)
    pr = "sem_seg_head.predictor."
    for i in range(9):
        for kind, attn in (("self", "self_attn"), ("cross", "multihead_attn")):
            layer = f"{pr}transformer_{kind}_attention_layers.{i}."
            s[f"{layer}{attn}.in_proj_weight"], s[f"{layer}{attn}.in_proj_bias"] = (
                (3 * h, h),
                (3 * h,),
            )
            s[f"{layer}{attn}.out_proj.weight"], s[f"{layer}{attn}.out_proj.bias"] = (h, h), (h,)
            s[f"{layer}norm.weight"] = s[f"{layer}norm.bias"] = (h,)
        ffn = f"{pr}transformer_ffn_layers.{i}."
        s[f"{ffn}linear1.weight"], s[f"{ffn}linear1.bias"] = (d["dec_ff"], h), (d["dec_ff"],)
        s[f"{ffn}linear2.weight"], s[f"{ffn}linear2.bias"] = (h, d["dec_ff"]), (h,)
        s[f"{ffn}norm.weight"] = s[f"{ffn}norm.bias"] = (h,)
    s[f"{pr}decoder_norm.weight"] = s[f"{pr}decoder_norm.bias"] = (h,)
    s[f"{pr}query_feat.weight"] = s[f"{pr}query_embed.weight"] = (d["queries"], h)
    s[f"{pr}level_embed.weight"] = (3, h)
    for mlp in ("mask_embed", "post_mask_embed.mask_embed.1"):
        for i in range(3):
            s[f"{pr}{mlp}.layers.{i}.weight"], s[f"{pr}{mlp}.layers.{i}.bias"] = (h, h), (h,)
    s[f"{pr}post_mask_embed.logit_scale"] = ()
    for ln in ("pool_proj.0", "mask_embed.0"):
        s[f"{pr}post_mask_embed.{ln}.weight"] = s[f"{pr}post_mask_embed.{ln}.bias"] = (h,)
    s[f"{pr}post_mask_embed.pool_proj.1.weight"] = (h, h)
    s[f"{pr}post_mask_embed.pool_proj.1.bias"] = (h,)
    text = "category_head" if classifier == "label" else "word_head"
    s[f"{text}.text_proj.weight"], s[f"{text}.text_proj.bias"] = (h, c), (h,)
    if classifier == "label":
        s["category_head.null_embed"] = (1, c)
        s["criterion.empty_weight"] = (d["classes"],)
    else:
        s[f"{pr}class_embed.weight"], s[f"{pr}class_embed.bias"] = (2, h), (2,)
        s["criterion.empty_weight"] = (2,)
    return s


def official_state_dict(classifier: str, dims: dict, device: str = "cpu") -> dict:
    """A synthetic release state dict: random values, or empty meta tensors at real sizes."""
    gen = torch.Generator().manual_seed(0)
    shapes = official_shapes(classifier, dims)
    if device == "meta":
        return {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    return {k: torch.randn(v, generator=gen) for k, v in shapes.items()}


@cache
def tiny_sd() -> tuple[dict, dict, dict]:
    """(tiny LDM checkpoint, reference tensors, metadata) from the fixture; the text encoder's token
    embedding is rebuilt from its two stored rows (BOS, EOS: all the empty prompt uses)."""
    tensors = safetensors.torch.load_file(FIXTURE)
    with safetensors.safe_open(str(FIXTURE), "pt") as f:
        meta = f.metadata()
    refs = {k[4:]: v for k, v in tensors.items() if k.startswith("ref.")}
    ckpt = {k: v for k, v in tensors.items() if not k.startswith("ref.")}
    rows = refs.pop("token_embedding_rows")
    embedding = torch.zeros(49408, rows.shape[1])
    embedding[[conv.BOS, conv.EOS]] = rows
    ckpt[f"{TEXT_PREFIX}embeddings.token_embedding.weight"] = embedding
    return ckpt, refs, meta


def tiny_original_config() -> dict:
    return json.loads(tiny_sd()[2]["original_config"])


def tiny_clip_state(scalars: bool = True) -> dict:
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_CLIP)
    state = {k: v.half() for k, v in model.state_dict().items()}  # OpenAI's JIT file is fp16
    if scalars:
        state.update(input_resolution=torch.tensor(28), context_length=torch.tensor(77))
        state["vocab_size"] = torch.tensor(64)
    return state


def save_openai_style_archive(path: Path, config: dict | None = None) -> torch.nn.Module:
    """A tiny CLIP (`config`, default TINY_CLIP) saved as TorchScript with the keys of OpenAI's
    archive (its three int scalars, no attention-mask buffer)."""
    config = config or TINY_CLIP
    model = open_clip.model.CLIP(**config)
    del model.context_length, model.vocab_size  # ints here, tensors in OpenAI's archive
    del model._buffers["attn_mask"]  # a plain attribute in OpenAI's model, so not in the archive
    model.attn_mask = None
    scalars = (
        ("input_resolution", config["vision_cfg"]["image_size"]),
        ("context_length", config["text_cfg"]["context_length"]),
        ("vocab_size", config["text_cfg"]["vocab_size"]),
    )
    for name, value in scalars:
        model.register_buffer(name, torch.tensor(value))
    torch.jit.save(torch.jit.script(model), str(path))
    return model


def fake_lightning_module() -> types.ModuleType:
    """A stand-in `pytorch_lightning.callbacks.model_checkpoint` so torch.save pickles a Lightning
    object the way sd-v1-3.ckpt does (its `callbacks` entry)."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self) -> None:
            self.best_model_path = "last.ckpt"
            self.best_model_score = np.float64(0.25)  # numpy objects: pickled as numpy globals

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    return module


@contextmanager
def lightning_importable() -> Iterator[types.ModuleType]:
    """Make `pytorch_lightning.callbacks.model_checkpoint` importable (a stand-in) while inside,
    so torch.save pickles a Lightning object the way sd-v1-3.ckpt does; gone afterwards."""
    lightning = fake_lightning_module()
    packages = ("pytorch_lightning", "pytorch_lightning.callbacks")
    stand_ins = {name: types.ModuleType(name) for name in packages}
    with mock.patch.dict(sys.modules, {**stand_ins, lightning.__name__: lightning}):
        yield lightning


def save_lightning_checkpoint(path: Path, state_dict: dict) -> None:
    """`state_dict` saved as a PyTorch Lightning checkpoint: the weights beside training metadata
    (epoch, step, version, a ModelCheckpoint callback object holding a numpy scalar)."""
    with lightning_importable() as lightning:
        callbacks = {"ModelCheckpoint": lightning.ModelCheckpoint()}
        checkpoint = {
            "epoch": 5,
            "global_step": 1000,
            "pytorch-lightning_version": "1.4.2",
            "state_dict": state_dict,
            "callbacks": callbacks,
        }
        torch.save(checkpoint, path)
    assert "pytorch_lightning" not in sys.modules  # read later as by a user without Lightning


# -- a whole folder of official files for odise_test_tiny -----------------------------------------

TINY_MODEL_CLIP = promptseg.model_info("odise_test_tiny").config["clip"]
"""odise_test_tiny's own CLIP (49408 tokens: the real tokenizer's ids fit)."""

# The SD checkpoint of the folder: the fixture's UNet and text encoder, and a VAE of the real SD
# structure (ch_mult 1, 2, 4, 4) at width 32, whose taps 0, 1, 6, 7 are 128 channels wide: the
# projection width, so (as in the release, where both are 512) those projections have no shortcut
# conv and the official key list applies. The UNet's taps (12, 8, 8, 8) get one.
VAE_CH, VAE_CH_MULT = 32, (1, 2, 4, 4)


def ldm_vae_shapes(ch: int, ch_mult: tuple[int, ...], blocks: int = 2, z: int = 4) -> dict:
    """Key -> shape of an LDM `first_stage_model` (AutoencoderKL, double_z, no attention but the
    middle one), written from the LDM Encoder / Decoder structure."""
    shapes: dict[str, tuple[int, ...]] = {}

    def norm(prefix: str, c: int) -> None:
        shapes[f"{prefix}.weight"], shapes[f"{prefix}.bias"] = (c,), (c,)

    def conv(prefix: str, out: int, inp: int, k: int) -> None:
        shapes[f"{prefix}.weight"], shapes[f"{prefix}.bias"] = (out, inp, k, k), (out,)

    def resnet(prefix: str, inp: int, out: int) -> None:
        norm(f"{prefix}.norm1", inp)
        conv(f"{prefix}.conv1", out, inp, 3)
        norm(f"{prefix}.norm2", out)
        conv(f"{prefix}.conv2", out, out, 3)
        if inp != out:
            conv(f"{prefix}.nin_shortcut", out, inp, 1)

    def middle(prefix: str, c: int) -> None:
        resnet(f"{prefix}.mid.block_1", c, c)
        norm(f"{prefix}.mid.attn_1.norm", c)
        for name in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{name}", c, c, 1)
        resnet(f"{prefix}.mid.block_2", c, c)

    widths = [ch * m for m in ch_mult]
    conv("encoder.conv_in", ch, 3, 3)
    current = ch
    for i, width in enumerate(widths):
        for j in range(blocks):
            resnet(f"encoder.down.{i}.block.{j}", current, width)
            current = width
        if i < len(widths) - 1:
            conv(f"encoder.down.{i}.downsample.conv", width, width, 3)
    middle("encoder", current)
    norm("encoder.norm_out", current)
    conv("encoder.conv_out", 2 * z, current, 3)
    conv("decoder.conv_in", current, z, 3)
    middle("decoder", current)
    for i in reversed(range(len(widths))):
        for j in range(blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", current, widths[i])
            current = widths[i]
        if i > 0:
            conv(f"decoder.up.{i}.upsample.conv", current, current, 3)
    norm("decoder.norm_out", current)
    conv("decoder.conv_out", 3, current, 3)
    conv("quant_conv", 2 * z, 2 * z, 1)
    conv("post_quant_conv", z, z, 1)
    return {f"first_stage_model.{k}": v for k, v in shapes.items()}


def tiny_vae_state() -> dict[str, torch.Tensor]:
    """Random LDM VAE weights at VAE_CH / VAE_CH_MULT (unit norms, fan-in scaled convs)."""
    gen = torch.Generator().manual_seed(1)
    state = {}
    for key, shape in ldm_vae_shapes(VAE_CH, VAE_CH_MULT).items():
        if len(shape) == 1:
            state[key] = torch.ones(shape) if ".norm" in key else torch.zeros(shape)
        else:
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=gen) / fan_in**0.5
    return state


def folder_original_config() -> dict:
    """The LDM config of the folder's SD checkpoint: the fixture's, with the wider VAE."""
    config = copy.deepcopy(tiny_original_config())
    ddconfig = config["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
    ddconfig.update(ch=VAE_CH, ch_mult=list(VAE_CH_MULT))
    return config


def folder_sd_state() -> dict[str, torch.Tensor]:
    """The folder's SD checkpoint: the fixture's UNet and text encoder, tiny_vae_state's VAE."""
    ckpt = {k: v for k, v in tiny_sd()[0].items() if not k.startswith("first_stage_model.")}
    return {**ckpt, **tiny_vae_state()}


@cache
def _folder_diffusers_configs() -> tuple[dict, dict]:
    return conv.diffusers_configs(folder_original_config(), folder_sd_state())


def tiny_model_config(classifier: str = "label") -> dict:
    """create_model(config=...) for odise_test_tiny to load the folder's files: the folder's UNet
    (2 GroupNorm groups, as the fixture was made) and VAE, and the release's 6 + 9 layers."""
    unet, vae = _folder_diffusers_configs()
    groups = int(tiny_sd()[2]["norm_num_groups"])
    return {
        "classifier": classifier,
        "unet": {**unet, "norm_num_groups": groups},
        "vae": {**vae, "norm_num_groups": 32},
        "mask2former": {"enc_layers": 6, "dec_layers": 9},
    }


# official_shapes dims of odise_test_tiny + tiny_model_config: mask2former hidden 32, 8 queries,
# 2 heads x 3 levels x 4 points, feed-forward 64; projections 128 (bottleneck 32); the fixture
# UNet's 8-wide context and 16-wide time embedding; odise_test_tiny's 32-wide CLIP embedding.
TINY_MODEL_DIMS = dict(clip=32, context=8, tokens=77, time=16, bottleneck=32, proj=128, hidden=32,
                       taps=(128, 128, 12, 8, 8, 8, 128, 128), enc_ff=64, dec_ff=64, queries=8,
                       offsets=48, weights=24, classes=134)  # fmt: skip


@contextmanager
def tiny_converter_defaults() -> Iterator[None]:
    """The converter's SD (v1-inference) and CLIP (ViT-L/14-336) defaults at the folder's sizes."""
    with (
        mock.patch.object(conv, "SD_V1_INFERENCE_CONFIG", folder_original_config()),
        mock.patch.object(conv, "_clip_model_config", lambda: dict(TINY_MODEL_CLIP)),
    ):
        yield


def write_official_folder(
    folder: Path, classifiers: tuple[str, ...] = ("label", "caption"), clip: str = "jit"
) -> dict[str, dict]:
    """Write the official files for odise_test_tiny into `folder` under their release names:
    the ODISE .pth of each classifier, sd-v1-3.ckpt (a Lightning pickle), ViT-L-14-336px.pt
    (`clip`: "jit", OpenAI's TorchScript archive, or "state_dict", a torch.save of its weights).
    Returns what was written: {"label"/"caption": release state dict, "clip": CLIP state dict}."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for classifier in classifiers:
        state = official_state_dict(classifier, TINY_MODEL_DIMS)
        torch.save({"model": state}, folder / conv.OFFICIAL_FILES[classifier][0])
        written[classifier] = state
    save_lightning_checkpoint(folder / conv.OFFICIAL_FILES["sd"][0], folder_sd_state())
    clip_path = folder / conv.OFFICIAL_FILES["clip"][0]
    torch.manual_seed(0)
    if clip == "jit":
        model = save_openai_style_archive(clip_path, dict(TINY_MODEL_CLIP))
        written["clip"] = dict(model.state_dict())
    else:
        written["clip"] = dict(open_clip.model.CLIP(**TINY_MODEL_CLIP).state_dict())
        torch.save(written["clip"], clip_path)
    return written
