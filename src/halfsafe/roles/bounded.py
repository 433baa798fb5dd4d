"""A bounded export: roles exact in memory, whose checkpoint cannot store every eps exactly.

A checkpoint stores one eps per config field, and a reloaded model gives that value to every
module built from the field. Two cases break exactness there (`Roles.export_blockers`):
- a norm built from a readers' field whose input does not move with the stream
  (`Roles.kept_eps`: Qwen 3.5's `linear_attn.norm`, Llama 4's `qk_norm`, a Mamba mixer's gated
  norm) needs eps while the readers need eps x s^2: one field cannot hold both;
- a reader's eps comes from no field (OPT, DBRX: a class default), so it reloads unscaled.

Either way the reloaded model differs from the original by a change of eps on one side: a norm
computing x / sqrt(ms(x) + eps) that should have used eps' moves by about
|eps - eps'| / (2 (ms(x) + eps)) relative, which is small where eps is small beside the mean
square it is added to. So each conflicting field is tried both ways (stored x s^2: the readers
exact, the kept norms see eps x s^2; stored as it was: the kept norms exact, the readers see
eps / s^2 relative to their input), the model is run in fp32 exactly as it will be reloaded,
and the choice closer to the original fp32 logits is kept, with its measured distance
(`ReloadResult`). Whether that distance is small enough is `fixing.bound_gate`'s decision.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import HalfsafeError
from .gate import scaled_parameters, swapped
from .provenance import text_config
from .roles import Roles

MAX_CHOICES = 16  # 2^4 combinations of conflicting fields at most; no covered type has more than 1


def bounded_possible(roles: Roles) -> bool:
    """True when the roles are exact in memory only and a checkpoint can still hold them up to a
    change of eps (not when the class cannot even be rebuilt from its config)."""
    return bool(roles.export_blockers) and not roles.export_refusals


def conflicting_fields(roles: Roles) -> list[str]:
    """The config fields that both a reader (eps x s^2) and a kept norm (eps) are built from."""
    kept = {roles.eps_source[f"{m}:{a}"] for m, a in roles.kept_eps if f"{m}:{a}" in roles.eps_source}
    readers = {roles.eps_source[f"{m}:{a}"] for m, a in roles.eps if f"{m}:{a}" in roles.eps_source}
    return sorted(kept & readers)


def exact_fields(roles: Roles) -> list[str]:
    """The readers' fields no kept norm shares: always stored x s^2."""
    conflicting = set(conflicting_fields(roles))
    return sorted({roles.eps_source[f"{m}:{a}"] for m, a in roles.eps if f"{m}:{a}" in roles.eps_source}
                  - conflicting)


def unstored_eps(roles: Roles) -> list[str]:
    """The readers' eps no config field holds: a reloaded checkpoint has them unscaled."""
    return [f"{m}.{a}" for m, a in roles.eps if f"{m}:{a}" not in roles.eps_source]


def export_settings(model: nn.Module, roles: Roles, s: float, scaled_fields: set[str] | list[str]
                    ) -> list[tuple[object, str, float]]:
    """(object, attribute, value): every eps of the rescaled model as a checkpoint reloads it when
    the config fields in `scaled_fields` are stored x s^2 and every other field as it was. Each
    module's eps follows its field (`Roles.eps_source`, found by rebuilding the class); a reader
    with no field keeps its class default, i.e. its original value."""
    scaled_fields = set(scaled_fields)
    settings = []
    for m, a in [*roles.eps, *roles.kept_eps]:
        module = model.get_submodule(m)
        factor = s * s if roles.eps_source.get(f"{m}:{a}") in scaled_fields else 1.0
        settings.append((module, a, getattr(module, a) * factor))
    config = text_config(model.config)
    settings += [(config, f, getattr(config, f) * s * s) for f in sorted(scaled_fields)]
    return settings


@contextmanager
def running_as_exported(model: nn.Module, roles: Roles, s: float, scaled_fields, interior=None):
    """Run `model` (fp32) rescaled by s with the eps a reloaded checkpoint would have; every weight
    and eps is restored exactly after."""
    new, settings = scaled_parameters(model, roles, s, interior), export_settings(model, roles, s, scaled_fields)
    with swapped(model, new, settings):
        yield model


