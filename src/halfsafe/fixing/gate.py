"""The verification gate and the report it fills: one for every way `fix` runs.

`gate` decides from measured fidelity (see `fixing.verify`) whether the fixed model may be kept or
written; `FixReport.to_json()` is the `halfsafe` block of an exported config (read by the vLLM
plugin: keys "version", "strategy", "plan", "verification" with "fixed", "bfloat16", "max_kl").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import __version__
from ..errors import HalfsafeError
from ..roles import Roles, applying_scales
from .keep_fp32 import KeepPlan
from .plan import Plan
from .verify import Fidelity


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
    exactness: dict | None = None  # rescale: the fp32 gate's max_delta, relative, equal, prompts
    roles: Roles | None = None  # rescale: the derived roles (a summary goes into the config)

    @property
    def fixed(self) -> Fidelity | None:
        return self.fidelity.get("fixed")

    def scales(self) -> dict:
        """Parameter -> `formats.Scale`: what the rescale strategy multiplied (a format writes it)."""
        if self.strategy != "rescale" or self.roles is None:
            return {}
        return applying_scales(self.roles, self.plan.residual_scale, self.plan.mlp_scales)

    def to_json(self, *, full_roles: bool = False) -> dict:
        """The report as the exported config's `halfsafe` block carries it; `full_roles`: every
        derived role by name (for --plan-json) rather than their counts."""
        roles = None if self.roles is None else self.roles.to_json() if full_roles else self.roles.summary()
        return {
            "version": __version__,
            "strategy": self.strategy,
            "plan": self.plan.to_json(),
            "speed_ratio": self.speed_ratio,
            "calibration_prompts": self.calibration_prompts,
            **({"exactness": self.exactness} if self.exactness is not None else {}),
            **({"roles": roles} if roles is not None else {}),
            "verification": {
                "prompts": self.verification_prompts,
                "max_kl": self.max_kl,
                **{name: f.to_json() for name, f in self.fidelity.items()},
            },
        }


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
