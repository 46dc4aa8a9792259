"""Generated `promptseg` argument vectors and `create_model` arguments: exit 0 or a clear error.

`promptseg.cli.main(argv)` must return 0, or 2 with `promptseg <command>: error: ...` on stderr;
argparse's own usage errors (SystemExit 2 with a usage line) count as clear errors too. Only the
`test_*` and tiny models are used, so nothing is downloaded or built at full size.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import promptseg
from promptseg import cli
from promptseg.weights import save_state_dict_file
from promptseg.zoo import build_model, model_info
from tests.robustness import COUNTS, run_case

WORK = Path(tempfile.mkdtemp(prefix="promptseg-robust-cli-"))
IMAGE = WORK / "image.png"
MASK = WORK / "mask.png"
FRAMES = WORK / "frames"
CHECKPOINT = WORK / "sine_test_tiny.safetensors"
Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(IMAGE)
_mask = np.zeros((24, 32), np.uint8)
_mask[4:14, 6:20] = 1
Image.fromarray(_mask * 255).save(MASK)
FRAMES.mkdir()
for _i in range(2):
    Image.open(IMAGE).save(FRAMES / f"{_i:05d}.png")
torch.manual_seed(0)
save_state_dict_file(build_model(model_info("sine_test_tiny")).state_dict(), CHECKPOINT)
(WORK / "junk.pth").write_bytes(b"not a checkpoint")

PATHS = [str(IMAGE), str(MASK), str(FRAMES), str(CHECKPOINT), str(WORK / "junk.pth"),
         str(WORK / "missing.png"), str(WORK), "", "-", "nothere/x.jpg"]  # fmt: skip
MODELS = ["test_colorkey", "test_empty", "sine_test_tiny", "nosuchmodel", "sine", ""]
WORDS = st.one_of(st.sampled_from(PATHS), st.text(max_size=8))
VALUES = {
    "--model": st.sampled_from(MODELS),
    "--checkpoint": st.sampled_from([str(CHECKPOINT), str(WORK / "junk.pth"), str(WORK / "no")]),
    "--device": st.sampled_from(["cpu", "cuda", "cuda:7", "mps", "tpu", "meta", "", "cpu:0"]),
    "--config": st.sampled_from(["head.layers=1", "x=1", "head", "head.dim=[1", "=3", "a..b=1"]),
    "--text": st.text(max_size=6),
    "--threshold": st.sampled_from(["0.5", "2", "-1", "nan", "inf", "x"]),
    "--level": st.sampled_from(["identity", "instance", "semantic", "all", "bogus"]),
    "--memory": st.sampled_from(["0", "-3", "2", "x"]),
    "--cache-dir": st.sampled_from([str(WORK / "cache"), str(IMAGE)]),
    "--prompt-file": WORDS,
    "--first-mask": WORDS,
    "--masks-dir": WORDS,
    "-o": st.sampled_from([str(WORK / "out"), str(IMAGE), str(WORK / "out.safetensors")]),
}
MULTI = {"--ref": 2, "--shot": 3}
COMMANDS = {
    "list": ([], ["--pretrained", "--capability", "--backbones", "--heads"]),
    "info": (["NAME"], ["--config", "--cache-dir"]),
    "download": (["NAME"], ["--cache-dir", "--force"]),
    "convert": (["NAME", "PATH"], ["-o", "--config", "--cache-dir"]),
    "segment": (
        ["PATH"],
        [
            "--model",
            "--text",
            "--ref",
            "--shot",
            "--prompt-file",
            "--level",
            "--threshold",
            "--device",
            "--checkpoint",
            "--config",
            "-o",
        ],
    ),  # fmt: skip
    "encode-prompt": (["--model", "--ref", "--shot", "--checkpoint", "--device", "-o"], []),
    "segment-video": (
        ["PATH"],
        ["--first-mask", "--masks-dir", "--model", "--memory", "--checkpoint", "--device", "-o"],
    ),
}


@st.composite
def argvs(draw: st.DrawFn) -> list[str]:
    """A command, its positional arguments and a few of its flags, mostly with sensible values."""
    command = draw(st.sampled_from([*COMMANDS, "bogus"]))
    if command == "bogus":
        return [command, *draw(st.lists(WORDS, max_size=2))]
    positional, flags = COMMANDS[command]
    argv = [command]
    for slot in positional:
        if slot == "NAME":
            argv.append(draw(st.sampled_from(MODELS)))
        elif slot == "PATH":
            argv.append(draw(WORDS))
        else:
            flags = [*flags, slot]
    for flag in draw(st.lists(st.sampled_from([*flags, "--bogus"]), max_size=4)):
        if flag in MULTI:
            argv += [flag, *draw(st.lists(WORDS, min_size=1, max_size=MULTI[flag]))]
        elif flag in VALUES:
            argv += [flag, draw(VALUES[flag])]
        else:
            argv.append(flag)
    return argv


def _run_cli(argv: list[str]) -> tuple[int, str]:
    """main(argv) -> (exit status, stderr); argparse's SystemExit becomes its status."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli.main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
            assert rc == 0 or "usage:" in err.getvalue(), err.getvalue()
            return rc, "usage"
    return rc, err.getvalue()


