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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import machine  # noqa: E402
from halfsafe.cli.session import quiet_transformers  # noqa: E402
from halfsafe.fixing.fix import fix  # noqa: E402
from halfsafe.guarding import guard  # noqa: E402
from halfsafe.model.loading import load_model  # noqa: E402
from halfsafe.prompts import HELDOUT, bundled_prompts  # noqa: E402
from halfsafe.timing import now  # noqa: E402

NEW_TOKENS = 32
REPEATS = 5


def measure(model, tokenizer, batch_size: int, repeats: int) -> tuple[float, float, float, int]:
    """(plain tok/s, guarded tok/s, the guard's own share of the guarded time, non-finite events)
    at `batch_size`, best of `repeats` each. On a CPU the guard's host time is its whole cost,
    so its share does not depend on the machine's noise the way a difference of two timings does."""
    tokenizer.padding_side = "left"
    prompts = bundled_prompts(HELDOUT)[:batch_size]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, top_p=None, top_k=None,
                    pad_token_id=tokenizer.pad_token_id)
    guarded = guard(model)
    best = {"plain": float("inf"), "guarded": float("inf")}
    shares = []
    with torch.inference_mode():
        for _ in range(repeats):
            for name, run in (("plain", model.generate), ("guarded", guarded.generate)):
                started = now()
                run(**inputs, **settings)
                best[name] = min(best[name], now() - started)
            shares.append(guarded.report.overhead_seconds / guarded.report.seconds)
    tokens = batch_size * NEW_TOKENS
    return tokens / best["plain"], tokens / best["guarded"], min(shares), guarded.counters.nonfinite_rows


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=REPEATS)
    repeats = parser.parse_args().repeats
    quiet_transformers()
    print(f"machine: {machine()}")
    print(f"greedy, {NEW_TOKENS} new tokens, best of {repeats} (plain and guarded alternating)")
    print("| model | batch | plain tok/s | guarded tok/s | guarded / plain | guard's own time | non-finite steps |")
    print("|---|---|---|---|---|---|---|")
    loaded = load_model("demo")
    for label in ("demo, fp32", "demo fixed, float16"):
        if label.startswith("demo fixed"):
            fix(loaded.model, loaded.tokenizer, verify=False)
        for batch_size in (1, 8):
            plain, guarded, share, events = measure(loaded.model, loaded.tokenizer, batch_size, repeats)
            print(f"| {label} | {batch_size} | {plain:.1f} | {guarded:.1f} | {guarded / plain:.3f} | {share:.2%} | "
                  f"{events} |", flush=True)


if __name__ == "__main__":
    main()
