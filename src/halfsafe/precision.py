"""Run a model in another dtype without losing its fp32 weights."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def cast_temporarily(model: nn.Module, dtype: torch.dtype):
    """Cast floating parameters to `dtype`; put the originals back on exit.

    Casting fp32 -> fp16 -> fp32 would round every weight, so the original tensors are kept
    and restored by reference: peak memory is the model plus one copy in `dtype`. Tied
    parameters are one Parameter object, so they stay tied. Buffers keep their dtype, as with
    `from_pretrained(dtype=...)`, which leaves rotary frequencies in fp32.
    """
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for tensor in _floating_tensors(model):
            if tensor.dtype != dtype:
                saved.append((tensor, tensor.data))
                tensor.data = tensor.data.to(dtype)
        yield model
    finally:
        for tensor, original in saved:
            tensor.data = original


def _floating_tensors(model: nn.Module):
    seen = set()
    for tensor in model.parameters():
        if tensor.is_floating_point() and id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor
