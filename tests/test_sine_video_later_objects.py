"""SINE video: objects joining at later annotated frames (YouTube-VOS `use_all_mask`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import promptseg
from promptseg.cli import main
from promptseg.weights import save_state_dict_file

H, W = 48, 80


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(6)]


@pytest.fixture(scope="module")
def first() -> np.ndarray:
    labels = np.zeros((H, W), np.uint8)
    labels[5:20, 5:30] = 1
    labels[25:45, 50:75] = 5
    return labels


@pytest.fixture(scope="module")
def later() -> np.ndarray:
    """Frame 3's labels: a new object 3 overlapping object 5's area, and object 1 elsewhere."""
    labels = np.zeros((H, W), np.uint8)
    labels[20:40, 30:60] = 3
    labels[30:45, 0:15] = 1  # already known: must not reset object 1's memory
    return labels


def _record_decodes(sine, monkeypatch) -> list[tuple[dict, list]]:
    calls: list[tuple[dict, list]] = []
    original = sine.vos_decode

    def spy(target, refs, small, big):
        calls.append((target, list(refs)))
        return original(target, refs, small, big)

    monkeypatch.setattr(sine, "vos_decode", spy)
    return calls


def test_new_object_absent_before_and_gt_from_its_frame(sine, frames, first, later, monkeypatch):
    calls = _record_decodes(sine, monkeypatch)
    maps = list(sine.segment_video(frames, first, masks={3: later}))
    assert len(maps) == len(frames)
    assert all(m.shape == (H, W) and m.dtype == torch.int64 for m in maps)
    assert all(not (m == 3).any() for m in maps[:3])
    gt = torch.from_numpy(later == 3)
    assert torch.equal(maps[3] == 3, gt & (maps[3] != 5))  # GT where no larger id overlaps
    assert bool(torch.isin(maps[3][gt], torch.tensor([3, 5])).all())
    decoded = [sorted({k for k, _, _ in refs}) for _, refs in calls]
    assert decoded == [[1, 5]] * 3 + [[1, 3, 5]] * 3  # decoded with the others from frame 3 on


def test_new_object_memory_starts_with_its_gt(sine, frames, first, later, monkeypatch):
    encodes = []
    original = sine.backbone.forward_features
    monkeypatch.setattr(
        sine.backbone, "forward_features", lambda x: encodes.append(1) or original(x)
    )
    calls = _record_decodes(sine, monkeypatch)
    list(sine.segment_video(frames, first, masks={3: later}, memory=3))
    assert len(encodes) == len(frames)  # each frame is still encoded once
    small, big = sine._video_geometry(H, W)
    gt3 = sine._video_mask(torch.from_numpy(later == 3), small, big)
    gt1 = sine._video_mask(torch.from_numpy(first == 1), small, big)
    for t in (3, 4, 5):
        target, refs = calls[t]
        new = [(f, m) for k, f, m in refs if k == 3]
        old = [(f, m) for k, f, m in refs if k == 1]
        assert torch.equal(new[0][1], gt3)  # fixed entry: frame 3's GT ...
        assert new[0][0].data_ptr() == calls[3][0]["feats"].data_ptr()  # ... on frame 3's features
        assert torch.equal(old[0][1], gt1)  # known objects keep their frame-0 GT
        assert old[0][0].data_ptr() == calls[0][0]["feats"].data_ptr()
        assert len(new) == min(t - 3 + 1, 3)  # GT, then its predictions from frame 3 on
        assert len(old) == 3
    second = [f for k, f, _ in calls[4][1] if k == 3][1]
    assert second.data_ptr() == calls[3][0]["feats"].data_ptr()  # its frame-3 prediction


def test_no_masks_is_unchanged(sine, frames, first, later):
    plain = list(sine.segment_video(frames, first))
    known_only = np.where(later == 3, 0, later)  # labels of known objects only: nothing changes
    for masks in (None, {}, {2: known_only}):
        again = sine.segment_video(frames, first, masks=masks)
        assert all(torch.equal(a, b) for a, b in zip(plain, again, strict=True))


@pytest.mark.parametrize("index", [0, 6, -1])
def test_mask_at_out_of_range_frame_is_rejected(sine, frames, first, later, index):
    with pytest.raises(ValueError, match=f"frame index {index}.*positions 1..5"):
        next(sine.segment_video(frames, first, masks={index: later}))


def test_segment_video_command_with_masks_dir(tmp_path, frames, first, later, capsys):
    video, annotations, out = tmp_path / "JPEGImages", tmp_path / "Annotations", tmp_path / "out"
    video.mkdir()
    annotations.mkdir()
    stems = [f"{5 * t:05d}" for t in range(len(frames))]  # every 5th frame, as YouTube-VOS
    for stem, frame in zip(stems, frames, strict=True):
        Image.fromarray(frame).save(video / f"{stem}.jpg")
    Image.fromarray(first).save(annotations / f"{stems[0]}.png")
    Image.fromarray(later).save(annotations / f"{stems[3]}.png")
    ckpt = tmp_path / "sine.safetensors"
    tiny = promptseg.create_model("sine_test_tiny", pretrained=False)
    save_state_dict_file(tiny.state_dict(), ckpt)
    base = ["segment-video", str(video), "--model", "sine_test_tiny", "--checkpoint", str(ckpt)]
    assert main([*base, "--masks-dir", str(annotations), "-o", str(out)]) == 0
    written = sorted(out.glob("*.png"))  # the palette PNGs (overlays are in out/overlay/)
    assert [p.stem for p in written] == stems
    images = [Image.open(p) for p in written]
    assert all(im.mode == "P" and im.size == (W, H) for im in images)
    labels = [np.asarray(im) for im in images]
    assert all(not (m == 3).any() for m in labels[:3])
    assert np.array_equal(labels[3] == 3, (later == 3) & (labels[3] != 5))

    (annotations / f"{stems[0]}.png").unlink()
    capsys.readouterr()
    assert main([*base, "--masks-dir", str(annotations)]) == 2
    assert "no mask for the first frame 00000.jpg" in capsys.readouterr().err
    first_png = tmp_path / "first.png"
    Image.fromarray(first).save(first_png)
    argv = [*base, "--masks-dir", str(annotations), "--first-mask", str(first_png)]
    assert main([*argv, "-o", str(tmp_path / "out2")]) == 0  # --first-mask gives frame 0
    assert all(
        np.array_equal(np.asarray(Image.open(out / f"{s}.png")), np.asarray(Image.open(p)))
        for s, p in zip(stems, sorted((tmp_path / "out2").glob("*.png")), strict=True)
    )
    Image.fromarray(later).save(annotations / "99999.png")
    assert main(argv) == 2
    assert "99999.png matches no frame" in capsys.readouterr().err
    assert main(base) == 2
    assert "--first-mask" in capsys.readouterr().err
