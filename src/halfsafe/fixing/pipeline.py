"""The fix as one sequence of stages, run by a backend with a strategy.

Every way of fixing a model (`fix`, `fix --layerwise`, `compare`'s fp16-fixed, `load_fixed`,
the demo, `generate --dtype auto`) runs `run` below; the stages, in order:

1. roles    (rescale) `derive`: from the model itself, the residual stream's writers (x s), the
            readers that need compensating (x 1/s), the eps that move by s^2 and the interior
            (producer, consumer) pairs (see `roles/`). Refused roles are a HalfsafeError naming
            the reader; roles that are exact in memory only (`export_blockers`) are exported
            bounded (`bounded`) unless `exact_only`, where that is possible at all.
2. prove    (rescale) `prove`: the roles applied in fp32 at s = 2^-3 must reproduce the fp32
            logits of two calibration prompts, max |delta| <= EXACT_BOUND * max |logit|
            (measured: torch.equal); otherwise VerificationFailed (exit 4) naming the worst
            position and the first diverging module. Nothing has been written yet.
3. observe  max |x| per site in fp32 on the calibration prompts (`observe`).
4. plan     rescale: s = the largest 2^-k with every s-site * s <= dtype max / margin, and per
            interior pair t likewise (`plan.make_plan`, sites' roles measured by
            `roles.output_exponents`); keep-fp32: the layers that keep fp32 (`keep_fp32`).
5. verify   held-out prompts through the fixed model and plain bfloat16, against fp32
            (mean KL, top-1, non-finite share; `verify`).
   bounded  (an export of roles exact in memory only) after planning, the model as it will be
            reloaded (each eps as its config field gives it) is run in fp32 both ways of storing
            a conflicting field (`roles.bounded.reload_gate`); verification runs that model, in
            the target dtype and in fp32 (`bound_gate.AS_EXPORTED`).
6. gate     all finite and mean KL <= the bound (`gate.gate`); a bounded export also within
            `bound_gate.check_bounded`'s bounds; else VerificationFailed.
7. commit   the backend puts the fix in: in memory (weights swapped) or on disk (shards
            written one unit at a time); then `finalise`: eps x s^2, the attention kernel the
            plan needs, config.dtype and the config's `halfsafe` block.

A backend (`Backend`) owns what differs between holding the model and streaming it from disk;
the stages above exist once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ..dtypes import dtype_name
from ..errors import HalfsafeError
from ..roles import GateResult, Roles, applying_scales, eps_settings
from ..roles.bounded import ReloadResult, bounded_possible, export_settings
from .bound_gate import bounded_summary, check_bounded
from .gate import FixReport, VerificationFailed, gate
from .keep_fp32 import KeepPlan, plan_keep_fp32
from .observe import SiteStat
from .plan import Plan, SiteRoles, make_plan

STRATEGIES = ("rescale", "keep-fp32")
GATE_PROMPTS = 2  # calibration prompts the exactness gate runs (two are enough to catch a wrong role)
GATE_TOKENS = 128  # each cut to this many tokens: a wrong role shows at the first position it touches


@dataclass
class Rescaling:
    """The rescale strategy's fix: derived roles and a plan; `scales` and `settings` are what
    the backend writes (weights, eps)."""

    roles: Roles
    plan: Plan
    export: ReloadResult | None = None  # a bounded export: the eps as the checkpoint will reload them

    def scales(self) -> dict:
        """Parameter -> `formats.scale.Scale`: the plan's residual and pair scales through the roles."""
        return applying_scales(self.roles, self.plan.residual_scale, self.plan.mlp_scales)

    def settings(self, model: nn.Module) -> list[tuple[object, str, float]]:
        """(object, attribute, value): every eps the roles name, times s^2; for a bounded export,
        every eps as the checkpoint will reload it."""
        if self.plan.residual_scale == 1.0:
            return []
        if self.export is not None:
            return export_settings(model, self.roles, self.plan.residual_scale, self.export.scaled_fields)
        return eps_settings(model, self.roles, self.plan.residual_scale)


Fix = Rescaling | KeepPlan


class Backend(Protocol):
    """Where the stages run: the whole model in memory, or one unit at a time from disk."""

    model: nn.Module  # the model, or its skeleton: config, module tree, parameter names
    reloads_bounded: bool  # whether `reload_gate` can run (a bounded export needs the whole model)

    def roles(self) -> Roles: ...  # derived on the model (or on a narrow stand-in of its config)

    def prove(self, roles: Roles, prompts: list[str]) -> GateResult: ...  # the fp32 exactness gate

    def site_roles(self, roles: Roles, prompt: str) -> SiteRoles: ...  # which sites move with s, 1/s, t

    def observe(self, prompts: list[str], progress=None) -> list[SiteStat]: ...

    def verify(self, prompts: list[str], fix: Fix, dtype: torch.dtype, progress=None) -> dict: ...

    def commit(self, fix: Fix, dtype: torch.dtype, report: FixReport) -> None: ...

    # a bounded export only: the model as it will reload, in fp32 both ways of storing each
    # conflicting eps field, and the exact fix in `dtype` (`roles.bounded.reload_gate`)
    def reload_gate(self, fix: Fix, prompts: list[str], dtype: torch.dtype) -> ReloadResult: ...

    # keep-fp32 only (in memory): forward throughput of the fix over the all-`dtype` model
    def speed_ratio(self, fix: Fix, dtype: torch.dtype, prompt: str) -> float: ...


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise HalfsafeError(f"unknown strategy '{strategy}'; use one of {', '.join(STRATEGIES)}")


