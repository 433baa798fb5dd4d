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
from .keeping import KeepPlan, apply_keep_fp32, plan_keep_fp32, use_keep_fp32
from .observing import SiteStat, encode, find_decoder_layers, observe
from .planning import PLANNING_MARGIN, Plan, make_plan
from .precision import cast_temporarily
from .prompts import CALIBRATION, HELDOUT, bundled_prompts, check_prompt_lengths
from .registry import architecture_of
from .timing import now
from .verifying import Fidelity, measure_fidelity

VERIFY_TOKENS = 32


class VerificationFailed(HalfsafeError):
    """The fixed model did not pass the gate; nothing was written."""

    exit_code = 4


@dataclass
class FixReport:
    plan: Plan | KeepPlan
    strategy: str = "rescale"
    speed_ratio: float | None = None  # keep-fp32: forward throughput over the all-half model
    fidelity: dict[str, Fidelity] = field(default_factory=dict)  # "fixed", "bfloat16"
    max_kl: float | None = None  # the gate's KL bound (from plain bf16's mean KL unless set; see `gate`)
    calibration_prompts: int = 0
    verification_prompts: int = 0

    @property
    def fixed(self) -> Fidelity | None:
        return self.fidelity.get("fixed")

    def to_json(self) -> dict:
        return {
            "version": __version__,
            "strategy": self.strategy,
            "plan": self.plan.to_json(),
            "speed_ratio": self.speed_ratio,
            "calibration_prompts": self.calibration_prompts,
            "verification": {
                "prompts": self.verification_prompts,
                "max_kl": self.max_kl,
                **{name: f.to_json() for name, f in self.fidelity.items()},
            },
        }


STRATEGIES = ("rescale", "keep-fp32")


def fix(
    model: nn.Module,
    tokenizer,
    *,
    dtype: torch.dtype | str = torch.float16,
    strategy: str = "rescale",
    margin: float = PLANNING_MARGIN,
    calibration: list[str] | None = None,
    heldout: list[str] | None = None,
    max_kl: float | None = None,
    verify: bool = True,
    observation: list[SiteStat] | None = None,
    progress=None,
) -> tuple[nn.Module, FixReport]:
    """Make `model` (fp32, changed in place) run in `dtype` without overflow.

    strategy "rescale" (the fix): power-of-two rescaling of the weights, then the whole model
    is cast to `dtype`; needs a registry entry. "keep-fp32" (the fallback, any architecture):
    the overflowing layers keep fp32 weights and arithmetic, through hooks that need halfsafe.

    Verification (unless `verify=False`) compares the result on held-out prompts with the
    fp32 model, next to plain bfloat16: any non-finite logit, or a mean KL above the bound (see
    `gate`; `max_kl` sets it), raises VerificationFailed and leaves the model untouched. Greedy decoding is
    compared for the fixed model only (bfloat16's is `compare`'s business).

    `observation`: the sites of an fp32 observation already made on the calibration prompts
    (e.g. `diagnose(...).sites`), to skip observing again.
    """
    dtype = parse_dtype(dtype)
    if strategy not in STRATEGIES:
        raise HalfsafeError(f"unknown strategy '{strategy}'; use one of {', '.join(STRATEGIES)}")
    if next(model.parameters()).dtype != torch.float32:
        raise HalfsafeError("fix starts from float32 weights; load the model with dtype=torch.float32")
    arch = architecture_of(model) if strategy == "rescale" else None
    calibration = calibration or bundled_prompts(CALIBRATION)
    heldout = heldout or bundled_prompts(HELDOUT)
    check_prompt_lengths(model, tokenizer, calibration, what="calibration prompt")
    check_prompt_lengths(model, tokenizer, heldout, reserve=VERIFY_TOKENS if verify else 0, what="held-out prompt")
    if observation is None:
        observation = observe(model, tokenizer, calibration, progress=progress).sites()
    if strategy == "rescale":
        plan = plan_rescale(model, observation, dtype=dtype, margin=margin)
        weights = scaled_weights(model, arch, plan, dtype)
        variant = lambda: use_fix(model, arch, plan, weights)  # noqa: E731
        commit = lambda: apply_fix(model, arch, plan, weights)  # noqa: E731
    else:
        plan = plan_keep_fp32(model, observation, dtype=dtype, margin=margin)
        variant = lambda: use_keep_fp32(model, plan, dtype)  # noqa: E731
        commit = lambda: apply_keep_fp32(model, plan, dtype)  # noqa: E731
    report = FixReport(plan, strategy=strategy, calibration_prompts=len(calibration),
                       verification_prompts=len(heldout))
    if verify:
        variants = {"fixed": variant, "bfloat16": lambda: cast_temporarily(model, torch.bfloat16)}
        report.fidelity = measure_fidelity(model, tokenizer, heldout, variants, new_tokens=VERIFY_TOKENS,
                                           greedy=("fixed",), progress=progress)
        gate(report, dtype, max_kl)
    if strategy == "keep-fp32":
        report.speed_ratio = _speed_ratio(model, tokenizer, heldout[0], variant, dtype)
    commit()
    model.config.dtype = dtype
    model.config.halfsafe = report.to_json()
    return model, report


