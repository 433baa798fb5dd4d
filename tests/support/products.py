"""The demo's test products, each built once and reused across runs (tests/support/cache.py):
the demo fixed by the CLI, the demo in a quantized format, its fix, and fp32 references.

    fixed = fixed_demo()                              # `halfsafe fix demo --out`, as a user runs it
    source = quantized_demo("w4a16", make, MAKE)      # make(demo_dir, target) -> target
    fixed, plan = fixed_product("w4a16", source, run_fix, heldout=8)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.support.cache import ROOT, build_once, json_once, product_id

SERVER_PROMPT = "Water boils at"  # the one prompt tests/test_vllm.py asks vLLM's server
LOADING = ROOT / "src" / "halfsafe" / "model" / "loading.py"  # how the dense demo is made
TINY_MODELS = ROOT / "tests" / "support" / "models.py"  # how the tiny planted models are made


def cached_copy(name: str, build: Callable[[Path], object], into: Path, *, inputs: dict,
                files: tuple[Path, ...] = (), package: bool = True) -> Path:
    """A small product (a tiny quantized checkpoint, its fix) built once across runs, copied to
    `into` (this run's temporary directory), so a test can write beside it as it always did."""
    shutil.copytree(build_once(name, build, inputs=inputs, files=files, package=package), into)
    return into


def sha_tree(directory: Path) -> str:
    """One hash of a directory's files (names and bytes): the key input for a product made from it."""
    import hashlib

    from tests.support.cache import sha256

    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(directory)} {sha256(path)}\n".encode())
    return h.hexdigest()


def export_fixed_demo(out: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "halfsafe", "fix", "demo", "--out", str(out), "--device", "cpu"],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def fixed_demo() -> Path:
    """The demo fixed for float16 by the CLI (`halfsafe fix demo --out`, its 48 held-out prompts,
    its model card), as a user makes it: built once (keyed by halfsafe's code and the versions)."""
    return build_once("demo-fixed", export_fixed_demo)


def quantized_demo(fmt: str, make: Callable[[Path, Path], object], *makers: Path) -> Path:
    """The demo's dense checkpoint quantized by `make(source, target)` (a real quantizer's
    script, `makers`), built once: its key is the scripts and the versions, not halfsafe's code."""
    from halfsafe.model.loading import demo_checkpoint

    return build_once(f"demo-{fmt}", lambda target: make(demo_checkpoint(), target), inputs={"format": fmt},
                      files=[*makers, LOADING], package=False)


def fixed_product(fmt: str, source: Path, run_fix: Callable[..., object], heldout: int | None = None,
                  files: tuple[Path, ...] = ()) -> tuple[Path, dict]:
    """`run_fix(source, out, plan_json, *options)` on `source`, verified on the first `heldout`
    held-out prompts (None: fix's default, all 48): (the fixed directory, the plan JSON)."""
    from halfsafe.prompts import HELDOUT, bundled_prompts

    def build(product: Path) -> None:
        product.mkdir(parents=True)
        options = []
        if heldout is not None:
            (product / "heldout.txt").write_text("\n".join(bundled_prompts(HELDOUT)[:heldout]) + "\n",
                                                 encoding="utf-8")
            options = ["--heldout", str(product / "heldout.txt")]
        run_fix(source, product / "fixed", product / "plan.json", *options)

    product = build_once(f"demo-{fmt}-fixed", build, inputs={"source": product_id(source), "heldout": heldout},
                         files=files)
    return product / "fixed", json.loads((product / "plan.json").read_text())


def fp32_greedy(source: Path, compute: Callable[[], dict], files: tuple[Path, ...] = ()) -> dict:
    """An fp32 reference of the product `source` (greedy tokens, prompt ids: whatever `compute()`
    returns), once."""
    name = product_id(source).rsplit("-", 1)[0]  # demo-w4a16-<key> -> demo-w4a16
    return json_once(f"{name}-fp32-reference", compute, inputs={"source": product_id(source)}, files=files)
