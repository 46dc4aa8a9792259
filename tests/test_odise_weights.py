"""ODISE weights through the core loading path: the missing-weights message, a folder of the
official files as `checkpoint_path=`, `promptseg convert` of such a folder, components fetched
(resumed, sha256-checked) from sources, Lightning pickles read safely, and the resident size of
the full model.

The files are synthetic, in the official layouts, at a size `odise_test_tiny` loads with
`tiny_model_config` (tests/odise_fixtures.py); the converter's SD / CLIP defaults are set to the
same sizes by `tiny_converter_defaults`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import numpy as np
import open_clip
import pytest
import torch

import promptseg
from promptseg import Vocabulary, cli
from promptseg.convert import odise as conv
from promptseg.errors import CheckpointFormatError, ChecksumError, WeightsNotFoundError
from promptseg.weights import (
    WeightSource,
    fetch_native,
    files_sha256,
    load_state_dict_file,
    native_checkpoint_path,
    sha256_file,
)
from promptseg.zoo import WeightRoute, build_model, model_info
from tests.odise_fixtures import (
    TINY,
    TINY_MODEL_CLIP,
    folder_sd_state,
    ldm_vae_shapes,
    lightning_importable,
    official_state_dict,
    save_lightning_checkpoint,
    tiny_converter_defaults,
    tiny_model_config,
    tiny_sd,
    write_official_folder,
)

CLIP_SHA256 = "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02"
PTH = {tag: conv.OFFICIAL_FILES[tag][0] for tag in ("label", "caption")}
VOCAB = Vocabulary("cat,kitty;dog;sky;grass", is_thing=[True, True, False, False])
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


@pytest.fixture(scope="module")
def defaults() -> Iterator[None]:
    with tiny_converter_defaults():
        yield


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A folder holding both ODISE files, sd-v1-3.ckpt and ViT-L-14-336px.pt (TorchScript)."""
    folder = tmp_path_factory.mktemp("official")
    return folder, write_official_folder(folder)


@pytest.fixture(scope="module")
def models(official, defaults, tmp_path_factory) -> dict[str, torch.nn.Module]:
    """odise_test_tiny of each classifier loaded from the one folder (each picks its .pth)."""
    cache = tmp_path_factory.mktemp("cache")
    return {
        tag: promptseg.create_model(
            "odise_test_tiny",
            checkpoint_path=official[0],
            cache_dir=cache,
            config=tiny_model_config(tag),
        )
        for tag in ("label", "caption")
    }


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)


