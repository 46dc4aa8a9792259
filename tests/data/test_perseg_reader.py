"""PerSeg reader (benchmarks.md §1.11) on the miniature dataset and on broken layouts."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from promptseg.data import PerSegDataset
from promptseg.errors import DatasetLayoutError
from promptseg.testing import make_mini
from promptseg.testing.mini_perseg import PERSEG_OBJECTS


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("perseg")
    assert make_mini(root, "perseg") == {"perseg": root}
    return root


@pytest.fixture
def copy(mini, tmp_path):
    shutil.copytree(mini / "data", tmp_path / "data")
    return tmp_path


def test_mini_reads_in_the_reference_order(mini):
    data = PerSegDataset(mini)
    assert data.objects() == sorted(PERSEG_OBJECTS)
    assert len(data.items()) == sum(n - 1 for n in PERSEG_OBJECTS.values())
    queries = [it.stem for it in data.queries("rc_car")]
    assert queries == [f"{i:02d}" for i in range(1, 11)]  # '10' is a query, not skipped
    ref = data.reference("cat2")
    assert ref.stem == "00" and ref.image_path == mini / "data" / "Images" / "cat2" / "00.jpg"
    assert [it.object for it in data.items()][:3] == ["backpack"] * 3
    item = data.items()[0]
    image, mask = data.image(item), data.mask(item)
    assert image.dtype == np.uint8 and image.shape == (*mask.shape, 3) and mask.dtype == bool
    assert not mask[0, 0] and not mask[0, -1]  # (0, 0, 4) pixels: grayscale 0 -> background
    assert not data.mask(data.queries("rc_car")[-1]).any()  # only a distractor in that query
    assert PerSegDataset(mini / "data").objects() == data.objects()  # the data/ folder itself
    with pytest.raises(KeyError, match="not a PerSeg object"):
        data.queries("unicorn")


def test_missing_root_lists_the_expected_folders(tmp_path):
    with pytest.raises(DatasetLayoutError) as err:
        PerSegDataset(tmp_path)
    msg = str(err.value)
    assert f"{tmp_path / 'data' / 'Images'} (dir)" in msg
    assert f"{tmp_path / 'data' / 'Annotations'} (dir)" in msg
    assert "Personalize-SAM" in msg and "Expected layout" in msg


def test_every_layout_problem_is_reported_at_once(copy):
    data = copy / "data"
    (data / "Annotations" / "backpack" / "02.png").unlink()  # image without mask
    (data / "Images" / "cat2" / "01.jpg").unlink()  # mask without image
    (data / "Images" / "rc_car" / "00.jpg").unlink()  # no reference
    (data / "Annotations" / "rc_car" / "00.png").unlink()
    (data / "Images" / "backpack" / "00.jpg").unlink()  # half a reference
    (data / "Images" / "lonely").mkdir()  # object without annotations
    shutil.copytree(data / "Annotations" / "cat2", data / "Annotations" / "ghost")  # and reverse
    for f in (data / "Images" / "cat2").glob("0[12].jpg"):
        f.unlink()
    for f in (data / "Annotations" / "cat2").glob("0[12].png"):
        f.unlink()  # cat2 keeps only its reference
    with pytest.raises(DatasetLayoutError) as err:
        PerSegDataset(copy)
    msg = str(err.value)
    assert f"{data / 'Annotations' / 'backpack' / '02'}.png (mask of" in msg
    assert f"{data / 'Annotations' / 'lonely'} (dir)" in msg
    assert f"{data / 'Images' / 'ghost'} (dir)" in msg
    assert "(the reference of 'rc_car')" in msg
    assert f"{data / 'Images' / 'backpack' / '00'}.jpg (image of" in msg
    assert "the reference of 'backpack'" not in msg
    assert f"a query image besides the reference in {data / 'Images' / 'cat2'}" in msg


def test_unreadable_or_mis_sized_masks_are_layout_errors(copy):
    data = PerSegDataset(copy)
    item = data.items()[0]
    item.mask_path.write_bytes(b"truncated")
    with pytest.raises(DatasetLayoutError, match=f"cannot read {item.mask_path}"):
        data.mask(item)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(item.mask_path)
    with pytest.raises(DatasetLayoutError, match="must have its image's size"):
        data.mask(item)
    item.image_path.write_bytes(b"")
    with pytest.raises(DatasetLayoutError, match=f"cannot read {item.image_path}"):
        data.image(item)
