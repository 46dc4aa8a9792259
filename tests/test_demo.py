"""`promptseg demo`: the engine the page calls, and the page itself in headless Chromium."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from promptseg.cli import main
from promptseg.demo import (
    TEST_MODELS,
    DemoEngine,
    build_app,
    default_models,
    model_status,
    reference_from_inputs,
)
from promptseg.errors import PromptsegError
from promptseg.testing.colors import class_color

MODELS = ["test_colorkey", "clipseg_test_tiny"]
SCREENSHOT_COPY = Path("/tmp/demo_screenshot.png")


def scene(path: Path | None = None) -> np.ndarray:
    """A grey image with a 'cat' block and a 'dog' block in test_colorkey's colours."""
    img = np.full((192, 256, 3), 128, dtype=np.uint8)
    img[32:128, 24:112] = class_color("cat")
    img[64:176, 144:232] = class_color("dog")
    if path is not None:
        Image.fromarray(img).save(path)
    return img


def test_engine_decodes_new_prompts_without_re_encoding(tmp_path):
    engine = DemoEngine(MODELS, random_weights=True, out_dir=tmp_path)
    calls = dict.fromkeys(MODELS, 0)
    for name in MODELS:
        model = engine.predictor(name).model
        encode = model.encode_image

        def counted(*args, _name=name, _encode=encode, **kwargs):
            calls[_name] += 1
            return _encode(*args, **kwargs)

        model.encode_image = counted
    image = scene()
    first = engine.run(image, MODELS, "cat\ndog")
    assert calls == dict.fromkeys(MODELS, 1)
    assert len(first.overlays) == 2
    assert [r[2] for r in first.rows] == ["cat", "dog", "cat", "dog"]
    colorkey = first.record["models"][0]
    assert colorkey["pixels"] == [96 * 88, 112 * 88]  # the test model finds both blocks
    assert "RANDOM" in first.overlays[1][1] and "TEST MODEL" in first.overlays[0][1]

    second = engine.run(image, MODELS, ["a bird"])
    assert calls == dict.fromkeys(MODELS, 1)  # only the decoder ran again
    assert all(m["image_cached"] for m in second.record["models"])
    record = json.loads(second.files[0].read_text())
    assert [m["model"] for m in record["models"]] == MODELS
    assert record["models"][1]["weights"] == "random"
    for m in record["models"]:
        png = second.files[0].parent / m["mask_files"][0]
        assert Image.open(png).size == (256, 192)

    engine.run(image[::-1].copy(), MODELS, ["cat"])  # other pixels: encoded again
    assert calls == dict.fromkeys(MODELS, 2)


def test_engine_prompts_each_model_can_take(tmp_path):
    engine = DemoEngine(["test_colorkey", "sine_test_tiny"], random_weights=True, out_dir=tmp_path)
    image = scene()
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[40:100, 30:100] = True
    res = engine.run(image, engine.names, "dog", (image, mask), vocabulary="cat;dog")
    labels = {m["model"]: m["labels"] for m in res.record["models"]}
    assert labels["test_colorkey"] == ["dog", "reference 1", "cat", "dog"]
    assert len(labels["sine_test_tiny"]) >= 1
    assert any("sine_test_tiny takes no text prompt" in n for n in res.notes)
    with pytest.raises(ValueError, match="give a prompt"):
        engine.run(image, engine.names, "  \n")


def test_reference_from_drawn_layer():
    image = scene()
    layer = np.zeros((*image.shape[:2], 4), dtype=np.uint8)
    layer[10:20, 30:40, 3] = 255
    ref_image, mask = reference_from_inputs({"background": image, "layers": [layer]}, None)
    assert ref_image.shape == image.shape and mask.sum() == 100
    uploaded = np.zeros(image.shape[:2], dtype=np.uint8)
    uploaded[:5] = 255
    assert reference_from_inputs({"background": image, "layers": [layer]}, uploaded)[1].sum() == (
        5 * 256
    )
    assert reference_from_inputs(None, None) is None
    with pytest.raises(ValueError, match="draw the reference mask"):
        reference_from_inputs({"background": image, "layers": []}, None)


def test_default_models_list_cached_weights(tmp_path):
    assert default_models(tmp_path) == list(TEST_MODELS)
    native = tmp_path / "clipseg_vitb16_rd64.uni" / "promptseg.safetensors"
    native.parent.mkdir()
    native.write_bytes(b"")
    assert default_models(tmp_path) == ["clipseg_vitb16_rd64.uni", *TEST_MODELS]
    assert model_status("clipseg_vitb16_rd64.uni", cache_dir=tmp_path).weights == "cached"
    status = model_status("clipseg_vitb16_rd64.uni", random_weights=True, cache_dir=tmp_path)
    assert status.weights == "random" and "RANDOM" in status.badge
    assert model_status("sine_test_tiny").weights == "random"
    assert model_status("test_colorkey").weights == "test"


def test_without_gradio_the_error_names_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    with pytest.raises(PromptsegError, match=r'pip install "promptseg\[demo\]"'):
        build_app(DemoEngine(["test_colorkey"], out_dir=tmp_path))
    assert main(["demo", "--models", "test_colorkey"]) == 2
    assert 'pip install "promptseg[demo]"' in capsys.readouterr().err


