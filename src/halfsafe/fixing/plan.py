"""Plan: choose power-of-two scales from an fp32 observation. A plan is a plain value.

- `residual_scale` s multiplies the residual stream: every writer (embedding, attention and
  MLP outputs, or Gemma's post-norms) is scaled by s; the readers are RMSNorms, which are
  scale-invariant, so the function is unchanged.
- `mlp_scales[pair]` t multiplies the interior of a (producer, consumer) pair inside a sublayer
  ('producer->consumer', e.g. an MLP's up -> down or attention's v -> o): the producer *= t,
  the consumer's weight *= 1/t, so the values between them shrink and the output does not change.

Which sites move with s, 1/s or a pair's t comes from the model's derived roles
(`Roles.site_roles`).

Each scale is the largest power of two that brings its sites below `dtype max / margin`:
a power of two is exact in floating point, and scaling further than needed pushes small
values toward float16's subnormals and makes the norms' eps significant (docs/numerics.md:
s = 1/8 gave KL 7e-7 on a tiny Qwen3, s = 1/64 gave 1e-2).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from ..dtypes import dtype_max, dtype_name
from ..errors import HalfsafeError
from .observe import ATTN_LOGITS, EMBEDDING, RESIDUAL, SiteStat

# fix: the plan brings every site this factor below the dtype's maximum, so inputs unlike the
# calibration prompts have room to grow (see docs/numerics.md).
PLANNING_MARGIN = 4.0


@dataclass
class Plan:
    architecture: str
    dtype: str
    margin: float
    residual_scale: float = 1.0
    mlp_scales: dict[str, float] = field(default_factory=dict)  # 'producer->consumer' -> t, where t != 1
    attn_implementation: str | None = None  # "sdpa" where eager attention logits would overflow
    max_before: float = 0.0
    site_before: str = ""
    max_after: float = 0.0
    site_after: str = ""
    unfixable: list[str] = field(default_factory=list)  # sites still over the limit after scaling

    @property
    def is_identity(self) -> bool:
        return self.residual_scale == 1.0 and not self.mlp_scales

    def to_json(self) -> dict:
        data = asdict(self)
        data["mlp_scales"] = dict(sorted(self.mlp_scales.items()))
        return data

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        data = dict(data)
        data["mlp_scales"] = {str(k): float(v) for k, v in data.get("mlp_scales", {}).items()}
        return cls(**data)

    def describe(self) -> str:
        if self.is_identity and not self.attn_implementation:
            return (f"no rescaling needed: largest value {self.max_before:,.0f} at {self.site_before} is already "
                    f"{self.margin:g}x below the {self.dtype} limit (scale 1, weights unchanged)")
        parts = [f"residual stream x {_power(self.residual_scale)}"]
        if self.mlp_scales:
            inner = ", ".join(f"{pair}: {_power(t)}" for pair, t in sorted(self.mlp_scales.items()))
            parts.append(f"interior x ({inner})")
        if self.attn_implementation:
            parts.append(f"attention must run {self.attn_implementation} (eager q.k overflows)")
        return (f"{'; '.join(parts)}; max {self.max_before:,.0f} ({self.site_before}) -> "
                f"{self.max_after:,.0f} ({self.site_after})")

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)


def _power(scale: float) -> str:
    exponent = round(math.log2(scale))
    return f"2^{exponent}" if exponent else "1"


def power_of_two_scale(value: float, target: float) -> float:
    """The largest 2^-k (k >= 0) with value * 2^-k <= target."""
    if not math.isfinite(value):
        raise HalfsafeError(f"cannot scale a non-finite observation ({value}): the model overflows even float32; "
                            "nothing can be rescaled")
    if value <= target:
        return 1.0
    return 2.0 ** -math.ceil(math.log2(value / target))


SiteRoles = tuple[dict[str, str], dict[str, str]]  # (site -> 's', '1/s' or 't'; 't' site -> its pair)


def make_plan(
    sites: list[SiteStat],
    site_roles: SiteRoles,
    *,
    architecture: str,
    dtype,
    margin: float = PLANNING_MARGIN,
    attn_implementation: str = "sdpa",
) -> Plan:
    """Scales for `sites` (an fp32 observation) so that every scaled site ends below limit / margin.
    `site_roles`: which sites move with s, 1/s or a pair's t (`Roles.site_roles` or `site_roles`)."""
    if margin < 1:
        raise HalfsafeError(f"margin {margin} must be at least 1 (a factor below the dtype's maximum)")
    limit = dtype_max(dtype)
    target = limit / margin
    roles, role_pairs = site_roles

    def role(site: SiteStat) -> str:
        if site.kind in (RESIDUAL, EMBEDDING):
            return "s"
        return roles.get(site.name, "1")

    residual = max((s.max_abs for s in sites if role(s) == "s"), default=0.0)
    s = power_of_two_scale(residual, target)
    interiors: dict[str, float] = {}
    for site in sites:
        if role(site) == "t":
            pair = role_pairs[site.name]
            interiors[pair] = max(interiors.get(pair, 0.0), site.max_abs)
    mlp_scales = {i: t for i, v in interiors.items() if (t := power_of_two_scale(v, target)) != 1.0}

    def after(site: SiteStat) -> float:
        factor = {"s": s, "1/s": 1 / s, "t": mlp_scales.get(role_pairs.get(site.name), 1.0)}.get(role(site), 1.0)
        return site.max_abs * factor

    eager_qk = [x for x in sites if x.kind == ATTN_LOGITS and x.max_abs > limit]
    counted = [x for x in sites if x.kind != ATTN_LOGITS]
    top_before = max(counted, key=lambda x: x.max_abs)
    top_after = max(counted, key=after)
    return Plan(
        architecture=architecture,
        dtype=dtype_name(dtype),
        margin=margin,
        residual_scale=s,
        mlp_scales=dict(sorted(mlp_scales.items())),
        # Weights cannot shrink q.k without changing the softmax temperature; sdpa never
        # materialises the unscaled product, so it is the fix. Recorded only if it matters.
        attn_implementation="sdpa" if eager_qk and attn_implementation == "eager" else None,
        max_before=top_before.max_abs,
        site_before=top_before.name,
        max_after=after(top_after),
        site_after=top_after.name,
        unfixable=[x.name for x in counted if after(x) > limit],
    )
