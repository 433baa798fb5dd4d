"""Apply derived roles, and the exactness gate that proves them on the model itself.

A power-of-two scale is exact in floating point and every reader's eps moves by s^2, so the
rescaled model, kept in fp32, computes what the original computed: docs/numerics.md section 4
measured `torch.equal` logits on the real gemma-3-270m. A missing writer or an uncompensated
reader instead changes the logits by orders of magnitude more than rounding does (a missing
writer mixes s-scaled and unscaled terms in one sum; the tests measure it). The gate therefore
allows only what a kernel could force: `EXACT_BOUND`, relative to the largest |logit|.

Why that bound: every op the trace sees is applied to bit-identical operands in both runs
except where a value is an exact power-of-two multiple, and every kernel the tested models use
(matmul, softmax, RMSNorm, LayerNorm, SDPA) gives an exactly scaled result for an exactly
scaled input unless a value falls into the subnormal range (below 2^-126 in fp32, where
scaling by 2^-3 drops bits). `benchmarks/arch_coverage.py` measures max |delta| per
architecture: 0.0 (torch.equal) on every one of the 137 types it covers, CPU, torch 2.13.0; so
is the real gemma-3-270m. The bound leaves room only for kernels that reorder a sum by value
(none seen yet) and is far below what a wrong role does: removing one writer from a tiny
Llama moved the logits by 0.55 to 1.06 of the largest logit (tests/test_roles.py asserts > 1e-3).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import HalfsafeError
from ..formats.scale import Scale
from ..model.hooks import HookSet
from .roles import Roles

EXACT_BOUND = 1e-6  # max |delta logit| / max |logit|; see the module docstring
GATE_SCALE = 2.0**-3


def scaled_parameters(model: nn.Module, roles: Roles, s: float, interior: dict[str, float] | None = None
                      ) -> dict[str, torch.Tensor]:
    """The new value of every scaled parameter, checked finite; the model is untouched. A plain
    power-of-two product is exact in the parameter's own dtype (and an embedding can be
    gigabytes); a gain with an offset is computed in float64 and cast once."""
    params = dict(model.named_parameters())
    new = {}
    for name, (factor, offset) in roles.factors(s, interior).items():
        source = params[name].detach()
        if offset:
            value = ((source.to(torch.float64) + offset) * factor - offset).to(source.dtype)
        else:
            value = source * factor
        if not bool(torch.isfinite(value).all()):
            raise HalfsafeError(f"scaling {name} by {factor:g} gives non-finite values; use --strategy keep-fp32")
        new[name] = value
    return new


def applying_scales(roles: Roles, s: float, interior: dict[str, float] | None = None) -> dict:
    """`roles` for residual scale s as `Scale` values (parameter -> factor and gain offset), the
    form every weight format (`formats`) and `apply.scaled_weights` take."""
    return {name: Scale(factor=factor, offset=offset) for name, (factor, offset) in roles.factors(s, interior).items()}


def eps_settings(model: nn.Module, roles: Roles, s: float) -> list[tuple[object, str, float]]:
    """(object, attribute, new value): every listed eps and config field times s^2."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    settings = [(model.get_submodule(m), a, getattr(model.get_submodule(m), a) * s * s) for m, a in roles.eps]
    settings += [(config, f, getattr(config, f) * s * s) for f in roles.config_eps]
    return settings


@contextmanager
def use_roles(model: nn.Module, roles: Roles, s: float, interior: dict[str, float] | None = None):
    """Run `model` rescaled by s (and `interior` pair scales) inside the block; every weight and
    eps is restored exactly after."""
    with swapped(model, scaled_parameters(model, roles, s, interior), eps_settings(model, roles, s)):
        yield model


@contextmanager
def swapped(model: nn.Module, new: dict[str, torch.Tensor], settings):
    """Run `model` with the parameters in `new` and the (object, attribute, value) `settings`
    inside the block; every original is restored exactly after."""
    params = dict(model.named_parameters())
    saved_params = {name: params[name].data for name in new}
    saved_attrs = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in settings]
    try:
        for name, value in new.items():
            params[name].data = value
        for obj, attr, value in settings:
            setattr(obj, attr, value)
        yield model
    finally:
        for name, value in saved_params.items():
            params[name].data = value
        for obj, attr, value in saved_attrs:
            setattr(obj, attr, value)


def apply_roles(model: nn.Module, roles: Roles, s: float, interior: dict[str, float] | None = None,
                settings: list[tuple[object, str, float]] | None = None) -> nn.Module:
    """Rescale `model` in place by s (weights and eps): the only function here that keeps a change.
    `settings`: the eps to give, (object, attribute, value); default every eps as exact in memory."""
    params = dict(model.named_parameters())
    new = scaled_parameters(model, roles, s, interior)
    settings = eps_settings(model, roles, s) if settings is None else settings
    with torch.no_grad():
        for name, value in new.items():
            params[name].data = value
    for obj, attr, value in settings:
        setattr(obj, attr, value)
    return model


