"""Calibration and held-out prompts: the bundled sets, or a user's file."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

from .errors import HalfsafeError

# The sets are disjoint: `fix` calibrates on one and verifies on the other.
CALIBRATION = "calibration"
HELDOUT = "heldout"


def bundled_prompts(name: str = CALIBRATION) -> list[str]:
    """A bundled set: English, Chinese, Japanese, code, arithmetic and a long passage."""
    text = files("halfsafe").joinpath("data", f"{name}.jsonl").read_text(encoding="utf-8")
    return _parse_jsonl(text.splitlines(), f"bundled set '{name}'")


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: JSONL with a `text` field (`.jsonl`), else plain text, one per line."""
    path = Path(path)
    if not path.exists():
        raise HalfsafeError(f"prompts file '{path}' does not exist; pass a text file (one prompt per line) or JSONL")
    if not path.is_file():
        raise HalfsafeError(f"prompts file '{path}' is not a regular file; pass a text file (one prompt per line) or JSONL")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise HalfsafeError(f"prompts file '{path}' is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    if path.suffix.lower() == ".jsonl":
        prompts = _parse_jsonl(lines, f"'{path}'")
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise HalfsafeError(f"prompts file '{path}' has no prompts; write one prompt per line (or JSONL with 'text')")
    return prompts


def _parse_jsonl(lines: list[str], where: str) -> list[str]:
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise HalfsafeError(f"{where} line {number} is not valid JSON ({exc.msg}); use one JSON object per line") from exc
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise HalfsafeError(f"{where} line {number} has no non-empty string field 'text'")
        prompts.append(text)
    return prompts
