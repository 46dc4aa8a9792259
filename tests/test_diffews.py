"""DiffewS: one-step image-to-mask numerics, the fused single pass vs the official two passes,
support banks reused across queries, per-component dtypes."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import promptseg
from promptseg.errors import CheckpointFormatError
from promptseg.models.diffews import SupportBank, quantized_map, relative_threshold


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = promptseg.create_model("diffews_test_tiny", pretrained=False)
    with torch.no_grad():
        model.empty_prompt_embedding.normal_()
    return model


@pytest.fixture
def episode():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    ref = rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)
    mask = np.zeros((36, 36), bool)
    mask[5:30, 8:28] = True
    return img, ref, mask


def test_quantised_map_floors_and_the_threshold_is_relative_to_all_channels():
    decoded = torch.tensor([[[[-2.0, 0.0]], [[0.999, -1.0]], [[0.5, 1.0]]]])  # [1, 3, 1, 2]
    p = quantized_map(decoded)
    # 255 * (0.5 * x + 0.5), floored: clamp(-2) -> 0, 0 -> 127 (127.5), 0.999 -> 254, 0.5 -> 191
    assert (p * 255).round().flatten().tolist() == [0, 127, 254, 0, 191, 255]

    def mask(p, tau):
        return p.mean(dim=1) > relative_threshold(p, tau)[:, None, None]

    # channel means 445/765 and 382/765; max over ALL channels is 255/255 = 1 -> thr 0.55
    assert relative_threshold(p, 0.55).tolist() == pytest.approx([0.55])
    assert mask(p, 0.55).tolist() == [[[True, False]]]
    assert mask(p, 0.2).tolist() == [[[True, True]]]
    # strict >, and an all-zero map is empty
    assert not mask(torch.zeros(1, 3, 2, 2), 0.25).any()
    assert not mask(torch.full((1, 3, 1, 1), 0.5), 1.0).any()


def test_fused_pass_equals_the_two_official_passes(model, episode):
    img, ref, mask = episode
    prompt = promptseg.SupportSet([promptseg.VisualPrompt(ref, mask), (ref[::-1].copy(), mask)])
    with torch.inference_mode():
        (fused_bank,) = model.encode_prompt([prompt])
        two_pass_bank = copy.copy(fused_bank)
        z_q = model.embed_image(img).features["default"]
        fused = model.query_pass(z_q, fused_bank)  # one call of batch 1 + K
        model.support_pass(two_pass_bank)  # references alone, then the query
        two_pass = model.query_pass(z_q, two_pass_bank)
    torch.testing.assert_close(fused, two_pass, atol=1e-5, rtol=0)
    assert fused_bank.layers.keys() == two_pass_bank.layers.keys()
    for name, (k, _) in fused_bank.layers.items():
        torch.testing.assert_close(k, two_pass_bank.layers[name][0], atol=1e-5, rtol=0)
        assert k.shape[0] == 2  # K = 2 shots
    a = model.segment(img, prompt_embeddings=[SupportBank(fused_bank.latents)], prompt=None)
    b = model.segment(img, prompt_embeddings=[two_pass_bank], prompt=None)
    assert torch.equal(a.masks, b.masks)


def test_a_bank_serves_many_queries_and_matches_segment(model, episode):
    img, ref, mask = episode
    prompt = promptseg.VisualPrompt(ref, mask)
    pred = promptseg.Predictor(model)
    pred.set_prompt(prompt)
    for image in (img, img[:, ::-1].copy()):
        pred.set_image(image)
        res = pred.predict(return_logits=True)
        direct = model.segment(image, prompt, return_logits=True)
        # the fused first call and the cached bank differ by ~1e-6 before the uint8 floor: a
        # value at a quantisation step may move by one level (1 / 255 per channel)
        torch.testing.assert_close(res.logits, direct.logits, atol=1.01 / 255, rtol=0)
        assert (res.logits != direct.logits).float().mean() < 0.01
        assert res.masks.shape == (1, *image.shape[:2])
    assert pred._prompt_embeddings[0].layers is not None  # kept after the first query


def test_several_queries_run_in_one_unet_call_against_one_bank(model, episode, monkeypatch):
    """segment_many: every query in one batched UNet call; same maps as one query at a time."""
    img, ref, mask = episode
    prompt = promptseg.VisualPrompt(ref, mask)
    images = [img, img[:, ::-1].copy(), img[::-1].copy()]
    single = [model.segment(im, prompt, return_logits=True) for im in images]
    batches = []
    original = model.unet_pass

    def counting(x, n_query, text_context=None):
        batches.append((x.shape[0], n_query))
        return original(x, n_query, text_context)

    monkeypatch.setattr(model, "unet_pass", counting)
    many = model.segment_many(images, prompt, return_logits=True)
    assert batches == [(3 + 1, 3)]  # 3 queries + the support, one fused call
    for a, b in zip(many, single, strict=True):
        torch.testing.assert_close(a.logits, b.logits, atol=1.01 / 255, rtol=0)
        assert (a.logits != b.logits).float().mean() < 0.01
        assert a.masks.shape == b.masks.shape and a.meta["timings"]["decode"] > 0
    with pytest.raises(TypeError, match="non-empty list of images"):
        model.segment_many(img, prompt)


def test_relative_threshold_output_sizes_and_dtypes(model, episode):
    img, ref, mask = episode
    prompt = promptseg.VisualPrompt(ref, mask)
    res = model.segment(img, prompt, output_size="input", return_logits=True)
    assert res.masks.shape == (1, 32, 32) and res.meta["input_size"] == (32, 32)
    assert res.meta["threshold"] == 0.25 and res.meta["threshold_mode"] == "relative"
    with torch.inference_mode():
        emb = model.embed_image(img)
        raw = model.decode(emb.features, model.encode_prompt([prompt]), "semantic")
    assert torch.equal(res.masks, raw.mean(dim=1) > 0.25 * raw.max())  # max over all channels
    torch.testing.assert_close(res.logits, raw.mean(dim=1))
    full = model.segment(img, prompt, threshold=0.5)
    assert full.masks.shape == (1, 40, 60) and full.meta["threshold"] == 0.5
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert bf16.vae.encoder.conv_in.weight.dtype == torch.float32  # the VAE stays fp32
    assert bf16.backbone.unet.conv_in.weight.dtype == torch.bfloat16
    assert bf16.segment(img, prompt).masks.shape == (1, 40, 60)


def test_support_sets_round_trip_through_prompt_files(model, episode, tmp_path):
    img, ref, mask = episode
    flipped = (ref[:, ::-1].copy(), mask[:, ::-1].copy())
    prompts = [promptseg.VisualPrompt(ref, mask), promptseg.SupportSet([(ref, mask), flipped])]
    banks = model.encode_prompt(prompts)
    path = tmp_path / "support.safetensors"
    model.save_prompt_embedding(banks, path)
    loaded = model.load_prompt_embedding(path)
    assert [b.shots for b in loaded] == [1, 2]
    direct = model.segment(img, prompts, return_logits=True)
    again = model.segment(img, loaded, return_logits=True)  # a prompt embedding as the prompt
    torch.testing.assert_close(again.logits, direct.logits)
    bad = tmp_path / "bad.safetensors"
    with safetensors.safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["0.latents"][0, 0, 0, 0] += 1.0  # one value changed: the checksum catches it
    safetensors.torch.save_file(tensors, bad, meta)
    with pytest.raises(ValueError, match="do not match the checksum"):
        model.load_prompt_embedding(bad)
    with pytest.raises(ValueError, match="not a DiffewS prompt file"):
        safetensors.torch.save_file({"x": torch.zeros(1)}, bad)
        model.load_prompt_embedding(bad)


def _official_pipeline(model) -> dict[str, torch.Tensor]:
    """The tiny model's weights under the released pipeline folder's key names."""
    state = model.state_dict()
    out = {k.replace("backbone.unet.", "unet."): v for k, v in state.items()}
    out = {k.replace("conv_in_ref.", "unet.conv_in_ref."): v for k, v in out.items()}
    return out


def test_converter_maps_every_official_tensor(model):
    from promptseg.convert.diffews import convert_diffews

    official = _official_pipeline(model)
    unet = {k[len("unet.") :]: v for k, v in official.items() if k.startswith("unet.")}
    assert sum(not k.startswith("conv_in_ref.") for k in unet) == len(
        model.backbone.unet.state_dict()
    )
    fresh = promptseg.create_model("diffews_test_tiny", pretrained=False)
    fresh.load_state_dict(convert_diffews(official), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    # a bare UNet: the VAE and the embedding come from the base pipeline component
    base = {k: v for k, v in official.items() if not k.startswith("unet.")}
    native = convert_diffews(unet, require=lambda name: base)
    assert native.keys() == model.state_dict().keys()
    with pytest.raises(CheckpointFormatError, match="stock Stable Diffusion UNet"):
        convert_diffews({k: v for k, v in unet.items() if not k.startswith("conv_in_ref")})
    with pytest.raises(CheckpointFormatError, match="base pipeline"):
        convert_diffews(unet)
    with pytest.raises(CheckpointFormatError, match="unknown DiffewS checkpoint layout"):
        convert_diffews({"film_mul.weight": torch.zeros(1)})


def write_pipeline(model, folder, *, nested: bool = False, with_vae: bool = True) -> None:
    """The released layout: unet/ (config.json incl. in_channels_ref + safetensors with
    conv_in_ref), vae/ (diffusers save_pretrained), empty_prompt_embedding.safetensors."""
    import json

    unet_dir = folder / "unet" / "unet" if nested else folder / "unet"
    model.backbone.unet.save_pretrained(unet_dir, safe_serialization=True)
    config = json.loads((unet_dir / "config.json").read_text())
    (unet_dir / "config.json").write_text(json.dumps({**config, "in_channels_ref": 8}))
    weights = safetensors.torch.load_file(unet_dir / "diffusion_pytorch_model.safetensors")
    ref = model.conv_in_ref.state_dict()
    weights.update({f"conv_in_ref.{k}": v.contiguous() for k, v in ref.items()})
    safetensors.torch.save_file(weights, unet_dir / "diffusion_pytorch_model.safetensors")
    if with_vae:
        model.vae.save_pretrained(folder / "vae", safe_serialization=True)
        embedding = {"embedding": model.empty_prompt_embedding.contiguous()}
        safetensors.torch.save_file(embedding, folder / "empty_prompt_embedding.safetensors")


@pytest.mark.parametrize("nested", [False, True])
def test_released_pipeline_folder_loads(model, tmp_path, nested):
    write_pipeline(model, tmp_path, nested=nested)
    loaded = promptseg.create_model("diffews_test_tiny", checkpoint_path=tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    from promptseg.weights import weights_sha256

    assert loaded.card.weights_sha256 == weights_sha256(tmp_path)


def test_the_architecture_comes_from_the_folder(tmp_path):
    """A UNet of another size than the zoo entry's loads: diffusers config.json is read."""
    torch.manual_seed(1)
    wider = promptseg.create_model(
        "diffews_test_tiny",
        pretrained=False,
        config={"backbone": {"unet": {"block_out_channels": [16, 16]}}},
    )
    write_pipeline(wider, tmp_path)
    loaded = promptseg.create_model("diffews_test_tiny", checkpoint_path=tmp_path)
    assert list(loaded.backbone.unet.config.block_out_channels) == [16, 16]
    assert torch.equal(loaded.conv_in_ref.weight, wider.conv_in_ref.weight)


