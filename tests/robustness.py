"""Classify what a public call does with a generated input, for the property-based tests.

Outcomes: "correct" (returned, and the test's invariants hold), "clear_error" (a ValueError /
TypeError / FileNotFoundError / promptseg error raised by an explicit `raise` in promptseg's own
code), "crash" (any other exception: raised inside torch, numpy, PIL, pathlib, ..., or an
implicit KeyError / IndexError / ... in our code), "silent_wrong" (returned, but an invariant
failed). Counts are kept per test and printed at the end of the session (conftest.py).
"""

from __future__ import annotations

import linecache
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import promptseg
from promptseg.errors import PromptsegError

PACKAGE = Path(promptseg.__file__).parent
CLEAR = (ValueError, TypeError, FileNotFoundError, PromptsegError)
OUTCOMES = ("correct", "clear_error", "crash", "silent_wrong")
COUNTS: dict[str, Counter] = defaultdict(Counter)


def is_clear_error(exc: BaseException) -> bool:
    """An accepted error type, raised by a `raise` statement in promptseg's own code."""
    if not isinstance(exc, CLEAR):
        return False
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return False
    last = frames[-1]
    if not Path(last.filename).resolve().is_relative_to(PACKAGE.resolve()):
        return False
    line = linecache.getline(last.filename, last.lineno).strip()
    return line.startswith("raise") or "raise " in line


def run_case(group: str, call: Callable[[], Any], check: Callable[[Any], None]) -> str:
    """Run one generated case, record its outcome under `group`, and return the outcome.

    `check(result)` raises AssertionError when an invariant fails. Crashes and silent wrong
    answers are re-raised / asserted by the caller via `expect_no_failure`.
    """
    try:
        result = call()
    except Exception as exc:  # noqa: BLE001 - classifying every exception is the point
        outcome = "clear_error" if is_clear_error(exc) else "crash"
        COUNTS[group][outcome] += 1
        if outcome == "crash":
            raise AssertionError(f"{group}: crash {type(exc).__name__}: {exc}") from exc
        return outcome
    try:
        check(result)
    except AssertionError as exc:
        COUNTS[group]["silent_wrong"] += 1
        raise AssertionError(f"{group}: silent wrong answer: {exc}") from exc
    COUNTS[group]["correct"] += 1
    return "correct"


def summary() -> list[str]:
    """Lines of the outcome table: per group and in total."""
    if not COUNTS:
        return []
    total: Counter = Counter()
    lines = [f"{'group':40s} " + " ".join(f"{o:>12s}" for o in OUTCOMES)]
    for group in sorted(COUNTS):
        total.update(COUNTS[group])
        lines.append(f"{group:40s} " + " ".join(f"{COUNTS[group][o]:12d}" for o in OUTCOMES))
    lines.append(f"{'total (' + str(sum(total.values())) + ' cases)':40s} "
                 + " ".join(f"{total[o]:12d}" for o in OUTCOMES))  # fmt: skip
    return lines
