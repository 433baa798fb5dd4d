"""Guard overhead on healthy models: guarded vs plain `generate`, same model and dtype, one run.

The demo model (gemma-3-270m) in fp32, and fixed by halfsafe in float16 (both healthy: no step is
non-finite, so what is measured is the guard's per-step cost: one `isfinite(...).any()` check,
the sanitizing processor and the degeneration monitor). Greedy, NEW_TOKENS new tokens, batch 1
and 8; plain and guarded alternate, and each keeps its best of REPEATS runs.
Target: guarded at least 0.98 of plain tokens/s.

Run: python benchmarks/bench_guard.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import machine  # noqa: E402

from halfsafe.fixing import fix  # noqa: E402
from halfsafe.guarding import guard  # noqa: E402
from halfsafe.loading import load_model  # noqa: E402
from halfsafe.prompts import HELDOUT, bundled_prompts  # noqa: E402
from halfsafe.session import quiet_transformers  # noqa: E402

NEW_TOKENS = 32
REPEATS = 5


def measure(model, tokenizer, batch_size: int) -> tuple[float, float, int]:
    """(plain tok/s, guarded tok/s, non-finite events) at `batch_size`, best of REPEATS each."""
    tokenizer.padding_side = "left"
    prompts = bundled_prompts(HELDOUT)[:batch_size]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, top_p=None, top_k=None,
                    pad_token_id=tokenizer.pad_token_id)
    guarded = guard(model)
    best = {"plain": float("inf"), "guarded": float("inf")}
    with torch.inference_mode():
        for _ in range(REPEATS):
            for name, run in (("plain", model.generate), ("guarded", guarded.generate)):
                started = time.perf_counter()
                run(**inputs, **settings)
                best[name] = min(best[name], time.perf_counter() - started)
    tokens = batch_size * NEW_TOKENS
    return tokens / best["plain"], tokens / best["guarded"], guarded.counters.nonfinite_rows


def main() -> None:
    quiet_transformers()
    print(f"machine: {machine()}")
    print(f"greedy, {NEW_TOKENS} new tokens, best of {REPEATS} (plain and guarded alternating)")
    print("| model | batch | plain tok/s | guarded tok/s | guarded / plain | non-finite steps |")
    print("|---|---|---|---|---|---|")
    loaded = load_model("demo")
    for label in ("demo, fp32", "demo fixed, float16"):
        if label.startswith("demo fixed"):
            fix(loaded.model, loaded.tokenizer, verify=False)
        for batch_size in (1, 8):
            plain, guarded, events = measure(loaded.model, loaded.tokenizer, batch_size)
            print(f"| {label} | {batch_size} | {plain:.1f} | {guarded:.1f} | {guarded / plain:.3f} | {events} |",
                  flush=True)


if __name__ == "__main__":
    main()
