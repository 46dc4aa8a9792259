"""SINE per-protocol behaviour on the tiny config: resolution order, FSOD pre-processing, level
"all", saved prompt embeddings, reference/target caching, bad inputs and the VOS merge."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image

import promptseg
from promptseg import SupportSet, UnsupportedPromptError, VisualPrompt
from promptseg.cache import LRUCache
from promptseg.heads.mask_inference import semantic_map
from promptseg.heads.mformer import PooledTokens
from promptseg.models.sine_prompts import SINEPrompt
from promptseg.models.sine_video import merge_objects
from promptseg.transforms import crop_resize, shortest_edge_size


def _images(n: int, seed: int, shape=(60, 90, 3)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def _count_backbone(sine, monkeypatch) -> list[int]:
    calls: list[int] = []
    original = sine.backbone.forward_features
    monkeypatch.setattr(sine.backbone, "forward_features", lambda x: calls.append(1) or original(x))
    return calls


def _same(one, two) -> None:
    assert one.level == two.level and one.class_ids.tolist() == two.class_ids.tolist()
    assert torch.equal(one.masks, two.masks)
    torch.testing.assert_close(one.scores, two.scores, atol=1e-6, rtol=1e-6)


# -- gap 1: semantic map at the canvas, then crop and resize ---------------------------------------
def test_semantic_map_upsamples_logits_before_sigmoid(sine, scene):
    img, a, b = scene
    refs = SupportSet([VisualPrompt(img, a, class_id=3), VisualPrompt(img, b, class_id=7)])
    res = sine.segment(img, refs, threshold=0.5)
    emb = sine.embed_image(img, "semantic")
    with torch.inference_mode():
        ((_, outs),) = sine.decode(emb.features, sine.encode_prompt([refs], "semantic"), "semantic")
    logits, masks = outs["fss"]["pred_logits"], outs["fss"]["pred_masks"]  # [S, 3], [S, 32, 32]
    up = F.interpolate(masks[None], size=(112, 112), mode="bilinear", align_corners=False)[0]
    direct = torch.einsum("sm,shw->mhw", logits.softmax(-1)[:, :-1], up.sigmoid())[:, :84, :84]
    direct = F.interpolate(direct[None], size=(60, 90), mode="bilinear", align_corners=False)[0]
    assert torch.equal(res.masks, direct > 0.5)
    inside = (direct.clamp(max=1) * res.masks).flatten(1).sum(1) / res.masks.flatten(1).sum(1)
    expected = torch.where(res.masks.flatten(1).any(1), inside, 0.0)  # the map capped, averaged
    torch.testing.assert_close(res.scores, expected, atol=1e-6, rtol=1e-6)
    assert res.labels == ["reference 0 class 3", "reference 0 class 7"]
    low_first = semantic_map(logits, masks)  # the old order: sigmoid at 32x32, then upsample
    low_first = F.interpolate(low_first[None], size=(112, 112), mode="bilinear")[0]
    low_first = crop_resize(low_first, (84, 84), (60, 90))
    assert not torch.allclose(low_first, direct, atol=1e-4)


def test_semantic_threshold_defaults_to_the_official_0_7(sine, scene):
    img, a, _ = scene
    res = sine.segment(img, (img, a))
    assert res.meta["threshold"] == 0.7


# -- gap 2: the instance level uses the FSOD pre-processing --------------------------------------
def test_shortest_edge_size_is_detectron2s():
    assert shortest_edge_size(480, 640, 896, 896) == (672, 896)
    assert shortest_edge_size(60, 90, 112, 112) == (75, 112)  # 74.67 rounds up (int(x + 0.5))
    assert shortest_edge_size(90, 60, 112, 112) == (112, 75)
    assert shortest_edge_size(100, 100, 112, 112) == (112, 112)


def test_instance_level_uses_fsod_preprocessing(sine, scene):
    img, a, b = scene
    pixels = sine.preprocess(torch.from_numpy(img).permute(2, 0, 1), "instance")
    resized = np.asarray(Image.fromarray(img).resize((112, 75), Image.BILINEAR))  # aspect kept
    bgr = torch.from_numpy(resized[..., ::-1].copy()).permute(2, 0, 1).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # RGB statistics on BGR pixels
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    expected = F.pad((bgr - mean) / std, (0, 0, 0, 112 - 75))  # zero (= mean) padding below
    torch.testing.assert_close(pixels[0], expected)
    assert sine.input_size((60, 90), "instance") == (75, 112)
    assert sine.input_size((60, 90)) == (84, 84)
    emb = sine.embed_image(img, "instance")
    assert set(emb.features) == {"instance"}
    with torch.inference_mode():
        torch.testing.assert_close(emb.features["instance"]["feats"], sine.features(expected[None]))
    # the references go through the same protocol: their masks land in the 75 x 112 region
    canvas = sine._canvas_mask(torch.from_numpy(a), "fsod")
    assert canvas.shape == (112, 112) and not canvas[75:].any()
    fss = sine.encode_prompt([SupportSet([(img, a), (img, b)])])[0].tokens
    assert set(fss) == {"fss", "fsod"}
    assert not torch.allclose(fss["fss"].sem_tokens, fss["fsod"].sem_tokens)


def test_all_level_equals_each_single_level(sine, scene):
    img, a, b = scene
    refs = SupportSet([VisualPrompt(img, a, class_id=3), VisualPrompt(img, b, class_id=7)])
    both = sine.segment(img, refs, level="all", threshold=0.3)
    for level in ("semantic", "instance", "identity"):
        single = sine.segment(img, refs, level=level, threshold=0.3)
        _same(both.select(torch.tensor([lv == level for lv in both.level])), single)
    instance = both.select(torch.tensor([lv == "instance" for lv in both.level]))
    assert bool(instance.masks.flatten(1).any(1).all())  # score > 0 keeps no empty mask


# -- gap 3: prompt embeddings saved once, reused for any target -----------------------------------
def test_prompt_embedding_save_load_reuse(sine, scene, tmp_path, monkeypatch):
    img, a, b = scene
    refs = SupportSet([VisualPrompt(img, a, class_id=3), VisualPrompt(img, b, class_id=7)])
    path = tmp_path / "refs.safetensors"
    sine.save_prompt_embedding(sine.encode_prompt([refs]), path)
    assert safetensors.torch.load_file(path)  # plain tensors: no pickle involved

    torch.manual_seed(123)
    fresh = promptseg.create_model("sine_test_tiny", pretrained=False)
    fresh.load_state_dict(sine.state_dict())
    loaded = fresh.load_prompt_embedding(path)
    calls = _count_backbone(fresh, monkeypatch)
    targets = _images(2, seed=5, shape=(50, 70, 3))
    for target in targets:
        for level in ("semantic", "instance", "identity"):
            _same(
                fresh.segment(target, loaded, level=level, threshold=0.3),
                sine.segment(target, refs, level=level, threshold=0.3),
            )
    assert len(calls) == 2 * 2  # per target: one FSS and one FSOD pass; never a reference

    single = tmp_path / "one.safetensors"
    loaded[0].save(single)
    one = SINEPrompt.load(single)
    pred = promptseg.Predictor(fresh)
    pred.set_prompt_embedding(one)
    pred.set_image(targets[0])
    _same(pred.predict(level="instance"), fresh.segment(targets[0], loaded, level="instance"))
    _same(pred.predict(loaded, level="identity"), fresh.segment(targets[0], refs, level="identity"))
    with pytest.raises(ValueError, match="holds 2 prompts"):
        sine.save_prompt_embedding(loaded * 2, single)
        SINEPrompt.load(single)
    with pytest.raises(TypeError, match="load_prompt_embedding"):
        pred.set_prompt_embedding("refs.safetensors")
    from dataclasses import replace

    renamed = promptseg.create_model("sine_test_tiny", pretrained=False)
    renamed.card = replace(renamed.card, name="sine_test_tiny.other")
    with pytest.warns(UserWarning, match="encoded by sine_test_tiny, not sine_test_tiny.other"):
        renamed.load_prompt_embedding(path)


def test_prompt_embedding_errors(sine, scene, tmp_path):
    img, a, _ = scene
    ints = (torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    semantic_only = sine.encode_prompt([SupportSet([(img, a)])], level="semantic")
    with pytest.raises(ValueError, match=r"no tokens for the \['instance'\] level"):
        sine.segment(img, semantic_only, level="instance")
    other = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a SINE prompt file"):
        sine.load_prompt_embedding(other)
    wide = SINEPrompt({"fss": PooledTokens(torch.zeros(0, 64), torch.zeros(1, 64), *ints)})
    with pytest.raises(ValueError, match="64-d tokens but sine_test_tiny uses 32-d"):
        sine.segment(img, wide)
    clipseg = promptseg.create_model("clipseg_test_tiny", pretrained=False)
    with pytest.raises(UnsupportedPromptError, match="Families that can: diffews, odise, sine"):
        clipseg.save_prompt_embedding([], tmp_path / "x.safetensors")
    with pytest.raises(UnsupportedPromptError, match="cannot save or load"):
        clipseg.load_prompt_embedding(other)


def test_predictor_encodes_the_prompt_under_inference_mode(sine, scene):
    img, a, _ = scene
    pred = promptseg.Predictor(sine)
    pred.set_prompt((img, a))
    assert pred._prompt_embeddings[0].tokens["fss"].sem_tokens.is_inference()
    pred.set_image(img)
    _same(pred.predict(level="instance"), sine.segment(img, (img, a), level="instance"))


# -- gap 4: reference pools per (image, mask) in an LRU, target features per image ----------------
def test_references_cached_per_image_and_mask(sine, monkeypatch):
    sine.clear_caches()
    images = _images(5, seed=3)
    masks = []
    for i in range(5):
        m = np.zeros((60, 90), bool)
        m[5 + 5 * i : 30 + 5 * i, 10:50] = True
        masks.append(m)
    shots = [
        VisualPrompt(im, m, class_id=i % 2)
        for i, (im, m) in enumerate(zip(images, masks, strict=True))
    ]
    cold = sine.encode_prompt([SupportSet(shots)], level="semantic")[0].tokens["fss"]
    calls = _count_backbone(sine, monkeypatch)
    warm = sine.encode_prompt([SupportSet(shots)], level="semantic")[0].tokens["fss"]
    sub = sine.encode_prompt([SupportSet(shots[1:4])], level="semantic")
    assert calls == []  # every (image, mask) pool is cached
    torch.testing.assert_close(warm.sem_tokens, cold.sem_tokens, atol=0, rtol=0)
    assert sub[0].tokens["fss"].classes.tolist() == [0, 1]
    targets = _images(2, seed=9)
    for target in targets:
        sine.segment(target, SupportSet(shots))
    assert len(calls) == 2  # one pass per target, none for the references
    sine.segment(targets[1], SupportSet(shots))
    assert len(calls) == 2  # the last target's features are cached too
    # a fresh object mask on an already seen image needs that image's features again
    sine.encode_prompt([SupportSet([(images[0], ~masks[0])])], level="semantic")
    assert len(calls) == 3


def test_lru_evicts_one_at_a_time_and_is_big_enough_for_5_shot_fsis(sine):
    lru = LRUCache(3)
    for k in "abc":
        lru.put(k, k)
    assert lru.get("a") == "a"  # refreshed: "b" is now the oldest
    lru.put("d", "d")
    assert lru.get("b") is None and [lru.get(k) for k in "acd"] == ["a", "c", "d"]
    # COCO-NOVEL 5-shot: 100 shot images x (1 ID + 1 class token) x 2 protocols
    assert sine.reference_cache_size >= 400


# -- gap 5: documented inputs ---------------------------------------------------------------------
def test_masks_of_another_size_are_resized_nearest(sine, scene):
    img, a, _ = scene
    small = a[::2, ::2]  # [30, 45]
    full = np.repeat(np.repeat(small, 2, axis=0), 2, axis=1)  # what nearest gives at [60, 90]
    _same(
        sine.segment(img, (img, small), threshold=0.3),
        sine.segment(img, (img, full), threshold=0.3),
    )


def test_classes_come_from_the_shots(sine, scene):
    img, a, b = scene
    with pytest.raises(ValueError, match="SupportSet is empty"):
        SupportSet([])
    refs = SupportSet([VisualPrompt(img, a, class_id=9), VisualPrompt(img, b, class_id=2)])
    res = sine.segment(img, refs, threshold=0.3)
    assert res.class_ids.tolist() == [2, 9]  # one semantic mask per shot class, nothing else


def test_more_objects_than_queries(sine):
    img = _images(1, seed=4, shape=(50, 50, 3))[0]
    shots = []
    for i in range(25):  # 25 objects, the tiny decoder has 10 instance queries
        m = np.zeros((50, 50), bool)
        m[(i // 5) * 10 : (i // 5) * 10 + 8, (i % 5) * 10 : (i % 5) * 10 + 8] = True
        shots.append(VisualPrompt(img, m, class_id=i % 3))
    ident = sine.segment(img, SupportSet(shots), level="identity")
    assert len(ident) == 25 and ident.class_ids.tolist() == list(range(25))
    inst = sine.segment(img, SupportSet(shots), level="instance")
    assert len(inst) <= min(sine.instance_topk, 10 * 3)


def test_vos_overlap_goes_to_the_largest_object_id(sine, monkeypatch):
    masks = torch.zeros(3, 4, 6, dtype=torch.bool)
    masks[0, :, :4] = True  # object 5
    masks[1, :, 2:] = True  # object 2
    masks[2, 0, 0] = True  # object 1, inside object 5
    labels = merge_objects(masks, torch.tensor([5, 2, 1]))
    assert labels[:, :4].eq(5).all() and labels[:, 4:].eq(2).all()

    def fake_decode(target, refs, small, big):  # objects 1 (left 2/3) and 3 (right 2/3)
        assert not torch.is_autocast_enabled("cpu")  # fp16 autocast is for CUDA only
        logits = torch.full((2, *small), -5.0)
        logits[0, :, : small[1] * 2 // 3] = 5.0
        logits[1, :, small[1] // 3 :] = 5.0
        return torch.tensor([1, 3]), logits, torch.ones(2)

    monkeypatch.setattr(sine, "vos_decode", fake_decode)
    frames = _images(2, seed=6, shape=(48, 72, 3))
    first = np.zeros((48, 72), np.uint8)
    first[5:20, 5:30] = 1
    first[25:45, 40:70] = 3
    for label_map in sine.segment_video(frames, first):
        assert label_map[:, :20].eq(1).all() and label_map[:, 28:].eq(3).all()
        assert label_map[:, 24:48].eq(3).all()  # both objects there: the larger id wins


def test_moving_the_model_drops_cached_features(scene):
    img, a, _ = scene
    model = promptseg.create_model("sine_test_tiny", pretrained=False)
    before = model.segment(img, (img, a))
    model.double()  # cached float32 features would no longer fit the float64 weights
    after = model.segment(img, (img, a))
    torch.testing.assert_close(after.scores, before.scores, atol=1e-4, rtol=0)
