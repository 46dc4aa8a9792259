"""SINE end to end on the tiny config: prompts, levels, caching, official-layout loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import promptseg
from promptseg import SupportSet, UnsupportedPromptError, VisualPrompt
from promptseg.heads.mformer import unbatch
from promptseg.weights import save_state_dict_file


def test_levels_and_shapes(sine, scene):
    img, a, b = scene
    refs = SupportSet([VisualPrompt(img, a, class_id=3), VisualPrompt(img, b, class_id=7)])
    sem = sine.segment(img, refs, threshold=0.0)
    assert sem.level == ["semantic", "semantic"] and sem.class_ids.tolist() == [3, 7]
    ident = sine.segment(img, refs, level="identity")
    assert ident.class_ids.tolist() == [0, 1] and ident.masks.shape == (2, 60, 90)
    inst = sine.segment(img, refs, level="instance", output_size=(30, 45))
    assert inst.masks.shape[1:] == (30, 45) and set(inst.class_ids.tolist()) <= {3, 7}
    assert len(inst) <= 10 * 2 and bool((inst.scores > 0).all())  # queries x classes
    both = sine.segment(img, refs, level="all", threshold=0.0)
    assert len(both) == 2 + len(sine.segment(img, refs, level="instance")) + 2


def test_reference_features_are_pooled_from_one_pass_and_cached(sine, scene, monkeypatch):
    img, a, b = scene
    sine.clear_caches()
    calls = []
    original = sine.backbone.forward_features
    monkeypatch.setattr(sine.backbone, "forward_features", lambda x: calls.append(1) or original(x))
    sine.encode_prompt([SupportSet([(img, a), (img, b)])], level="semantic")
    sine.encode_prompt([SupportSet([(img, b)])], level="semantic")
    assert len(calls) == 1


def test_predictor_reuses_target_features(sine, scene):
    img, a, b = scene
    pred = promptseg.Predictor(sine)
    pred.set_image(img)
    one = pred.predict((img, a), level="identity")
    again = sine.segment(img, (img, a), level="identity")
    torch.testing.assert_close(one.scores, again.scores)


def test_bad_prompts(sine, scene):
    img, a, _ = scene
    with pytest.raises(UnsupportedPromptError, match="text"):
        sine.segment(img, "a cat")
    with pytest.raises(ValueError, match="no foreground"):
        sine.segment(img, (img, np.zeros_like(a)))


def test_official_layout_checkpoint_loads_strictly(sine, scene, tmp_path):
    official = {"criterion.empty_weight": torch.ones(2)}
    for key, value in sine.state_dict().items():
        if key.startswith("backbone.vit."):
            official["image_encoder.encoder." + key[len("backbone.vit.") :]] = value
        elif key.startswith("head.neck."):
            official["image_encoder." + key[len("head.") :]] = value
        else:
            official["transformer_decoder." + key[len("head.") :]] = value
    official["image_encoder.encoder.mask_token"] = torch.zeros(1, 32)
    path = tmp_path / "pytorch_model.bin"
    torch.save(official, path)
    loaded = promptseg.create_model("sine_test_tiny", checkpoint_path=path)
    img, a, _ = scene
    ours = loaded.segment(img, (img, a), level="identity", return_logits=True)
    ref = sine.segment(img, (img, a), level="identity")
    torch.testing.assert_close(ours.scores, ref.scores)
    save_state_dict_file(loaded.state_dict(), tmp_path / "native.safetensors")
    promptseg.create_model("sine_test_tiny", checkpoint_path=tmp_path / "native.safetensors")


def test_released_tag_error_says_where_to_get_the_file(tmp_path):
    card = promptseg.model_info("sine_dinov2l.coco_ade_o365")
    assert card.default_threshold == 0.7 and card.config["head"]["queries"] == 200
    from promptseg.weights import fetch_native

    with pytest.raises(promptseg.WeightsNotFoundError, match="1GYQbbUZClbmhVESDLpRwqe"):
        fetch_native(card, cache_dir=tmp_path, progress=False)


def test_memory_bank_keeps_first_frame_and_best_decayed():
    from promptseg.models.sine_video import MemoryBank, MemoryEntry, decayed_score

    assert decayed_score(0.8, 0) == 0.8 and decayed_score(0.8, 10) == pytest.approx(0.4)
    assert decayed_score(0.8, 20) == 0.0 and decayed_score(0.8, 25) == 0.0

    def entry(score, frame):
        return MemoryEntry(torch.zeros(1), torch.zeros(1), score, frame)

    bank = MemoryBank(3, entry(1.0, 0))
    for t, score in enumerate([0.9, 0.2, 0.5, 0.95], start=1):
        bank.push(entry(score, t), now=t)
    assert [e.frame for e in bank.frames()] == [0, 4, 1]  # GT fixed; 0.95@4 and 0.9@1 kept
    bank.push(entry(0.3, 30), now=30)  # old frames decayed to 0: the fresh one wins
    assert [e.frame for e in bank.frames()][:2] == [0, 30]


def test_video_encodes_each_frame_once_and_labels_by_object(sine, monkeypatch):
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8) for _ in range(5)]
    labels = np.zeros((48, 80), np.uint8)
    labels[5:20, 5:30] = 1
    labels[25:45, 40:70] = 3
    calls = []
    original = sine.backbone.forward_features
    monkeypatch.setattr(sine.backbone, "forward_features", lambda x: calls.append(1) or original(x))
    maps = list(sine.segment_video(frames, labels, memory=2))
    assert len(calls) == len(frames)  # memory frames reuse the features computed as targets
    assert all(m.shape == (48, 80) and m.dtype == torch.int64 for m in maps)
    assert set(torch.cat([m.unique() for m in maps]).tolist()) <= {0, 1, 3}
    with pytest.raises(ValueError, match="no object"):
        next(sine.segment_video(frames, np.zeros((48, 80), np.uint8)))


def test_segment_video_command(sine, tmp_path, capsys):
    from PIL import Image

    from promptseg.cli import main

    rng = np.random.default_rng(2)
    for t in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(
            tmp_path / f"{t:05d}.jpg"
        )
    first = np.zeros((40, 56), np.uint8)
    first[5:20, 5:30] = 2
    Image.fromarray(first).save(tmp_path / "first.png")
    ckpt = tmp_path / "sine.safetensors"
    save_state_dict_file(sine.state_dict(), ckpt)
    argv = ["segment-video", str(tmp_path), "--first-mask", str(tmp_path / "first.png")]
    argv += ["--model", "sine_test_tiny", "--checkpoint", str(ckpt), "-o", str(tmp_path / "out")]
    assert main([*argv, "--gif"]) == 0
    written = sorted((tmp_path / "out").iterdir())
    names = ["00000.png", "00001.png", "00002.png"]
    assert [p.name for p in written] == [*names, "overlay", "overlay.gif"]
    assert Image.open(written[0]).mode == "P" and Image.open(written[0]).size == (56, 40)
    assert sorted(p.name for p in (tmp_path / "out" / "overlay").iterdir()) == names
    with Image.open(tmp_path / "out" / "overlay" / "00000.png") as im:
        assert im.mode == "RGB" and im.size[1] >= 40
    with Image.open(tmp_path / "out" / "overlay.gif") as gif:
        assert gif.n_frames == 3
    assert main(["segment-video", str(tmp_path / "nope"), "--first-mask", "x.png"]) == 2


def test_instance_level_decodes_without_id_tokens(sine, scene):
    img, a, b = scene
    emb = sine.embed_image(img, level="all")
    prompt = sine.encode_prompt([SupportSet([(img, a), (img, b)])])
    with torch.no_grad():
        ((_, fsod),) = sine.decode(emb.features, prompt, "instance")
        ((_, fss),) = sine.decode(emb.features, prompt, "semantic")
        f, tokens = emb.features["instance"], prompt[0].tokens["fsod"]
        direct = unbatch(sine.head(f["feats"], f["mfeat"], None, tokens.sem_tokens, aux=False))[0]
        g = emb.features["default"]
        without_ids = sine.head(
            g["feats"], g["mfeat"], tokens.id_tokens, prompt[0].tokens["fss"].sem_tokens, aux=False
        )
        without_ids = unbatch(without_ids)[0]
    assert fsod["fsod"]["pred_id_logits"].shape[0] == 0 and tokens.id_tokens.shape[0] == 0
    torch.testing.assert_close(
        fsod["fsod"]["pred_logits"], direct["pred_logits"], atol=1e-5, rtol=1e-5
    )
    assert fss["fss"]["pred_id_logits"].shape[0] == 2
    assert not torch.allclose(without_ids["pred_logits"], fss["fss"]["pred_logits"])
