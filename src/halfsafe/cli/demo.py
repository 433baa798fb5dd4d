"""`halfsafe demo`: the float16 failure on a real model, its diagnosis, and its fix.

The model is Google's gemma-3-270m base, shipped on PyPI as GGUF Q4_K_M; its residual stream
reaches about 1e5 in fp32, past float16's 65,504.
"""

from __future__ import annotations

import torch
from rich.rule import Rule

from ..diagnosing import AT_RISK_MARGIN, greedy_continuation
from ..guarding import NONFINITE, GuardedGenerator
from ..model.loading import DEMO, cache_root
from ..model.precision import cast_temporarily
from ..outputs import check_output_path
from ..prompts import bundled_prompts
from .plots import plot_diagnosis
from .render import render_diagnosis, render_fix
from .session import diagnose_with_progress, fix_with_progress, load_for_cli, make_console

PROMPT = "上海有个非常出名的地方，"  # the prompt of a widely shared Qwen float16 failure report


def run_demo(*, plot: str | None = None, device: str = "auto") -> int:
    plot_path = check_output_path(plot, "plot") if plot else None
    console = make_console()
    loaded = load_for_cli(DEMO, console, device=device)
    model, tokenizer = loaded.model, loaded.tokenizer
    console.print(Rule(f"{loaded.name} in float16"))
    batch = tokenizer(PROMPT, return_tensors="pt").to(model.device)
    generation = dict(max_new_tokens=16, pad_token_id=tokenizer.pad_token_id)

    with cast_temporarily(model, torch.float16), torch.inference_mode():
        console.print(f"1. sampling (temperature 0.8) from {PROMPT!r}:", highlight=False)
        try:
            torch.manual_seed(0)
            model.generate(**batch, do_sample=True, temperature=0.8, **generation)
            console.print("   completed (this model did not overflow on this prompt)")
        except RuntimeError as exc:
            console.print(f"   RuntimeError: {exc}", style="red", markup=False, highlight=False)
            console.print(
                "   the logits are NaN: a residual channel passed float16's maximum (65,504) and became inf,\n"
                "   then inf - inf = NaN spread through attention to every position."
            )
        console.print("2. greedy decoding:")
        out = model.generate(**batch, do_sample=False, top_p=None, top_k=None, **generation)
        text = tokenizer.decode(out[0, batch["input_ids"].shape[1]:])
        console.print(f"   {text!r}", style="red", markup=False, highlight=False)
        console.print("   argmax of an all-NaN row is token 0, which is <pad> for Gemma ('!' for Qwen).")
        console.print("3. the same greedy decoding, guarded (halfsafe generate MODEL --dtype float16):")
        guarded = GuardedGenerator(model)
        out = guarded.generate(**batch, do_sample=False, top_p=None, top_k=None, **generation)
        text = tokenizer.decode(out[0, batch["input_ids"].shape[1]:])
        console.print(f"   {text!r}", style="green", markup=False, highlight=False)
        events = guarded.report.of_kind(NONFINITE)
        console.print(
            f"   {len(events)} non-finite step(s) ({', '.join(str(e.step) for e in events)}; first non-finite module "
            f"{events[0].module if events else 'none'}) recomputed in float32, one module's weights at a time;\n"
            "   the repaired KV cache lets every later step run in float16.", highlight=False,
        )

    console.print(Rule("diagnosis"))
    diagnosis = diagnose_with_progress(loaded, bundled_prompts(), torch.float16, AT_RISK_MARGIN, console)
    render_diagnosis(diagnosis, console)
    if plot_path is None:
        plot_path = cache_root() / "reports" / "demo-diagnosis.png"
        plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot_diagnosis(diagnosis, plot_path)
    console.print(f"plot: {plot_path}", highlight=False)

    console.print(Rule("fix: rescale the residual stream by a power of two (exact in fp32)"))
    model, report = fix_with_progress(loaded, console, observation=diagnosis.sites)
    render_fix(report, console)
    fixed_text = greedy_continuation(model, tokenizer, PROMPT)
    console.print(f"fp32 greedy:          {diagnosis.reference_continuation!r}", markup=False, highlight=False)
    console.print(f"fixed float16 greedy: {fixed_text!r}", style="green", markup=False, highlight=False)
    console.print("export it for transformers or vLLM: halfsafe fix demo --out DIR", highlight=False)
    return 0
