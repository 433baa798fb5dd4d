"""Coverage as a number: derive roles for every causal-LM type transformers maps, and prove them.

For each model type in transformers' causal-LM mapping: build a tiny model from its config
class (sizes shrunk generically, halfsafe/shrinking.py), plant a massive activation (1e5 in one
residual channel, written by a first-layer writer's row, past float16's 65,504), derive the roles, and record:
- derived: the roles came out without a refusal (else the refusal's reason);
- exact: the exactness gate (s = 2^-3, two prompts, fp32): max |delta logit|, bit-identical or not;
- float16 finite before / after the fix (s chosen as `fix` does: 4x below 65,504);
- mean KL to fp32 of the fixed float16 model, against bfloat16's (unfixed).
A type is *covered* when the gate passes, float16 is finite after, and its KL is below bf16's.

Writes docs/architectures.md and prints the count, transformers' version, the machine and the
run time. Usage: python benchmarks/arch_coverage.py [TYPE ...] [--timeout 120] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402
from halfsafe.diagnosing import FiniteWatch  # noqa: E402
from halfsafe.fixing.observe import find_decoder_layers  # noqa: E402
from halfsafe.fixing.plan import power_of_two_scale  # noqa: E402
from halfsafe.model.hooks import HookSet  # noqa: E402
from halfsafe.roles import apply_roles, derive_roles, exactness_gate  # noqa: E402
from halfsafe.shrinking import BOS, plant_massive_activation, tiny_model  # noqa: E402

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
        logp, logq = p.log_softmax(-1), q.log_softmax(-1)
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
        row["planted"] = plant_massive_activation(model, layers, layers_path, roles, batch[0])
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
        if roles.export_blockers:
            return dict(row, status="covered in memory", reason=f"export not exact: {roles.export_blockers[0]}")
        return dict(row, status="covered")
    except TimedOut:
        raise
    except Exception as error:  # noqa: BLE001
        return dict(row, status="failed", reason=_one_line(error))


def _one_line(error: Exception) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return text[:160]


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
        "| type | class | status | planted | fp16 finite before | max abs delta (fp32) | bit-identical | "
        "fp16 finite after | KL fixed fp16 | KL bf16 | median KL fixed fp16 | median KL bf16 | reason |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append("| " + " | ".join([
            row["type"], row.get("class", ""), row["status"], _number(row.get("planted"), "{:,.0f}"),
            _number(row.get("fp16 finite before")), _number(row.get("max delta")), _number(row.get("equal")),
            _number(row.get("fp16 finite after")), _number(row.get("fp16 kl")), _number(row.get("bf16 kl")),
            _number(row.get("fp16 kl median")), _number(row.get("bf16 kl median")),
            row.get("reason", "").replace("|", "/"),
        ]) + " |")
    return "\n".join(lines) + "\n"


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
        print(f"{model_type:28s} {row['status']:10s} {time.perf_counter() - began:5.1f}s  {row.get('reason', '')}",
              flush=True)
    elapsed = time.perf_counter() - started
    covered = sum(r["status"] == "covered" for r in rows)
    in_memory = sum(r["status"] == "covered in memory" for r in rows)
    overflowed = sum(r["status"].startswith("covered") and r.get("fp16 finite before") is False for r in rows)
    identical = sum(r["status"].startswith("covered") and r.get("equal") is True for r in rows)
    header = (f"Measured {time.strftime('%Y-%m-%d')} on {machine()}: **{covered + in_memory} of {len(rows)}** model "
              f"types in transformers {transformers.__version__}'s causal-LM mapping covered ({covered} exportable "
              f"exactly, {in_memory} exact in memory only; {identical} of them bit-identical in fp32, {overflowed} "
              f"non-finite in plain float16 before the fix); run time {elapsed:.0f} s (one thread).")
    if not args.types:
        Path(args.out).write_text(render(rows, header))
    print(header)


if __name__ == "__main__":
    main()
