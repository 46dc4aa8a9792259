"""The README's command lines: every one parses, and the "Try it without weights" block runs as
written (test models, no network) from a folder holding the repository's examples/."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from promptseg.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUNNABLE_SECTION = "## Try it without weights"


def bash_commands(text: str) -> list[str]:
    """The `promptseg ...` lines of the ```bash blocks of `text`, continuations joined."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["promptseg"]:
                commands.append(line)
            elif "promptseg" in words:  # `pip install ... && promptseg ...`
                commands.append(" ".join(shlex.quote(w) for w in words[words.index("promptseg") :]))
    return commands


def section(text: str, title: str) -> str:
    start = text.index(title)
    end = text.find("\n## ", start + len(title))
    return text[start : end if end > 0 else None]


def argv_of(command: str) -> list[str]:
    return shlex.split(command, comments=True)[1:]


PLACEHOLDER = re.compile(r"\[|\||\.\.\.")  # optional parts and alternatives written as prose


@pytest.mark.parametrize("command", bash_commands(README.read_text()))
def test_every_readme_command_parses(command):
    if PLACEHOLDER.search(command.split("#")[0]):
        pytest.skip("a usage line with [optional] / a|b parts, not a command")
    build_parser().parse_args(argv_of(command))


def test_the_try_it_block_runs_as_written(tmp_path, monkeypatch, capsys):
    commands = bash_commands(section(README.read_text(), RUNNABLE_SECTION))
    assert len(commands) >= 5
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROMPTSEG_OFFLINE", "1")
    for command in commands:
        assert main(argv_of(command)) == 0, command
    out = capsys.readouterr().out
    assert "sine_test_tiny" in out and "loss" in out
    assert (tmp_path / "out" / "odise" / "panoptic.png").is_file()
    assert (tmp_path / "runs" / "train_sine_tiny" / "promptseg.safetensors").is_file()