@dataclass
class Candidate:
    scaled_fields: list[str]  # config fields stored x s^2 (the others as they were)
    max_delta: float  # max |delta logit| against the original, fp32
    relative: float  # max_delta / max |logit|
    kl_mean: float  # mean over positions of KL(original || as exported), fp32
    kl_max: float


@dataclass
class ReloadResult:
    """The fp32 distance of the model as it will be reloaded, for the choice kept, and every
    choice measured (`candidates`)."""

    s: float
    chosen: Candidate
    candidates: list[Candidate] = field(default_factory=list)
    kept_norms: list[str] = field(default_factory=list)  # modules that see eps x s^2 or are kept at eps
    unstored: list[str] = field(default_factory=list)
    target: Candidate | None = None  # the exact (in-memory) fix in the target dtype: its rounding error

    @property
    def scaled_fields(self) -> list[str]:
        return self.chosen.scaled_fields

    def to_json(self) -> dict:
        return {"s": self.s, "scaled_fields": self.chosen.scaled_fields, "max_delta": self.chosen.max_delta,
                "relative": self.chosen.relative, "kl_mean": self.chosen.kl_mean, "kl_max": self.chosen.kl_max,
                "kept_norms": self.kept_norms, "unstored_eps": self.unstored,
                **({"target_max_delta": self.target.max_delta, "target_kl_mean": self.target.kl_mean}
                   if self.target is not None else {}),
                "candidates": [asdict(c) for c in self.candidates]}


def reload_gate(model: nn.Module, roles: Roles, prompts: list[torch.Tensor], s: float, interior=None
                ) -> ReloadResult:
    """Measure, in fp32 on `prompts` (each [1, T] token ids), every way of storing the conflicting
    fields, with the model run exactly as it will be reloaded (`running_as_exported`); keep the
    choice with the smaller mean KL to the original (then the smaller max |delta logit|)."""
    conflicting = conflicting_fields(roles)
    if 2 ** len(conflicting) > MAX_CHOICES:
        raise HalfsafeError(f"{roles.model_class} has {len(conflicting)} eps fields shared by norms that cannot "
                            "scale; too many choices to measure; drop --out and use halfsafe.load_fixed(MODEL)")
    base = exact_fields(roles)
    with torch.no_grad():
        reference = [model(input_ids=ids, use_cache=False).logits.float() for ids in prompts]
        candidates = []
        for chosen in itertools.product((True, False), repeat=len(conflicting)):
            scaled = sorted([*base, *(f for f, on in zip(conflicting, chosen, strict=True) if on)])
            with running_as_exported(model, roles, s, scaled, interior):
                exported = [model(input_ids=ids, use_cache=False).logits.float() for ids in prompts]
            candidates.append(distance(scaled, reference, exported))
    best = min(candidates, key=lambda c: (c.kl_mean, c.max_delta))
    kept = sorted({m for m, _ in roles.kept_eps})
    return ReloadResult(s, best, candidates, kept, unstored_eps(roles))


def distance(scaled: list[str], reference: list[torch.Tensor], exported: list[torch.Tensor]) -> Candidate:
    """How far `exported` logits are from `reference` ([1, T, V] each, per prompt)."""
    max_delta, top, kls = 0.0, 0.0, []
    for a, b in zip(reference, exported, strict=True):  # [1, T, V] each
        max_delta = max(max_delta, (a - b).abs().nan_to_num(float("inf")).max().item())
        top = max(top, a.abs().max().item())
        logp, logq = a.double().log_softmax(-1), b.double().log_softmax(-1)  # fp32 KL has a ~1e-8 floor
        kls.append((logp.exp() * (logp - logq)).sum(-1).flatten())  # [T]
    kl = torch.cat(kls).clamp_min(0.0)
    return Candidate(scaled, max_delta, max_delta / (top or 1.0), kl.mean().item(), kl.max().item())
