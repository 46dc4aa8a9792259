"""The harness's test models: exact colour answers, nothing, or a known shift."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import promptseg
from promptseg.testing.colors import BACKGROUND, class_color


@pytest.fixture
def scene() -> np.ndarray:
    img = np.empty((64, 96, 3), np.uint8)
    img[:] = BACKGROUND
    img[8:24, 8:32] = class_color("cat")
    img[40:56, 8:24] = class_color("cat")
    img[8:40, 48:88] = class_color("sky")
    return img


def test_colorkey_levels(scene):
    model = promptseg.create_model("test_colorkey", pretrained=False)
    assert int(model.segment(scene, "cat").masks.sum()) == 16 * 24 + 16 * 16
    vocab = promptseg.Vocabulary(["cat", "sky", "dog"], is_thing=[True, False, True])
    pan = model.segment(scene, vocab, level="panoptic")
    assert [s["category_id"] for s in pan.panoptic["segments_info"]] == [0, 0, 1]
    inst = model.segment(scene, vocab, level="instance")
    assert inst.class_ids.tolist() == [0, 0, 1]
    sem = model.segment(scene, vocab)
    assert sem.masks.sum(dim=(1, 2)).tolist() == [640, 1280, 0]
    ref = np.zeros((64, 96), bool)
    ref[10:20, 10:20] = True  # inside the first cat: the reference's colour is "cat"
    one_shot = model.segment(scene, (scene, ref), output_size=(32, 48))
    assert one_shot.masks.shape == (1, 32, 48) and int(one_shot.masks.sum()) == 160


def test_video_follows_first_frame_colours(scene):
    model = promptseg.create_model("test_colorkey", pretrained=False)
    labels = np.zeros((64, 96), np.uint8)
    labels[8:24, 8:32] = 1
    labels[8:40, 48:88] = 2
    maps = list(model.segment_video([scene, scene[:, ::-1].copy()], labels))
    assert maps[0].unique().tolist() == [0, 1, 2]
    assert torch.equal(maps[1], maps[0].flip(1))


def test_empty_and_shifted(scene):
    empty = promptseg.create_model("test_empty", pretrained=False)
    assert not empty.segment(scene, "cat").masks.any()
    assert len(empty.segment(scene, "cat", level="instance")) == 0
    assert all(not m.any() for m in empty.segment_video([scene], scene[..., 0] > 200))
    shifted = promptseg.create_model("test_shifted", pretrained=False)
    exact = promptseg.create_model("test_colorkey", pretrained=False).segment(scene, "sky").masks
    moved = shifted.segment(scene, "sky").masks
    assert torch.equal(moved[:, :, 8:], exact[:, :, :-8])


def test_clipseg_cannot_track_video():
    model = promptseg.create_model("clipseg_test_tiny", pretrained=False)
    with pytest.raises(promptseg.UnsupportedPromptError, match="does not segment videos"):
        next(iter(model.segment_video([np.zeros((8, 8, 3), np.uint8)], np.ones((8, 8)))))


def test_testing_exports_the_three_models_and_the_zoo_builds_them():
    from promptseg.testing import ColorKey, Empty, ShiftedOracle

    assert type(promptseg.create_model("test_colorkey", pretrained=False)) is ColorKey
    assert type(promptseg.create_model("test_empty", pretrained=False)) is Empty
    shifted = promptseg.create_model("test_shifted", pretrained=False)
    assert type(shifted) is ShiftedOracle and shifted.dx == 8
    assert ColorKey().card.name == "test_colorkey" and Empty().card.name == "test_empty"
    own = ShiftedOracle(3)
    assert own.dx == 3 and own.card.name == "test_shifted" and own.card.config["dx"] == 3
    assert isinstance(own, ColorKey) and isinstance(Empty(), ColorKey)


@pytest.mark.parametrize(
    ("dx", "iou"),
    [
        (5, 15 / 25),  # inter 15 x 20 columns x rows, union 25 x 20: (w - dx) / (w + dx)
        (-5, 15 / 25),
        (20, 0.0),  # touching, not overlapping
        (-30, 0.0),  # pushed out of the image: nothing left
    ],
)
def test_shifted_oracle_iou_matches_the_hand_computed_value(dx, iou):
    from promptseg.testing import ShiftedOracle

    img = np.empty((64, 64, 3), np.uint8)
    img[:] = BACKGROUND
    img[10:30, 10:30] = class_color("cat")  # a 20 x 20 square
    gt = np.zeros((64, 64), bool)
    gt[10:30, 10:30] = True
    pred = ShiftedOracle(dx).segment(img, "cat").masks[0].numpy()
    assert int(pred.sum()) == {5: 400, -5: 400, 20: 400, -30: 0}[dx]  # clipped at the border
    assert np.count_nonzero(pred & gt) / np.count_nonzero(pred | gt) == pytest.approx(iou)
    first = gt.astype(np.uint8)
    (label,) = ShiftedOracle(dx).segment_video([img], first)  # the video path shifts alike
    assert np.array_equal(label.numpy() == 1, pred)
