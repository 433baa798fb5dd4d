"""The demo's acceptance numbers on the held-out set, and why a fixed model's greedy text diverges.

Prints, with the machine:
1. fidelity vs fp32 on the bundled held-out prompts (48), greedy over 32 new tokens: bfloat16
   and the fixed float16 model at three residual scales (margins 2, 4 = the default, 8);
2. for every prompt whose greedy text differs from fp32's: where, and the fp32 top-1 - top-2
   logit and probability gaps there (a near-tie is a gap within the noise of half precision);
3. the fp32 floor: fp32 against itself, batched with left padding vs one prompt at a time
   (greedy tokens, and the largest change in any top-1 - top-2 logit gap);
4. whether this CPU's float16 matmul rounds once (fp32 accumulation) or more often.

Run: python benchmarks/bench_acceptance.py [--prompts N]   (over an hour on a 2-core CPU shared with other jobs)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import machine  # noqa: E402
from halfsafe.cli.session import quiet_transformers  # noqa: E402
from halfsafe.fixing.fix import InMemory  # noqa: E402
from halfsafe.fixing.pipeline import rescaling  # noqa: E402
from halfsafe.fixing.verify import greedy_tokens, match_lengths, measure_fidelity  # noqa: E402
from halfsafe.model.loading import load_model  # noqa: E402
from halfsafe.model.precision import cast_temporarily  # noqa: E402
from halfsafe.prompts import HELDOUT, bundled_prompts  # noqa: E402

NEW_TOKENS = 32
MARGINS = (2.0, 4.0, 8.0)


def variants_of(model, tokenizer):
    """bf16, and the fix at each margin as `fix` makes it (derived roles, proven, observed once)."""
    backend = InMemory(model, tokenizer)
    variants = {"bf16": lambda: cast_temporarily(model, torch.bfloat16)}
    sites = None
    for margin in MARGINS:
        fix, _, sites = rescaling(backend, bundled_prompts(), dtype=torch.float16, margin=margin, sites=sites)
        name = f"fixed x 2^{int(torch.log2(torch.tensor(fix.plan.residual_scale)))} (margin {margin:g})"
        variants[name] = backend.variant(fix, torch.float16)
    return variants


def gaps(model, tokenizer, prompt: str, continuation: torch.Tensor) -> tuple[float, float, int, int]:
    """fp32 top-1 - top-2 logit and probability gaps after `prompt` + `continuation`, and the two tokens."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    ids = torch.cat([ids, continuation[None]], dim=1)
    logits = model(input_ids=ids, use_cache=False).logits[0, -1].double()  # [V]
    top = logits.topk(2)
    probs = logits.softmax(-1)[top.indices]
    return float(top.values[0] - top.values[1]), float(probs[0] - probs[1]), int(top.indices[0]), int(top.indices[1])


def fp32_floor(model, tokenizer, prompts, ref_tokens) -> tuple[int, float]:
    """Prompts whose fp32 greedy text changes when run alone instead of in the padded batch, and the
    largest change of a top-1 - top-2 logit gap over the continuations' positions between the two."""
    changed, worst = 0, 0.0
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    sequences = [torch.cat([tokenizer(p, return_tensors="pt")["input_ids"][0], r])
                 for p, r in zip(prompts, ref_tokens, strict=True)]
    width = max(len(s) for s in sequences)
    pad = tokenizer.pad_token_id
    ids = torch.stack([torch.cat([torch.full((width - len(s),), pad), s]) for s in sequences])
    mask = torch.stack([torch.cat([torch.zeros(width - len(s), dtype=torch.long), torch.ones(len(s), dtype=torch.long)])
                        for s in sequences])
    tokenizer.padding_side = side
    batched = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -NEW_TOKENS - 1:-1].double()
    for row, (prompt, sequence) in enumerate(zip(prompts, sequences, strict=True)):
        alone = model(input_ids=sequence[None], use_cache=False).logits[0, -NEW_TOKENS - 1:-1].double()
        tokens = greedy_tokens(model, tokenizer, [prompt], NEW_TOKENS)[0]
        changed += int(not torch.equal(tokens, ref_tokens[row]))
        for a, b in ((alone, batched[row]),):
            ga = a.topk(2).values
            gb = b.topk(2).values
            worst = max(worst, float(((ga[:, 0] - ga[:, 1]) - (gb[:, 0] - gb[:, 1])).abs().max()))
    return changed, worst


