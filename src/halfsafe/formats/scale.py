"""The scale value every weight format applies: a factor and a norm convention's gain offset.

A role says "multiply this parameter by c" (`Roles.factors`); for a gain stored as `w` with the
norm computing `(offset + w)` it says `w' = c * (offset + w) - offset`. `Scale` is that value and
`scaled_tensor` its arithmetic on one dense tensor: float64, cast once, checked finite. How a
format stores a parameter (dense, or an integer tensor and its quantization scales) is the
format module's business; this module knows none of them, so `roles` and `fixing` both import it
and the arrows run one way (formats <- roles <- model.precision, formats <- fixing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import HalfsafeError

_ROWS = 4096


@dataclass
class Scale:
    factor: float = 1.0
    offset: float = 0.0  # the norm convention: the gain is (offset + w)


def scaled_tensor(name: str, tensor: torch.Tensor, entry: Scale | None, dtype: torch.dtype) -> torch.Tensor:
    """One tensor scaled (float64 arithmetic, a slice of rows at a time, since an embedding can
    be gigabytes wide), cast once to `dtype` and checked finite."""
    if entry is None or entry.factor == 1.0:
        return tensor.to(dtype)
    new = torch.empty(tensor.shape, dtype=dtype, device=tensor.device)
    finite = True
    for source, target in zip(tensor.split(_ROWS), new.split(_ROWS), strict=True):
        target.copy_((source.to(torch.float64) + entry.offset) * entry.factor - entry.offset)
        # Per slice: on a 1 B-element embedding the whole-tensor check allocates GBs of temporaries.
        finite = finite and bool(torch.isfinite(target).all())
    if not finite:
        raise HalfsafeError(
            f"scaling {name} by {entry.factor:g} gives non-finite {dtype} values; "
            "lower --margin or use --strategy keep-fp32"
        )
    return new
