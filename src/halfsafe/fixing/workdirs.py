"""Work directories beside an output, named for the process that owns them.

An export is written into a hidden directory beside its target and renamed at the end, so an
interrupted run leaves nothing at the target. A run killed outright (SIGKILL, the OOM killer,
a power cut) cannot remove that directory itself, so its name says who owns it:

    .OUT.halfsafe-<host>-<pid>-<start>-XXXXXXXX

`host` is a short hash of the machine's name (a directory on a shared disk may belong to a
process elsewhere, which is never judged from here), `pid` the owner's process id, and `start`
its start time in hundredths of a second since the epoch, so a later process that happens to
get the same pid is not mistaken for the owner. A later run removes the directories whose
owner is gone. The layer-wise resume state (`.OUT.halfsafe-partial`) is kept on purpose and
never matches this pattern.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

_UNKNOWN_START = 0


def make_work_dir(parent: Path, stem: str) -> Path:
    """A new private directory `{stem}-<host>-<pid>-<start>-XXXXXXXX` in `parent`."""
    pid = os.getpid()
    return Path(tempfile.mkdtemp(prefix=f"{stem}-{_host()}-{pid}-{_start_time(pid)}-", dir=parent))


def remove_stale_work_dirs(parent: Path, stem: str) -> list[tuple[Path, int]]:
    """Remove this machine's `{stem}-...` directories in `parent` whose owner has exited;
    returns each removed directory with the bytes it held."""
    pattern = re.compile(re.escape(stem) + r"-([0-9a-f]{6})-(\d+)-(\d+)-[A-Za-z0-9_]{8}")
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed  # an unreadable parent is reported by the output checks
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if not match or not entry.is_dir() or entry.is_symlink():
            continue
        host, pid, start = match.group(1), int(match.group(2)), int(match.group(3))
        if host != _host() or _alive(pid, start):
            continue
        size = _size(entry)
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append((entry, size))
    return removed


def describe_removed(removed: list[tuple[Path, int]]) -> str:
    """One line for the user: what was removed, and why."""
    from ..dtypes import format_bytes

    names = ", ".join(f"{path} ({format_bytes(size)})" for path, size in removed)
    return f"removed {len(removed)} partial director{'y' if len(removed) == 1 else 'ies'} left by a run that " \
           f"was killed: {names}"


def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _start_time(pid: int) -> int:
    """The process's start time in hundredths of a second, or 0 where it cannot be read."""
    try:
        import psutil  # installed with accelerate

        return round(psutil.Process(pid).create_time() * 100)
    except Exception:
        return _UNKNOWN_START


def _alive(pid: int, start: int) -> bool:
    """Whether the process that made a directory still runs: its pid exists and, where start
    times are known, started when the directory's name says (one tick of slack for rounding)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    try:
        import psutil

        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False  # killed, not yet reaped by its parent: its work is over
    except Exception:
        pass
    if start == _UNKNOWN_START:
        return True
    now = _start_time(pid)
    return now == _UNKNOWN_START or abs(now - start) <= 1


def _size(directory: Path) -> int:
    total = 0
    for path in directory.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
        except OSError:
            pass
    return total
