"""When a bounded export may be written: its fp32 error far below the float16 error it ships with.

`roles.bounded` measures, in fp32, the model exactly as a checkpoint reloads it (every eps as
its config field will give it) against the original. That distance is the price of exporting
roles that are exact only in memory. What float16 costs anyway is the rounding error of the exact
fix (in memory, every eps x s^2) run in float16. The verification measures all three on the
same held-out prompts against the fp32 original (`AS_EXPORTED`, `ROUNDING` beside "fixed", the
export in float16), and the export is allowed when both hold:

- mean KL(fp32 original || fp32 as exported) <= `KL_SHARE` x mean KL(fp32 original || exact fix
  in float16): on average the bounded part is at most a tenth of float16's rounding error, so it
  cannot change the float16 verification's verdict (KLs of small independent perturbations add,
  to first order);
- max |delta logit| of the fp32 export <= `MAX_SHARE` x the exact float16 fix's max |delta logit|:
  a mean can hide one position; this keeps every logit within the worst error float16 rounding
  already makes.

Both sides of every conflicting field were measured in fp32 first (`reload_gate`, on the
calibration prompts); the closer one is exported, and the bounds are checked on those prompts and
on the held-out ones. Anything not within them is refused (`VerificationFailed`) with its numbers.
"""

from __future__ import annotations

from ..roles.bounded import ReloadResult
from .gate import FixReport, VerificationFailed

KL_SHARE = 0.1
MAX_SHARE = 1.0
AS_EXPORTED = "fp32 as exported"  # the verification's name for the bounded model run in fp32
ROUNDING = "float16 exact in memory"  # ... and for the exact (in-memory) fix run in the target dtype


def bounded_summary(result: ReloadResult) -> dict:
    """The `exactness.bounded` block of an exported config: the choice, its measured distance, the bounds."""
    return {**result.to_json(), "kl_share_bound": KL_SHARE, "max_share_bound": MAX_SHARE}


def outside_bound(delta_fp32: float, kl_fp32: float, delta_float16: float, kl_float16: float) -> str | None:
    """Why an export whose fp32 logits moved by max |delta| `delta_fp32` and mean KL `kl_fp32`,
    beside the exact fix's float16 rounding error `delta_float16` and `kl_float16` (all against the
    fp32 original, on the same prompts), is not within the bound; None when it is."""
    if not kl_fp32 <= KL_SHARE * max(kl_float16, 0.0):
        return f"fp32 mean KL {kl_fp32:.2g}, above {KL_SHARE:g} x float16 rounding's {kl_float16:.2g}"
    if not delta_fp32 <= MAX_SHARE * delta_float16:
        return f"fp32 max |delta logit| {delta_fp32:.2g}, above {MAX_SHARE:g} x float16 rounding's {delta_float16:.2g}"
    return None


def check_bounded(report: FixReport, result: ReloadResult) -> None:
    """Raise VerificationFailed unless the bounded export is within both bounds, on the held-out
    prompts and on the calibration prompts the reload gate ran; record the numbers in
    `report.exactness['bounded']`."""
    block = report.exactness.setdefault("bounded", bounded_summary(result))
    rounding, as_exported = report.fidelity.get(ROUNDING), report.fidelity.get(AS_EXPORTED)
    if rounding is None or as_exported is None:
        raise VerificationFailed("a bounded export is judged against its float16 verification, which did not run; "
                                 "nothing was written; drop --no-verify, or pass --exact-only to refuse it")
    block.update(heldout_kl_mean=as_exported.kl_mean, heldout_max_delta=as_exported.max_delta,
                 float16_kl_mean=rounding.kl_mean, float16_max_delta=rounding.max_delta, passed=False)
    why = outside_bound(as_exported.max_delta, as_exported.kl_mean, rounding.max_delta, rounding.kl_mean)
    if why is None and result.target is not None:  # and on the calibration prompts the reload gate ran
        why = outside_bound(result.chosen.max_delta, result.chosen.kl_mean, result.target.max_delta,
                            result.target.kl_mean)
        why = why and f"{why} (calibration prompts)"
    if why:
        where = ", ".join(result.kept_norms[:2] + result.unstored[:2]) or "a norm"
        raise VerificationFailed(
            f"a checkpoint of these roles is not exact (one eps per config field: {where}) and its fp32 error is not "
            f"far below float16's: {why}; nothing was written; use halfsafe.load_fixed(MODEL) in Python, or "
            "--strategy keep-fp32")
    block["passed"] = True


def describe_bounded(exactness: dict | None) -> str | None:
    """One line for `fix`: what is bounded and by how much; None for an exact export."""
    block = (exactness or {}).get("bounded")
    if not block:
        return None
    stored = ", ".join(block["scaled_fields"]) or "no field"
    kept = len(block["kept_norms"])
    unstored = len(block["unstored_eps"])
    why = "; ".join(filter(None, [f"{kept} norm(s) that cannot scale see eps x s^2" if kept and block["scaled_fields"]
                                  else f"{kept} norm(s) keep eps, the readers see it unscaled" if kept else "",
                                  f"{unstored} eps in no config field reload unscaled" if unstored else ""]))
    line = (f"export bounded, not bit-exact (exact: false): eps x s^2 stored in {stored} ({why}); fp32 as reloaded: "
            f"max |delta logit| {block['max_delta']:.1e} on the calibration prompts")
    if block.get("heldout_kl_mean") is not None:
        line += (f"; held-out mean KL {block['heldout_kl_mean']:.1e} (float16 rounding's "
                 f"{block['float16_kl_mean']:.1e}, bound {block['kl_share_bound']:g}x), max |delta logit| "
                 f"{block['heldout_max_delta']:.1e} (float16 rounding's {block['float16_max_delta']:.1e})")
    return line
