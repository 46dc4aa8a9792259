"""Fixtures shared by the harness tests."""

from __future__ import annotations

import contextlib

import pytest


@pytest.fixture
def interrupted_after(monkeypatch):
    """`with interrupted_after(n, every=None): run_eval(...)`: the eval is stopped by a Ctrl-C
    (KeyboardInterrupt) once n items went through its progress loops (all loops together);
    `every` sets how often progress is saved. Asserts that the interrupt reached the caller."""
    from promptseg.bench import runner

    original = runner.Progress.iterate

    @contextlib.contextmanager
    def interrupt(items: int, every: int | None = None):
        seen = 0

        def iterate(self, *args, **kwargs):
            nonlocal seen
            if every is not None:
                self.every = every
            for item in original(self, *args, **kwargs):
                if seen == items:
                    raise KeyboardInterrupt
                seen += 1
                yield item

        monkeypatch.setattr(runner.Progress, "iterate", iterate)
        try:
            with pytest.raises(KeyboardInterrupt):
                yield
        finally:
            monkeypatch.setattr(runner.Progress, "iterate", original)

    return interrupt
