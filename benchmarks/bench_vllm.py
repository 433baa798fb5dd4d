"""vLLM tokens/s: the fixed demo in float16 against the demo in bfloat16 and float32, batch 1 and 16,
with the cost of halfsafe's plugin and of its logits processor as ratios.

Runs in vLLM's environment (scripts/test-envs.sh); FIXED is the demo fixed by halfsafe:

    halfsafe fix demo --out /tmp/demo-fixed
    .venv-vllm/bin/python benchmarks/bench_vllm.py /tmp/demo-fixed

Each configuration loads its own engine in a fresh process (engine core in that process, so
that the no-plugin baseline can lift vLLM's refusal by hand; eager, no torch.compile). Greedy,
ignore_eos, NEW_TOKENS new tokens per request; each keeps the best of REPEATS runs.
- plugin ratio: fixed fp16 through the plugin / fixed fp16 with the refusal lifted by hand and
  no plugin (VLLM_PLUGINS=none). The plugin acts only while vLLM resolves the dtype: about 1.
- processor ratio: fixed fp16 with `halfsafe.vllm.processor:SanitizeLogits` / without.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

NEW_TOKENS = 64
REPEATS = 3
BATCHES = (1, 16)
PROMPT = "The history of the printing press begins"
CONFIGS = {  # name: (model, dtype, processor, plugin)
    "fixed fp16": ("fixed", "float16", False, True),
    "fixed fp16 + processor": ("fixed", "float16", True, True),
    "fixed fp16 no plugin": ("fixed", "float16", False, False),
    "demo bf16": ("demo", "bfloat16", False, True),
    "demo fp32": ("demo", "float32", False, True),
}
MARK = "BENCH-RESULT "


def measure(name: str, fixed: str, new_tokens: int, repeats: int) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from halfsafe.model.loading import demo_cache_dir
    from vllm import LLM, SamplingParams

    which, dtype, processor, plugin = CONFIGS[name]
    if not plugin:
        import vllm.config.model as model_module

        model_module._FLOAT16_NOT_SUPPORTED_MODELS.clear()
    extra = {"logits_processors": ["halfsafe.vllm.processor:SanitizeLogits"]} if processor else {}
    model = fixed if which == "fixed" else str(demo_cache_dir())
    llm = LLM(model=model, dtype=dtype, max_model_len=512, max_num_seqs=max(BATCHES), enforce_eager=True, seed=0,
              **extra)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate([PROMPT], params, use_tqdm=False)  # warm-up
    result = {}
    for batch in BATCHES:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            outputs = llm.generate([PROMPT] * batch, params, use_tqdm=False)
            best = min(best, time.perf_counter() - start)
        assert all(len(o.outputs[0].token_ids) == new_tokens for o in outputs)
        result[batch] = batch * new_tokens / best
    return result


def machine() -> str:
    """benchmarks/common.py's machine line, with vLLM's version."""
    import vllm

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import machine as common_machine

    return f"{common_machine()}, vllm {vllm.__version__}"


def main() -> None:
    import argparse

    if len(sys.argv) == 6 and sys.argv[1] == "--one":
        name, fixed, new_tokens, repeats = sys.argv[2:]
        print(MARK + json.dumps(measure(name, fixed, int(new_tokens), int(repeats))), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fixed", help="the demo fixed by halfsafe (halfsafe fix demo --out FIXED_DIR)")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.fixed, "config.json")):
        raise SystemExit(f"{args.fixed} has no config.json; make it with: halfsafe fix demo --out {args.fixed}")
    fixed, names = args.fixed, [n.strip() for n in args.configs.split(",")]
    if unknown := [n for n in names if n not in CONFIGS]:
        raise SystemExit(f"unknown configuration {unknown[0]!r}; choose from: {', '.join(CONFIGS)}")
    print(f"machine: {machine()}")
    print(f"vLLM, eager, greedy, {args.new_tokens} new tokens per request, best of {args.repeats}; tokens/s")
    results = {}
    for name in names:
        plugin = CONFIGS[name][3]
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
        if not plugin:
            env["VLLM_PLUGINS"] = "none"
        done = subprocess.run([sys.executable, __file__, "--one", name, fixed, str(args.new_tokens),
                               str(args.repeats)], env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith(MARK)]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"{name} failed:\n{(done.stdout + done.stderr)[-3000:]}")
        results[name] = {int(k): v for k, v in json.loads(lines[-1][len(MARK):]).items()}
        print(f"  {name:24s} " + "  ".join(f"batch {b}: {results[name][b]:7.1f}" for b in BATCHES), flush=True)
    fp16 = results.get("fixed fp16")
    for batch in BATCHES:
        ratios = [f"{label} {fp16[batch] / results[other][batch]:.2f}" for label, other in (
            ("fixed fp16 / demo bf16", "demo bf16"), ("/ demo fp32", "demo fp32"),
            ("plugin ratio", "fixed fp16 no plugin")) if fp16 and other in results]
        if fp16 and "fixed fp16 + processor" in results:
            ratios.append(f"processor ratio {results['fixed fp16 + processor'][batch] / fp16[batch]:.3f}")
        print(f"batch {batch}: " + "; ".join(ratios))


if __name__ == "__main__":  # vLLM spawns processes that import this module
    main()