# -- the missing-weights message ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["odise_sd13_m2f", "odise_sd13_m2f.caption_coco50e"])
def test_offline_miss_names_every_file_and_its_cache_path(name, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    card = model_info(name)
    with pytest.raises(WeightsNotFoundError) as info:
        promptseg.create_model(name, cache_dir=tmp_path)
    message = str(info.value)
    tag = "label" if card.config["classifier"] == "label" else "caption"
    for path in (
        tmp_path / card.name / PTH[tag],
        tmp_path / conv.SD_COMPONENT / "sd-v1-3.ckpt",
        tmp_path / conv.CLIP_COMPONENT / "ViT-L-14-336px.pt",
    ):
        assert str(path) in message
    other = "caption" if tag == "label" else "label"
    assert PTH[other] not in message
    assert CLIP_SHA256 in message and "CompVis/stable-diffusion-v-1-3-original" in message
    assert "(missing)" in message and "checkpoint_path=FOLDER" in message


def test_components_present_missing_and_checked(tmp_path, defaults, monkeypatch):
    """The route's .pth in the cache: the message says which component is there; a component
    file whose sha256 differs from zoo.yaml's is reported and kept, never used."""
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    card = model_info("odise_sd13_m2f")
    (tmp_path / card.name).mkdir()
    torch.save({"model": official_state_dict("label", TINY)}, tmp_path / card.name / PTH["label"])
    clip = tmp_path / conv.CLIP_COMPONENT / "ViT-L-14-336px.pt"
    clip.parent.mkdir()
    clip.write_bytes(b"not the OpenAI file")
    with pytest.raises(WeightsNotFoundError) as info:
        promptseg.create_model(card.name, cache_dir=tmp_path)
    message = str(info.value)
    assert f"component {conv.CLIP_COMPONENT}: present at {clip}" in message
    assert f"component {conv.SD_COMPONENT} (missing)" in message
    assert str(tmp_path / conv.SD_COMPONENT / "sd-v1-3.ckpt") in message

    sd = tmp_path / conv.SD_COMPONENT / "sd-v1-3.ckpt"
    sd.parent.mkdir()
    save_lightning_checkpoint(sd, folder_sd_state())  # read from the cache like the real one
    with pytest.raises(ChecksumError, match=CLIP_SHA256) as info:
        promptseg.create_model(card.name, cache_dir=tmp_path)
    assert str(clip) in str(info.value) and clip.read_bytes() == b"not the OpenAI file"
    assert not native_checkpoint_path(card, tmp_path).exists()


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serve a folder, honouring `Range: bytes=N-`; record each (path, Range) asked for."""

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("Range")))
        data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        start = int((self.headers.get("Range") or "bytes=0-")[6:].rstrip("-"))
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args) -> None:
        pass


def test_components_download_resume_and_verify(official, models, tmp_path, monkeypatch):
    """The route's .pth and both components from URLs: a partial component resumes, sha256s are
    checked, and the cached conversion equals the folder's."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    for var in ("PROMPTSEG_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    folder, _ = official
    handler = lambda *a, **k: _RangeHandler(*a, directory=str(folder), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    def source(name: str) -> WeightSource:
        return WeightSource("url", name, url=f"{url}/{name}", sha256=sha256_file(folder / name))

    requires = (conv.SD_COMPONENT, conv.CLIP_COMPONENT)
    card = dataclasses.replace(
        model_info("odise_test_tiny", config=tiny_model_config("label")),
        weights=(WeightRoute("odise", (source(PTH["label"]),), requires),),
        components={
            conv.SD_COMPONENT: (source("sd-v1-3.ckpt"),),
            conv.CLIP_COMPONENT: (source("ViT-L-14-336px.pt"),),
        },
    )
    part = tmp_path / conv.SD_COMPONENT / "sd-v1-3.ckpt.part"
    part.parent.mkdir()
    part.write_bytes((folder / "sd-v1-3.ckpt").read_bytes()[:1000])
    try:
        state = fetch_native(card, cache_dir=tmp_path, progress=False)
    finally:
        server.shutdown()
    assert ("/sd-v1-3.ckpt", "bytes=1000-") in server.requests
    assert not part.exists()
    for name in ("sd-v1-3.ckpt", "ViT-L-14-336px.pt"):
        component = conv.SD_COMPONENT if name.startswith("sd") else conv.CLIP_COMPONENT
        assert sha256_file(tmp_path / component / name) == sha256_file(folder / name)
    expected = models["label"].state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert native_checkpoint_path(card, tmp_path).is_file()


# -- a folder of official files -------------------------------------------------------------------


def test_folder_loads_each_tag_from_its_own_file(official, models):
    folder, written = official
    label, caption = models["label"], models["caption"]
    assert torch.equal(label.text_head.null_embed, written["label"]["category_head.null_embed"])
    assert caption.text_head.null_embed is None
    assert torch.equal(
        caption.head.predictor.class_embed.weight,
        written["caption"]["sem_seg_head.predictor.class_embed.weight"],
    )
    for key in ("backbone.unet.conv_in.weight", "clip.visual.proj", "empty_prompt_embedding"):
        assert torch.equal(label.state_dict()[key], caption.state_dict()[key]), key
    assert torch.equal(label.clip.visual.proj, written["clip"]["visual.proj"])
    torch.testing.assert_close(
        label.empty_prompt_embedding, tiny_sd()[1]["empty_prompt_embedding"], atol=1e-6, rtol=0
    )
    for tag, model in models.items():  # the sha256 of the three files read, as sha256sum lists
        files = [folder / PTH[tag], folder / "sd-v1-3.ckpt", folder / "ViT-L-14-336px.pt"]
        assert model.card.weights_sha256 == files_sha256(folder, files)
        listing = "".join(f"{sha256_file(f)}  {f.name}\n" for f in files)
        assert model.card.weights_sha256 == hashlib.sha256(listing.encode()).hexdigest()
    assert label.card.weights_sha256 != caption.card.weights_sha256
    # the user's files are read as they are: zoo.yaml's CLIP sha256 applies to downloads only
    assert sha256_file(folder / "ViT-L-14-336px.pt") != CLIP_SHA256
    sources = model_info("odise_sd13_m2f").components[conv.CLIP_COMPONENT]
    assert any(s.sha256 == CLIP_SHA256 for s in sources)


def test_folder_missing_files_are_named(tmp_path):
    torch.save({"model": official_state_dict("label", TINY)}, tmp_path / PTH["label"])
    with pytest.raises(WeightsNotFoundError) as info:
        promptseg.create_model("odise_test_tiny", checkpoint_path=tmp_path)
    message = str(info.value)
    assert "lacks 2 of the files" in message
    for name in ("sd-v1-3.ckpt", "ViT-L-14-336px.pt"):
        assert f"{tmp_path / name}  <-  https://" in message
    with pytest.raises(WeightsNotFoundError, match=PTH["caption"]):
        promptseg.create_model(
            "odise_test_tiny", checkpoint_path=tmp_path, config={"classifier": "caption"}
        )


def test_an_embedding_file_replaces_the_sd_text_encoder(official, models, defaults, tmp_path):
    """sd-v1-3.ckpt without its text encoder loads when empty_prompt_embedding.safetensors
    (key `embedding`) lies beside it; without either, the error names both ways."""
    import shutil

    import safetensors.torch

    folder, _ = official
    for name in (PTH["label"], "ViT-L-14-336px.pt"):
        shutil.copy(folder / name, tmp_path / name)
    no_text = {k: v for k, v in folder_sd_state().items() if not k.startswith("cond_stage_model.")}
    save_lightning_checkpoint(tmp_path / "sd-v1-3.ckpt", no_text)
    config = tiny_model_config("label")
    with pytest.raises(CheckpointFormatError, match="empty_prompt_embedding.safetensors"):
        promptseg.create_model("odise_test_tiny", checkpoint_path=tmp_path, config=config)
    embedding = torch.randn(1, 77, models["label"].empty_prompt_embedding.shape[-1])
    safetensors.torch.save_file(
        {"embedding": embedding}, tmp_path / "empty_prompt_embedding.safetensors"
    )
    model = promptseg.create_model("odise_test_tiny", checkpoint_path=tmp_path, config=config)
    assert torch.equal(model.empty_prompt_embedding, embedding)
    assert torch.equal(model.clip.visual.proj, models["label"].clip.visual.proj)


def test_plain_clip_state_dict_reads_like_the_archive(official, tmp_path):
    folder, written = official
    plain = tmp_path / "ViT-L-14-336px.pt"
    torch.save({k: v.half() for k, v in written["clip"].items()}, plain)
    from_archive = conv.clip_to_native(folder / "ViT-L-14-336px.pt", TINY_MODEL_CLIP)
    from_plain = conv.clip_to_native(plain, TINY_MODEL_CLIP)
    assert from_plain.keys() == from_archive.keys()
    assert all(torch.equal(from_plain[k], from_archive[k].half().float()) for k in from_plain)


# -- promptseg convert ----------------------------------------------------------------------------


def test_convert_folder_then_native_file_gives_identical_outputs(
    official, models, defaults, tmp_path, image, capsys
):
    folder, _ = official
    out = tmp_path / "odise_caption.safetensors"
    config = tiny_model_config("caption")
    flags = [f"--config={key}={json.dumps(value)}" for key, value in config.items()]
    argv = ["convert", "odise_test_tiny", str(folder), "-o", str(out), *flags]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert str(out) in capsys.readouterr().out

    native = promptseg.create_model("odise_test_tiny", checkpoint_path=out, config=config)
    from_folder = models["caption"]
    assert native.card.weights_sha256 == sha256_file(out)
    expected = from_folder.state_dict()
    assert native.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in native.state_dict().items())
    a = from_folder.segment(image, VOCAB, level="all", return_logits=True)
    b = native.segment(image, VOCAB, level="all", return_logits=True)
    assert len(a) > 0 and a.level == b.level and a.labels == b.labels
    assert torch.equal(a.masks, b.masks) and torch.equal(a.scores, b.scores)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.panoptic["id_map"], b.panoptic["id_map"])


