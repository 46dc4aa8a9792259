"""`promptseg train diffews`: the tiny config learns on a synthetic COCO dataset (loss falls),
episodes are reproducible, training resumes where it stopped with the same numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from promptseg.cli import main
from promptseg.errors import DatasetLayoutError
from promptseg.train import common
from promptseg.train import diffews as trainer
from promptseg.train.common import CocoInstances
from promptseg.train.diffews import DiffewSTrainConfig, EpisodeSampler, train_diffews
from tests.test_sine_train import write_coco


def tiny(tmp_path, **kw) -> DiffewSTrainConfig:
    ann = write_coco(tmp_path)
    base = {"model": "diffews_test_tiny", "pretrained": False, "annotations": str(ann),
            "images": str(tmp_path), "steps": 4, "batch_size": 1, "lr": 3e-3, "lr_end": 0.0,
            "weight_decay": 0.0, "out": str(tmp_path / "run"), "save_every": 2}  # fmt: skip
    return DiffewSTrainConfig(**{**base, **kw})


def test_loss_falls_and_the_cli_trains(tmp_path, capsys):
    losses = train_diffews(tiny(tmp_path), progress=False)
    assert len(losses) == 4 and np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2])
    assert (tmp_path / "run" / "promptseg.safetensors").is_file()
    cfg = tmp_path / "train.yaml"
    data = {k: v for k, v in vars(tiny(tmp_path, steps=1, out=str(tmp_path / "cli"))).items()}
    cfg.write_text(yaml.safe_dump({k: v for k, v in data.items() if k != "model_config"}))
    assert main(["train", "diffews", "--config", str(cfg)]) == 0
    assert "1 steps, loss" in capsys.readouterr().out


def test_resume_continues_with_the_same_numbers(tmp_path, monkeypatch):
    full = train_diffews(tiny(tmp_path, out=str(tmp_path / "a")), progress=False)
    calls = []
    original = common.optimiser_step

    def stop_after_three(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(common, "optimiser_step", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        train_diffews(tiny(tmp_path, out=str(tmp_path / "b")), progress=False)
    monkeypatch.setattr(common, "optimiser_step", original)
    rest = train_diffews(tiny(tmp_path, out=str(tmp_path / "b"), resume=True), progress=False)
    assert len(rest) == 2  # steps 3..4 (the state was saved after step 2)
    np.testing.assert_allclose(rest, full[2:], rtol=1e-4)


def test_episodes_are_reproducible_and_need_two_images_of_a_class(tmp_path):
    data = CocoInstances(write_coco(tmp_path), tmp_path)

    def draws(seed):
        sampler, rng = EpisodeSampler(data, 2), np.random.default_rng(seed)
        return [sampler(rng) for _ in range(4)]

    for a, b in zip(draws(0), draws(0), strict=True):
        assert torch.equal(a[1], b[1]) and len(a[2]) == len(b[2])
        assert 1 <= len(a[2]) <= 2 and a[1].any()
    one = tmp_path / "one"
    one.mkdir()
    single = CocoInstances(write_coco(one, 1), one)
    with pytest.raises(DatasetLayoutError, match="two images"):
        EpisodeSampler(single, 2)
    with pytest.raises(ValueError, match="shots"):
        DiffewSTrainConfig(shots=0).check()


def test_the_official_77_token_context_is_used_when_given(tmp_path):
    """`text_context` (key `padded` of empty_prompt_embedding.safetensors) conditions training
    like the official code; without it training warns that it uses the 2-token context."""
    import safetensors.torch

    with pytest.warns(UserWarning, match="2-token"):
        plain = train_diffews(tiny(tmp_path, steps=1, out=str(tmp_path / "a")), progress=False)
    width = 8  # cross_attention_dim of diffews_test_tiny
    torch.manual_seed(0)
    path = tmp_path / "empty_prompt_embedding.safetensors"
    padded = torch.randn(1, 77, width)
    safetensors.torch.save_file({"embedding": padded[:, :2].clone(), "padded": padded}, path)
    seen = []
    original = trainer.episode_loss

    def spy(model, episode, generator=None, text_context=None):
        seen.append(text_context)
        return original(model, episode, generator, text_context)

    config = tiny(tmp_path, steps=1, out=str(tmp_path / "b"), text_context=str(path))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "episode_loss", spy)
        padded_run = train_diffews(config, progress=False)
    assert seen and all(torch.equal(c, padded) for c in seen)
    assert padded_run[0] != pytest.approx(plain[0], rel=1e-6)  # 75 more keys: another loss
    safetensors.torch.save_file({"embedding": padded[:, :2].clone()}, path)
    with pytest.raises(ValueError, match="no `padded`"):
        train_diffews(config, progress=False)
    with pytest.raises(ValueError, match="text_context"):
        DiffewSTrainConfig(text_context=str(tmp_path / "missing.safetensors")).check()
