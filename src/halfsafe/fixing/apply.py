"""Apply a plan: the only step that writes weights.

`scaled_weights` computes the new tensors (in float64, cast once to the target dtype, each
checked finite) without touching the model; `use_fix` runs the model with them for a block;
`put_weights` puts them in for good. Keeping the two
apart lets `fix` verify the result against the untouched fp32 model before committing.

Which parameters and eps move comes from the model's derived roles (`roles.applying_scales`,
`roles.eps_settings`). Per writer, in terms of the residual scale s and a pair's scale t:
- linear writer (o_proj, down_proj, stacked expert down_proj): weight and bias *= s;
- norm writer (Gemma's post-norms, gain = offset + w): w' = s * (offset + w) - offset;
- embedding *= s; if it is tied to the output embedding, the logits would scale by s, so the
  final norm's gain is divided by s;
- MLP interior: up weight and bias *= t, down weight *= 1/t (down's bias is added after the
  product and is not divided);
- the RMSNorms' eps *= s^2 (config field and modules), so `rms(s * x)` is exactly `s * rms(x)`;
  the writers feeding norms that share the readers' eps but do not read the stream *= s.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..formats.dense import DENSE
from ..formats.scale import Scale, scaled_tensor  # noqa: F401 (scaled_tensor: public here)
from ..model.precision import use_weights
from .plan import Plan

# The scale value and its dense arithmetic live in the weight-format layer (`formats`), which
# `roles` imports too; `_Scale` is kept as this module's name for it.
_Scale = Scale


def scaled_weights(model: nn.Module, scales: dict[str, Scale], dtype: torch.dtype, *,
                   only: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Every floating parameter of `model` (or those named in `only`), scaled by `scales`
    (`Rescaling.scales()`: parameter -> factor and gain offset) and cast to `dtype`; the model is
    untouched. Dense weights; a quantized checkpoint's format has its own (`formats`)."""
    return DENSE.scaled_weights(model, scales, dtype, only=only)


Settings = list[tuple[object, str, float]]  # (object, attribute, new value): the eps x s^2


@contextmanager
def use_fix(model: nn.Module, settings: Settings, plan: Plan, weights: dict[str, torch.Tensor]):
    """Run the model as fixed (weights, eps `settings`, attention kernel) inside the block;
    restore it after."""
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in settings]
    attention = model.config._attn_implementation
    try:
        for obj, attr, value in settings:
            setattr(obj, attr, value)
        if plan.attn_implementation:
            model.set_attn_implementation(plan.attn_implementation)
        with use_weights(model, weights):
            yield model
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)
        if plan.attn_implementation:
            model.set_attn_implementation(attention)


def put_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """Write the fix's weights into the model for good (its eps and attention kernel are
    `pipeline.finalise`'s)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].data = tensor
    return model
