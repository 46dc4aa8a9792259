"""DiffewS checkpoints -> the native layout: `backbone.unet.*`, `conv_in_ref.*`, `vae.*`,
`empty_prompt_embedding`.

Layouts read:
- a pipeline folder as released (`unet/` with the fine-tuned UNet incl. `conv_in_ref`, `vae/`,
  optionally `empty_prompt_embedding.safetensors`), read as `unet.*` / `vae.*` /
  `empty_prompt_embedding` keys;
- a bare fine-tuned UNet state dict (the 686 stock SD 2.1 UNet tensors + `conv_in_ref.weight`,
  `conv_in_ref.bias`), the VAE and the empty-prompt embedding then coming from the base pipeline
  component (`diffews_sd21_base`);
- promptseg's own native files.
The UNet keys are diffusers' own (the official attention modules are subclasses with the same
parameters), so only prefixes change; old diffusers VAE attention names are renamed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F

from ..errors import CheckpointFormatError
from ..registry import register_converter
from .common import expect_no_leftovers, rename_keys, strip_prefix

__all__ = [
    "convert_diffews",
    "detect_layout",
    "pipeline_to_native",
    "unet_to_native",
    "write_empty_prompt_embedding",
]

StateDict = dict[str, torch.Tensor]
Require = Callable[[str], StateDict]
BASE_COMPONENT = "diffews_sd21_base"
REF_CONV = ("conv_in_ref.weight", "conv_in_ref.bias")
_OLD_VAE_ATTENTION = [  # diffusers < 0.14 VAE attention names -> current
    (r"(.*attentions\.\d+)\.query\.(weight|bias)", r"\1.to_q.\2"),
    (r"(.*attentions\.\d+)\.key\.(weight|bias)", r"\1.to_k.\2"),
    (r"(.*attentions\.\d+)\.value\.(weight|bias)", r"\1.to_v.\2"),
    (r"(.*attentions\.\d+)\.proj_attn\.(weight|bias)", r"\1.to_out.0.\2"),
    (r"(.*)", r"\1"),
]


def _fp32(state_dict: StateDict) -> StateDict:
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def unet_to_native(unet: StateDict) -> StateDict:
    """DiffewS UNet state dict (stock keys + conv_in_ref) -> `backbone.unet.*`, `conv_in_ref.*`."""
    missing = [k for k in REF_CONV if k not in unet]
    if missing:
        raise CheckpointFormatError(
            f"the UNet has no {', '.join(missing)}: it is a stock Stable Diffusion UNet, not a "
            "DiffewS one (DiffewS adds an 8-channel reference input conv)"
        )
    if "conv_in.weight" not in unet:
        raise CheckpointFormatError("the UNet has no conv_in.weight; is this a UNet state dict?")
    ref = {k: unet[k] for k in REF_CONV}
    stock = {f"backbone.unet.{k}": v for k, v in unet.items() if k not in REF_CONV}
    in_ref, in_query = ref["conv_in_ref.weight"].shape[1], unet["conv_in.weight"].shape[1]
    if in_ref != 2 * in_query:
        raise CheckpointFormatError(
            f"conv_in_ref takes {in_ref} channels but conv_in {in_query}; DiffewS's reference "
            "conv takes the image and the mask latents, twice the query's channels"
        )
    return _fp32({**stock, **ref})


def vae_to_native(vae: StateDict) -> StateDict:
    """An AutoencoderKL state dict (any diffusers naming) -> `vae.*`."""
    renamed, _ = rename_keys(vae, _OLD_VAE_ATTENTION)
    return _fp32({f"vae.{k}": v for k, v in renamed.items()})


def _embedding(state_dict: StateDict, where: str) -> StateDict:
    """The empty-prompt embedding [1, L, C] as a native buffer."""
    if "empty_prompt_embedding" not in state_dict:
        raise CheckpointFormatError(
            f"{where} has no empty-prompt embedding: put empty_prompt_embedding.safetensors "
            "(key `embedding`, [1, L, C]) beside the weights, or compute it once from the "
            "pipeline's text encoder with promptseg.convert.diffews.write_empty_prompt_embedding"
            "(FOLDER)"
        )
    e = state_dict["empty_prompt_embedding"]
    if e.ndim != 3 or e.shape[0] != 1 or not torch.isfinite(e).all():
        raise CheckpointFormatError(
            f"{where}: empty_prompt_embedding must be finite [1, L, C], got {tuple(e.shape)}"
        )
    return {"empty_prompt_embedding": e.float()}


def pipeline_to_native(state_dict: StateDict, require: Require | None = None) -> StateDict:
    """`unet.*` (+ `vae.*`, `empty_prompt_embedding`) -> native; missing parts from the base."""
    unet = strip_prefix(state_dict, "unet.")
    vae = strip_prefix(state_dict, "vae.")
    other = [
        k
        for k in state_dict
        if not k.startswith(("unet.", "vae.", "text_encoder.")) and k != "empty_prompt_embedding"
    ]
    expect_no_leftovers(other, "DiffewS pipeline")
    native = unet_to_native(unet)
    if not vae or "empty_prompt_embedding" not in state_dict:
        if require is None:
            raise CheckpointFormatError(
                "this DiffewS checkpoint lacks the VAE or the empty-prompt embedding, which come "
                f"from the base pipeline folder (component {BASE_COMPONENT})"
            )
        base = require(BASE_COMPONENT)
        vae = vae or strip_prefix(base, "vae.")
        state_dict = {**base, **state_dict}
    return {**native, **vae_to_native(vae), **_embedding(state_dict, "the DiffewS pipeline")}


def detect_layout(state_dict: StateDict) -> str:
    """'native' | 'pipeline' | 'unet' | 'unknown' from telltale keys."""
    if any(k.startswith("backbone.unet.") for k in state_dict):
        return "native"
    if any(k.startswith("unet.") for k in state_dict):
        return "pipeline"
    if "conv_in.weight" in state_dict and any(k.startswith("down_blocks.") for k in state_dict):
        return "unet"
    return "unknown"


def write_empty_prompt_embedding(folder: str | Path) -> Path:
    """Compute the constant text conditioning once, from a pipeline folder's `text_encoder/` (and
    `tokenizer/`) -> `empty_prompt_embedding.safetensors` in `folder` with two keys:
    `embedding`, the empty prompt not padded (BOS, EOS) as inference uses it [1, 2, C], and
    `padded`, the empty prompt padded to the tokenizer's length as the official training used it
    [1, 77, C] (for `promptseg train diffews`, key `text_context`). Final layer norm included.

    Needs the `transformers` package (inference never loads a text encoder afterwards).
    """
    folder = Path(folder)
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as exc:
        raise ImportError(
            "computing the empty-prompt embedding needs `transformers` (pip install "
            "transformers), or put empty_prompt_embedding.safetensors in the folder yourself"
        ) from exc
    if not (folder / "text_encoder").is_dir():
        raise FileNotFoundError(f"{folder} has no text_encoder/ folder to embed the empty prompt")
    model = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    length = model.config.max_position_embeddings
    if (folder / "tokenizer").is_dir():
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        ids = torch.tensor([tokenizer("", padding="do_not_pad")["input_ids"]])
        padded = tokenizer("", padding="max_length", max_length=length)["input_ids"]
        padded = torch.tensor([padded])
    else:  # "" is BOS, EOS; SD 2's tokenizer pads with id 0 (its `temp_input_ids.pt` too)
        ids = torch.tensor([[model.config.bos_token_id, model.config.eos_token_id]])
        padded = F.pad(ids, (0, length - 2), value=0)
    with torch.no_grad():
        embedding = model(input_ids=ids).last_hidden_state.float().contiguous()  # [1, 2, C]
        padded_embedding = model(input_ids=padded).last_hidden_state.float().contiguous()
    path = folder / "empty_prompt_embedding.safetensors"
    safetensors.torch.save_file({"embedding": embedding, "padded": padded_embedding}, str(path))
    return path


def _folder_config(folder: Path, name: str) -> dict | None:
    """A pipeline component's diffusers `config.json` (`name/` or nested `name/name/`), without
    the private keys and DiffewS's `in_channels_ref`; None when absent."""
    for candidate in (folder / name / "config.json", folder / name / name / "config.json"):
        if candidate.is_file():
            try:
                config = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise CheckpointFormatError(f"{candidate} is not a readable JSON config") from exc
            if not isinstance(config, dict):
                raise CheckpointFormatError(f"{candidate} is not a JSON object")
            return {k: v for k, v in config.items()
                    if not k.startswith("_") and k != "in_channels_ref"}  # fmt: skip
    return None


