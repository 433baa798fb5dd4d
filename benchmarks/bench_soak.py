"""A soak of the guard: NaN injected at random steps, rows and layers; every fault recovered?

For each (dtype, batch) in {float16, bfloat16} x {1, 8}, on a healthy tiny Qwen3 (real config,
random weights; no step overflows on its own), GENERATIONS greedy generations of NEW_TOKENS
tokens each run under `halfsafe.guard`, each with one fault: a forward hook on a random
decoder layer writes NaN into a random subset of rows at a random step. Checked:
- one NONFINITE event per faulted row, at the fault's step, and that step recovered;
- every unfaulted row identical to the unfaulted run of the same batch;
- faulted rows: identical to the unfaulted run, or not (recovery recomputes the step and the
  row's KV cache in fp32, so the row continues from fp32's numbers rather than its own dtype's);
- resident memory every SAMPLE_EVERY generations, after gc.collect() and glibc's malloc_trim
  (freed heap pages handed back, so what remains is what is held): first, last, max and the
  least-squares slope over the run; and the number of live Python objects, first and last.

Run: python benchmarks/bench_soak.py [--generations N]   (about 2 minutes on a 2-core CPU)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: tests/support

from tests.support.models import PAD, NanFault, build_tiny_model, byte_tokenizer  # noqa: E402

from common import machine, rss_bytes  # noqa: E402
from halfsafe.guarding import NONFINITE, RECOVERED, guard  # noqa: E402
from halfsafe.model.layers import find_decoder_layers  # noqa: E402

NEW_TOKENS = 32
SAMPLE_EVERY = 2
PROMPTS = ["The capital of France is", "def add(a, b):", "上海有个非常出名的地方，", "1 + 1 =",
           "Once upon a time", "SELECT * FROM", "大阪で一番有名な食べ物は", "Water boils at"]
GREEDY = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, top_p=None, top_k=None,
              temperature=None, pad_token_id=PAD)


def batch_of(size: int) -> dict[str, torch.Tensor]:
    tokenizer = byte_tokenizer()
    tokenizer.padding_side = "left"
    encoded = tokenizer(PROMPTS[:size], return_tensors="pt", padding=True)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def held_bytes() -> int:
    """Resident memory after a full collection, with the heap's free pages handed back."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return rss_bytes()


def slope(samples: list[tuple[int, int]]) -> float:
    """Least-squares bytes per step."""
    n = len(samples)
    mean_x = sum(x for x, _ in samples) / n
    mean_y = sum(y for _, y in samples) / n
    var = sum((x - mean_x) ** 2 for x, _ in samples)
    return sum((x - mean_x) * (y - mean_y) for x, y in samples) / var if var else 0.0


def soak(model, dtype: torch.dtype, size: int, generations: int, rng: random.Random, memory: list, steps_done: int):
    model.to(dtype)
    batch = batch_of(size)
    layers = len(find_decoder_layers(model)[1])
    with torch.inference_mode():
        clean = model.generate(**batch, **GREEDY)  # [B, L + NEW_TOKENS]
    guarded = guard(model)
    tally = dict(faults=0, faulted_rows=0, events_ok=0, recovered_ok=0, other_rows=0, other_identical=0,
                 faulted_identical=0, steps=0)
    for generation in range(generations):
        step = rng.randrange(NEW_TOKENS)
        rows = sorted(rng.sample(range(size), rng.randint(1, min(3, size))))
        with NanFault(model, step=step, rows=rows, layer=rng.randrange(layers)), torch.inference_mode():
            out = guarded.generate(**batch, **GREEDY)
        report = guarded.report
        tally["faults"] += 1
        tally["faulted_rows"] += len(rows)
        tally["steps"] += report.steps
        nonfinite = [(e.step, e.row) for e in report.of_kind(NONFINITE)]
        recovered = [(e.step, e.row) for e in report.of_kind(RECOVERED)]
        tally["events_ok"] += nonfinite == [(step, r) for r in rows]
        tally["recovered_ok"] += recovered == [(step, r) for r in rows] and report.recovered_steps == [step]
        for row in range(size):
            same = torch.equal(out[row], clean[row])
            if row in rows:
                tally["faulted_identical"] += same
            else:
                tally["other_rows"] += 1
                tally["other_identical"] += same
        if generation % SAMPLE_EVERY == 0 or generation == generations - 1:
            memory.append((steps_done + tally["steps"], held_bytes()))
    return tally


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--generations", type=int, default=10, help="per (dtype, batch); each has NEW_TOKENS steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    rng = random.Random(args.seed)
    model = build_tiny_model("qwen3", plant=None)
    layers = len(find_decoder_layers(model)[1])
    print(f"model: tiny Qwen3 (real config, random weights, {layers} layers, healthy); "
          f"{args.generations} generations x {NEW_TOKENS} greedy steps per (dtype, batch), one fault each\n")
    print("| dtype | batch | steps | faults (rows) | one NONFINITE per faulted row | step recovered | "
          "unfaulted rows identical | faulted rows identical |")
    print("|---|---|---|---|---|---|---|---|")
    memory: list[tuple[int, int]] = []
    total_steps, started = 0, time.perf_counter()
    objects = len(gc.get_objects())
    memory.append((0, held_bytes()))
    for dtype in (torch.float16, torch.bfloat16):
        for size in (1, 8):
            t = soak(model, dtype, size, args.generations, rng, memory, total_steps)
            total_steps += t["steps"]
            other = f"{t['other_identical']}/{t['other_rows']}" if t["other_rows"] else "- (no other row)"
            print(f"| {str(dtype).removeprefix('torch.')} | {size} | {t['steps']} | "
                  f"{t['faults']} ({t['faulted_rows']}) | "
                  f"{t['events_ok']}/{t['faults']} | {t['recovered_ok']}/{t['faults']} | {other} | "
                  f"{t['faulted_identical']}/{t['faulted_rows']} |")
    rss = [r for _, r in memory]
    print(f"\n{total_steps} guarded steps in {time.perf_counter() - started:.0f} s")
    print(f"live Python objects: {objects:,} before, {len(gc.get_objects()):,} after")
    print(f"resident memory after gc.collect() and malloc_trim, {len(rss)} samples: first {rss[0] / 2**20:.1f} MiB, "
          f"last {rss[-1] / 2**20:.1f} MiB, max {max(rss) / 2**20:.1f} MiB; "
          f"slope {slope(memory):.1f} bytes/step (over the run's second half: {slope(memory[len(memory) // 2:]):.1f})")


if __name__ == "__main__":
    main()
