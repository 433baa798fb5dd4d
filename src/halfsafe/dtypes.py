"""Target dtypes, their finite range, and sizes in bytes."""

from __future__ import annotations

import torch

from .errors import HalfsafeError

# Names users type; the canonical name comes first.
_ALIASES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in _ALIASES.values():
            raise HalfsafeError(f"dtype {name} is not supported; use float16, bfloat16 or float32")
        return name
    dtype = _ALIASES.get(str(name).strip().lower())
    if dtype is None:
        raise HalfsafeError(
            f"unknown dtype '{name}'; use one of float16 (fp16), bfloat16 (bf16), float32 (fp32)"
        )
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_max(dtype: torch.dtype) -> float:
    """Largest finite value: 65,504 for float16, about 3.39e38 for bfloat16."""
    return float(torch.finfo(dtype).max)


def format_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'; binary units, as memory is counted."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:,.1f} {unit}" if unit != "GiB" else f"{count / size:,.2f} {unit}"
    return f"{count} B"
