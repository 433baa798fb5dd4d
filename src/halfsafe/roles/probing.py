"""Probing a module on the input the trace recorded: is it scale-invariant, and with which eps?

A reader of the residual stream that is not linear is run again on its recorded input with the
stream's part times s. If the output is unchanged once one of its float attributes (or a child's)
is multiplied by s^2, that attribute is the eps the fix scales; RMSNorm with w or 1 + w, LayerNorm
with or without bias, and norms without a weight all pass, whatever their eps is called.
"""

from __future__ import annotations

import torch
from torch import nn

from .tracing import Trace, first_tensor

PROBE_SCALE = 2.0**-3


def probe_invariance(module: nn.Module, trace: Trace, name: str, s: float = PROBE_SCALE) -> str | None:
    """Run `module` on its recorded input with the stream part times s: the float attribute
    (own or a child's, 'child.attr') that, times s^2, makes the output unchanged; '' if none
    is needed; None if the module is not scale-invariant."""
    args, kwargs = trace.calls[name]

    def scaled(value):
        if isinstance(value, torch.Tensor) and trace.latest.get(id(value)) in trace.stream:
            return value * s
        if isinstance(value, (list, tuple)):
            return type(value)(scaled(v) for v in value)
        if isinstance(value, dict):
            return {k: scaled(v) for k, v in value.items()}
        return value

    candidates = [(f"{path}.{attr}" if path else attr, child, attr)
                  for path, child in module.named_modules()
                  for attr, value in vars(child).items() if isinstance(value, float) and not isinstance(value, bool)]
    candidates.sort(key=lambda c: "eps" not in c[0].lower())
    with torch.no_grad():
        reference = first_tensor(module(*args, **kwargs))
        scaled_args, scaled_kwargs = scaled(args), scaled(kwargs)
        for exact in (True, False):
            for label, child, attr in candidates + [("", None, None)]:
                old = getattr(child, attr) if child is not None else None
                try:
                    if child is not None:
                        setattr(child, attr, old * s * s)
                    out = first_tensor(module(*scaled_args, **scaled_kwargs))
                finally:
                    if child is not None:
                        setattr(child, attr, old)
                if _same(reference, out, exact):
                    return label
    return None


def _same(a: torch.Tensor, b: torch.Tensor, exact: bool) -> bool:
    if a is None or b is None or a.shape != b.shape:
        return False
    if exact:
        return torch.equal(a, b)
    scale = a.abs().max().item() or 1.0
    return (a - b).abs().max().item() <= 1e-6 * scale


def depends_on(module: nn.Module, trace: Trace, name: str, attr: str) -> bool:
    """Does `module`'s output on its recorded input change when `attr` changes?"""
    args, kwargs = trace.calls[name]
    old = getattr(module, attr)
    with torch.no_grad():
        reference = first_tensor(module(*args, **kwargs))
        try:
            setattr(module, attr, old + 1e3)
            changed = first_tensor(module(*args, **kwargs))
        finally:
            setattr(module, attr, old)
    return reference is not None and changed is not None and not torch.equal(reference, changed)