def test_convert_names_the_missing_files(tmp_path, capsys):
    argv = ["convert", "odise_sd13_m2f.caption_coco50e", str(tmp_path), "-o", "x.safetensors"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "odise_caption_coco_50e-853cc971.pth" in err and "sd-v1-3.ckpt" in err


# -- the core checkpoint reader -------------------------------------------------------------------


def test_lightning_checkpoint_reads_without_lightning(tmp_path):
    weights = {"model.diffusion_model.w": torch.arange(4.0), "betas": torch.ones(3)}
    path = tmp_path / "sd-v1-3.ckpt"
    save_lightning_checkpoint(path, weights)
    assert "pytorch_lightning" not in sys.modules
    state = load_state_dict_file(path)
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    assert conv.load_checkpoint(path).keys() == weights.keys()  # the converter reads the same way


def test_legacy_format_lightning_checkpoint(tmp_path):
    """The pre-zip torch.save format: training objects are found while loading, then stubbed."""
    path = tmp_path / "old.ckpt"
    with lightning_importable() as lightning:
        obj = {"state_dict": {"w": torch.ones(2)}, "callbacks": lightning.ModelCheckpoint()}
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_state_dict_file(path)["w"], torch.ones(2))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_other_pickled_objects_are_refused_in_one_line(tmp_path, legacy):
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"w": torch.zeros(1)}, "hook": print}
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointFormatError) as info:
        load_state_dict_file(path)
    message = str(info.value)
    assert "print" in message and "\n" not in message and "weights_only" not in message
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(200), "a JPEG image"),
        (b"\x89PNG\r\n\x1a\n" + bytes(200), "a PNG image"),
        (b"<!DOCTYPE html><html><body>Access denied</body></html>", "an HTML page"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n", "Git LFS"),
        (b"epoch: 3\nlr: 0.1\n", "a text file"),
        (b"", "empty"),
    ],
    ids=["jpeg", "png", "html", "lfs", "text", "empty"],
)
@pytest.mark.parametrize("suffix", [".pth", ".ckpt"])
def test_a_file_that_is_no_checkpoint_is_one_clear_line(tmp_path, content, what, suffix):
    path = tmp_path / f"sd-v1-3{suffix}"
    path.write_bytes(content)
    with pytest.raises(CheckpointFormatError) as info:
        load_state_dict_file(path)
    message = str(info.value)
    assert f"{path} is not a checkpoint" in message and what in message
    assert "\n" not in message and "weights_only" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_ldm_vae_shapes_match_the_ldm_fixture():
    """The folder's SD VAE is written from the same structure the LDM-made fixture has."""
    fixture = {k: tuple(v.shape) for k, v in tiny_sd()[0].items()}
    vae = {k: v for k, v in fixture.items() if k.startswith("first_stage_model.")}
    assert ldm_vae_shapes(4, (1, 1, 1, 2)) == vae


