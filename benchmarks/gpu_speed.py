"""GPU speed: fixed fp16 vs bf16 vs fp32 generation on realistic shapes with random weights,
and the guard's overhead on the fixed model.

Built on the device from Qwen3 configs (1.7B- and 8B-shaped), with a massive activation
planted as in the tests (so plain fp16 overflows), then fixed by halfsafe in memory. For
speed alone random weights are as good as real ones. Sized for under 5 minutes on one
H100/H200:  python benchmarks/gpu_speed.py
On a CPU, `--small` runs the same code on tiny shapes (a check of the script, not a benchmark).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: tests/support

from tests.support.models import SHORT_PROMPTS, byte_tokenizer, plant_massive_activation  # noqa: E402

from common import machine  # noqa: E402
from halfsafe.fixing.fix import fix  # noqa: E402
from halfsafe.guarding import guard  # noqa: E402
from halfsafe.model.precision import cast_temporarily  # noqa: E402
from halfsafe.timing import now  # noqa: E402

SHAPES = {  # name: Qwen3Config fields (the public configs' shapes)
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
}
SMALL = {"qwen3-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, vocab_size=320, tie_word_embeddings=True)}


def tokens_per_second(model, tokenizer, batch: int, new_tokens: int, generate=None) -> float:
    generate = generate or model.generate
    tokenizer.padding_side = "left"
    inputs = tokenizer((SHORT_PROMPTS * batch)[:batch], return_tensors="pt", padding=True).to(model.device)
    best = float("inf")
    for _ in range(2):
        started = now()
        with torch.inference_mode():
            generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                     top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
        best = min(best, now() - started)
    return batch * new_tokens / best


def main() -> None:
    from transformers import AutoModelForCausalLM, Qwen3Config

    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="tiny shapes, to check the script on a CPU")
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"machine: {machine()}")
    tokenizer = byte_tokenizer()
    for name, shape in (SMALL if args.small else SHAPES).items():
        torch.manual_seed(0)
        config = Qwen3Config(**shape, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        with torch.no_grad():
            plant_massive_activation(model)
        speeds = {}
        for batch in (1, 16):
            speeds["fp32", batch] = tokens_per_second(model, tokenizer, batch, args.new_tokens)
            with cast_temporarily(model, torch.bfloat16):
                speeds["bf16", batch] = tokens_per_second(model, tokenizer, batch, args.new_tokens)
        with cast_temporarily(model, torch.float16), torch.inference_mode():
            plain = model(**tokenizer(SHORT_PROMPTS[0], return_tensors="pt").to(device)).logits
        started = now()
        model, report = fix(model, tokenizer, calibration=SHORT_PROMPTS, verify=False)
        fix_seconds = now() - started
        with torch.inference_mode():
            fixed = model(**tokenizer(SHORT_PROMPTS[0], return_tensors="pt").to(device)).logits
        guarded = guard(model)
        for batch in (1, 16):
            speeds["fp16-fixed", batch] = tokens_per_second(model, tokenizer, batch, args.new_tokens)
            speeds["fp16-fixed guarded", batch] = tokens_per_second(model, tokenizer, batch, args.new_tokens,
                                                                    guarded.generate)
        print(f"\n{name}: plain fp16 logits finite: {bool(torch.isfinite(plain).all())}; fixed: "
              f"{bool(torch.isfinite(fixed).all())}; plan: {report.plan.describe()}; fix {fix_seconds:.1f} s")
        print("| variant | tok/s batch 1 | tok/s batch 16 |")
        print("|---|---|---|")
        for variant in ("fp32", "bf16", "fp16-fixed", "fp16-fixed guarded"):
            print(f"| {variant} | {speeds[variant, 1]:.1f} | {speeds[variant, 16]:.1f} |")
        print(f"fixed fp16 / bf16: {speeds['fp16-fixed', 1] / speeds['bf16', 1]:.2f} at batch 1, "
              f"{speeds['fp16-fixed', 16] / speeds['bf16', 16]:.2f} at batch 16")
        print("guard overhead, guarded / plain fixed fp16: "
              f"{speeds['fp16-fixed guarded', 1] / speeds['fp16-fixed', 1]:.3f} at batch 1, "
              f"{speeds['fp16-fixed guarded', 16] / speeds['fp16-fixed', 16]:.3f} at batch 16 "
              f"(non-finite steps: {guarded.counters.nonfinite_rows})")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
