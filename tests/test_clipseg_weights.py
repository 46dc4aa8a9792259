"""CLIPSeg weights: every source layout loads strictly; failures say what to do."""

from __future__ import annotations

from dataclasses import replace

import huggingface_hub
import pytest
import torch

from promptseg.convert.clipseg import convert_clipseg, official_to_native
from promptseg.errors import CheckpointFormatError, WeightsNotFoundError
from promptseg.weights import load_pretrained, native_checkpoint_path, save_state_dict_file
from promptseg.zoo import build_model, create_model, model_info

pytest.importorskip("transformers")
from promptseg.testing.clipseg import TINY, hf_model, openai_clip_state


def official_decoder_dict(d: int, refined: bool, with_reduce: bool) -> dict[str, torch.Tensor]:
    """A synthetic official decoder-only state dict: key names and shapes of spec §4.1."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {
        "film_mul.weight": r(d, 512),
        "film_mul.bias": r(d),
        "film_add.weight": r(d, 512),
        "film_add.bias": r(d),
    }
    if with_reduce:
        sd.update({"reduce.weight": r(d, 768), "reduce.bias": r(d)})
    if refined:
        sd.update(
            {
                "trans_conv.0.weight": r(d, d, 3, 3),
                "trans_conv.0.bias": r(d),
                "trans_conv.2.weight": r(d, d // 2, 4, 4),
                "trans_conv.2.bias": r(d // 2),
                "trans_conv.4.weight": r(d // 2, 1, 4, 4),
                "trans_conv.4.bias": r(1),
            }
        )
    else:
        sd.update({"trans_conv.weight": r(d, 1, 16, 16), "trans_conv.bias": r(1)})
    for k in range(3):
        sd[f"reduces.{k}.weight"], sd[f"reduces.{k}.bias"] = r(d, 768), r(d)
        b = f"blocks.{k}."
        sd.update(
            {
                b + "self_attn.in_proj_weight": r(3 * d, d),
                b + "self_attn.in_proj_bias": r(3 * d),
                b + "self_attn.out_proj.weight": r(d, d),
                b + "self_attn.out_proj.bias": r(d),
                b + "linear1.weight": r(2048, d),
                b + "linear1.bias": r(2048),
                b + "linear2.weight": r(d, 2048),
                b + "linear2.bias": r(d),
                b + "norm1.weight": r(d),
                b + "norm1.bias": r(d),
                b + "norm2.weight": r(d),
                b + "norm2.bias": r(d),
            }
        )
    return sd


@pytest.mark.parametrize(
    "name,d,refined,with_reduce,n_keys",
    [
        ("clipseg_vitb16_rd64.uni", 64, False, False, 48),
        ("clipseg_vitb16_rd64.refined", 64, True, True, 54),
        ("clipseg_vitb16_rd16.uni", 16, False, True, 50),
    ],
)
def test_official_decoder_only_file_loads_strictly(name, d, refined, with_reduce, n_keys):
    sd = official_decoder_dict(d, refined, with_reduce)
    assert len(sd) == n_keys
    model = build_model(model_info(name))
    openai_clip = openai_clip_state(model)
    native = official_to_native(sd, require=lambda component: openai_clip)
    model.load_state_dict(native, strict=True)
    torch.testing.assert_close(
        model.head.blocks[1].self_attn.in_proj_weight, sd["blocks.1.self_attn.in_proj_weight"]
    )
    torch.testing.assert_close(model.head.reduces[0].bias, sd["reduces.0.bias"])


def official_file_of(hf) -> dict[str, torch.Tensor]:
    """The decoder of a transformers CLIPSeg under the official file's key names (spec §4.1)."""
    decoder = {k: v for k, v in convert_clipseg(hf.state_dict()).items() if k.startswith("head.")}
    official = {}
    for k, v in decoder.items():  # same block names (torch TransformerEncoderLayer)
        official[k[len("head.") :].replace("upsample", "trans_conv")] = v
    return official


def tiny_clip_openai_names() -> dict[str, torch.Tensor]:
    return openai_clip_state(build_model(model_info("clipseg_test_tiny")))