# --------------------------------------------------------------------------- real browser


def _browser_missing() -> str | None:
    for module, what in (("gradio", "gradio"), ("selenium", "selenium")):
        if importlib.util.find_spec(module) is None:
            return f'{what} is not installed (pip install -e ".[dev,demo]")'
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        return "no chromium on PATH (apt-get install chromium chromium-driver)"
    if not shutil.which("chromedriver"):
        return "no chromedriver on PATH (apt-get install chromium-driver)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tmp_path):
    """The demo page on a free local port: (url, engine)."""
    engine = DemoEngine([*MODELS, "sine_test_tiny"], random_weights=True, out_dir=tmp_path / "o")
    app = build_app(engine)
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", engine
    finally:
        app.close()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,1900")
    try:
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    except WebDriverException as exc:  # e.g. a chromedriver of another version than chromium
        pytest.skip(f"headless chromium did not start: {exc.msg}")
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))
def test_page_in_headless_chromium(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, engine = served
    start = time.perf_counter()
    wait = WebDriverWait(browser, 30)
    browser.get(url)
    upload = wait.until(
        ec.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]"))
    )
    scene(tmp_path / "scene.png")
    upload.send_keys(str(tmp_path / "scene.png"))
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image img")))
    browser.find_element(By.CSS_SELECTOR, "#texts textarea").send_keys("cat\ndog")
    boxes = browser.find_elements(By.CSS_SELECTOR, "#models input[type=checkbox]")
    assert [b.is_selected() for b in boxes] == [True, True, False]  # the first two models
    browser.find_element(By.CSS_SELECTOR, "#run").click()

    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#overlays img")) >= 2)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#files a[href*='results.json']"))
    page = browser.find_element(By.TAG_NAME, "body").text
    assert "RANDOM WEIGHTS" in page and "TEST MODEL" in page
    assert "clipseg_test_tiny" in browser.find_element(By.CSS_SELECTOR, "#table").text

    link = browser.find_element(By.CSS_SELECTOR, "#files a[href*='results.json']")
    with urllib.request.urlopen(link.get_attribute("href"), timeout=10) as response:
        record = json.loads(response.read())
    assert [m["model"] for m in record["models"]] == MODELS
    assert record["models"][0]["labels"] == ["cat", "dog"]

    shot = tmp_path / "demo.png"
    browser.execute_script("document.querySelector('#overlays').scrollIntoView()")
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(shot))
    shutil.copyfile(shot, SCREENSHOT_COPY)
    assert time.perf_counter() - start < 40


@pytest.mark.skipif(_browser_missing() is not None, reason=str(_browser_missing()))
def test_reference_mask_painted_in_headless_chromium(served, browser, tmp_path, monkeypatch):
    """Paint a stroke on the dog block in the reference editor: the page hands that stroke to
    the models as the mask, and the colour-matching test model then finds the whole block."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    import promptseg.demo as demo

    drawn = []
    original = demo.reference_from_inputs

    def recording(*args):
        drawn.append(original(*args))
        return drawn[-1]

    monkeypatch.setattr(demo, "reference_from_inputs", recording)
    url, _ = served
    wait = WebDriverWait(browser, 30)
    browser.get(url)
    scene(tmp_path / "scene.png")
    accordion = wait.until(
        lambda d: [b for b in d.find_elements(By.TAG_NAME, "button") if "Reference" in b.text]
    )
    accordion[0].click()
    upload = wait.until(
        ec.presence_of_element_located((By.CSS_SELECTOR, "#reference input[type=file]"))
    )
    upload.send_keys(str(tmp_path / "scene.png"))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#reference button[title=Brush]"))
    time.sleep(1)  # the editor draws the uploaded image onto its canvas
    canvas = browser.find_elements(By.CSS_SELECTOR, "#reference canvas")[-1]
    # the image fills the canvas's height, centred: (70, 20) from the centre is on the dog block
    stroke = ActionChains(browser).move_to_element_with_offset(canvas, 70, 20).click_and_hold()
    stroke.move_by_offset(20, 10).move_by_offset(20, 20).move_by_offset(-20, 20).release()
    stroke.perform()
    browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(
        str(tmp_path / "scene.png")
    )
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image img")))
    browser.find_element(By.CSS_SELECTOR, "#run").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#files a[href*='results.json']"))

    image, mask = drawn[-1]
    dog = np.zeros(mask.shape, dtype=bool)
    dog[64:176, 144:232] = True
    assert image.shape == (192, 256, 3) and mask.sum() > 500 and not (mask & ~dog).any()
    link = browser.find_element(By.CSS_SELECTOR, "#files a[href*='results.json']")
    with urllib.request.urlopen(link.get_attribute("href"), timeout=10) as response:
        record = json.loads(response.read())
    colorkey = record["models"][0]
    assert colorkey["model"] == "test_colorkey" and colorkey["labels"] == ["reference 0"]
    assert colorkey["pixels"] == [int(dog.sum())]
