"""ODISE on its tiny config: one forward gives every level, the fusion numerics, MaskCLIP,
vocabulary embeddings cached and saved, odd inputs."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

import promptseg
from promptseg import Vocabulary
from promptseg.heads.mask_inference import semantic_scores
from promptseg.models.odise import (
    ensemble_class_scores,
    mask_clip_attention,
    max_over_synonyms,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = promptseg.create_model("odise_test_tiny", pretrained=False)
    with torch.no_grad():
        model.empty_prompt_embedding.normal_()
        for p in model.head.parameters():  # a spread of mask logits the post-processing can see
            if p.ndim == 2:
                p.mul_(2.0)
    return model


@pytest.fixture
def scene() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)


VOCAB = Vocabulary("cat,kitty;dog;sky;grass", is_thing=[True, True, False, False])


def test_one_forward_gives_every_level(model, scene):
    res = model.segment(scene, VOCAB, level="all", return_logits=True)
    levels = set(res.level)
    assert levels <= {"panoptic", "instance", "semantic"} and "semantic" in levels
    assert res.masks.shape[1:] == (48, 80) and res.logits.shape == res.masks.shape
    semantic = res.select([lv == "semantic" for lv in res.level])
    assert len(semantic) == 4 and semantic.class_ids.tolist() == [0, 1, 2, 3]
    assert semantic.labels == ["cat", "dog", "sky", "grass"]
    assert torch.equal(semantic.masks.sum(0), torch.ones(48, 80, dtype=torch.int64))  # a partition
    assert torch.equal(semantic.masks, semantic.logits.argmax(0) == torch.arange(4)[:, None, None])
    expected = semantic_scores(semantic.logits, semantic.masks)  # the map capped, averaged
    torch.testing.assert_close(semantic.scores, expected)
    instances = res.select([lv == "instance" for lv in res.level])
    assert all(VOCAB.is_thing[c] for c in instances.class_ids.tolist())
    ids, infos = res.panoptic["id_map"], res.panoptic["segments_info"]
    assert ids.dtype == torch.int32 and ids.shape == (48, 80)
    assert sorted(set(ids.unique().tolist()) - {0}) == [s["id"] for s in infos]
    for s in infos:
        assert s["isthing"] == VOCAB.is_thing[s["category_id"]] and 0 < s["score"] <= 1
    stuff = [s["category_id"] for s in infos if not s["isthing"]]
    assert len(stuff) == len(set(stuff))  # one segment per stuff class
    alone = model.segment(scene, VOCAB, level="semantic")
    assert torch.equal(alone.masks, semantic.masks)


def test_processing_geometry(model, scene):
    """Shortest edge to 64 (max 128, PIL bilinear), padded to multiples of 64."""
    res = model.segment(scene, VOCAB, level="semantic")
    assert res.meta["input_size"] == (64, 107)
    features = model.embed_image(scene).features["default"]
    assert features.padded_size == (64, 128) and features.valid_size == (64, 107)
    assert features.mask_logits.shape == (8, 16, 32)  # 8 queries at stride 4


def test_text_embeddings_are_cached_saved_and_reused(model, scene, tmp_path):
    (a,) = model.encode_prompt([VOCAB])
    (b,) = model.encode_prompt([Vocabulary("cat,kitty;dog;sky;grass", [1, 1, 0, 0])])
    assert a is b  # cached per vocabulary
    assert a.diffusion_text.shape == (5, 32) and a.synonym_class.tolist() == [0, 0, 1, 2, 3]
    assert a.seen.tolist() == [True, True, True, True]  # COCO synonyms: cat, dog, sky, grass
    path = tmp_path / "vocab.safetensors"
    model.save_prompt_embedding([a], path)
    (loaded,) = model.load_prompt_embedding(path)
    assert loaded.vocabulary == VOCAB and torch.equal(loaded.diffusion_text, a.diffusion_text)
    direct = model.segment(scene, VOCAB, level="all")
    reused = model.segment(scene, model.load_prompt_embedding(path), level="all")
    assert torch.equal(direct.masks, reused.masks) and direct.labels == reused.labels
    pred = promptseg.Predictor(model)
    pred.set_image(scene)
    other = pred.predict(Vocabulary("tree;road"), level="semantic")
    assert other.labels == ["tree", "road"]


def test_label_and_caption_templates(model):
    """Label model: raw synonyms for the diffusion branch; both: 'a photo of a {}.' for CLIP."""
    (e,) = model.encode_prompt([Vocabulary("pickup truck")])
    with torch.no_grad():
        raw = F.normalize(model.text_head.text_proj(model.encode_texts(["pickup truck"])), dim=-1)
        photo = F.normalize(model.encode_texts(["a photo of a pickup truck."]), dim=-1)
    torch.testing.assert_close(e.diffusion_text, raw)
    torch.testing.assert_close(e.clip_text, photo)
    assert e.seen.tolist() == [False]  # exact synonym match: "truck" is seen, this is not


def test_fusion_numerics():
    diffusion = torch.tensor([[2.0, 0.0, -1.0]])
    clip = torch.tensor([[0.0, 1.0, 0.5]])
    seen = torch.tensor([True, False, True])
    void = torch.tensor([0.2])
    out = ensemble_class_scores(diffusion, clip, void, seen, alpha=0.3, beta=0.7)
    p, q = diffusion.softmax(-1), clip.softmax(-1)
    w = torch.where(seen, 0.3, 0.7)
    e = (p ** (1 - w) * q**w).log().softmax(-1)
    expected = torch.log(torch.cat([e * 0.8, void[:, None]], dim=-1) + 1e-8)
    torch.testing.assert_close(out, expected)
    tiny = ensemble_class_scores(
        torch.tensor([[200.0, -200.0]]), torch.tensor([[0.0, 0.0]]), void, seen[:2], 0.3, 0.7
    )
    assert not tiny.isnan().any()  # an underflowing class gives -inf inside, never NaN
    logits = torch.tensor([[1.0, 5.0, 3.0, -2.0]])
    assert max_over_synonyms(logits, torch.tensor([0, 0, 1, 1]), 2).tolist() == [[5.0, 3.0]]


def test_mask_clip_sees_only_its_patches(model):
    """Attention rule; a mask covering everything gives exactly CLIP's own image embedding."""
    visible = torch.tensor([[[True, False, True], [False, False, False]]])
    mask = mask_clip_attention(visible, 2, heads=2)
    assert mask.shape == (2, 6, 6)
    blocked = mask[0].isinf()
    assert blocked[:, :2].all()  # nobody attends to mask tokens
    assert not blocked[2:, 2:].any()  # cls and patches as in CLIP
    assert blocked[0, 2:].tolist() == [False, False, True, False]
    assert blocked[1, 2:].tolist() == [False, True, True, True]  # cls only
    image = torch.rand(1, 3, 40, 60)
    everywhere = torch.full((1, 1, 10, 15), 10.0)
    with torch.no_grad():
        masked = model.mask_clip(image, everywhere)[0, 0]
        plain = model.clip.encode_image(model.clip_pixels(image))[0]
    torch.testing.assert_close(masked, plain, atol=1e-5, rtol=1e-5)