def test_decoder_only_checkpoint_fetches_clip_component_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTSEG_OFFLINE", "1")
    clip = tiny_clip_openai_names()
    save_state_dict_file(clip, tmp_path / "openai_clip_vitb16" / "open_clip_model.safetensors")
    hf = hf_model(TINY, refined=True)
    official = official_file_of(hf)
    path = tmp_path / "rd-tiny.pth"
    torch.save(official, path)
    model = create_model("clipseg_test_tiny", checkpoint_path=path, cache_dir=tmp_path)
    torch.testing.assert_close(model.backbone.visual.conv1.weight, clip["visual.conv1.weight"])
    torch.testing.assert_close(model.head.film_mul.weight, hf.decoder.film_mul.weight)


def test_transformers_save_pretrained_directory_loads(tmp_path):
    hf = hf_model(TINY, refined=True)
    hf.save_pretrained(tmp_path / "hf")
    model = create_model("clipseg_test_tiny", checkpoint_path=tmp_path / "hf")
    ids = model.text_encoder.tokenize(["a cup"])
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=pixels).logits
        ours = model.decode({"default": model.encode_image(pixels)}, model.text_encoder(ids))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_hub_download_is_converted_once_and_cached(tmp_path, monkeypatch):
    hf = hf_model(TINY, refined=True)
    hf.save_pretrained(tmp_path / "hub")
    calls = []

    def fake_download(repo_id, filename, **kw):
        calls.append((repo_id, filename))
        return str(tmp_path / "hub" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    released = model_info("clipseg_vitb16_rd64.refined")
    card = replace(model_info("clipseg_test_tiny"), name="tiny.fakehub", weights=released.weights)
    model = build_model(card)
    load_pretrained(model, card, cache_dir=tmp_path / "cache", progress=False)
    assert calls == [("CIDAS/clipseg-rd64-refined", "model.safetensors")]
    assert native_checkpoint_path(card, tmp_path / "cache").is_file()
    load_pretrained(build_model(card), card, cache_dir=tmp_path / "cache", progress=False)
    assert len(calls) == 1  # second load: converted cache, no hub call
    torch.testing.assert_close(model.head.film_add.bias, hf.decoder.film_add.bias)


def test_offline_miss_names_every_source_and_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PROMPTSEG_OFFLINE", "1")
    card = replace(
        model_info("clipseg_test_tiny"), weights=model_info("clipseg_vitb16_rd16").weights
    )
    with pytest.raises(WeightsNotFoundError) as err:
        load_pretrained(build_model(card), card, cache_dir=tmp_path, progress=False)
    text = str(err.value)
    assert "CIDAS/clipseg-rd16" in text and "owncloud" in text and "rd16-uni.pth" in text
    assert str(tmp_path) in text and "promptseg convert" in text


def test_no_released_weights_says_use_pretrained_false():
    with pytest.raises(WeightsNotFoundError, match="pretrained=False"):
        create_model("clipseg_test_tiny")


def test_bad_checkpoints_raise_named_errors(tmp_path):
    good = convert_clipseg(hf_model(TINY, refined=True).state_dict())
    missing = dict(good)
    del missing["head.film_mul.weight"]
    wrong = dict(good)
    wrong["head.film_add.weight"] = torch.zeros(3, 3)
    for state, pattern in [
        (missing, r"missing \(1\): head.film_mul.weight"),
        (wrong, r"head.film_add.weight \(3, 3\)"),
        ({**good, "decoder.extra": torch.zeros(1)}, "unexpected"),
        ({"foo.weight": torch.zeros(1)}, "unknown CLIPSeg checkpoint layout"),
        ({"visual.conv1.weight": torch.zeros(1)}, "plain CLIP checkpoint"),
    ]:
        path = tmp_path / "ckpt.safetensors"
        save_state_dict_file(state, path)
        with pytest.raises(CheckpointFormatError, match=pattern):
            create_model("clipseg_test_tiny", checkpoint_path=path)
    # the wrong variant: an rd16 decoder into an rd64 model
    sd = official_decoder_dict(16, False, True)
    model = build_model(model_info("clipseg_vitb16_rd64.uni"))
    with pytest.raises(CheckpointFormatError, match="shape"):
        from promptseg.weights import load_native_state_dict

        load_native_state_dict(
            model,
            {
                **model.state_dict(),
                **{
                    k: v
                    for k, v in official_to_native(sd, require=lambda c: {}).items()
                    if k.startswith("head.")
                },
            },
            "rd16-uni.pth",
        )


def test_file_placed_by_hand_is_used_before_any_download(tmp_path, monkeypatch):
    """Online, a hand-placed official decoder in the cache wins over the hub route (tried first)."""
    monkeypatch.delenv("PROMPTSEG_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")

    def no_network(*args, **kw):
        raise AssertionError(f"network used: {args}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    hf = hf_model(TINY, refined=True)
    released = model_info("clipseg_vitb16_rd64.refined")
    card = replace(model_info("clipseg_test_tiny"), name="tiny.byhand", weights=released.weights)
    (tmp_path / "tiny.byhand").mkdir()
    torch.save(official_file_of(hf), tmp_path / "tiny.byhand" / "rd64-uni-refined.pth")
    save_state_dict_file(
        tiny_clip_openai_names(), tmp_path / "openai_clip_vitb16" / "open_clip_model.safetensors"
    )
    model = build_model(card)
    load_pretrained(model, card, cache_dir=tmp_path, progress=False)
    torch.testing.assert_close(model.head.film_mul.weight, hf.decoder.film_mul.weight)


def test_offline_miss_says_the_official_route_also_needs_clip(tmp_path):
    card = replace(
        model_info("clipseg_test_tiny"), weights=model_info("clipseg_vitb16_rd64.uni").weights
    )
    with pytest.raises(WeightsNotFoundError) as err:
        load_pretrained(build_model(card), card, cache_dir=tmp_path, progress=False)
    text = str(err.value)
    assert "also needs the component openai_clip_vitb16" in text
    assert str(tmp_path / "openai_clip_vitb16" / "ViT-B-16.pt") in text


def test_unknown_layout_names_the_file_and_where_good_copies_come_from(tmp_path):
    released = model_info("clipseg_vitb16_rd64.refined")
    card = replace(model_info("clipseg_test_tiny"), name="tiny.layout", weights=released.weights)
    path = tmp_path / "mystery.safetensors"
    save_state_dict_file({"foo.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointFormatError) as err:
        load_pretrained(build_model(card), card, checkpoint_path=path, cache_dir=tmp_path)
    text = str(err.value)
    assert str(path) in text and "unknown CLIPSeg checkpoint layout" in text
    assert "CIDAS/clipseg-rd64-refined" in text
    assert str(tmp_path / "tiny.layout" / "rd64-uni-refined.pth") in text
    # the same file in the cache, where a download would have put it
    cached = tmp_path / "tiny.layout" / "model.safetensors"
    save_state_dict_file({"foo.weight": torch.zeros(1)}, cached)
    with pytest.raises(CheckpointFormatError) as err:
        load_pretrained(build_model(card), card, cache_dir=tmp_path, progress=False)
    assert str(cached) in str(err.value) and "Good copies come from" in str(err.value)


def test_corrupt_converted_cache_names_the_file_and_says_delete_it(tmp_path):
    card = replace(model_info("clipseg_test_tiny"), name="tiny.corrupt")
    native = native_checkpoint_path(card, tmp_path)
    native.parent.mkdir(parents=True)
    native.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointFormatError) as err:
        load_pretrained(build_model(card), card, cache_dir=tmp_path)
    assert str(native) in str(err.value) and "Delete it" in str(err.value)


def test_hf_home_hub_cache_is_used_offline(tmp_path):
    """A model in the Hugging Face cache under $HF_HOME loads with HF_HUB_OFFLINE=1 (no network)."""
    import os
    import subprocess
    import sys
    import textwrap

    snapshot = tmp_path / "hf" / "hub" / "models--CIDAS--clipseg-rd64-refined"
    commit = "0" * 40
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text(commit)
    hf = hf_model(TINY, refined=True)
    hf.save_pretrained(snapshot / "snapshots" / commit)
    script = textwrap.dedent(
        """
        import sys
        from dataclasses import replace
        from promptseg.weights import load_pretrained
        from promptseg.zoo import build_model, model_info
        released = model_info("clipseg_vitb16_rd64.refined")
        tiny = model_info("clipseg_test_tiny")
        card = replace(tiny, name="tiny.hfhome", weights=released.weights)
        model = build_model(card)
        load_pretrained(model, card, cache_dir=sys.argv[1], progress=False)
        print(float(model.head.film_add.bias.sum()))
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "cache")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    expected = float(hf.decoder.film_add.bias.detach().sum())
    assert float(done.stdout) == pytest.approx(expected, abs=1e-5)
