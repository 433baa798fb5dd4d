"""Nothing left behind: a `fix` killed with SIGKILL during its export, then rerun."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from halfsafe.fixing.export import remove_stale_exports
from halfsafe.fixing.workdirs import make_work_dir
from halfsafe.layerwise.jobs import work_dir_for
from tests.support.models import save_tiny_model

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")


def _fix_command(model: Path, out: Path, prompts: Path) -> list[str]:
    return [sys.executable, "-m", "halfsafe", "fix", str(model), "--out", str(out), "--prompts", str(prompts),
            "--heldout", str(prompts), "--no-verify", "--device", "cpu"]


def test_fix_killed_during_export_then_rerun_leaves_one_checkpoint(tmp_path):
    # Wide enough that the export (about 120 MB of float16 safetensors) takes about half a
    # second on a 2-core CPU: long enough to be caught in the act by polling every millisecond.
    model = save_tiny_model("qwen2", tmp_path / "model", plant=None, hidden_size=1024, intermediate_size=4096)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n", encoding="utf-8")
    out = tmp_path / "fixed"
    command = _fix_command(model, out, prompts)

    # The export is caught in the act when its directory holds a file (save_pretrained writes
    # config.json first); the up-front check of --out makes and removes an empty one of the same
    # name, which is not the export. On a loaded machine the poll may wake after the export has
    # finished: then the checkpoint is removed and the kill tried again.
    for _attempt in range(3):
        writing = _kill_during_export(command, tmp_path)
        if writing and not out.exists():
            break
        shutil.rmtree(out, ignore_errors=True)
    assert writing and not out.exists(), "the export finished before the kill three times"
    left = sorted(tmp_path.glob(".fixed.*"))
    assert left == writing  # what the killed run left: its export, half-written

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    removed = [line for line in rerun.stderr.splitlines() if "left by a run that was killed" in line]
    assert len(removed) == 1 and removed[0].startswith("halfsafe: removed 1 partial directory left by a run that "
                                                       f"was killed: {left[0]} ("), rerun.stderr
    # One checkpoint, no hidden folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed", "model", "prompts.txt"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert list(out.glob("*.safetensors"))


def _kill_during_export(command: list[str], folder: Path) -> list[Path]:
    """Start `command`, SIGKILL it once its export directory holds a file; the directories seen
    (empty when the run finished first)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while process.poll() is None:
            writing = [d for d in folder.glob(".fixed.halfsafe-*") if _holds_files(d)]
            if writing:
                process.send_signal(signal.SIGKILL)
                process.wait()
                return writing if process.returncode == -signal.SIGKILL else []
            assert time.monotonic() < deadline, "fix did not reach its export in 300 s"
            time.sleep(0.001)
        assert process.returncode == 0, process.stderr.read()
        return []
    finally:
        process.kill()
        process.wait()


def _holds_files(directory: Path) -> bool:
    try:
        return any(directory.iterdir())
    except FileNotFoundError:  # the up-front check's directory, removed as soon as made
        return False


def test_a_live_owner_keeps_its_directory_and_a_dead_or_reused_pid_does_not(tmp_path):
    out = tmp_path / "fixed"
    mine = make_work_dir(tmp_path, ".fixed.halfsafe")  # this process is alive
    # A process that made one and ended without removing it.
    script = "import sys; from pathlib import Path; from halfsafe.fixing.workdirs import make_work_dir; " \
             "print(make_work_dir(Path(sys.argv[1]), '.fixed.halfsafe'))"
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    orphan = Path(done.stdout.strip())
    assert orphan.is_dir()
    # This process's pid with another start time: a pid reused by an unrelated process.
    prefix, host, pid, start, suffix = mine.name.rsplit("-", 4)
    reused = tmp_path / f"{prefix}-{host}-{pid}-{int(start) - 500}-{suffix}"
    reused.mkdir()
    # A directory of another machine's process (a shared disk) is never judged from here.
    elsewhere = tmp_path / f"{prefix}-{'0' * 6 if host != '0' * 6 else '1' * 6}-{pid}-{start}-{suffix}"
    elsewhere.mkdir()
    resume = work_dir_for(out)  # the layer-wise resume state is kept on purpose
    resume.mkdir()

    removed = [path for path, _ in remove_stale_exports(out)]
    assert sorted(removed) == sorted([orphan, reused])
    assert mine.is_dir() and elsewhere.is_dir() and resume.is_dir()
    assert not orphan.exists() and not reused.exists()