def test_a_converted_file_records_the_folder_architecture(tmp_path):
    """`promptseg convert` of a folder of another size writes that architecture into the file's
    metadata: the converted file and the cache both rebuild the wider UNet."""
    from promptseg.cli import main
    from promptseg.weights import recorded_architecture

    torch.manual_seed(1)
    wider = promptseg.create_model(
        "diffews_test_tiny",
        pretrained=False,
        config={"backbone": {"unet": {"block_out_channels": [16, 16]}}},
    )
    write_pipeline(wider, tmp_path / "folder")
    out = tmp_path / "converted.safetensors"
    cache = tmp_path / "cache"
    for target in (["--output", str(out)], []):
        cmd = ["convert", "diffews_test_tiny", str(tmp_path / "folder"), "--cache-dir", str(cache)]
        assert main(cmd + target) == 0
    assert recorded_architecture(out)["backbone"]["unet"]["block_out_channels"] == [16, 16]
    for loaded in (
        promptseg.create_model("diffews_test_tiny", checkpoint_path=out),
        promptseg.create_model("diffews_test_tiny", cache_dir=cache),
    ):
        assert list(loaded.backbone.unet.config.block_out_channels) == [16, 16]
        for key, value in wider.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key


def test_a_fold_folder_takes_the_vae_from_the_base_pipeline(model, tmp_path):
    fold = tmp_path / "coco20i_fold0"
    write_pipeline(model, fold, with_vae=False)  # unet/ only, as released per fold
    cache = tmp_path / "cache"
    with pytest.raises(promptseg.WeightsNotFoundError, match="modelscope.*ref8inchannels"):
        promptseg.create_model("diffews_test_tiny", checkpoint_path=fold, cache_dir=cache)
    write_pipeline(model, cache / "diffews_sd21_base" / "stable-diffusion-2-1-ref8inchannels-"
                   "tag4inchannels")  # fmt: skip
    loaded = promptseg.create_model("diffews_test_tiny", checkpoint_path=fold, cache_dir=cache)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_empty_prompt_embedding_is_computed_once_from_the_text_encoder(tmp_path):
    transformers = pytest.importorskip("transformers")
    from promptseg.convert.diffews import write_empty_prompt_embedding

    config = transformers.CLIPTextConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2
    )
    torch.manual_seed(0)
    text = transformers.CLIPTextModel(config).eval()
    text.save_pretrained(tmp_path / "text_encoder")
    path = write_empty_prompt_embedding(tmp_path)
    embedding = safetensors.torch.load_file(path)["embedding"]
    with torch.no_grad():
        padded = text(input_ids=torch.tensor([[49406, 49407] + [0] * 75])).last_hidden_state
    assert embedding.shape == (1, 2, 8)  # not padded: BOS, EOS
    torch.testing.assert_close(embedding, padded[:, :2], atol=1e-5, rtol=0)  # causal: same rows
    training = safetensors.torch.load_file(path)["padded"]  # the official training context
    assert training.shape == (1, config.max_position_embeddings, 8)
    torch.testing.assert_close(training, padded[:, : training.shape[1]], atol=1e-5, rtol=0)