def test_one_clip_and_no_text_encoder(model):
    clips = [m for m in model.modules() if isinstance(m, open_clip.model.CLIP)]
    assert len(clips) == 1
    assert model.empty_prompt_embedding.shape == (1, 77, 32)
    assert not any("text_model" in k or "cond_stage" in k for k in model.state_dict())


@pytest.mark.parametrize(
    "shape", [(20, 30, 3), (10, 400, 3), (48, 80), (48, 80, 4)], ids=["small", "wide", "L", "RGBA"]
)
def test_odd_images(model, shape):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    res = model.segment(image, VOCAB, level="all")
    assert res.masks.shape[1:] == shape[:2]
    if shape == (10, 400, 3):  # the max-size clamp: long side 128
        assert res.meta["input_size"] == (3, 128)


def test_a_thousand_classes_and_bad_vocabularies(model, scene):
    lvis = Vocabulary.preset("lvis_1203")
    res = model.segment(scene, lvis, level="semantic")
    assert len(res) == 1203 and res.masks.sum(0).eq(1).all()
    with pytest.raises(ValueError, match="has no class"):
        model.segment(scene, Vocabulary(""))
    with pytest.raises(ValueError, match="same synonyms|duplicate"):
        model.segment(scene, Vocabulary("cat;dog;cat"))
    with pytest.raises(promptseg.UnsupportedPromptError):
        model.segment(scene, promptseg.VisualPrompt(scene, np.ones((48, 80), bool)))


def test_half_precision_keeps_the_pixel_decoder_in_fp32(scene):
    torch.manual_seed(0)
    model = promptseg.create_model("odise_test_tiny", pretrained=False, dtype=torch.bfloat16)
    assert model.head.pixel_decoder.mask_features.weight.dtype == torch.float32
    res = model.segment(scene, VOCAB, level="all")
    assert res.masks.shape[1:] == (48, 80) and torch.isfinite(res.scores).all()


def test_command_line_segment_encode_prompt_and_prompt_file(scene, tmp_path, capsys):
    """segment --vocab/--preset --level panoptic writes the panopticapi PNG, segments.json and an
    overlay; encode-prompt writes the vocabulary embedding that --prompt-file reuses."""
    import json

    from PIL import Image

    from promptseg.cli import main

    Image.fromarray(scene).save(tmp_path / "scene.png")
    base = ["--model", "odise_test_tiny", "--random-weights"]
    vocab = ["--vocab", "cat,kitty;dog", "--preset", "pascal_voc_21"]
    out = tmp_path / "out"
    args = ["segment", str(tmp_path / "scene.png"), *base, *vocab, "--level", "panoptic"]
    assert main([*args, "-o", str(out)]) == 0
    assert "RANDOM weights" in capsys.readouterr().err
    segments = json.loads((out / "segments.json").read_text())
    assert segments["file"] == "panoptic.png"
    with Image.open(out / "panoptic.png") as im:
        ids = np.asarray(im).astype(np.int64) @ np.array([1, 256, 65536])
    assert sorted(set(np.unique(ids).tolist()) - {0}) == [
        s["id"] for s in segments["segments_info"]
    ]
    with Image.open(out / "overlay.png") as im:
        assert im.size == (80, 48)
    prompt = tmp_path / "vocab.safetensors"
    assert main(["encode-prompt", *base, *vocab, "-o", str(prompt)]) == 0 and prompt.is_file()
    again = tmp_path / "again"
    args = ["segment", str(tmp_path / "scene.png"), *base, "--prompt-file", str(prompt)]
    assert main([*args, "--level", "panoptic", "-o", str(again)]) == 0
    assert json.loads((again / "segments.json").read_text()) == segments