def config_from(path: Path, config: dict) -> dict:
    """The model config with the UNet / VAE architectures of a pipeline folder's config.json
    files (as diffusers' from_pretrained reads them), so a checkpoint of any size loads."""
    if not path.is_dir():
        return config
    unet, vae = _folder_config(path, "unet"), _folder_config(path, "vae")
    out = dict(config)
    if unet is not None:
        out["backbone"] = {**config["backbone"], "unet": unet}
    if vae is not None:
        out["vae"] = vae
    return out


@register_converter("diffews")
def convert_diffews(state_dict: StateDict, require: Require | None = None) -> StateDict:
    """Any DiffewS layout promptseg knows -> native (what `checkpoint_path=` accepts)."""
    layout = detect_layout(state_dict)
    if layout == "native":
        return state_dict
    if layout == "pipeline":
        return pipeline_to_native(state_dict, require)
    if layout == "unet":
        return pipeline_to_native({f"unet.{k}": v for k, v in state_dict.items()}, require)
    sample = ", ".join(sorted(state_dict)[:6])
    raise CheckpointFormatError(
        "unknown DiffewS checkpoint layout (expected a pipeline folder with unet/ and vae/, a "
        f"UNet state dict with conv_in_ref.*, or promptseg's own); keys: {sample}, ..."
    )


convert_diffews.config_from = config_from  # read by create_model(checkpoint_path=FOLDER)
