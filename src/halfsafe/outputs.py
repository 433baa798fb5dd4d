"""Files a command writes besides a checkpoint (JSON, JSON lines, PNG): the location tried before
any work, then written atomically (a temporary sibling renamed at the end), so a killed run
leaves either the old file or the new one."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from .errors import HalfsafeError
from .fixing.workdirs import make_work_dir


def check_output_path(path: str | Path, what: str) -> Path:
    """Refuse an output file that cannot be written, before any work is done."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise HalfsafeError(f"{what} path '{path}' is a directory; give a file name")
    check_parent_writable(path, f"{what} path")
    return path


def check_parent_writable(path: Path, label: str) -> None:
    """The directory an output is created in must exist and take a new entry.

    Tried for real (a directory made and removed) rather than asked of `os.access`, which
    answers yes for root on /proc and /sys, where creating anything fails.
    """
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise HalfsafeError(f"{label} '{path}': '{parent}' is a file, not a directory; choose another location")
    if not parent.is_dir():
        raise HalfsafeError(f"{label} '{path}': directory '{parent}' does not exist; create it first")
    try:
        os.rmdir(make_work_dir(parent, f".{path.name}.halfsafe"))
    except OSError as exc:
        raise HalfsafeError(f"{label} '{path}': nothing can be created in '{parent}' ({exc.strerror}); "
                            "choose a directory you can write to") from exc


def atomic_write(path: Path, write) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(data: dict, path: str | Path) -> Path:
    path = check_output_path(path, "JSON")

    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(_finite_json(data), handle, indent=2, ensure_ascii=False)
            handle.write("\n")

    atomic_write(path, write)
    return path


def write_json_lines(rows: list[dict], path: str | Path) -> Path:
    """One JSON object per line (events for a log pipeline), written atomically."""
    path = check_output_path(path, "JSON lines")

    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(_finite_json(row), ensure_ascii=False) + "\n")

    atomic_write(path, write)
    return path


def _finite_json(value):
    """JSON has no inf/nan: write them as the strings 'inf', '-inf', 'nan'."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value
