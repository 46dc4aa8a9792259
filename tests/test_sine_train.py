"""`promptseg train sine`: the tiny config learns on a synthetic COCO dataset (loss falls);
schedule, clipping, weight-decay groups, pair construction and the frozen encoder (sine.md §7)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from promptseg.cli import main
from promptseg.errors import DatasetLayoutError
from promptseg.train.common import (
    CocoInstances,
    build_optimiser,
    load_train_state,
    optimiser_step,
    parameter_groups,
    save_train_state,
    trainable_model,
)
from promptseg.train.sine import (
    PairSampler,
    large_scale_jitter,
    train_sine,
    training_pair,
)
from promptseg.train.sine import SINETrainConfig as TrainConfig
from promptseg.weights import load_state_dict_file

COLORS = {1: (200, 40, 40), 2: (40, 200, 40), 3: (40, 40, 200)}


def write_coco(root, n_images=3, layout=None):
    """COCO json + PNGs: image i holds one 30x24 box per category in layout[i] (default 1, 2)."""
    layout = layout or [[1, 2]] * n_images
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i, cats in enumerate(layout):
        img = np.full((64, 80, 3), 128, np.uint8)
        for k, cat in enumerate(cats):
            y, x = int(rng.integers(0, 30)), int(rng.integers(0, 40))
            img[y : y + 24, x : x + 30] = COLORS[cat]
            poly = [x, y, x + 29, y, x + 29, y + 23, x, y + 23]
            anns.append(
                {
                    "id": 10 * i + k + 1,
                    "image_id": i,
                    "category_id": cat,
                    "iscrowd": 0,
                    "segmentation": [poly],
                    "area": 720,
                    "bbox": [x, y, 30, 24],
                }
            )
        Image.fromarray(img).save(root / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "height": 64, "width": 80})
    path = root / "instances.json"
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": anns,
                "categories": [{"id": c, "name": str(c)} for c in COLORS],
            }
        )
    )
    return path


def tiny_config(tmp_path, **kw) -> TrainConfig:
    """The toy model without pretrained weights, writing into tmp_path/run."""
    return TrainConfig(model="sine_test_tiny", pretrained=False, out=str(tmp_path / "run"), **kw)


def test_loss_falls_on_the_tiny_config(tmp_path):
    ann = write_coco(tmp_path)
    config = tiny_config(
        tmp_path,
        annotations=str(ann),
        images=str(tmp_path),
        steps=30,
        lr=2e-3,
        warmup_steps=3,
        jitter_scale=(0.8, 1.25),
    )
    losses = train_sine(config, progress=False)
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert (tmp_path / "run" / "promptseg.safetensors").is_file()


def test_train_command_and_bad_data(tmp_path, capsys):
    ann = write_coco(tmp_path, n_images=1)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        f"model: sine_test_tiny\npretrained: false\nannotations: {ann}\n"
        f"images: {tmp_path}\nsteps: 2\nwarmup_steps: 1\nbatch_size: 2\njitter_scale: [0.5, 1.5]\n"
        f"out: {tmp_path / 'run'}\n"
    )
    assert main(["train", "sine", "--config", str(cfg)]) == 0
    assert "2 steps" in capsys.readouterr().out
    assert main(["train", "sine", "--config", str(cfg), "--steps", "1"]) == 2
    assert "warmup_steps (1) must be in [0, steps = 1)" in capsys.readouterr().err
    with pytest.raises(DatasetLayoutError, match="not found"):
        CocoInstances(tmp_path / "nope.json", tmp_path)
    cfg.write_text("modle: x\n")
    assert main(["train", "sine", "--config", str(cfg)]) == 2
    assert "unknown keys" in capsys.readouterr().err


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(steps=50).check()  # default warmup 100
    with pytest.raises(ValueError, match="grad_clip"):
        TrainConfig(grad_clip=0.0).check()
    for scale in [(2.0, 1.0), 0.5, (0.5,)]:
        with pytest.raises(ValueError, match="jitter_scale"):
            TrainConfig(jitter_scale=scale).check()
    TrainConfig().check()
    TrainConfig(grad_clip=None, warmup_steps=0).check()


def test_lr_follows_warmup_then_linear_decay(tmp_path):
    model = trainable_model(tiny_config(tmp_path), "backbone")
    config = tiny_config(tmp_path, lr=1e-3, steps=10, warmup_steps=4)
    optimiser, schedule = build_optimiser(model.head, config)
    # step s < 4: lr * s / 4; then lr * (10 - s) / (10 - 4), reaching 0 after the last step
    expected = [0, 0.25, 0.5, 0.75, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0]
    for step, factor in enumerate(expected):
        for group in optimiser.param_groups:
            assert group["lr"] == pytest.approx(1e-3 * factor, abs=1e-12), step
        optimiser.step()
        schedule.step()
    defaults = TrainConfig()
    assert (defaults.lr, defaults.warmup_steps, defaults.weight_decay) == (1e-4, 100, 0.05)
    assert optimiser.defaults["betas"] == (0.9, 0.999) and optimiser.defaults["eps"] == 1e-8


def test_a_resumed_run_follows_its_own_schedule(tmp_path):
    """A run saved at step 3 of 10 and resumed with `steps: 20` continues on the 20-step
    schedule (the saved optimiser's lr is that of the old one)."""
    model = trainable_model(tiny_config(tmp_path), "backbone")
    optimiser, schedule = build_optimiser(
        model.head, tiny_config(tmp_path, steps=10, warmup_steps=1)
    )
    for _ in range(3):
        optimiser.step()
        schedule.step()
    rng = np.random.default_rng(0)
    path = tmp_path / "train_state.pt"
    save_train_state(path, step=3, rng=rng, optimiser=optimiser, schedule=schedule)
    config = tiny_config(tmp_path, steps=20, warmup_steps=1)
    optimiser, schedule = build_optimiser(model.head, config)
    step, _ = load_train_state(path, rng=rng, optimiser=optimiser, schedule=schedule)
    wanted = config.lr * (20 - 3) / (20 - config.warmup_steps)
    assert step == 3 and config.warmup_steps < 3
    assert all(g["lr"] == pytest.approx(wanted, rel=1e-9) for g in optimiser.param_groups)


def test_gradients_are_clipped_to_the_max_norm(tmp_path):
    model = trainable_model(tiny_config(tmp_path), "backbone")
    optimiser, schedule = build_optimiser(model.head, tiny_config(tmp_path))
    params = list(model.head.parameters())

    def grad_norm() -> float:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))

    sum(1e3 * p.sum() for p in params).backward()
    before = grad_norm()
    assert optimiser_step(optimiser, schedule, 1.0) == pytest.approx(before, rel=1e-5)
    assert before > 100 and grad_norm() <= 1.0 + 1e-5
    optimiser.zero_grad()
    sum(1e3 * p.sum() for p in params).backward()
    optimiser_step(optimiser, schedule, None)
    assert grad_norm() == pytest.approx(before, rel=1e-5)


