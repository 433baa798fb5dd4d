"""Export a fixed model as a standard Hugging Face checkpoint, atomically.

Written into a temporary directory beside the target and renamed at the end: an interrupted
run leaves nothing at the target, and an existing target is replaced only with `overwrite`.
The temporary directory is named for its process (`workdirs`), so one left by a killed run is
recognised and removed by the next (`remove_stale_exports`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors import SafetensorError
from torch import nn

from ..errors import HalfsafeError
from ..formats import DENSE
from ..outputs import check_parent_writable
from .workdirs import make_work_dir, remove_stale_work_dirs


def check_export_target(out: str | Path, *, overwrite: bool, source: Path | None = None) -> Path:
    """Refuse a target that exists (without overwrite), cannot be created, or is the input."""
    out = Path(out).expanduser().resolve()
    if source is not None:
        source = Path(source).resolve()
        if out == source or source.is_relative_to(out) or out.is_relative_to(source):
            raise HalfsafeError(f"--out '{out}' overlaps the input checkpoint '{source}'; the input is never modified, "
                                "choose another directory")
    if out.exists() and not overwrite:
        raise HalfsafeError(f"--out '{out}' already exists; choose a new directory or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise HalfsafeError(f"--out '{out}' exists and is not a directory")
    check_parent_writable(out, "--out")
    return out


def export_checkpoint(model: nn.Module, tokenizer, out: str | Path, *, overwrite: bool = False,
                      weights_format=DENSE, scales: dict | None = None) -> Path:
    """The fixed checkpoint, written by its weights format into a temporary sibling, then renamed to
    `out`. Dense: save_pretrained (safetensors shards, config with its `halfsafe` block, generation
    config) plus the tokenizer. A quantized format copies its input with only the tensors that
    `scales` (`FixReport.scales()`) moves rewritten (`formats`)."""
    out = check_export_target(out, overwrite=overwrite)
    work = None
    try:
        work = make_work_dir(out.parent, f".{out.name}.halfsafe")
        weights_format.write(work, model, tokenizer, scales or {})
        publish(work, out, source=model.config.name_or_path)
    except (OSError, SafetensorError) as exc:  # a full disk, a vanished directory: found only while writing
        raise HalfsafeError(f"could not write the checkpoint to --out '{out}': {_reason(exc)}; nothing was "
                            "written there; free some space or choose another directory") from exc
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return out


def remove_stale_exports(out: str | Path) -> list[tuple[Path, int]]:
    """Remove the temporary directories that killed runs left beside `out` (never the
    layer-wise resume state); returns them with their sizes."""
    out = Path(out).expanduser().resolve()
    return [*remove_stale_work_dirs(out.parent, f".{out.name}.halfsafe"),
            *remove_stale_work_dirs(out.parent, f".{out.name}.old")]


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f" ({exc.filename})" if exc.filename else "")
    return str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__


def publish(directory: Path, out: Path, *, source: str | Path | None = None) -> None:
    """Write the model card (README.md, from config.json's `halfsafe` block), give a finished
    checkpoint directory ordinary permissions and rename it to `out`, replacing an existing `out`
    only once the new one is complete. `source`: where the model came from, for the card."""
    from .modelcard import write_model_card

    write_model_card(directory, source)
    _ordinary_permissions(directory)
    if out.exists():
        trash = make_work_dir(out.parent, f".{out.name}.old")
        os.replace(out, trash / out.name)
        os.replace(directory, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(directory, out)


def _ordinary_permissions(directory: Path) -> None:
    """mkdtemp makes a private directory; the checkpoint gets the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
