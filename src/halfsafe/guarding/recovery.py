"""Recovery of a non-finite step: the broken rows' whole sequences recomputed in fp32, one
module's weights upcast at a time (`precision.compute_in`, no second copy of the model); their
logits replace the broken ones and their KV-cache entries are replaced by the fp32 ones, cast
back, so the next steps run in the model's own dtype again. Other rows are untouched.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from ..model.layers import last_logits_only
from .report import RECOVERED, UNRECOVERED, GuardEvent


def rerun(model: nn.Module, call, sequence, mask, rows, dtype=None, use_cache=False):
    """Run `rows` of the whole sequence again, without a cache, optionally computing in `dtype`.
    sequence: [B, L] -> the model's output for [R, L], last position's logits only."""
    from ..model.precision import compute_in

    index = torch.tensor(rows, device=sequence.device)
    ids = sequence.index_select(0, index)
    row_mask = mask.index_select(0, index) if mask is not None else torch.ones_like(ids)
    positions = (row_mask.long().cumsum(-1) - 1).masked_fill(row_mask == 0, 0)  # as generate makes them
    call.busy = True
    try:
        with torch.inference_mode(), (compute_in(model, dtype) if dtype else nullcontext()):
            return model(input_ids=ids, attention_mask=row_mask, position_ids=positions,
                         use_cache=use_cache, **last_logits_only(model))
    finally:
        call.busy = False


def first_nonfinite(model: nn.Module, call, sequence, mask, rows) -> str | None:
    """Re-run the broken rows in the model's dtype, watching every module, to name the culprit."""
    from ..diagnosing import FiniteWatch

    if any(e.module for e in call.events):  # once per generation: it costs a forward
        return next(e.module for e in call.events if e.module)
    with FiniteWatch(model) as watch:
        rerun(model, call, sequence, mask, rows)
    return watch.first_nonfinite()


def recover(model: nn.Module, call, step: int, rows: list[int], sequence, mask, output, module: str | None):
    """Replace the broken rows' last logits (output.logits: [B, T, V]) by fp32's, and their cache
    entries; record one event per row. Returns the output to hand on, or None if nothing could
    be recomputed (the sanitizer then handles the rows)."""
    if sequence is None:
        call.events.extend(GuardEvent(step, r, UNRECOVERED, module, detail="no input_ids to recompute")
                           for r in rows)
        return None
    try:
        fresh = rerun(model, call, sequence, mask, rows, dtype=torch.float32, use_cache=True)
    except (RuntimeError, TypeError, ValueError) as exc:
        detail = f"fp32 recomputation failed: {str(exc).splitlines()[0][:200]}"
        call.events.extend(GuardEvent(step, r, UNRECOVERED, module, detail=detail) for r in rows)
        return None
    new_logits = fresh.logits[:, -1]  # [R, V], fp32
    ok = torch.isfinite(new_logits).all(dim=-1).tolist()
    logits = output.logits.float() if output.logits.dtype != torch.float32 else output.logits.clone()
    good = [i for i, fine in enumerate(ok) if fine]
    repaired = False
    if good:
        index = torch.tensor([rows[i] for i in good], device=logits.device)
        logits[index, -1] = new_logits[good].to(logits.device)
        repaired = repair_cache(output.get("cache"), fresh.get("cache"), [rows[i] for i in good], good)
    for i, row in enumerate(rows):
        if ok[i]:
            detail = "recomputed in float32" + ("" if repaired else "; KV cache not repaired")
            call.events.append(GuardEvent(step, row, RECOVERED, module, detail=detail))
        else:
            call.events.append(GuardEvent(step, row, UNRECOVERED, module, detail="non-finite in float32 too"))
    output.logits = logits
    call.sanitizer.verified = all(ok)  # every broken row now holds fp32's finite logits
    return output


def repair_cache(cache, fresh, rows: list[int], fresh_rows: list[int]) -> bool:
    """Copy the fp32 recomputation's keys and values for `rows` into the running cache, in its
    dtype, so the next step reads sound entries. A cache of another layout is left alone."""
    layers, new_layers = getattr(cache, "layers", None), getattr(fresh, "layers", None)
    if not layers or not new_layers or len(layers) != len(new_layers):
        return False
    updates = []
    for layer, new in zip(layers, new_layers, strict=True):
        for name in ("keys", "values"):
            old, value = getattr(layer, name, None), getattr(new, name, None)
            if not torch.is_tensor(old) or not torch.is_tensor(value) or value.shape[-2] < old.shape[-2]:
                return False
            # Sliding-window layers keep only the tail.
            value = value[fresh_rows, ..., value.shape[-2] - old.shape[-2]:, :].to(old.dtype)
            if not bool(torch.isfinite(value).all()):
                return False
            updates.append((old, value))
    index = torch.tensor(rows, device=updates[0][0].device)
    for old, value in updates:
        old.index_copy_(0, index, value.to(old.device))
    return True


