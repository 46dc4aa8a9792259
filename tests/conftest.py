"""Shared fixtures: tiny random CLIPSeg and SINE, small images; no test touches the network."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    """Never download in tests, and never read or write the user's cache."""
    monkeypatch.setenv("PROMPTSEG_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PROMPTSEG_CACHE", str(tmp_path_factory.mktemp("cache")))
    # tests that go online fake the Hub and serve URLs locally: no reachability probe
    monkeypatch.setattr("promptseg.weights._unreachable", lambda url: None)


@pytest.fixture(scope="session")
def tiny_clipseg():
    import promptseg

    return promptseg.create_model("clipseg_test_tiny", pretrained=False)


@pytest.fixture
def rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(48, 80, 3), dtype=np.uint8)


@pytest.fixture
def box_mask() -> np.ndarray:
    m = np.zeros((48, 80), dtype=bool)
    m[10:30, 20:50] = True
    return m


@pytest.fixture(scope="module")
def sine():
    """A tiny random SINE, one per test module (its feature caches stay module-local)."""
    import torch

    import promptseg

    torch.manual_seed(0)
    return promptseg.create_model("sine_test_tiny", pretrained=False)


@pytest.fixture
def scene():
    """A 60x90 image with two boxes `a` and `b` (SINE references and targets)."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    a = np.zeros((60, 90), bool)
    a[10:40, 20:60] = True
    b = np.zeros((60, 90), bool)
    b[42:58, 5:30] = True
    return img, a, b


def pytest_configure(config):
    """Hypothesis: seeded (derandomized), no deadline; `--hypothesis-profile thorough` for more."""
    from hypothesis import settings

    settings.register_profile("promptseg", derandomize=True, deadline=None, print_blob=True)
    settings.register_profile("thorough", derandomize=False, deadline=None, max_examples=2000)
    if not config.getoption("hypothesis_profile", None):
        settings.load_profile("promptseg")


def pytest_terminal_summary(terminalreporter):
    """The property-based tests' outcome counts (tests/robustness.py)."""
    from tests.robustness import summary

    lines = summary()
    if lines:
        terminalreporter.section("generated inputs: outcomes")
        for line in lines:
            terminalreporter.write_line(line)