def matmul_rounding() -> float:
    """Share of float16 matmul outputs bit-equal to fp32 accumulation rounded once to float16."""
    torch.manual_seed(0)
    a = torch.randn(64, 640).half()
    b = torch.randn(640, 2048).half()
    return float((a @ b == (a.float() @ b.float()).half()).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, help="only the first N held-out prompts (default: all 48)")
    args = parser.parse_args()
    quiet_transformers()
    print(f"machine: {machine()}")
    started = time.perf_counter()
    loaded = load_model("demo")
    model, tokenizer = loaded.model, loaded.tokenizer
    prompts = bundled_prompts(HELDOUT)[: args.prompts]
    variants = variants_of(model, tokenizer)
    with torch.inference_mode():
        fidelity = measure_fidelity(model, tokenizer, prompts, variants, new_tokens=0)
        ref_tokens = greedy_tokens(model, tokenizer, prompts, NEW_TOKENS)
        tokens = {}
        for name, variant in variants.items():
            with variant() as running:
                tokens[name] = greedy_tokens(running, tokenizer, prompts, NEW_TOKENS)
    print(f"\n1. fidelity vs fp32 on {len(prompts)} held-out prompts ({fidelity['bf16'].positions} positions), "
          f"greedy over {NEW_TOKENS} new tokens:")
    print("| variant | KL mean | KL p99 | KL max | top-1 | greedy match | identical |")
    print("|---|---|---|---|---|---|---|")
    for name, f in fidelity.items():
        lengths = match_lengths(ref_tokens, tokens[name])
        identical = int((lengths == NEW_TOKENS).sum())
        print(f"| {name} | {f.kl_mean:.2e} | {f.kl_p99:.2e} | {f.kl_max:.2e} | {f.top1:.2%} | "
              f"{lengths.float().mean():.1f} | {identical}/{len(prompts)} = {identical / len(prompts):.1%} |")

    print("\n2. divergences (fp32 gap at the first differing token; 'bf16 too' = bf16 differs at or before it):")
    bf16_lengths = match_lengths(ref_tokens, tokens["bf16"])
    for name in variants:
        lengths = match_lengths(ref_tokens, tokens[name])
        for row in torch.nonzero(lengths < NEW_TOKENS)[:, 0].tolist():
            at = int(lengths[row])
            with torch.inference_mode():
                logit_gap, prob_gap, first, second = gaps(model, tokenizer, prompts[row], ref_tokens[row, :at])
            took = int(tokens[name][row, at])
            print(f"  {name:<24} prompt {row:2d} token {at:2d}: fp32 logit gap {logit_gap:.3f}, "
                  f"prob gap {prob_gap:.4f}; "
                  f"took fp32's {'2nd' if took == second else 'other'} choice; "
                  f"bf16 too: {'yes' if bf16_lengths[row] <= at else 'no'}  {prompts[row][:40]!r}")

    with torch.inference_mode():
        changed, worst = fp32_floor(model, tokenizer, prompts, ref_tokens)
    print(f"\n3. fp32 floor: {changed} of {len(prompts)} greedy texts change when run alone instead of batched; "
          f"largest change of a top-1 - top-2 logit gap: {worst:.2e}")

    print(f"\n4. float16 matmul outputs equal to fp32 accumulation rounded once: {matmul_rounding():.2%}")
    print(f"\ntotal time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
