"""The public API end to end on the tiny CLIPSeg: inputs, prompts, caching, clean failures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import promptseg
from promptseg import (
    MixedPrompt,
    Predictor,
    SupportSet,
    TextPrompt,
    UnknownModelError,
    UnsupportedPromptError,
    VisualPrompt,
    Vocabulary,
)


# -- zoo ----------------------------------------------------------------------------------------
def test_list_models_filters():
    assert promptseg.list_models("clipseg*rd16*", pretrained=True) == ["clipseg_vitb16_rd16.uni"]
    released = promptseg.list_models(pretrained=True)
    assert {
        "clipseg_vitb16_rd64.refined",
        "clipseg_vitb16_rd64.uni",
        "clipseg_vitb16_rd16.uni",
    } <= set(released)
    assert "clipseg_test_tiny" not in released
    assert "clipseg_test_tiny" in promptseg.list_models("*tiny")
    assert promptseg.list_models(capability="video", pretrained=True) == [
        "sine_dinov2l.coco_ade_o365"
    ]
    assert "test_colorkey" in promptseg.list_models(capability="video")
    assert "clipseg_vitb16_rd64.uni" in promptseg.list_models(capability="visual")


def test_model_info_default_tag_and_card():
    card = promptseg.model_info("clipseg_vitb16_rd64")
    assert card.name == "clipseg_vitb16_rd64.refined" and card.config["head"]["refined"] is True
    uni = promptseg.model_info("clipseg_vitb16_rd64.uni")
    assert uni.config["head"]["refined"] is False and uni.default_threshold == 0.3
    assert uni.reported["phrasecut_table3_t0.3"]["mIoU"] == 43.4
    assert uni.config["extract_layers"] == [3, 6, 9]
    assert uni.data_config["mean"] == [0.485, 0.456, 0.406]


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownModelError, match="did you mean clipseg_vitb16_rd64"):
        promptseg.create_model("clipseg_vitb16_rd46", pretrained=False)
    with pytest.raises(UnknownModelError, match="clipseg_vitb16_rd64.uni"):
        promptseg.model_info("clipseg_vitb16_rd64.unii")


def test_dtype_is_honoured(rgb):
    model = promptseg.create_model("clipseg_test_tiny", pretrained=False, dtype=torch.bfloat16)
    res = model.segment(rgb, "a cup")
    assert res.masks.shape == (1, 48, 80) and res.scores.dtype == torch.float32


# -- image inputs ----------------------------------------------------------------------------------
def test_every_image_input_gives_masks_at_original_size(tiny_clipseg, rgb, tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(rgb).save(path)
    gray = rgb[..., 0]
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    inputs = [
        str(path),
        path,
        Image.fromarray(rgb),
        rgb,
        gray,
        gray[..., None],
        rgba,
        rgb.astype(np.float32) / 255,
        torch.from_numpy(rgb).permute(2, 0, 1),
        torch.from_numpy(rgb).permute(2, 0, 1).float() / 255,
    ]
    reference = tiny_clipseg.segment(rgb, "a cup", return_logits=True)
    for image in inputs:
        res = tiny_clipseg.segment(image, "a cup", return_logits=True)
        assert res.masks.shape == (1, 48, 80), type(image)
        if image is not gray and not (
            isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 1
        ):
            torch.testing.assert_close(res.logits, reference.logits, atol=2e-3, rtol=0)


def test_exif_rotated_jpeg_is_upright(tiny_clipseg, tmp_path):
    img = Image.fromarray(np.zeros((30, 50, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    res = tiny_clipseg.segment(tmp_path / "rot.jpg", "a cup")
    assert res.masks.shape == (1, 50, 30)


def test_reference_mask_of_another_size_is_resized(tiny_clipseg, rgb, box_mask):
    small = np.array(Image.fromarray(box_mask).resize((40, 24), Image.NEAREST))
    a = tiny_clipseg.segment(rgb, (rgb, box_mask), return_logits=True)
    b = tiny_clipseg.segment(rgb, (rgb, small), return_logits=True)
    torch.testing.assert_close(a.logits, b.logits)


# -- prompts ------------------------------------------------------------------------------------
def test_as_prompt_forms(rgb, box_mask):
    assert promptseg.as_prompt("a cup") == [TextPrompt("a cup")]
    assert promptseg.as_prompt(["a", "b"]) == [TextPrompt("a"), TextPrompt("b")]
    (vp,) = promptseg.as_prompt((rgb, box_mask))
    assert isinstance(vp, VisualPrompt)
    (ss,) = promptseg.as_prompt([(rgb, box_mask), (rgb, box_mask)])
    assert isinstance(ss, SupportSet) and len(ss) == 2
    assert promptseg.as_prompt(("img.png", "mask.png"))[0].mask == "mask.png"
    vocab = Vocabulary("cat;dog,puppy")
    assert vocab.names == ["cat", "dog"] and vocab.classes[1] == ("dog", "puppy")
    for bad, err in [([], ValueError), ("  ", ValueError), (3, TypeError), ([1, 2], TypeError)]:
        with pytest.raises(err):
            promptseg.as_prompt(bad)
    with pytest.raises(TypeError, match="wrap it as VisualPrompt"):
        promptseg.as_prompt(["a cup", (rgb, box_mask)])
    mixed = promptseg.as_prompt(["a cup", VisualPrompt(rgb, box_mask)])
    assert [type(p) for p in mixed] == [TextPrompt, VisualPrompt]


def test_many_prompts_run_the_image_tower_once(tiny_clipseg, rgb, box_mask, monkeypatch):
    calls = []
    original = tiny_clipseg.backbone.forward_features
    monkeypatch.setattr(
        tiny_clipseg.backbone, "forward_features", lambda x: calls.append(x.shape) or original(x)
    )
    prompts = [
        "a cup",
        "a plate",
        VisualPrompt(rgb, box_mask),
        MixedPrompt("a cup", VisualPrompt(rgb, box_mask), 0.3),
    ]
    res = tiny_clipseg.segment(rgb, prompts, return_logits=True)
    assert calls == [(1, 3, 64, 64)]
    assert res.labels[:2] == ["a cup", "a plate"] and res.prompt_index.tolist() == [0, 1, 2, 3]
    # each row equals the prompt run alone
    for i, p in enumerate(prompts):
        alone = tiny_clipseg.segment(rgb, p, return_logits=True)
        torch.testing.assert_close(alone.logits[0], res.logits[i], atol=1e-5, rtol=1e-5)


def test_mixed_prompt_interpolates_conditional_vectors(tiny_clipseg, rgb, box_mask):
    vp = VisualPrompt(rgb, box_mask)
    with torch.no_grad():
        text, visual, mixed = tiny_clipseg.encode_prompt(
            [TextPrompt("a cup"), vp, MixedPrompt("a cup", vp, 0.25)]
        )
    torch.testing.assert_close(mixed, 0.25 * text + 0.75 * visual)


def test_unsupported_prompt_kinds_name_the_capability(tiny_clipseg, rgb, box_mask):
    with pytest.raises(UnsupportedPromptError, match="few_shot"):
        tiny_clipseg.segment(rgb, SupportSet([(rgb, box_mask), (rgb, box_mask)]))
    with pytest.raises(UnsupportedPromptError, match="open_vocab"):
        tiny_clipseg.segment(rgb, Vocabulary(["cat", "dog"]))
    # a one-shot support set is a visual prompt
    assert len(tiny_clipseg.segment(rgb, SupportSet([(rgb, box_mask)]))) == 1


def test_reference_masks_empty_and_full(tiny_clipseg, rgb, box_mask):
    with pytest.raises(ValueError, match="marks no pixel"):
        tiny_clipseg.segment(rgb, (rgb, np.zeros_like(box_mask)))
    res = tiny_clipseg.segment(rgb, (rgb, np.ones_like(box_mask)))  # whole image = the object
    assert res.masks.shape == (1, 48, 80)


def test_reference_object_lost_in_the_resize_is_a_clear_error(tiny_clipseg):
    big = np.zeros((600, 900, 3), dtype=np.uint8)
    speck = np.zeros((600, 900), dtype=bool)
    speck[301, 451] = True  # one pixel: no pixel centre of the 64x64 input falls on it
    with pytest.raises(ValueError, match="too small to survive"):
        tiny_clipseg.segment(big, (big, speck))


def test_empty_mask_box_is_the_whole_image():
    from promptseg.models.clipseg import _mask_box

    assert _mask_box(torch.zeros(8, 10, dtype=torch.bool)) == (0, 8, 0, 10)


def test_bad_inputs_fail_with_messages(tiny_clipseg, rgb, box_mask, tmp_path):
    broken = tmp_path / "broken.jpg"
    Image.fromarray(rgb).save(broken)
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(ValueError, match="broken.jpg"):
        tiny_clipseg.segment(broken, "a cup")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        tiny_clipseg.segment(tmp_path / "nope.png", "a cup")
    with pytest.raises(ValueError, match="empty"):
        tiny_clipseg.segment(rgb, [])
    with pytest.raises(TypeError):
        tiny_clipseg.segment(rgb, 42)
    with pytest.raises(ValueError, match="tokens long"):
        tiny_clipseg.segment(rgb, "word " * 100)
    with pytest.raises(ValueError, match="level"):
        tiny_clipseg.segment(rgb, "a cup", level="instance")
    with pytest.raises(ValueError, match="output_size"):
        tiny_clipseg.segment(rgb, "a cup", output_size="huge")
    label_map = box_mask.astype(np.uint8) + 2 * (np.arange(80) > 60).astype(np.uint8)[None]
    with pytest.raises(ValueError, match="label"):
        tiny_clipseg.segment(rgb, (rgb, label_map))


# -- outputs ------------------------------------------------------------------------------------
def test_threshold_output_size_and_logits(tiny_clipseg, rgb):
    res = tiny_clipseg.segment(rgb, ["a", "b"], return_logits=True, threshold=0.0)
    assert res.masks.all() and res.meta["threshold"] == 0.0
    assert res.logits.shape == (2, 64, 64)
    assert res.upsample().shape == (2, 48, 80)
    probs = torch.sigmoid(res.upsample())
    torch.testing.assert_close(
        (probs > 0.5), tiny_clipseg.segment(rgb, ["a", "b"], threshold=0.5).masks
    )
    assert tiny_clipseg.segment(rgb, "a", output_size="input").masks.shape == (1, 64, 64)
    assert tiny_clipseg.segment(rgb, "a", output_size=(10, 12)).masks.shape == (1, 10, 12)
    none = tiny_clipseg.segment(rgb, "a", threshold=1.0)
    assert not none.masks.any() and none.scores.tolist() == [0.0]


def test_save_writes_masks_and_overlay(tiny_clipseg, rgb, tmp_path):
    res = tiny_clipseg.segment(rgb, ["a cup", "a plate"], threshold=0.0)
    paths = res.save(tmp_path / "out")
    names = sorted(p.name for p in paths)
    assert "overlay.png" in names and sum(n.startswith("mask_") for n in names) == 2
    assert Image.open(tmp_path / "out" / "overlay.png").size == (80, 48)


# -- predictor ----------------------------------------------------------------------------------
def test_predictor_caches_by_content(tiny_clipseg, rgb, monkeypatch):
    pred = Predictor(tiny_clipseg)
    calls = []
    original = tiny_clipseg.encode_image
    monkeypatch.setattr(tiny_clipseg, "encode_image", lambda *a: calls.append(1) or original(*a))
    pred.set_image(rgb)
    pred.set_image(rgb.copy())
    assert len(calls) == 1
    a = pred.predict(["a cup", "a plate"], return_logits=True)
    assert len(calls) == 1
    b = tiny_clipseg.segment(rgb, ["a cup", "a plate"], return_logits=True)
    torch.testing.assert_close(a.logits, b.logits)
    calls.clear()
    other = rgb.copy()
    other[0, 0] += 1
    pred.set_image(other)
    assert len(calls) == 1  # new pixels, new features: never stale
    saved = pred.get_image_embedding()
    pred.reset_image()
    with pytest.raises(RuntimeError, match="set_image"):
        pred.predict("a cup")
    pred.set_image_embedding(saved)
    pred.set_prompt("a cup")
    assert pred.predict().labels == ["a cup"] and len(calls) == 1
    sine = promptseg.Predictor(promptseg.create_model("sine_test_tiny", pretrained=False))
    with pytest.raises(ValueError, match="computed by clipseg_test_tiny"):
        sine.set_image_embedding(saved)


def test_threshold_must_be_a_probability(tiny_clipseg, rgb):
    for bad in ("x", 1.5, -0.1):
        with pytest.raises(ValueError, match="threshold"):
            tiny_clipseg.segment(rgb, "a cup", threshold=bad)
    assert tiny_clipseg.segment(rgb, "a cup", threshold="0.5").meta["threshold"] == 0.5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_unavailable_or_unknown_device_is_a_clear_error():
    with pytest.raises(ValueError, match="0 usable CUDA"):
        promptseg.create_model("clipseg_test_tiny", pretrained=False, device="cuda")
    with pytest.raises(ValueError, match="not a device name"):
        promptseg.create_model("clipseg_test_tiny", pretrained=False, device="gpu0")
    with pytest.raises(TypeError, match="floating torch.dtype"):
        promptseg.create_model("clipseg_test_tiny", pretrained=False, dtype="half")


def test_only_the_tapped_blocks_run():
    """The released configs tap blocks (3, 6, 9): blocks 10 and 11 are never computed."""
    from promptseg.zoo import build_model, model_info

    model = build_model(model_info("clipseg_vitb16_rd64.uni")).eval()
    ran = []
    for i, block in enumerate(model.backbone.visual.transformer.resblocks):
        block.register_forward_hook(lambda *_, i=i: ran.append(i))
    with torch.no_grad():
        model.encode_image(torch.randn(1, 3, 64, 64))
    assert model.backbone.taps == (3, 6, 9) and ran == list(range(10))


def test_readme_model_table_lists_every_zoo_name():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = [line for line in readme.splitlines() if line.startswith("| `")]
    for name in promptseg.list_models():
        assert any(f"`{name}`" in line or f"`{name}." in line for line in table), name


def test_prompt_encoded_once_serves_many_images(tiny_clipseg, rgb, monkeypatch):
    prompts = tiny_clipseg.prepare_prompts(["a cup", "a plate"])
    with torch.inference_mode():
        encoded = tiny_clipseg.encode_prompt(prompts)
    calls = []
    original = tiny_clipseg.encode_prompt
    monkeypatch.setattr(tiny_clipseg, "encode_prompt", lambda *a: calls.append(1) or original(*a))
    for image in (rgb, rgb[::-1].copy()):
        a = tiny_clipseg.segment(image, prompts, prompt_embeddings=encoded, return_logits=True)
        assert a.labels == ["a cup", "a plate"] and not calls
        b = tiny_clipseg.segment(image, ["a cup", "a plate"], return_logits=True)
        assert calls == [1]
        calls.clear()
        torch.testing.assert_close(a.logits, b.logits)
