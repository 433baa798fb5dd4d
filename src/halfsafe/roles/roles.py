"""The derived roles of a model: a plain value (printable, serialisable, testable without a model).

`scales` maps a parameter name to [exponent, offset]: for a residual scale s the parameter
becomes `(offset + p) * s**exponent - offset` (exponent 1 for writers, -1 for a linear reader or
the input side of a tied embedding's other use; a gain with Gemma's `1 + w` convention has
offset 1). `eps` lists the (module, attribute) pairs multiplied by s^2 and `config_eps` the
config fields that carry them into an exported checkpoint. A non-empty `refusals` means the
model must not be rescaled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class Roles:
    model_class: str
    scales: dict[str, list] = field(default_factory=dict)  # parameter -> [exponent of s, gain offset]
    eps: list[tuple[str, str]] = field(default_factory=list)  # (module, attribute): value * s^2
    config_eps: list[str] = field(default_factory=list)  # config fields: value * s^2
    writers: list[str] = field(default_factory=list)  # modules whose output is added into the stream
    readers: dict[str, str] = field(default_factory=dict)  # module -> how it is kept exact
    companions: list[str] = field(default_factory=list)  # non-reading norms sharing the readers' eps
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (producer, consumer) inside a sublayer
    interior: dict[str, dict[str, int]] = field(default_factory=dict)  # 'producer->consumer' -> {param: exponent of t}
    refusals: list[str] = field(default_factory=list)
    export_blockers: list[str] = field(default_factory=list)  # exact in memory, not as a checkpoint
    # What a bounded export (roles/bounded.py) needs to know about those blockers: "module:attr" ->
    # the config field a reloaded checkpoint builds that eps from (readers' and `kept_eps`' alike);
    # the norms built from a readers' field whose input cannot scale (they keep their eps in
    # memory); and why no bounded export is possible either (the class cannot be rebuilt).
    eps_source: dict[str, str] = field(default_factory=dict)
    kept_eps: list[tuple[str, str]] = field(default_factory=list)
    export_refusals: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def refused(self) -> bool:
        return bool(self.refusals)

    def factors(self, s: float, interior: dict[str, float] | None = None) -> dict[str, tuple[float, float]]:
        """Parameter -> (factor, offset) for residual scale s and, per pair 'producer->consumer'
        in `interior`, its scale t; parameters not listed are unchanged."""
        found = {name: [s**exponent, offset] for name, (exponent, offset) in self.scales.items()}
        for pair, t in (interior or {}).items():
            for name, exponent in self.interior[pair].items():
                found.setdefault(name, [1.0, 0.0])[0] *= t**exponent
        return {name: (factor, offset) for name, (factor, offset) in found.items() if factor != 1.0}

    def site_roles(self, exponents: dict[str, int]) -> tuple[dict[str, str], dict[str, str]]:
        """What planning needs (`fixing.pipeline.Backend.site_roles`' form): site -> 's' (its output
        moves with the residual scale), '1/s', or 't' (inside an interior pair), and for 't' sites the pair
        ('producer->consumer') whose t applies. `exponents`: `gate.output_exponents`' result."""
        roles = {site: {1: "s", -1: "1/s"}[k] for site, k in exponents.items() if k in (1, -1)}
        pairs = {}
        for pair in self.interior:
            producer, consumer = pair.split("->")
            for site in (producer, f"{consumer}:input"):
                roles[site], pairs[site] = "t", pair
        return roles, pairs

    def without(self, module: str) -> Roles:
        """A copy with `module`'s parameters dropped from the scales (to show the gate can fail)."""
        data = self.to_json()
        data["scales"] = {n: v for n, v in data["scales"].items() if n.rsplit(".", 1)[0] != module}
        data["writers"] = [w for w in data["writers"] if w != module]
        return Roles.from_json(data)

    def summary(self) -> dict:
        """What an exported config and the CLI say about the roles: counts, not names."""
        kinds: dict[str, int] = {}
        for how in self.readers.values():
            # 'scale-invariant[: eps x s^2]', 'linear: weight x 1/s', 'uses P: input x 1/s' (a tied head)
            kind = {"linear": "linear x 1/s", "uses": "input x 1/s"}.get(how.split(":")[0].split()[0],
                                                                           "scale-invariant")
            kinds[kind] = kinds.get(kind, 0) + 1
        return {"model_class": self.model_class, "writers": len(self.writers), "readers": kinds,
                "scaled_parameters": len(self.scales), "eps_fields": list(self.config_eps),
                "interior_pairs": len(self.interior)}

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, data: dict) -> Roles:
        data = dict(data)
        data["eps"] = [tuple(x) for x in data.get("eps", [])]
        data["pairs"] = [tuple(x) for x in data.get("pairs", [])]
        data["kept_eps"] = [tuple(x) for x in data.get("kept_eps", [])]
        return cls(**data)

    def describe(self) -> str:
        lines = [f"{self.model_class}: {len(self.writers)} writer module(s), {len(self.readers)} reader(s), "
                 f"{len(self.scales)} scaled parameter(s), eps x s^2 in {len(self.eps)} module(s)"
                 + (f" and config {', '.join(self.config_eps)}" if self.config_eps else "")]
        lines += [f"  refused: {r}" for r in self.refusals]
        lines += [f"  export not exact: {n}" for n in self.export_blockers]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