def test_released_weights_say_where_to_put_them(tmp_path):
    """ModelScope is not fetched automatically: the error names the folder, its source and the
    base pipeline it also needs, at once (no SD 2.1 model is built first)."""
    with pytest.raises(promptseg.WeightsNotFoundError) as err:
        promptseg.create_model("diffews_sd21.coco20i_fold0", cache_dir=tmp_path)
    message = str(err.value)
    assert "zzzmmz/Diffews" in message and "weight/coco_fold0" in message
    assert str(tmp_path / "diffews_sd21.coco20i_fold0" / "coco_fold0") in message
    assert "diffews_sd21_base" in message and "ref8inchannels" in message
    card = promptseg.model_info("diffews_sd21")
    assert card.name == "diffews_sd21.incontext" and card.default_threshold == 0.25


def official_tiny() -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """The stored official run (tests/data/diffews_official_tiny.safetensors, its metadata says
    how it was made) and diffews_test_tiny with its UNet, reference conv, VAE and text."""
    stored = safetensors.torch.load_file(
        Path(__file__).parent / "data" / "diffews_official_tiny.safetensors"
    )
    model = promptseg.create_model("diffews_test_tiny", pretrained=False)

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in stored.items() if k.startswith(prefix)}

    model.conv_in_ref.load_state_dict(part("unet.conv_in_ref."), strict=True)
    unet = {k: v for k, v in part("unet.").items() if not k.startswith("conv_in_ref.")}
    model.backbone.unet.load_state_dict(unet, strict=True)
    model.vae.load_state_dict(part("vae."), strict=True)
    with torch.no_grad():
        model.empty_prompt_embedding.copy_(stored["text"])
    return stored, model