def derive(backend: Backend, *, for_export: bool = False, exact_only: bool = False) -> Roles:
    """Stage 1: the model's roles; refused roles, or roles a checkpoint cannot carry when the fix
    is to be exported (not even bounded, or `exact_only`), are a HalfsafeError."""
    roles = backend.roles()
    if roles.refused:
        more = f" ({len(roles.refusals)} reasons in all)" if len(roles.refusals) > 1 else ""
        raise HalfsafeError(f"{roles.model_class} cannot be rescaled exactly: {roles.refusals[0]}{more}; "
                            "use --strategy keep-fp32")
    if for_export and roles.export_blockers:
        bounded = bounded_possible(roles) and backend.reloads_bounded
        if exact_only or not bounded:
            hint = ("drop --exact-only to export it bounded (its fp32 delta measured and recorded), " if exact_only
                    and bounded else "drop --layerwise to export it bounded, " if bounded_possible(roles) else "")
            raise HalfsafeError(f"{roles.model_class} is rescaled exactly in memory but not as a checkpoint: "
                                f"{roles.export_blockers[0]}; {hint}drop --out and use halfsafe.load_fixed(MODEL) "
                                "in Python, or --strategy keep-fp32")
    return roles


def prove(backend: Backend, roles: Roles, calibration: list[str]) -> GateResult:
    """Stage 2: the exactness gate in fp32; VerificationFailed (exit 4) if it fails."""
    result = backend.prove(roles, calibration[:GATE_PROMPTS])
    if not result.passed:
        raise VerificationFailed(f"the derived roles are not exact on this model, nothing was written: "
                                 f"{result.describe()}")
    return result


def plan_rescale(sites: list[SiteStat], site_roles: SiteRoles, *, architecture: str, dtype: torch.dtype,
                 margin: float, attn_implementation: str) -> Plan:
    """Stage 4 (rescale): the plan from an fp32 observation; refuses what scaling cannot fix."""
    plan = make_plan(sites, site_roles, architecture=architecture, dtype=dtype, margin=margin,
                     attn_implementation=attn_implementation)
    if plan.unfixable:
        raise HalfsafeError(
            f"rescaling cannot bring {plan.unfixable[0]} below the {dtype_name(dtype)} limit "
            f"({len(plan.unfixable)} site(s) in all); use --strategy keep-fp32"
        )
    return plan


def rescaling(backend: Backend, calibration: list[str], *, dtype: torch.dtype, margin: float,
              sites: list[SiteStat] | None = None, for_export: bool = False, exact_only: bool = False,
              progress=None) -> tuple[Rescaling, GateResult, list[SiteStat]]:
    """Stages 1-4 for the rescale strategy: roles, proof, observation (unless `sites` is given), plan;
    for a bounded export, the model as reloaded measured in fp32."""
    roles = derive(backend, for_export=for_export, exact_only=exact_only)
    proof = prove(backend, roles, calibration)
    if sites is None:
        sites = backend.observe(calibration, progress)
    plan = plan_rescale(sites, backend.site_roles(roles, calibration[0]), architecture=roles.model_class,
                        dtype=dtype, margin=margin,
                        attn_implementation=backend.model.config._attn_implementation or "eager")
    fix = Rescaling(roles, plan)
    if for_export and roles.export_blockers and plan.residual_scale != 1.0:  # at s = 1 nothing moves: exact
        fix.export = backend.reload_gate(fix, calibration[:GATE_PROMPTS], dtype)
    return fix, proof, sites


def run(backend: Backend, *, dtype: torch.dtype, strategy: str, margin: float, calibration: list[str],
        heldout: list[str], max_kl: float | None, verify: bool, sites: list[SiteStat] | None = None,
        for_export: bool = False, exact_only: bool = False, progress=None) -> FixReport:
    """Every stage in order; returns the report once the backend has committed the fix."""
    check_strategy(strategy)
    proof = None
    if strategy == "rescale":
        fix, proof, sites = rescaling(backend, calibration, dtype=dtype, margin=margin, sites=sites,
                                      for_export=for_export, exact_only=exact_only, progress=progress)
        plan = fix.plan
    else:
        if sites is None:
            sites = backend.observe(calibration, progress)
        fix = plan = plan_keep_fp32(backend.model, sites, dtype=dtype, margin=margin)
    report = FixReport(plan, strategy=strategy, calibration_prompts=len(calibration),
                       verification_prompts=len(heldout) if verify else 0)
    if proof is not None:
        report.exactness = {"max_delta": proof.max_delta, "relative": proof.relative, "equal": proof.equal,
                            "prompts": min(GATE_PROMPTS, len(calibration)),
                            # as a checkpoint: roles exact in memory only are not, unless nothing moves (s = 1)
                            "exact": not (fix.roles.export_blockers and fix.plan.residual_scale != 1.0)}
        if fix.export is not None:
            report.exactness["bounded"] = bounded_summary(fix.export)
        report.roles = fix.roles
    if verify:
        report.fidelity = backend.verify(heldout, fix, dtype, progress)
        gate(report, dtype, max_kl)
    if strategy == "rescale" and fix.export is not None:
        check_bounded(report, fix.export)
    if strategy == "keep-fp32":
        report.speed_ratio = backend.speed_ratio(fix, dtype, heldout[0])
    backend.commit(fix, dtype, report)
    return report


def finalise(model: nn.Module, fix: Fix, dtype: torch.dtype, report: FixReport) -> None:
    """Stage 7's end, for both backends: the eps x s^2, the plan's attention kernel, the config's
    dtype and `halfsafe` block (what an exported config carries)."""
    if isinstance(fix, Rescaling):
        for obj, attr, value in fix.settings(model):
            setattr(obj, attr, value)
        if fix.plan.attn_implementation:
            model.set_attn_implementation(fix.plan.attn_implementation)
    model.config.dtype = dtype
    model.config.halfsafe = report.to_json()
