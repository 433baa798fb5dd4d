"""Every `halfsafe` command the README and docs/ show uses a command and flags the CLI has: the
shell blocks are read from the files as a reader sees them, so a renamed or removed flag fails
here rather than in a user's terminal."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from halfsafe.cli.parser import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "tests" / "README.md"]


def shown_commands() -> list[tuple[str, str]]:
    """(file, command line) for every `halfsafe ...` line inside a fenced block, its indented
    continuation lines (a synopsis's `[--flag ...]`) joined to it."""
    found = []
    for path in DOCUMENTS:
        inside, current = False, None
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.lstrip().startswith("```"):
                inside, current = not inside, None
                continue
            if not inside:
                continue
            text = line.split("#", 1)[0].rstrip()  # a shell comment is prose
            for part in re.split(r"&&|;", text):
                if part.strip().startswith("halfsafe "):
                    current = [path.relative_to(ROOT).as_posix(), part.strip()]
                    found.append(current)
                    break
            else:
                if current is not None and line.startswith(" ") and text.strip().startswith("["):
                    current[1] += " " + text.strip()
                else:
                    current = None
    return [tuple(item) for item in found]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_the_docs_show_commands_at_all():
    shown = shown_commands()
    files = {path for path, _ in shown}
    # the README shows each of the six commands; the docs their synopses
    assert {"README.md", "docs/fix.md", "docs/diagnose.md", "docs/guard.md", "docs/quantized.md"} <= files, files
    assert {line.split()[1] for _, line in shown} >= {"demo", "diagnose", "fix", "generate", "compare"}


@pytest.mark.parametrize(("path", "line"), shown_commands())
def test_every_shown_command_and_flag_exists(path, line):
    commands = subcommands()
    name = line.split()[1]
    assert name in commands, f"{path}: `{line}` names no halfsafe command ({', '.join(commands)})"
    known = set(commands[name]._option_string_actions)
    unknown = [flag for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line) if flag not in known]
    assert not unknown, f"{path}: `{line}` uses {unknown}, which `halfsafe {name}` does not have"
