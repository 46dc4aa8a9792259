"""The `promptseg` command on the tiny model (weights via --checkpoint), no network."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from promptseg.cli import build_parser, main
from promptseg.weights import native_checkpoint_path, save_state_dict_file
from promptseg.zoo import model_info


@pytest.fixture
def tiny_checkpoint(tiny_clipseg, tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_state_dict_file(tiny_clipseg.state_dict(), path)
    return path


@pytest.fixture
def files(rgb, box_mask, tmp_path):
    Image.fromarray(rgb).save(tmp_path / "img.png")
    Image.fromarray(box_mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    return tmp_path / "img.png", tmp_path / "mask.png"


def test_every_command_has_help(capsys):
    for cmd in ["list", "info", "download", "convert", "segment", "encode-prompt", "segment-video"]:
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([cmd, "--help"])
        assert exit_.value.code == 0
        assert len(capsys.readouterr().out) > 100


def test_list_and_info(capsys):
    assert main(["list", "clipseg*", "--pretrained"]) == 0
    out = capsys.readouterr().out
    assert "clipseg_vitb16_rd64.refined" in out and "clipseg_test_tiny" not in out
    assert main(["info", "clipseg_vitb16_rd64.uni"]) == 0
    out = capsys.readouterr().out
    assert "CIDAS/clipseg-rd64" in out and "mIoU 43.4" in out and "not downloaded" in out


def test_segment_text_and_reference(tiny_checkpoint, files, tmp_path, capsys):
    img, mask = files
    out = tmp_path / "out"
    argv = [
        "segment",
        str(img),
        "--model",
        "clipseg_test_tiny",
        "--checkpoint",
        str(tiny_checkpoint),
    ]
    argv += ["--text", "a cup", "--text", "a plate", "--ref", str(img), str(mask)]
    assert main(argv + ["--threshold", "0.1", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    written = sorted(p.name for p in out.iterdir())
    assert "overlay.png" in written and sum(n.startswith("mask_") for n in written) == 3
    meta = json.loads((out / "result.json").read_text())
    assert meta["labels"][:2] == ["a cup", "a plate"]
    assert Image.open(out / written[written.index("overlay.png")]).size == (80, 48)


def test_convert_then_load_from_cache(tiny_checkpoint, tmp_path, capsys):
    assert (
        main(["convert", "clipseg_test_tiny", str(tiny_checkpoint), "--cache-dir", str(tmp_path)])
        == 0
    )
    assert native_checkpoint_path(model_info("clipseg_test_tiny"), tmp_path).is_file()


def test_errors_are_one_line_not_tracebacks(files, tmp_path, capsys):
    img, _ = files
    assert main(["download", "clipseg_vitb16_rd16.uni", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("promptseg download: error:") and "rd16-uni.pth" in err
    assert main(["info", "clipseg_nope"]) == 2
    assert "unknown model" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    save_state_dict_file({"foo": __import__("torch").zeros(1)}, bad)
    assert (
        main(
            [
                "segment",
                str(img),
                "--model",
                "clipseg_test_tiny",
                "--checkpoint",
                str(bad),
                "--text",
                "a",
            ]
        )
        == 2
    )
    assert "unknown CLIPSeg checkpoint layout" in capsys.readouterr().err


def test_bad_device_is_one_line(files, tmp_path, capsys):
    img, _ = files
    argv = ["segment", str(img), "--model", "clipseg_test_tiny", "--text", "a", "--device", "gpu0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("promptseg segment: error:") and "gpu0" in err and "Traceback" not in err


def test_shot_arguments_make_one_support_set(files, tmp_path):
    from promptseg.cli import _prompts_from_args
    from promptseg.prompts import SupportSet

    img, mask = files
    labels = np.zeros((48, 80), dtype=np.uint8)
    labels[:10, :10], labels[20:30, 20:30] = 3, 5
    Image.fromarray(labels).save(tmp_path / "labels.png")
    args = build_parser().parse_args(
        [
            "segment",
            str(img),
            "--shot",
            str(img),
            str(mask),
            "--shot",
            str(img),
            str(tmp_path / "labels.png"),
            "2",
        ]
    )
    (prompt,) = _prompts_from_args(args)
    assert isinstance(prompt, SupportSet) and len(prompt) == 3
    assert [(s.class_id, s.object_id) for s in prompt] == [(0, None), (2, 3), (2, 5)]
    assert int(prompt.shots[2].mask.sum()) == 100
    for bad in (["--shot", str(img)], ["--shot", str(img), str(mask), "dog"]):
        with pytest.raises(ValueError, match="--shot"):
            _prompts_from_args(build_parser().parse_args(["segment", str(img), *bad]))


def test_segment_needs_exactly_one_prompt_source(files, tmp_path, capsys):
    img, _ = files
    assert main(["segment", str(img), "--model", "clipseg_test_tiny"]) == 2
    assert "--prompt-file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def sine_checkpoint(tmp_path_factory):
    import promptseg

    path = tmp_path_factory.mktemp("sine") / "sine_tiny.safetensors"
    save_state_dict_file(
        promptseg.create_model("sine_test_tiny", pretrained=False).state_dict(), path
    )
    return path


def test_sine_k_shot_levels_and_saved_prototypes(
    sine_checkpoint, tiny_checkpoint, files, tmp_path, capsys
):
    """k-shot semantic, all levels, and prototypes encoded once then reused from a file."""
    img, mask = files
    model = ["--model", "sine_test_tiny", "--checkpoint", str(sine_checkpoint)]
    shots = ["--shot", str(img), str(mask), "1", "--shot", str(img), str(mask), "1"]
    assert main(["segment", str(img), *model, *shots, "-o", str(tmp_path / "sem")]) == 0
    sem = json.loads((tmp_path / "sem" / "result.json").read_text())
    assert sem["level"] == ["semantic"] and sem["class_ids"] == [1]
    argv = ["segment", str(img), *model, *shots, "--level", "all", "-o", str(tmp_path / "all")]
    assert main(argv) == 0
    levels = json.loads((tmp_path / "all" / "result.json").read_text())["level"]
    assert {"semantic", "identity"} <= set(levels)
    protos = tmp_path / "protos.safetensors"
    assert main(["encode-prompt", *model, *shots, "-o", str(protos)]) == 0 and protos.is_file()
    for level in ("semantic", "instance"):
        direct, reused = tmp_path / f"direct_{level}", tmp_path / f"reused_{level}"
        assert main(["segment", str(img), *model, *shots, "--level", level, "-o", str(direct)]) == 0
        argv = ["segment", str(img), *model, "--prompt-file", str(protos), "--level", level]
        assert main([*argv, "-o", str(reused)]) == 0
        a = json.loads((direct / "result.json").read_text())
        b = json.loads((reused / "result.json").read_text())
        assert a["scores"] == pytest.approx(b["scores"]) and a["class_ids"] == b["class_ids"]
    capsys.readouterr()
    clipseg = ["--model", "clipseg_test_tiny", "--checkpoint", str(tiny_checkpoint)]
    assert main(["encode-prompt", *clipseg, "--text", "a", "-o", str(protos)]) == 2
    assert "cannot save or load prompt embeddings" in capsys.readouterr().err


def test_segment_with_a_vocabulary_and_presets(tmp_path, capsys):
    """--vocab and --preset build one Vocabulary (user classes first); a panoptic result writes
    panoptic.png and segments.json beside the overlay."""
    import json

    from PIL import Image

    from promptseg.testing.colors import class_color

    img = np.zeros((32, 48, 3), np.uint8)
    img[4:20, 6:30] = class_color("cat")
    Image.fromarray(img).save(tmp_path / "scene.png")
    out = tmp_path / "out"
    args = ["segment", str(tmp_path / "scene.png"), "--model", "test_colorkey"]
    assert main([*args, "--vocab", "cat,kitty;dog", "--level", "panoptic", "-o", str(out)]) == 0
    assert "'cat' (panoptic)" in capsys.readouterr().out
    segments = json.loads((out / "segments.json").read_text())
    assert segments["file"] == "panoptic.png" and (out / "panoptic.png").is_file()
    assert [s["category_id"] for s in segments["segments_info"]] == [0]
    assert main([*args, "--vocab", "cat", "--preset", "pascal_voc_21", "-o", str(out)]) == 0
    record = json.loads((out / "result.json").read_text())
    assert record["labels"][0] == "cat"  # the user's class first
    assert main([*args, "--vocab", "cat;;dog", "-o", str(out)]) == 2
    assert "--vocab 'cat;;dog'" in capsys.readouterr().err
