"""Generated images, prompts, arguments, videos and prompt files through every tiny test model.

The models are every registered `*test*` zoo entry, so a family added later is covered without
new code. A case passes when the call gives a result that keeps the output contract (bool masks
[N, H, W] at the requested size, one label and one finite score in the documented range per
mask, Predictor == segment, COCO RLE and saved PNGs that read back as the masks) or raises a
clear error from promptseg's own code (tests/robustness.py counts the outcomes).
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

import promptseg
from promptseg import MixedPrompt, Predictor, SupportSet, VisualPrompt, Vocabulary
from promptseg.models.base import PromptSegModel
from promptseg.registry import lookup
from promptseg.result import SegmentationResult
from tests.robustness import run_case
from tests.test_robust_inputs import IDS, MEMBERS, TEXTS, _expected_image, image_arrays, mask_inputs

MODELS = [n for n in promptseg.list_models() if "test" in n]
# no shrinking: a failing model case is reported as found, so a failure costs seconds, not minutes
MODEL_CASES = settings(
    max_examples=25,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

RNG = np.random.default_rng(0)
IMG = RNG.integers(0, 256, (12, 16, 3), dtype=np.uint8)
MASK = np.zeros((12, 16), bool)
MASK[2:8, 3:9] = True
OTHER = RNG.integers(0, 256, (20, 10, 3), dtype=np.uint8)
OTHER_MASK = np.zeros((20, 10), np.uint8)
OTHER_MASK[5:15, 2:8] = 255


@pytest.fixture(scope="module")
def model():
    """name -> the tiny model, each built once per module (seeded, random weights)."""
    built: dict[str, PromptSegModel] = {}

    def get(name: str) -> PromptSegModel:
        if name not in built:
            torch.manual_seed(0)
            built[name] = promptseg.create_model(name, pretrained=False)
        return built[name]

    return get


def valid_prompt(m: PromptSegModel) -> Any:
    """A prompt of the first kind the model supports (visual references work for most)."""
    caps = m.capabilities
    if "visual" in caps:
        return VisualPrompt(OTHER, OTHER_MASK)
    if "few_shot" in caps:
        return SupportSet([(OTHER, OTHER_MASK), (IMG, MASK)])
    if "text" in caps:
        return "a cup"
    return Vocabulary(["cat", "dog"])


def check_result(m: PromptSegModel, res: Any, size: tuple[int, int]) -> None:
    """The output contract of one segment() result at the requested output size."""
    assert isinstance(res, SegmentationResult), f"returned a {type(res).__name__}"
    assert res.masks.dtype == torch.bool and res.masks.ndim == 3
    assert tuple(res.masks.shape[1:]) == tuple(size), f"masks {tuple(res.masks.shape)} != {size}"
    n = res.masks.shape[0]
    assert len(res.labels) == n and len(res.level) == n and res.scores.shape == (n,)
    assert bool(torch.isfinite(res.scores).all()), f"scores {res.scores.tolist()}"
    for score, level in zip(res.scores.tolist(), res.level, strict=True):
        assert 0.0 <= score <= 1.0, f"{level} score {score} outside [0, 1] (every level's range)"
    if res.logits is not None:
        assert res.logits.shape[0] == n
        assert tuple(res.upsample().shape) == (n, *res.image_size)


def expected_size(m: PromptSegModel, image_hw: tuple[int, int], output_size: Any, level: Any):
    """The output size segment() documents for `output_size` (None when it is invalid)."""
    if isinstance(output_size, str):
        if output_size == "original":
            return image_hw
        if output_size == "input":
            return m.input_size(image_hw, m.input_names(m.check_level(level))[0])
        return None
    return tuple(int(s) for s in output_size)


# -- images -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
@settings(MODEL_CASES, max_examples=60)
@given(case=image_arrays())
def test_images(model, name, case):
    """Every image form through segment(): masks at its size, or a clear error for bad ones."""
    m = model(name)
    x, layout = case
    expected = _expected_image(x, layout)

    def check(res: SegmentationResult) -> None:
        assert expected is not None, f"segmented an image the contract rejects ({layout})"
        check_result(m, res, expected.shape[1:])

    outcome = run_case(f"{name}: image", lambda: m.segment(x, valid_prompt(m)), check)
    assert expected is None or outcome == "correct", "a valid image was rejected"


# -- prompts ------------------------------------------------------------------------------------
@st.composite
def model_prompts(draw: st.DrawFn) -> Any:
    """Prompts of every kind with generated references, masks and ids (valid or not)."""
    kind = draw(st.sampled_from(["text", "visual", "visual", "shots", "mixed", "vocab", "other"]))
    if kind == "text":
        return draw(st.one_of(TEXTS, st.lists(TEXTS, min_size=1, max_size=3)))
    if kind == "other":
        return draw(MEMBERS)
    if kind == "vocab":
        return Vocabulary(
            draw(st.lists(st.sampled_from(["cat", "dog", "a b"]), min_size=1, unique=True))
        )
    text, weight = draw(TEXTS), draw(st.floats(-0.5, 1.5))
    shots = []
    for _ in range(draw(st.integers(1, 3) if kind == "shots" else st.just(1))):
        mask = draw(st.one_of(mask_inputs(), st.sampled_from([MASK, OTHER_MASK])))
        image = IMG if draw(st.booleans()) else OTHER
        ids = draw(st.one_of(st.just((0, None)), st.tuples(IDS, IDS)))
        shots.append(lambda image=image, mask=mask, ids=ids: VisualPrompt(image, mask, *ids))
    if kind == "visual":
        return shots[0]
    if kind == "shots":
        return lambda: SupportSet([make() for make in shots])
    return lambda: MixedPrompt(text, shots[0](), weight)


@pytest.mark.parametrize("name", MODELS)
@settings(MODEL_CASES, max_examples=80)
@given(make=model_prompts())
def test_prompts(model, name, make):
    """Any prompt: a result keeping the contract, or a clear (e.g. unsupported-kind) error."""
    m = model(name)

    def call() -> SegmentationResult:  # prompts are built here, so their own errors count
        return m.segment(IMG, make() if callable(make) else make)

    run_case(f"{name}: prompt", call, lambda res: check_result(m, res, IMG.shape[:2]))


# -- arguments ----------------------------------------------------------------------------------
LEVELS = st.one_of(st.none(), st.sampled_from(["semantic", "instance", "identity", "panoptic"]))
LEVELS = st.one_of(LEVELS, st.sampled_from(["all", "x", "", "SEMANTIC", 3, b"semantic"]))
THRESHOLDS = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0, 1),
    st.sampled_from([0, 1, True, "0.5", "x", [0.5], np.float32(0.3), torch.tensor(0.4)]),
)
SIZES = st.one_of(
    st.sampled_from(["original", "input", "x", "", None, 3, 2.5]),
    st.tuples(st.integers(-2, 40), st.integers(-2, 40)),
    st.tuples(st.integers(1, 30), st.integers(1, 30)).map(list),
    st.tuples(st.integers(1, 30), st.integers(1, 30)).map(np.array),
    st.sampled_from([(1.5, 2), (65537, 1), (True, 3), (np.int64(7), 9), (4,), (1, 2, 3)]),
)


@pytest.mark.parametrize("name", MODELS)
@settings(MODEL_CASES, max_examples=60)
@given(level=LEVELS, threshold=THRESHOLDS, output_size=SIZES, logits=st.sampled_from([0, 1, 2]))
def test_arguments(model, name, level, threshold, output_size, logits):
    """level / threshold / output_size / return_logits: checked at the edge, honoured if valid."""
    m = model(name)

    def call() -> SegmentationResult:
        return m.segment(
            IMG,
            valid_prompt(m),
            level=level,
            threshold=threshold,
            output_size=output_size,
            return_logits=bool(logits),
        )

    def check(res: SegmentationResult) -> None:
        assert isinstance(level, str | None) and (level is None or level in m.levels)
        if threshold is not None:  # numbers, and strings of numbers, are accepted
            assert not isinstance(threshold, bool) and 0 <= float(threshold) <= 1
        size = expected_size(m, IMG.shape[:2], output_size, level)
        assert size is not None and min(size) > 0, f"accepted output_size {output_size!r}"
        check_result(m, res, size)

    run_case(f"{name}: arguments", call, check)


# -- Predictor, COCO RLE, save ------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
@settings(MODEL_CASES, max_examples=8)
@given(
    h=st.sampled_from([1, 5, 12, 33]),
    w=st.sampled_from([1, 7, 16, 40]),
    seed=st.integers(0, 99),
    level=st.one_of(st.none(), st.sampled_from(["instance", "identity", "all"])),
)
def test_predictor_rle_save(model, name, tmp_path_factory, h, w, seed, level):
    """Predictor == segment; to_coco_rle() and save() give back exactly the masks."""
    m = model(name)
    level = level if level in m.levels else None
    image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    image[: h // 2, : w // 2] = OTHER[5, 5]  # a patch of a reference colour (testing models)
    prompt = valid_prompt(m)
    out = tmp_path_factory.mktemp("save")

    def check(res: SegmentationResult) -> None:
        check_result(m, res, (h, w))
        pred = Predictor(m)
        pred.set_image(image)
        again = pred.predict(prompt, level=level)
        assert torch.equal(again.masks, res.masks), "Predictor.predict != segment"
        records = res.to_coco_rle()
        assert len(records) == len(res)
        for rec, mask in zip(records, res.masks, strict=True):
            rle = {"size": rec["segmentation"]["size"], "counts": rec["segmentation"]["counts"]}
            assert np.array_equal(mask_utils.decode(rle).astype(bool), mask.numpy())
        res.save(out)
        record = json.loads((out / "result.json").read_text())
        assert len(record["mask_files"]) == len(res)
        for file, mask in zip(record["mask_files"], res.masks, strict=True):
            assert np.array_equal(np.asarray(Image.open(out / file)) > 0, mask.numpy())

    group = f"{name}: predictor/rle/save"
    assert run_case(group, lambda: m.segment(image, prompt, level=level), check) == "correct"


# -- video --------------------------------------------------------------------------------------
VIDEO_MODELS = [n for n in MODELS if "video" in promptseg.model_info(n).capabilities]


@pytest.mark.parametrize("name", VIDEO_MODELS)
@settings(MODEL_CASES, max_examples=20)
@given(
    size=st.sampled_from([(12, 16), (1, 200), (200, 1), (1, 1), (9, 9)]),
    n_frames=st.integers(0, 3),
    objects=st.integers(0, 3),
    memory=st.one_of(st.none(), st.integers(-1, 4), st.sampled_from(["x", 2.0, True])),
    as_list=st.booleans(),
)
def test_video(model, name, size, n_frames, objects, memory, as_list):
    """segment_video: one int64 label map per frame at its size, labels from the first mask."""
    m = model(name)
    rng = np.random.default_rng(n_frames + 10 * objects)
    frames = [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n_frames)]
    first = rng.integers(0, objects + 1, size).astype(np.uint8)
    kwargs = {} if memory is None else {"memory": memory}
    takes_memory = "memory" in inspect.signature(m.segment_video).parameters

    def call() -> list[torch.Tensor]:
        return list(m.segment_video(frames if as_list else tuple(frames), first, **kwargs))

    def check(maps: list[torch.Tensor]) -> None:
        assert len(maps) == len(frames) > 0
        assert memory is None or (isinstance(memory, int) and memory >= 1)
        allowed = set(np.unique(first).tolist()) | {0}
        for label_map in maps:
            assert label_map.dtype == torch.int64 and tuple(label_map.shape) == size
            assert set(torch.unique(label_map).tolist()) <= allowed

    if memory is not None and not takes_memory:
        return  # this family has no memory argument (Python itself rejects the keyword)
    run_case(f"{name}: video", call, check)


# -- prompt files -------------------------------------------------------------------------------
def _has_prompt_files(name: str) -> bool:
    family = lookup("model family", promptseg.model_info(name).family)
    return family.save_prompt_embedding is not PromptSegModel.save_prompt_embedding


FILE_MODELS = [n for n in MODELS if _has_prompt_files(n)]
DAMAGE = ["none", "drop", "nan", "inf", "flatten", "extra_row", "float", "int", "rename"]
DAMAGE += ["meta_drop", "meta_set"]


def _damage(tensors: dict, meta: dict, op: str, key: str, value: str) -> tuple[dict, dict]:
    """One damage of a prompt file's tensors (the one named `key`) or metadata."""
    tensors, meta = {k: v.clone() for k, v in tensors.items()}, dict(meta)
    t = tensors[key]
    if op == "drop":
        del tensors[key]
    elif op in ("nan", "inf") and t.is_floating_point() and t.numel():
        t.view(-1)[0] = float(op)
    elif op == "flatten":
        tensors[key] = t.reshape(-1)
    elif op == "extra_row":
        tensors[key] = torch.cat([t, torch.zeros(1, *t.shape[1:], dtype=t.dtype)])
    elif op in ("float", "int"):
        tensors[key] = t.double() if op == "float" else t.long()
    elif op == "rename":
        tensors["9." + key] = tensors.pop(key)
    elif op == "meta_drop":
        meta.pop(value, None)
    elif op == "meta_set":
        meta["prompts"] = value
    return tensors, meta


