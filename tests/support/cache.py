"""Test products built once and reused across runs: a pure function of its inputs is kept under
the user cache directory, keyed by a hash of everything it depends on, checked on load.

    path = build_once("demo-fixed", lambda out: ..., inputs={...}, files=[MAKE])

The key hashes: `inputs` (JSON), the bytes of `files` (the scripts that make the product) and,
unless `package=False` (a product no halfsafe code makes, such as llm-compressor's quantization
of the demo), of every file of the halfsafe package; the constraints files that fix every
environment's versions, this environment's Python, torch and transformers, and the CPU's model
and flags (half precision rounds differently by CPU kind). A product is built into a temporary
directory, its files' sha256 written to MANIFEST.json, then renamed into place: an interrupted
build leaves nothing that looks finished. On load every file is hashed again; a
missing, extra or changed file, or a product whose builder changed, is rebuilt. Older products
of the same name are removed once the new one is in place.

$HALFSAFE_TEST_CACHE: another directory, or `off` to build every product afresh in this run's
temporary directory (what a fresh machine does).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "halfsafe"
CONSTRAINTS = [ROOT / "constraints.txt", *sorted((ROOT / "scripts" / "envs").glob("*.txt"))]
MANIFEST = "MANIFEST.json"
_run_dir: Path | None = None


def cache_dir() -> Path:
    """Where products live: $HALFSAFE_TEST_CACHE, else the user cache directory."""
    chosen = os.environ.get("HALFSAFE_TEST_CACHE", "")
    if chosen == "off":
        global _run_dir
        if _run_dir is None:
            _run_dir = Path(tempfile.mkdtemp(prefix="halfsafe-test-products-"))
        return _run_dir
    if chosen:
        return Path(chosen).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "halfsafe-tests"


def _digest_file(path: Path, h) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    _digest_file(path, h)
    return h.hexdigest()


def _cpu() -> str:
    """This CPU's model and instruction-set flags: half-precision results differ by CPU kind, so a
    product holding float16 numbers is not reused on another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = [line.split(":", 1)[1].strip() for line in lines if line.startswith(("model name", "flags"))]
    return " | ".join(dict.fromkeys(wanted))


def _versions() -> dict:
    import torch
    import transformers

    return {"python": sys.version, "machine": platform.machine(), "cpu": _cpu(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def key(inputs: dict | None = None, files: Iterable[Path] = (), package: bool = True) -> str:
    """The hash of everything a product depends on (see the module's docstring)."""
    h = hashlib.sha256(json.dumps({"inputs": inputs or {}, "versions": _versions()}, sort_keys=True,
                                  default=str).encode())
    sources = sorted(p for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                     and ".egg-info" not in str(p)) if package else []
    for path in [*sources, *CONSTRAINTS, Path(__file__), *map(Path, files)]:
        h.update(str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path).encode())
        _digest_file(path, h)
    return h.hexdigest()[:20]


def _files(directory: Path) -> dict[str, Path]:
    return {str(p.relative_to(directory)): p for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def _intact(directory: Path) -> bool:
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text())
    except ValueError:
        return False
    found = _files(directory / "product") if (directory / "product").is_dir() else {}
    return set(found) == set(recorded) and all(sha256(found[name]) == digest for name, digest in recorded.items())


def build_once(name: str, build: Callable[[Path], None], *, inputs: dict | None = None,
               files: Iterable[Path] = (), package: bool = True) -> Path:
    """The directory `build(path)` makes at `path` (which does not exist yet), built now or taken
    from an earlier run with the same key."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    entry = root / f"{name}-{key(inputs, files, package)}"
    if entry.is_dir() and _intact(entry):
        return entry / "product"
    shutil.rmtree(entry, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        build(staging / "product")
        if not (staging / "product").exists():
            raise RuntimeError(f"the builder of test product {name!r} wrote nothing to {staging / 'product'}")
        recorded = {rel: sha256(path) for rel, path in _files(staging / "product").items()}
        (staging / MANIFEST).write_text(json.dumps(recorded, indent=1))
        os.replace(staging, entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in root.glob(f"{name}-*"):  # the same product under an older key
        if old != entry and old.is_dir() and len(old.name) == len(entry.name):
            shutil.rmtree(old, ignore_errors=True)
    return entry / "product"


def json_once(name: str, compute: Callable[[], object], *, inputs: dict | None = None,
              files: Iterable[Path] = (), package: bool = True):
    """`compute()`'s JSON value, computed now or read from an earlier run with the same key."""
    def build(directory: Path) -> None:
        directory.mkdir(parents=True)
        (directory / "value.json").write_text(json.dumps(compute()))

    path = build_once(name, build, inputs=inputs, files=files, package=package) / "value.json"
    return json.loads(path.read_text())


def product_id(path: Path) -> str:
    """A product's name and key (`demo-w4a16-<key>`), for the inputs of a product made from it."""
    return path.parent.name if path.name == "product" else str(path)