# -- memory ---------------------------------------------------------------------------------------


def test_full_model_fp32_weights_fit_in_6_gb():
    """odise_sd13_m2f built on the meta device: one CLIP, no SD text encoder, <= 6 GB in fp32."""
    with torch.device("meta"):
        model = build_model(model_info("odise_sd13_m2f"))
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    size = sum(t.numel() * 4 for t in tensors.values())  # every tensor held in float32
    parts = {
        name: sum(p.numel() * 4 for p in module.parameters())
        for name, module in (
            ("clip", model.clip),
            ("unet", model.backbone.unet),
            ("vae", model.backbone.vae),
        )
    }
    detail = ", ".join(f"{k} {v / 1e9:.3f} GB" for k, v in parts.items())
    assert size <= 6e9, f"fp32 weights resident: {size} bytes ({size / 1e9:.3f} GB; {detail})"
    print(f"odise_sd13_m2f fp32 weights resident: {size} bytes ({detail})")
    assert sum(isinstance(m, open_clip.model.CLIP) for m in model.modules()) == 1
    assert not any("CLIPText" in type(m).__name__ for m in model.modules())
    trained = sum(
        p.numel()
        for name, p in model.named_parameters()
        if not name.startswith(("clip.", "backbone.unet.", "backbone.vae."))
    )
    assert trained == 28_067_009  # the release's trained modules (spec §8.1: 28.1M)