def test_the_official_code_gives_the_same_unet_output():
    """v of the official MyUNet2DConditionModel (diffews commit d12c396 on diffusers 0.25, its
    SDPA bank processor, the support call then the query call), stored on a tiny random UNet:
    ours, fused or in two passes, gives the same numbers on the same weights and inputs."""
    stored, model = official_tiny()
    with torch.inference_mode():
        fused = model.query_pass(stored["query"], SupportBank(stored["support"]))
        bank = model.support_pass(SupportBank(stored["support"]))
        two_pass = model.query_pass(stored["query"], bank)
        alone = model.unet_pass(stored["query"], n_query=1)  # no bank: plain self-attention
    official = stored["v_official"]
    assert official.abs().max() > 10  # a spread the comparison can see
    torch.testing.assert_close(fused, official, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(two_pass, official, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(alone, stored["v_official_without_support"], atol=1e-4, rtol=1e-5)


def test_the_official_decode_gives_the_same_map_and_mask():
    """The official decode on the stored official v (its DDIM step with the 1.0/1.0 scheduler,
    `decode_seg`, clip and uint8 PIL map, main_oss.py's to_tensor and relative threshold 0.25)
    on a tiny random VAE: our decode path gives the same quantised map and the same mask."""
    stored, model = official_tiny()
    img = np.zeros((32, 32, 3), np.uint8)  # stands in for the query: its latent is set below
    embedding = model.embed_image(img)
    embedding.features["default"] = stored["query"]
    bank = SupportBank(stored["support"])
    result = model.run(embedding, [], [bank], output_size="input")
    with torch.inference_mode():
        raw = model.decode({"default": stored["query"]}, [SupportBank(stored["support"])], "x")
    official_map, official_mask = stored["map_official"], stored["mask_official"].bool()
    assert 0.2 < official_mask.float().mean() < 0.8  # a mask the comparison can see
    # same uint8 levels, but for values on a level boundary after ~2e-5 differences in v
    assert (raw - official_map).abs().max() <= 1.01 / 255
    assert (raw != official_map).float().mean() < 0.01
    assert torch.equal(result.masks, official_mask)
    with torch.inference_mode():
        alone = model.vae.decode(-stored["v_official_without_support"] / model.scaling).sample
    assert torch.equal(quantized_map(alone), stored["map_official_without_support"])


def test_cli_segment_and_prompt_files_with_random_weights(tmp_path, capsys, episode):
    from PIL import Image

    from promptseg.cli import main

    img, ref, mask = episode
    Image.fromarray(img).save(tmp_path / "q.png")
    Image.fromarray(ref).save(tmp_path / "r.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    shot = ["--shot", str(tmp_path / "r.png"), str(tmp_path / "m.png")]
    base = ["--model", "diffews_test_tiny"]
    assert main(["segment", str(tmp_path / "q.png"), *base, *shot, "-o", str(tmp_path)]) == 2
    assert "--random-weights" in capsys.readouterr().err  # the CLI's words, not Python's
    out = ["-o", str(tmp_path / "seg")]
    assert main(["segment", str(tmp_path / "q.png"), *base, *shot, "--random-weights", *out]) == 0
    captured = capsys.readouterr()
    assert "RANDOM weights" in captured.err and "'reference 0'" in captured.out
    assert (tmp_path / "seg" / "mask_000_reference_0.png").is_file()
    prompt = str(tmp_path / "support.safetensors")
    args = ["encode-prompt", *base, *shot, "--random-weights", "-o", prompt]
    assert main(args) == 0 and Path(prompt).is_file()
    args = ["segment", str(tmp_path / "q.png"), *base, "--prompt-file", prompt, "--random-weights"]
    assert main([*args, "-o", str(tmp_path / "again")]) == 0