@dataclass
class GateResult:
    passed: bool
    max_delta: float  # max |delta logit|
    relative: float  # max_delta / max |logit|
    equal: bool  # torch.equal on every prompt
    worst: tuple[int, int]  # (prompt, token position) of max_delta
    culprit: str | None = None  # first module whose output is neither unchanged nor exactly rescaled

    def describe(self) -> str:
        if self.passed:
            exact = ("bit-identical" if self.equal
                     else f"max |delta| {self.max_delta:.3g} (relative {self.relative:.2g})")
            return f"exactness gate passed: rescaled fp32 logits {exact}"
        return (f"exactness gate failed: max |delta logit| {self.max_delta:.3g} (relative {self.relative:.2g}, bound "
                f"{EXACT_BOUND:g}) at prompt {self.worst[0]} position {self.worst[1]}; first diverging module: "
                f"{self.culprit or 'unknown'}; use --strategy keep-fp32")


def exactness_gate(model: nn.Module, roles: Roles, prompts: list[torch.Tensor], *, s: float = GATE_SCALE,
                   bound: float = EXACT_BOUND, interior: dict[str, float] | None = None) -> GateResult:
    """Rescale `model` (fp32) by s in place for the check, compare its logits on `prompts`
    (each [1, T] token ids) with the original's; the model is restored after."""
    reference, rescaled = [], []
    with torch.no_grad():
        for ids in prompts:
            reference.append(model(input_ids=ids, use_cache=False).logits.float())
        with use_roles(model, roles, s, interior):
            for ids in prompts:
                rescaled.append(model(input_ids=ids, use_cache=False).logits.float())
    worst, max_delta, top, equal = (0, 0), 0.0, 0.0, True
    for index, (a, b) in enumerate(zip(reference, rescaled, strict=True)):
        equal = equal and torch.equal(a, b)
        delta = (a - b).abs().nan_to_num(float("inf")).amax(dim=-1)[0]  # [T]
        top = max(top, a.abs().max().item())
        if delta.max().item() > max_delta or index == 0:
            max_delta = max(max_delta, delta.max().item())
            worst = (index, int(delta.argmax()))
    relative = max_delta / (top or 1.0)
    result = GateResult(relative <= bound, max_delta, relative, equal, worst)
    if not result.passed:
        result.culprit = first_divergence(model, roles, prompts[worst[0]], s, interior)
    return result


def first_divergence(model: nn.Module, roles: Roles, ids: torch.Tensor, s: float,
                     interior: dict[str, float] | None = None) -> str | None:
    """The first module, in execution order, whose rescaled output is neither its original
    output nor that output times s or 1/s: where a role is wrong. (An interior pair's inner
    values move by t, a power of two too: they are skipped, the consumer's output is not.)"""
    before, after = _module_outputs(model, None, ids, s), _module_outputs(model, roles, ids, s, interior)
    inner = {m for pair in (interior or {}) for m in pair.split("->")[:1]}
    for name, a in before.items():
        b = after.get(name)
        if b is None or a.shape != b.shape:
            continue
        scale = a.abs().max().item() or 1.0
        if name in inner:
            continue
        if not any((a * f - b).abs().max().item() <= 1e-5 * scale * max(f, 1) for f in (1.0, s, 1 / s)):
            return name or type(model).__name__
    return None


def output_exponents(model: nn.Module, roles: Roles, ids: torch.Tensor, s: float = GATE_SCALE) -> dict[str, int]:
    """Module -> k such that its output, rescaled, is its original output times s**k (1 for
    writers and the stream, -1 for a tied model's final norm, 0 for readers' outputs), measured
    by running `ids` ([1, T]) both ways: what planning needs to know which sites move with s.
    Modules whose output is neither are left out (the gate reports those)."""
    before, after = _module_outputs(model, None, ids, s), _module_outputs(model, roles, ids, s)
    found = {}
    for name, a in before.items():
        b = after.get(name)
        if b is None or a.shape != b.shape:
            continue
        scale = a.abs().max().item() or 1.0
        for k in (0, 1, -1):
            if (a * s**k - b).abs().max().item() <= 1e-5 * scale * max(s**k, 1):
                found[name] = k
                break
    return found


def _module_outputs(model: nn.Module, roles: Roles | None, ids: torch.Tensor, s: float,
                    interior: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    names = {m: n for n, m in model.named_modules()}
    outputs: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        tensor = output if isinstance(output, torch.Tensor) else next(
            (t for t in (output if isinstance(output, (tuple, list)) else ()) if isinstance(t, torch.Tensor)), None)
        if tensor is not None and tensor.is_floating_point() and names[module] not in outputs:
            outputs[names[module]] = tensor.detach().float().clone()

    with HookSet() as hooks:
        for module in model.modules():
            hooks.forward(module, hook)
        with torch.no_grad():
            if roles is None:
                model(input_ids=ids, use_cache=False)
            else:
                with use_roles(model, roles, s, interior):
                    model(input_ids=ids, use_cache=False)
    return outputs
