"""Shared evaluation plumbing: weights hash, dtype names, prefetching, batched prompt encoding."""

from __future__ import annotations

import hashlib
import threading

import pytest
import torch

from promptseg.bench.runner import encode_prompts, environment, model_record, prefetch


def test_weights_sha256_of_the_file_loaded(tiny_clipseg, tmp_path):
    from promptseg import create_model
    from promptseg.weights import native_checkpoint_path, save_state_dict_file

    assert model_record(tiny_clipseg)["weights_sha256"] is None  # random init
    native = native_checkpoint_path(tiny_clipseg.card, tmp_path)
    save_state_dict_file(tiny_clipseg.state_dict(), native)
    digest = hashlib.sha256(native.read_bytes()).hexdigest()
    cached = create_model("clipseg_test_tiny", cache_dir=tmp_path, checkpoint_path=native)
    assert model_record(cached)["weights_sha256"] == digest


def test_environment_names_the_dtype_as_the_cli_does():
    from promptseg import create_model

    model = create_model("test_colorkey", pretrained=False)
    assert environment(model)["dtype"] == "fp32"
    assert environment(model.to(torch.bfloat16))["dtype"] == "bf16"
    assert environment(model.to(torch.float16))["dtype"] == "fp16"


def test_prefetch_keeps_the_order_and_raises_the_loaders_error():
    names = set()

    def load(i: int) -> int:
        names.add(threading.current_thread().name)
        if i == 7:
            raise OSError("unreadable image 7")
        return i * i

    assert list(prefetch(load, range(7), workers=3, ahead=4)) == [i * i for i in range(7)]
    assert all(n.startswith("promptseg-load") for n in names)
    with pytest.raises(OSError, match="image 7"):
        list(prefetch(load, range(10), workers=2, ahead=2))
    assert list(prefetch(load, range(3), workers=0, ahead=1)) == [0, 1, 4]


def test_encode_prompts_splits_a_batch_per_prompt():
    from promptseg import create_model

    model = create_model("test_colorkey", pretrained=False)
    encoded = encode_prompts(model, ["cat", ["dog", "bird"]])
    assert [p.text for p in encoded[1][0]] == ["dog", "bird"] and len(encoded[1][1]) == 2
    assert encoded[0][1] == model.encode_prompt(model.prepare_prompts("cat"))

    class Opaque:
        def __len__(self) -> int:
            return 3

    model.encode_prompt = lambda prompts, level=None: Opaque()
    with pytest.raises(ValueError, match="--batch-size 1"):
        encode_prompts(model, ["cat", "dog"])