def test_no_weight_decay_for_layernorm_and_embeddings(tmp_path):
    head = trainable_model(tiny_config(tmp_path), "backbone").head
    decay, no_decay = parameter_groups(head, 0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    embeddings = {"query_feat", "query_embed", "query_grained_embed", "neg_class_embed"}
    expected = {
        n
        for n, _ in head.named_parameters()
        if n.split(".")[0] in embeddings or n.startswith("decoder_norm.") or ".norm." in n
    }
    assert set(no_decay["names"]) == expected and len(expected) > 10
    # officially decayed: LayerNorm2d (neck, mask features), biases, temp and logit_scale
    for name in ["neck.1.weight", "mask_feat_layer.1.bias", "id_class_embed.bias", "temp"]:
        assert name in decay["names"]
    assert "logit_scale" in decay["names"]
    names = decay["names"] + no_decay["names"]
    assert sorted(names) == sorted(n for n, _ in head.named_parameters())
    for group in (decay, no_decay):
        named = dict(head.named_parameters())
        assert all(named[n] is p for n, p in zip(group["names"], group["params"], strict=True))


def test_pairs_from_different_images_of_a_shared_class(tmp_path):
    # class 1 in images 0 and 1; class 3 only in image 0; class 2 only in image 2
    ann = write_coco(tmp_path, layout=[[1, 3], [1], [2]])
    data = CocoInstances(ann, tmp_path)
    assert data.by_class == {1: [0, 1], 2: [2], 3: [0]}
    sampler, rng = PairSampler(data, 112, crop_pair_prob=0.0), np.random.default_rng(0)
    cross = 0
    for _ in range(30):
        ref, tgt = sampler(rng)
        assert len(ref.ids) and len(tgt.ids) and set(tgt.cats) <= set(ref.cats)
        assert max(ref.image.shape[:2]) <= 112 and ref.masks.shape[1:] == ref.image.shape[:2]
        assert tgt.masks.shape[1:] == tgt.image.shape[:2] and tgt.masks.any((1, 2)).all()
        if ref.index != tgt.index:
            cross += 1
            assert {ref.index, tgt.index} == {0, 1} and set(tgt.cats) == {1}
            assert not set(tgt.ids) & set(ref.ids)  # no identity shared across images
        else:  # a class found in one image only: crop pair
            assert ref.index in (0, 2)
    assert cross >= 5
    crop = PairSampler(data, 112, crop_pair_prob=1.0)
    for _ in range(10):
        ref, tgt = crop(rng)
        assert ref.index == tgt.index


def test_pairs_are_reproducible_under_the_seed(tmp_path):
    data = CocoInstances(write_coco(tmp_path), tmp_path)

    def draws(seed: int) -> list:
        sampler, rng = PairSampler(data, 112), np.random.default_rng(seed)
        return [view for _ in range(5) for view in sampler(rng)]

    a, b, c = draws(0), draws(0), draws(1)
    for x, y in zip(a, b, strict=True):
        assert x.index == y.index and np.array_equal(x.image, y.image)
        assert np.array_equal(x.masks, y.masks) and np.array_equal(x.ids, y.ids)
    assert any(x.image.shape != y.image.shape for x, y in zip(a, c, strict=True))


def test_large_scale_jitter_resizes_crops_and_keeps_masks_aligned():
    image = np.zeros((40, 60, 3), np.uint8)
    image[10:30, 20:50] = 255
    mask = np.zeros((1, 40, 60), bool)
    mask[0, 10:30, 20:50] = True
    rng = np.random.default_rng(0)
    small, small_mask = large_scale_jitter(image, mask, 32, rng, scale=(1.0, 1.0))
    assert small.shape == (21, 32, 3) and small_mask.shape == (1, 21, 32)  # 32 / 60 of the size
    big, big_mask = large_scale_jitter(image, mask, 32, rng, scale=(2.0, 2.0))
    assert big.shape == (32, 32, 3) and big_mask.shape == (1, 32, 32)  # 43 x 64, then cropped
    for img, m in [(small, small_mask[0]), (big, big_mask[0])]:
        assert m.any() and (img[..., 0][m] > 127).mean() > 0.9 and (img[..., 0][~m] < 128).all()


def test_frozen_encoder_gets_no_gradient(tmp_path):
    ann = write_coco(tmp_path)
    config = tiny_config(
        tmp_path, annotations=str(ann), images=str(tmp_path), steps=2, warmup_steps=1
    )
    model = trainable_model(config, "backbone")
    sampler = PairSampler(CocoInstances(ann, tmp_path), model.canvas("fss"))
    output, target = training_pair(model, *sampler(np.random.default_rng(0)))
    output["pred_masks"].sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.parameters())
    assert any(p.grad is not None for p in model.head.parameters())
    # a short run leaves the encoder weights as initialised and changes the head
    torch.manual_seed(config.seed)
    fresh = trainable_model(config, "backbone").state_dict()
    train_sine(config, progress=False)
    saved = load_state_dict_file(tmp_path / "run" / "promptseg.safetensors")
    backbone = [k for k in fresh if k.startswith("backbone.")]
    assert backbone and all(torch.equal(saved[k], fresh[k]) for k in backbone)
    assert not torch.equal(saved["head.query_feat.weight"], fresh["head.query_feat.weight"])