def plan_rescale(model: nn.Module, observation: list[SiteStat], *, dtype: torch.dtype, margin: float) -> Plan:
    """The rescaling plan for `model` from an fp32 observation; refuses what it cannot fix."""
    plan = make_plan(
        observation, architecture_of(model), len(find_decoder_layers(model)[1]), dtype=dtype, margin=margin,
        attn_implementation=model.config._attn_implementation or "eager", tied=is_tied(model),
    )
    if plan.unfixable:
        raise HalfsafeError(
            f"rescaling cannot bring {plan.unfixable[0]} below the {dtype_name(dtype)} limit "
            f"({len(plan.unfixable)} site(s) in all); use --strategy keep-fp32"
        )
    return plan


def _speed_ratio(model, tokenizer, prompt: str, variant, dtype: torch.dtype, repeats: int = 3) -> float:
    """Forward throughput of `variant` over the all-`dtype` model (values do not matter here)."""
    batch = encode(tokenizer, prompt, next(model.parameters()).device)

    def best_time() -> float:
        times = []
        for _ in range(repeats):
            started = now()
            model(**batch, use_cache=False)
            times.append(now() - started)
        return min(times)

    with torch.inference_mode():
        with variant():
            kept = best_time()
        with cast_temporarily(model, dtype):
            plain = best_time()
    return plain / kept


# A bfloat16 target's bound is plain bfloat16's mean KL times this. Rescaling by powers of two
# commutes with rounding, so the fixed model's KL equals plain bfloat16's (ratio 1.000 on the nine
# tiny architectures, scale 1 and 2^-2 alike, AMD EPYC); the 25% is room for kernels that sum in
# another order. What it catches: a plan whose scales push values out of bfloat16's precision
# (Gemma's (1 + w) gains at scale 2^-22: 9,300x plain bfloat16's KL). See docs/numerics.md.
BF16_TARGET_SLACK = 1.25


def gate(report: FixReport, dtype: torch.dtype, max_kl: float | None = None) -> None:
    """The verification gate: raise VerificationFailed unless the fixed model is all finite and its
    mean KL to fp32 is at most `max_kl`, by default plain bfloat16's (both in `report.fidelity`).

    Against bfloat16 on purpose, whatever the target: for float16 it is the alternative a user
    would otherwise choose (and has 3 fewer mantissa bits, so a sound fix beats it by ~50x); for
    bfloat16 it is the same model without the fix, which the fix must not make worse
    (`BF16_TARGET_SLACK`). Sets `report.max_kl` to the bound used.
    """
    if max_kl is None:
        plain = report.fidelity["bfloat16"].kl_mean
        report.max_kl, bound = (plain * BF16_TARGET_SLACK, "bfloat16 without the fix") if dtype == torch.bfloat16 \
            else (plain, "bfloat16")
    else:
        report.max_kl, bound = max_kl, "--max-kl"
    fixed = report.fixed
    if fixed.nonfinite_share > 0:
        raise VerificationFailed(
            f"the fixed model still produced non-finite logits at {fixed.nonfinite_share:.1%} of positions; "
            "nothing was written; try a larger --margin or --strategy keep-fp32"
        )
    if fixed.kl_mean > report.max_kl:
        raise VerificationFailed(
            f"the fixed model's mean KL to fp32 ({fixed.kl_mean:.3g}) is above the bound ({report.max_kl:.3g}, "
            f"{bound}); top-1 {fixed.top1:.4f}; "
            "nothing was written; try another --margin, or set --max-kl"
        )


def load_fixed(model: str, dtype: torch.dtype | str = torch.float16, *, device: str | None = None, **kwargs):
    """Load MODEL (directory, hub id, .gguf or 'demo'), fix it in memory, return (model, tokenizer).

    For people who never want a second checkpoint. `kwargs` go to `fix` (strategy, margin,
    max_kl, verify, calibration, heldout) or to loading (allow_pickle, trust_remote_code,
    attn_implementation).
    """
    from .loading import load_model

    load_keys = {"allow_pickle", "trust_remote_code", "attn_implementation"}
    loaded = load_model(model, dtype=torch.float32, **{k: v for k, v in kwargs.items() if k in load_keys})
    if device is not None:
        loaded.model.to(device)
    fix_options = {k: v for k, v in kwargs.items() if k not in load_keys}
    fixed, _ = fix(loaded.model, loaded.tokenizer, dtype=dtype, **fix_options)
    return fixed, loaded.tokenizer
