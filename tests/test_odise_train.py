"""`promptseg train odise` (specs/odise.md §9): the tiny random ODISE learns on a miniature COCO
panoptic dataset, frozen parts stay frozen, training resumes with the same numbers, the CLI
trains; the data pipeline, schedule, optimiser groups and losses are checked piece by piece."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from promptseg.cli import main
from promptseg.errors import DatasetLayoutError
from promptseg.testing.mini_dense import make_mini_dense
from promptseg.train import odise as trainer
from promptseg.train.odise import (
    CocoPanoptic,
    EpochSampler,
    ODISETrainConfig,
    SetCriterion,
    class_text,
    frozen_modules,
    grounding_loss,
    label_logits,
    large_scale_jitter,
    merge_chunks,
    odise_parameter_groups,
    predictions,
    step_lr_factor,
    train_odise,
    training_vocabulary,
)

STEPS = 4
# the zoo's tiny backbone projection must be a multiple of 128 (GroupNorm of its quarter)
TINY = {"backbone": {"projection_dim": 128}}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's many small ops run faster on one thread than on busy shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mini")
    make_mini_dense(root, ["coco-panoptic"])
    return root / "coco"


def tiny(coco: Path, out: Path, **kw) -> ODISETrainConfig:
    base = {
        "model": "odise_test_tiny",
        "pretrained": False,
        "model_config": TINY,
        "annotations": str(coco / "annotations" / "panoptic_val2017.json"),
        "panoptic_masks": str(coco / "panoptic_val2017"),
        "images": str(coco / "val2017"),
        "crop_size": 64,
        "steps": STEPS,
        "batch_size": 1,
        "micro_batch": 1,
        "lr": 2e-3,
        "warmup": 0.0,
        "num_points": 256,
        "out": str(out),
        "save_every": 3,
    }
    return ODISETrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def run(coco, tmp_path_factory):
    """One uninterrupted tiny run: its losses, the trained model and its frozen parts' states
    when it was built."""
    built = {}
    original = trainer.training_model

    def spy(config):
        model = original(config)
        built["model"] = model
        built["frozen"] = {
            name: {k: v.clone() for k, v in m.state_dict().items()}
            for name, m in frozen_modules(model).items()
        }
        return model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "training_model", spy)
        losses = train_odise(tiny(coco, tmp_path_factory.mktemp("full")), progress=False)
    return {"losses": losses, **built}


# ----------------------------------------------------------------------------------------------
# training end to end


def test_loss_falls_and_frozen_parts_stay_frozen(run):
    losses, model = run["losses"], run["model"]
    assert len(losses) == STEPS and np.isfinite(losses).all()
    assert np.mean(losses[-2:]) < 0.92 * np.mean(losses[:2]), losses
    for name, module in frozen_modules(model).items():
        assert not any(p.requires_grad for p in module.parameters()), name
        for key, value in module.state_dict().items():
            assert torch.equal(value, run["frozen"][name][key]), f"{name}.{key} changed"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    prefixes = {
        n.split(".")[0] if n.startswith(("head", "text")) else ".".join(n.split(".")[:2])
        for n in trainable
    }
    assert prefixes == {"backbone.captioner", "backbone.feature_projections", "head", "text_head"}
    assert "text_head.null_embed" in trainable and "text_head.text_proj.weight" in trainable


def test_resume_continues_with_the_same_numbers(coco, run, tmp_path):
    """A run of 2 steps, resumed with `steps` 4: the learning rate follows the 4-step schedule
    (the first run ended at its own schedule's end, x 0.01) and the losses match the full run."""
    train_odise(tiny(coco, tmp_path, steps=2), progress=False)
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert state["step"] == 2 and "backbone.unet.conv_in.weight" not in state["trainable"]
    assert state["optimiser"]["param_groups"][0]["lr"] == pytest.approx(2e-5)
    rest = train_odise(tiny(coco, tmp_path, resume=True), progress=False)
    assert len(rest) == STEPS - 2
    np.testing.assert_allclose(rest, run["losses"][2:], rtol=1e-5)


def test_the_cli_trains_one_step_and_reports_a_bad_config(coco, tmp_path, capsys):
    config = tiny(coco, tmp_path / "cli", steps=1)
    path = tmp_path / "train.yaml"
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(config).items()}
    path.write_text(yaml.safe_dump(data))
    assert main(["train", "odise", "--config", str(path)]) == 0
    assert "1 steps, loss" in capsys.readouterr().out
    assert (tmp_path / "cli" / "promptseg.safetensors").is_file()

    path.write_text(yaml.safe_dump({**data, "crop_size": 100, "micro_batch": 3}))
    assert main(["train", "odise", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "crop_size (100) must be a positive multiple of 64" in err
    assert "multiple of micro_batch" in err
    path.write_text(yaml.safe_dump({**data, "crop": 64}))
    assert main(["train", "odise", "--config", str(path)]) == 2
    assert "unknown keys ['crop']" in capsys.readouterr().err


def test_bad_configs_say_what_to_change(coco, tmp_path):
    bad = {
        "warmup_steps": (5, "do not apply to ODISE's step schedule"),
        "lr_drops": ((0.9, 0.5), "increasing fractions"),
        "vocabulary": ("coco", "must be one of"),
        "captions": (str(tmp_path / "none.json"), "is not a file"),
        "scale_range": ((2.0, 0.1), "0 < min <= max"),
    }
    for key, (value, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            tiny(coco, tmp_path, **{key: value}).check()
    with pytest.raises(DatasetLayoutError, match="panoptic_masks"):
        train_odise(tiny(coco, tmp_path, panoptic_masks=str(tmp_path / "x")), progress=False)
    with pytest.raises(ValueError, match="needs CUDA"):
        train_odise(tiny(coco, tmp_path, amp=True), progress=False)


def test_the_caption_model_trains_with_the_grounding_loss(coco, tmp_path, monkeypatch):
    captions = tmp_path / "captions.json"
    captions.write_text(
        json.dumps(
            {
                "annotations": [
                    {"image_id": 139, "caption": "a person near two cars on grass"},
                    {"image_id": 285, "caption": "a person with a dog"},
                ]
            }
        )
    )
    monkeypatch.setattr(trainer, "nltk_noun_phrases", lambda: lambda c: c.split()[1::2])
    terms = []
    original = trainer.batch_loss

    def spy(*args, **kwargs):
        total, losses = original(*args, **kwargs)
        terms.append({k: float(v.detach()) for k, v in losses.items()})
        return total, losses

    monkeypatch.setattr(trainer, "batch_loss", spy)
    model_config = {**TINY, "classifier": "caption"}
    config = tiny(
        coco,
        tmp_path / "run",
        model_config=model_config,
        steps=1,
        batch_size=2,
        micro_batch=2,
        captions=str(captions),
    )
    (loss,) = train_odise(config, progress=False)
    (seen,) = terms
    n_stages = 4  # the tiny decoder's 3 layers + the initial queries
    grounding = {k for k in seen if k.startswith("loss_grounding")}
    assert len(grounding) == n_stages and len(seen) == 4 * n_stages
    assert np.isfinite(loss) and loss == pytest.approx(sum(seen.values()), rel=1e-5)
    with pytest.raises(ValueError, match="set `captions`"):
        train_odise(tiny(coco, tmp_path, model_config=model_config), progress=False)


# ----------------------------------------------------------------------------------------------
# the model side


def test_label_logits_are_the_best_synonym_cosine_and_train_the_text_side(run):
    model = run["model"]
    torch.manual_seed(0)
    z, text, null = torch.randn(2, 3, 32), torch.randn(5, 32), torch.randn(1, 32)
    owner = torch.tensor([0, 0, 1, 2, 2])
    logits = label_logits(z, torch.tensor(10.0), text, owner, 3, null)
    cos = F.normalize(z, dim=-1) @ F.normalize(text, dim=-1).T
    expected = torch.stack([cos[..., :2].amax(-1), cos[..., 2], cos[..., 3:].amax(-1)], -1)
    void = F.normalize(z, dim=-1) @ F.normalize(null, dim=-1).T
    torch.testing.assert_close(logits, 10 * torch.cat([expected, void], -1))

    vocabulary, _ = training_vocabulary([{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}], None)
    model.train()
    stages = predictions(model, torch.rand(1, 3, 64, 64), class_text(model, vocabulary))
    assert len(stages) == 4 and all(s["pred_logits"].shape == (1, 8, 3) for s in stages)
    model.zero_grad()
    sum(s["pred_logits"].sum() for s in stages).backward()
    head = model.text_head
    assert head.text_proj.weight.grad.abs().sum() > 0 and head.null_embed.grad.abs().sum() > 0
    assert model.backbone.captioner.alpha_cond.grad.abs().sum() > 0  # through the frozen UNet
    assert all(p.grad is None for p in model.clip.parameters())
    model.zero_grad()
    model.eval()


def test_parameter_groups_skip_decay_for_norms_and_biases_only(run):
    model = run["model"]
    groups = odise_parameter_groups(model, 0.05)
    decay = {n for g in groups if g["weight_decay"] for n in g["names"]}
    plain = {n for g in groups if not g["weight_decay"] for n in g["names"]}
    assert decay | plain == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not decay & plain
    assert "backbone.feature_projections.0.conv1.norm.weight" in plain  # GroupNorm
    assert "head.predictor.decoder_norm.weight" in plain  # LayerNorm
    assert "text_head.text_proj.bias" in plain
    in_proj = "head.predictor.transformer_self_attention_layers.0.self_attn.in_proj_bias"
    for name in (
        "text_head.null_embed",
        "backbone.captioner.alpha_cond",
        in_proj,
        "head.predictor.query_feat.weight",
        "head.predictor.post_mask_embed.logit_scale",
    ):
        assert name in decay, name


# ----------------------------------------------------------------------------------------------
# data


def test_dataset_keeps_non_crowd_segments_and_maps_coco_ids(coco):
    data = CocoPanoptic(
        coco / "annotations" / "panoptic_val2017.json",
        coco / "panoptic_val2017",
        coco / "val2017",
    )
    assert len(data) == 2
    first, second = data[0], data[1]
    assert first.category_ids.tolist() == [187, 193, 1, 3, 3]
    assert second.category_ids.tolist() == [199, 1, 18]  # the crowd 'person' is left out
    for item in (first, second):
        assert item.image.shape[:2] == item.segments.shape
        assert all((item.segments == s).any() for s in item.segment_ids)
    vocabulary, index = training_vocabulary(data.categories, "coco_panoptic")
    assert len(vocabulary) == 133
    assert {vocabulary.names[index[c["id"]]] for c in data.categories} == {
        "person",
        "car",
        "dog",
        "sky",
        "grass",
        "wall",
    }
    plain, plain_index = training_vocabulary(data.categories, None)
    assert plain.names[plain_index[187]] == "sky-other-merged" and len(plain) == 6
    with pytest.raises(ValueError, match=r"category ids \[0\]"):
        training_vocabulary([{"id": 0, "name": "x"}], "coco_panoptic")


class Draws:
    """Stands in for the generator: fixed flip draw, scale fraction and crop fraction."""

    def __init__(self, flip: float, scale: float, crop: float) -> None:
        self.values, self.scale = [flip, crop], scale

    def random(self) -> float:
        return self.values.pop(0)

    def uniform(self, low: float, high: float) -> float:
        return self.scale


def test_large_scale_jitter_resizes_crops_and_pads_consistently():
    image = np.zeros((32, 64, 3), np.uint8)
    image[:, :40] = (200, 0, 0)
    image[:, 40:] = (0, 0, 200)
    segments = np.where(np.arange(64) < 40, 7, 9)[None].repeat(32, 0)
    # scale 2: 32x64 -> 64x128, crop offset 0.5 x (0, 64) = (0, 32): boundary 80 -> column 48
    out, seg = large_scale_jitter(image, segments, 64, Draws(0.9, 2.0, 0.5))
    assert out.shape == (64, 64, 3) and seg.shape == (64, 64)
    assert (seg[:, :48] == 7).all() and (seg[:, 48:] == 9).all()
    assert (out[:, :47, 0] == 200).all() and (out[:, 49:, 2] == 200).all()
    # flipped, scale 0.25: 8x16 in the top-left corner, the rest padded (128, void)
    out, seg = large_scale_jitter(image, segments, 64, Draws(0.1, 0.25, 0.5))
    assert (seg[:8, :6] == 9).all() and (seg[:8, 6:16] == 7).all()
    assert (seg[8:] == 0).all() and (seg[:, 16:] == 0).all()
    assert (out[8:] == 128).all() and (out[:, 16:] == 128).all()


def test_epoch_sampler_visits_every_image_once_per_epoch_and_resumes():
    sampler = EpochSampler(5, np.random.default_rng(0))
    first = [sampler() for _ in range(5)]
    assert sorted(first) == list(range(5))
    state, rng_state = sampler.state_dict(), sampler.rng.bit_generator.state
    ahead = [sampler() for _ in range(7)]
    again = EpochSampler(5, np.random.default_rng(1))
    again.load_state_dict(state)
    again.rng.bit_generator.state = rng_state
    assert [again() for _ in range(7)] == ahead and sorted(ahead[:5]) == list(range(5))


# ----------------------------------------------------------------------------------------------
# schedule and losses


def test_step_schedule_matches_the_reference_iterations():
    c = ODISETrainConfig()
    factors = [
        step_lr_factor(s, c.steps, c.warmup, c.warmup_factor, c.lr_drops) for s in range(c.steps)
    ]
    assert factors[0] == pytest.approx(0.067) and factors[250] == 1.0
    assert np.all(np.diff(factors[:251]) > 0)  # linear warmup over ~250 of 92,188 iterations
    drops = np.flatnonzero(np.diff(factors[251:]) < 0) + 252
    assert drops.tolist() == [81945, 88774]  # spec §9: ~81,945 and ~88,774
    assert factors[-1] == pytest.approx(0.01)


def test_set_criterion_matches_queries_and_normalises_by_num_masks():
    torch.manual_seed(0)
    masks = torch.zeros(2, 32, 32)
    masks[0, :16], masks[1, :, 20:] = 1, 1
    target = [{"labels": torch.tensor([1, 0]), "masks": masks}]
    good = torch.where(masks.bool(), 8.0, -8.0)[:, ::4, ::4]  # [2, 8, 8] logits at 1/4
    pred_masks = torch.cat([torch.randn(2, 8, 8), good.flip(0)])[None]  # queries 2, 3 are right
    logits = torch.full((1, 4, 3), -4.0)
    logits[0, 2, 0] = logits[0, 3, 1] = 4.0  # query 2 says class 0, query 3 class 1
    logits[0, :2, 2] = 4.0  # the others say no-object
    stage = {"pred_masks": pred_masks, "pred_logits": logits}
    criterion = SetCriterion(num_points=512)
    ((rows, cols),) = criterion.match(stage, target, torch.Generator().manual_seed(0))
    assert rows.tolist() == [2, 3] and cols.tolist() == [1, 0]
    losses = criterion([stage, stage], target, 2.0, torch.Generator().manual_seed(0))
    assert sorted(losses) == sorted(
        ["loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"]
    )
    expected_ce = F.cross_entropy(
        logits[0], torch.tensor([2, 2, 0, 1]), torch.tensor([1.0, 1.0, 0.1])
    )
    torch.testing.assert_close(losses["loss_ce"], 2.0 * expected_ce)
    noise = {**stage, "pred_masks": torch.randn(1, 4, 8, 8)}
    worse = criterion([noise], target, 2.0, torch.Generator().manual_seed(0))
    for key in ("loss_mask", "loss_dice"):
        assert losses[key] < 0.5 * worse[key], key  # the right masks cost less
    halved = criterion([stage], target, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(halved["loss_mask"], 2 * losses["loss_mask"])
    empty = criterion(
        [stage],
        [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 32, 32)}],
        1.0,
    )
    assert empty["loss_mask"] == 0 and empty["loss_ce"] > 0


def test_grounding_loss_by_hand():
    torch.manual_seed(0)
    masks, words = torch.randn(2, 3, 4), torch.randn(2, 2, 4)
    scale = torch.tensor(5.0)
    m, w = F.normalize(masks, dim=-1), F.normalize(words, dim=-1)
    score = torch.zeros(2, 2)
    for i in range(2):
        for t in range(2):
            s = scale * m[i] @ w[t].T  # [Q, K]
            score[i, t] = (s.softmax(0) * s).sum(0).mean()
    labels = torch.arange(2)
    both = torch.ones(2, 2, dtype=torch.bool)
    expected = 0.5 * (F.cross_entropy(score.T, labels) + F.cross_entropy(score, labels))
    torch.testing.assert_close(grounding_loss(masks, scale, words, both), expected)
    one = torch.tensor([[True, False], [False, False]])  # image 1's caption has no phrase
    t2i = F.cross_entropy(score.T, labels, reduction="none") * torch.tensor([1.0, 0.0])
    i2t = F.cross_entropy(score, labels, reduction="none")[0]
    torch.testing.assert_close(grounding_loss(masks, scale, words, one), 0.5 * (t2i.mean() + i2t))


def test_noun_phrases_merge_like_the_reference():
    assert merge_chunks(["red car", None, "tree", "grass", None]) == ["red car", "tree grass"]
    assert merge_chunks([None, "dog", None, "park"]) == ["dog"]  # a trailing chunk is dropped
    # a phrase already found is not repeated and keeps growing with the next chunk
    assert merge_chunks(["dog", None, "dog", None, "cat", None]) == ["dog", "dog cat"]