@pytest.mark.parametrize("name", FILE_MODELS)
@settings(MODEL_CASES, max_examples=40)
@given(
    op=st.sampled_from(DAMAGE),
    pick=st.integers(0, 99),
    value=st.sampled_from(["format", "version", "prompts", "model", "dim", "x", "0", "2", "-1"]),
)
def test_prompt_files(model, name, tmp_path_factory, op, pick, value):
    """A saved prompt embedding, damaged in one way: it loads and segments, or fails at load."""
    m = model(name)
    folder = tmp_path_factory.mktemp("prompts")
    good = folder / "good.safetensors"
    m.save_prompt_embedding(m.encode_prompt(m.prepare_prompts(valid_prompt(m))), good)
    with safetensors.safe_open(good, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = sorted(tensors)[pick % len(tensors)]
    damaged, damaged_meta = _damage(tensors, meta, op, key, value)
    path = folder / "damaged.safetensors"
    safetensors.torch.save_file(damaged, path, metadata=damaged_meta)
    same = damaged.keys() == tensors.keys() and all(
        torch.equal(damaged[k], tensors[k]) for k in tensors
    )
    # metadata a loader does not need, and token dtypes, may change without harm
    harmless = same and (
        op in ("float", "none") or damaged_meta == meta or value in ("dim", "model")
    )

    def check(res: SegmentationResult) -> None:
        check_result(m, res, IMG.shape[:2])
        assert harmless, f"a prompt file damaged by {op} ({key}, {value}) was used"

    run_case(f"{name}: prompt file", lambda: m.segment(IMG, m.load_prompt_embedding(path)), check)


# -- the probe's reproducers ----------------------------------------------------------------------
def test_reproducers(model):
    """The probe's SINE crashes: each now returns a good result or a clear error."""
    if "sine_test_tiny" not in MODELS:
        pytest.skip("no sine_test_tiny in the zoo")
    s = model("sine_test_tiny")
    ref = VisualPrompt(IMG, MASK)
    u16 = torch.from_numpy(MASK.astype(np.int64)).to(torch.uint16)
    good = [
        (lambda: s.segment(np.zeros((1, 300, 3), np.uint8), ref, level="instance"), (1, 300)),
        (lambda: s.segment(np.zeros((300, 1, 3), np.uint8), ref, level="instance"), (300, 1)),
        (lambda: s.segment(IMG, VisualPrompt(IMG, u16)), (12, 16)),
    ]
    for call, size in good:
        check = lambda r, size=size: check_result(s, r, size)  # noqa: E731
        assert run_case("sine_test_tiny: reproducers", call, check) == "correct"
    frames = [np.zeros((1, 200, 3), np.uint8)] * 2
    video = list(s.segment_video(frames, np.ones((1, 200), np.uint8)))
    assert [tuple(v.shape) for v in video] == [(1, 200)] * 2
    bad = [lambda m=memory: s.segment_video([IMG], MASK, memory=m) for memory in ("x", 0, -1)]
    bad += [
        lambda: s.segment(IMG, None),
        lambda: s.segment(IMG, ref, threshold=2),
        lambda: s.segment(IMG, ref, level="x"),
        lambda: s.segment(IMG, ref, output_size=(0, 3)),
        lambda: s.segment(IMG, VisualPrompt(IMG, MASK, class_id=None)),
    ]
    for call in bad:
        assert run_case("sine_test_tiny: reproducers", call, lambda r: None) == "clear_error"
