"""The side environments the tests drive (scripts/test-envs.sh builds them from scripts/envs/envs.txt)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WHAT = {"vllm": "vLLM's", "llmc": "llm-compressor's", "gptq": "GPTQModel's"}


def side_python(name: str) -> Path:
    """.venv-NAME's Python; a missing or half-built environment fails the test in one line saying
    how to build it."""
    venv = ROOT / f".venv-{name}"
    python = venv / "bin" / "python"
    if not (python.exists() and (venv / ".halfsafe-stamp").exists()):
        pytest.fail(f"{venv} is missing or incomplete; build {WHAT[name]} environment first: "
                    f"bash scripts/test-envs.sh {name}", pytrace=False)
    return python
