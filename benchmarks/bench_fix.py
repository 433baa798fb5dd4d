"""`fix` on the demo model: cost, fidelity next to the alternatives, and generation speed.

Prints, with the machine:
1. fix time (observation + plan + scaled weights, then verification) and peak memory, after load;
2. the fidelity table on the bundled held-out prompts, reference fp32: bf16, plain fp16,
   fp16 with the residual clamped at +-64,504 (what T5 and ONNX exports do), fixed fp16;
3. greedy generation speed, fixed fp16 vs bf16 vs fp32, batch 1, measured in one run.

Run: python benchmarks/bench_fix.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import PeakRSS, machine, model_bytes  # noqa: E402
from halfsafe.cli.session import quiet_transformers  # noqa: E402
from halfsafe.comparing import build_variants  # noqa: E402
from halfsafe.fixing.fix import fix  # noqa: E402
from halfsafe.fixing.plan import PLANNING_MARGIN  # noqa: E402
from halfsafe.fixing.verify import measure_fidelity  # noqa: E402
from halfsafe.model.layers import encode  # noqa: E402
from halfsafe.model.loading import load_model  # noqa: E402
from halfsafe.prompts import HELDOUT, bundled_prompts  # noqa: E402
from halfsafe.timing import now  # noqa: E402

SPEED_TOKENS = 32
SPEED_REPEATS = 3


def tokens_per_second(model, tokenizer, prompt: str) -> float:
    batch = encode(tokenizer, prompt, next(model.parameters()).device)
    best = float("inf")
    for _ in range(SPEED_REPEATS):
        started = now()
        model.generate(**batch, max_new_tokens=SPEED_TOKENS, min_new_tokens=SPEED_TOKENS, do_sample=False,
                       top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
        best = min(best, now() - started)
    return SPEED_TOKENS / best


def main() -> None:
    quiet_transformers()
    print(f"machine: {machine()}")

    # 1. the cost of `fix` itself, on its own copy of the model
    loaded = load_model("demo")
    size = model_bytes(loaded.model)
    with PeakRSS() as memory:
        started = now()
        _, report = fix(loaded.model, loaded.tokenizer)
        seconds = now() - started
    print(f"model: {loaded.name}, fp32 weights {size / 2**30:.2f} GiB")
    print(f"plan: {report.plan.describe()}")
    print(f"fix time (observe 37 prompts, plan, scale, verify on 16 held-out with 32 greedy tokens): {seconds:.1f} s "
          "(target < 60 s)")
    print(f"peak resident memory during fix: {memory.peak / 2**30:.2f} GiB = "
          f"{memory.peak / size:.2f}x the fp32 weights")
    del loaded, report

    # 2. fidelity of every variant, from one fp32 model, built as `halfsafe compare` builds them
    loaded = load_model("demo")
    model, tokenizer = loaded.model, loaded.tokenizer
    names = ["fp32", "bf16", "fp16", "fp16-clamp", "fp16-fixed"]
    started = now()
    variants = build_variants(model, tokenizer, names, calibration=bundled_prompts(), margin=PLANNING_MARGIN)
    print(f"variants built (the fixed one: observe + plan + scaled weights): {now() - started:.1f} s")
    prompts = bundled_prompts(HELDOUT)
    fidelity = measure_fidelity(model, tokenizer, prompts, variants, new_tokens=32)
    print(f"\nfidelity vs fp32 on {len(prompts)} held-out prompts ({fidelity['bf16'].positions} positions), "
          "greedy over 32 new tokens:")
    print("| variant | non-finite | KL mean | KL p99 | KL max | top-1 | mean abs dp | perplexity "
          "| greedy match | identical |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, f in fidelity.items():
        print(f"| {name} | {f.nonfinite_share:.0%} | {f.kl_mean:.2e} | {f.kl_p99:.2e} | {f.kl_max:.2e} | "
              f"{f.top1:.2%} | {f.delta_p_mean:.2e} | {f.perplexity:.3f} | {f.greedy_match_mean:.1f} | "
              f"{f.greedy_identical:.0%} |")
    fixed, bf16 = fidelity["fp16-fixed"], fidelity["bf16"]
    print(f"fixed fp16 mean KL is {bf16.kl_mean / fixed.kl_mean:.0f}x smaller than bf16's (target >= 20x)")

    # 3. generation speed, batch 1, same prompt, one run
    prompt = "The capital of France is"
    speeds = {}
    with torch.inference_mode():
        for name in ("fp32", "bf16", "fp16-fixed"):
            with variants[name]() as running:
                speeds[name] = tokens_per_second(running, tokenizer, prompt)
    print(f"\ngreedy generation, batch 1, {SPEED_TOKENS} new tokens, best of {SPEED_REPEATS}: "
          + ", ".join(f"{k} {v:.1f} tok/s" for k, v in speeds.items()))
    print(f"fixed fp16 / bf16 speed ratio: {speeds['fp16-fixed'] / speeds['bf16']:.2f}")


if __name__ == "__main__":
    main()