@settings(max_examples=300)
@given(argvs())
def test_cli_exits_0_or_prints_one_clear_error(argv: list[str]) -> None:
    group = f"cli: promptseg {argv[0] if argv[0] in COMMANDS else 'unknown command'}"
    try:
        rc, err = _run_cli(argv)
    except Exception:
        COUNTS[group]["crash"] += 1
        raise
    if rc == 0:
        COUNTS[group]["correct"] += 1
        return
    ok = rc == 2 and (err == "usage" or err.startswith(f"promptseg {argv[0]}: error: "))
    COUNTS[group]["clear_error" if ok else "crash"] += 1
    assert ok, (argv, rc, err)
    assert "Traceback" not in err


def test_missing_image_is_reported_before_any_weights(monkeypatch) -> None:
    """A mistyped image with the default model fails at once, naming the image."""

    def no_weights(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("create_model was called before the inputs were checked")

    monkeypatch.setattr("promptseg.zoo.create_model", no_weights)
    for argv in (
        ["segment", str(WORK / "typo.png"), "--text", "cat"],
        ["segment", str(IMAGE), "--ref", str(WORK / "typo.png"), str(MASK)],
        ["encode-prompt", "--shot", str(IMAGE), str(WORK / "typo.png"), "-o", "x.safetensors"],
        ["segment-video", str(WORK / "no-frames"), "--first-mask", str(MASK)],
        ["segment-video", str(FRAMES), "--first-mask", str(WORK / "typo.png")],
    ):
        rc, err = _run_cli(argv)
        assert rc == 2 and "typo.png" in err or "no-frames" in err, err
        assert err.count("\n") == 1, err


@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "test_colorkey", str(CHECKPOINT)],
        ["segment", str(IMAGE), "--model", "test_colorkey", "--checkpoint", str(CHECKPOINT)],
    ],
)
def test_models_without_weights_refuse_a_checkpoint_in_one_line(argv: list[str]) -> None:
    rc, err = _run_cli([*argv, "--text", "a"] if argv[0] == "segment" else argv)
    assert rc == 2 and err.count("\n") == 1 and "takes no weights" in err, err


def test_segment_runs_the_test_models_without_weights() -> None:
    rc, err = _run_cli(["segment", str(IMAGE), "--model", "test_colorkey", "--text", "a",
                        "-o", str(WORK / "colorkey-out")])  # fmt: skip
    assert rc == 0, err


# -- create_model arguments ---------------------------------------------------------------------
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), st.text(max_size=5),
    st.lists(st.integers(-2, 70), max_size=3), st.dictionaries(st.text(max_size=4), st.integers()),
)  # fmt: skip


@st.composite
def overrides(draw: st.DrawFn, keys: list[str]) -> Any:
    """None, a non-dict, or a dict over the model's own keys plus unknown ones, any values."""
    return draw(
        st.one_of(
            st.none(),
            JUNK,
            st.dictionaries(st.sampled_from([*keys, "bogus", "name"]), JUNK, max_size=2),
        )
    )


@settings(max_examples=200)
@given(data=st.data())
def test_create_model_arguments(data: st.DataObject) -> None:
    name = data.draw(
        st.one_of(
            st.sampled_from(["test_colorkey", "test_empty", "test_shifted", "sine_test_tiny"]),
            JUNK,
            st.just(b"test_colorkey"),
        )
    )
    card = model_info("sine_test_tiny")

    def mostly(default: Any, other: st.SearchStrategy[Any]) -> Any:
        return data.draw(st.one_of(st.just(default), st.just(default), other))

    kwargs = {
        "pretrained": mostly(False, st.one_of(st.just(False), JUNK)),
        "device": mostly(None, st.one_of(st.sampled_from(["cpu", "cuda", "meta", "cpu:0"]), JUNK)),
        "dtype": mostly(
            None,
            st.one_of(st.sampled_from([None, torch.float16, torch.int8, torch.bfloat16]), JUNK),
        ),
        "config": mostly(None, overrides(sorted(card.config))),
        "data_config": mostly(None, overrides(sorted(card.data_config))),
        "head": mostly(None, overrides(sorted(card.config["head"]))),
        "backbone": mostly(None, overrides(sorted(card.config["backbone"]))),
    }

    def check(model: Any) -> None:
        assert isinstance(model, promptseg.models.base.PromptSegModel)
        assert model.card.weights_sha256 is None and not model.training

    run_case("create_model: arguments", lambda: promptseg.create_model(name, **kwargs), check)
