"""Fix: observe -> plan -> verify -> apply, so a model runs in float16 without overflow.

The fix changes weights only (shapes, names and config fields stay), so the result is a normal
checkpoint that stock transformers or vLLM loads and runs at its usual float16 speed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from . import __version__
from .applying import apply_fix, is_tied, scaled_weights, use_fix
from .dtypes import dtype_name, parse_dtype
from .errors import HalfsafeError
from .observing import observe
from .planning import DEFAULT_MARGIN, Plan, make_plan
from .precision import cast_temporarily
from .prompts import CALIBRATION, HELDOUT, bundled_prompts
from .registry import architecture_of
from .verifying import Fidelity, measure_fidelity

VERIFY_TOKENS = 32


class VerificationFailed(HalfsafeError):
    """The fixed model did not pass the gate; nothing was written."""

    exit_code = 4


@dataclass
class FixReport:
    plan: Plan
    fidelity: dict[str, Fidelity] = field(default_factory=dict)  # "fixed", "bfloat16"
    max_kl: float | None = None  # the gate's KL bound (bf16's mean KL unless set)
    calibration_prompts: int = 0
    verification_prompts: int = 0

    @property
    def fixed(self) -> Fidelity | None:
        return self.fidelity.get("fixed")

    def to_json(self) -> dict:
        return {
            "version": __version__,
            "plan": self.plan.to_json(),
            "calibration_prompts": self.calibration_prompts,
            "verification": {
                "prompts": self.verification_prompts,
                "max_kl": self.max_kl,
                **{name: f.to_json() for name, f in self.fidelity.items()},
            },
        }


def fix(
    model: nn.Module,
    tokenizer,
    *,
    dtype: torch.dtype | str = torch.float16,
    margin: float = DEFAULT_MARGIN,
    calibration: list[str] | None = None,
    heldout: list[str] | None = None,
    max_kl: float | None = None,
    verify: bool = True,
    progress=None,
) -> tuple[nn.Module, FixReport]:
    """Rescale `model` (fp32, in place) so it runs in `dtype` without overflow; cast it to `dtype`.

    Verification (unless `verify=False`) compares the fixed model on held-out prompts with the
    fp32 model, next to bfloat16: any non-finite logit, or a mean KL above bfloat16's (or above
    `max_kl`), raises VerificationFailed and leaves the model untouched.
    """
    dtype = parse_dtype(dtype)
    if next(model.parameters()).dtype != torch.float32:
        raise HalfsafeError("fix starts from float32 weights; load the model with dtype=torch.float32")
    arch = architecture_of(model)
    calibration = calibration or bundled_prompts(CALIBRATION)
    heldout = heldout or bundled_prompts(HELDOUT)
    recorder = observe(model, tokenizer, calibration, progress=progress)
    plan = make_plan(
        recorder.sites(), arch, recorder.num_layers, dtype=dtype, margin=margin,
        attn_implementation=recorder.attn_implementation, tied=is_tied(model),
    )
    if plan.unfixable:
        raise HalfsafeError(
            f"rescaling cannot bring {plan.unfixable[0]} below the {dtype_name(dtype)} limit "
            f"({len(plan.unfixable)} site(s) in all); use --strategy keep-fp32"
        )
    report = FixReport(plan, calibration_prompts=len(calibration), verification_prompts=len(heldout))
    weights = scaled_weights(model, arch, plan, dtype)
    if plan.attn_implementation:
        model.set_attn_implementation(plan.attn_implementation)
    if verify:
        variants = {"fixed": lambda: use_fix(model, arch, plan, weights)}
        if dtype != torch.bfloat16:
            variants["bfloat16"] = lambda: cast_temporarily(model, torch.bfloat16)
        report.fidelity = measure_fidelity(model, tokenizer, heldout, variants, new_tokens=VERIFY_TOKENS,
                                           progress=progress)
        report.max_kl = max_kl if max_kl is not None else report.fidelity.get("bfloat16", report.fixed).kl_mean
        _gate(report)
    apply_fix(model, arch, plan, weights)
    model.config.dtype = dtype
    model.config.halfsafe = report.to_json()
    return model, report


def _gate(report: FixReport) -> None:
    fixed = report.fixed
    if fixed.nonfinite_share > 0:
        raise VerificationFailed(
            f"the fixed model still produced non-finite logits at {fixed.nonfinite_share:.1%} of positions; "
            "nothing was written; try a larger --margin or --strategy keep-fp32"
        )
    if fixed.kl_mean > report.max_kl:
        raise VerificationFailed(
            f"the fixed model's mean KL to fp32 ({fixed.kl_mean:.3g}) is above the bound ({report.max_kl:.3g}, "
            f"{'bfloat16' if 'bfloat16' in report.fidelity else '--max-kl'}); top-1 {fixed.top1:.4f}; "
            "nothing was written; try another --margin, or set --max-kl"
        )


def load_fixed(model: str, dtype: torch.dtype | str = torch.float16, *, device: str | None = None, **kwargs):
    """Load MODEL (directory, hub id, .gguf or 'demo'), fix it in memory, return (model, tokenizer).

    For people who never want a second checkpoint. `kwargs` go to `fix` (margin, max_kl,
    verify, calibration, heldout) or to loading (allow_pickle, trust_remote_code).
    """
    from .loading import load_model

    load_keys = {"allow_pickle", "trust_remote_code", "attn_implementation"}
    loaded = load_model(model, dtype=torch.float32, **{k: v for k, v in kwargs.items() if k in load_keys})
    if device is not None:
        loaded.model.to(device)
    fixed, _ = fix(loaded.model, loaded.tokenizer, dtype=dtype, **{k: v for k, v in kwargs.items() if k not in load_keys})
    return fixed, loaded.tokenizer
