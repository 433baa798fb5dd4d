"""Apply a plan: the only step that writes weights.

`scaled_weights` computes the new tensors (in float64, cast once to the target dtype, each
checked finite) without touching the model; `use_fix` runs the model with them for a block;
`apply_fix` puts them in for good. Keeping the two
apart lets `fix` verify the result against the untouched fp32 model before committing.

Which parameters and eps move comes from the model's derived roles (`roles.applying_scales`,
`roles.eps_settings`); `scale_factors` and `norm_eps_settings` give the same from a registry
entry (the tests cross-check the two). Per writer, in terms of the residual scale s and a
pair's scale t:
- linear writer (o_proj, down_proj, stacked expert down_proj): weight and bias *= s;
- norm writer (Gemma's post-norms, gain = offset + w): w' = s * (offset + w) - offset;
- embedding *= s; if it is tied to the output embedding, the logits would scale by s, so the
  final norm's gain is divided by s;
- MLP interior: up weight and bias *= t, down weight *= 1/t (down's bias is added after the
  product and is not divided);
- the RMSNorms' eps *= s^2 (config field and modules), so `rms(s * x)` is exactly `s * rms(x)`;
  the linear layers feeding norms that do not read the stream (`eps_companions`) *= s.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import HalfsafeError
from ..model.precision import use_weights
from ..model.registry import Architecture
from .plan import Plan

_ROWS = 4096


@dataclass
class _Scale:
    factor: float = 1.0
    offset: float = 0.0  # the norm convention: the gain is (offset + w)


def is_tied(model: nn.Module) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def scale_factors(model: nn.Module, arch: Architecture, plan: Plan) -> dict[str, _Scale]:
    """Parameter name -> how to scale it. Parameters not listed are unchanged."""
    scales: dict[str, _Scale] = {}
    names = {id(p): n for n, p in model.named_parameters()}

    def scale(param: nn.Parameter, factor: float, offset: float = 0.0) -> None:
        entry = scales.setdefault(names[id(param)], _Scale(offset=offset))
        entry.factor *= factor

    def scale_writer(target: nn.Module | nn.Parameter, factor: float) -> None:
        if isinstance(target, nn.Parameter):
            scale(target, factor)
        elif isinstance(target, nn.Linear):
            scale(target.weight, factor)
            if target.bias is not None:
                scale(target.bias, factor)
        else:  # a norm: scale its effective gain
            scale(target.weight, factor, arch.norm_offset)

    base = model.get_submodule(arch.prefix)
    s = plan.residual_scale
    if s != 1.0:
        scale(base.get_submodule(arch.embedding).weight, s)
        if is_tied(model):
            scale(base.get_submodule(arch.final_norm).weight, 1.0 / s, arch.norm_offset)
    layers = base.get_submodule(arch.layers)
    for index, layer in enumerate(layers):
        if s != 1.0:
            for role in (arch.attn_writers, arch.mlp_writers):
                found = [t for path in role if (t := _resolve(layer, path)) is not None]
                if not found:
                    raise HalfsafeError(
                        f"layer {index} of {type(model).__name__} has none of {', '.join(role)}; "
                        f"the registry entry '{arch.name}' does not match this model"
                    )
                for target in found:
                    scale_writer(target, s)
            for path in arch.eps_companions:
                companion = _resolve(layer, path)
                if companion is not None:
                    scale_writer(companion, s)
        t = plan.mlp_scales.get(_pair_key(arch, index), 1.0) if arch.mlp_pair else 1.0
        if t != 1.0:
            up, down = (_resolve(layer, path) for path in arch.mlp_pair)
            if not isinstance(up, nn.Linear) or not isinstance(down, nn.Linear):
                raise HalfsafeError(
                    f"layer {index} has no dense {' / '.join(arch.mlp_pair)} pair to scale its MLP interior"
                )
            scale_writer(up, t)
            scale(down.weight, 1.0 / t)
    return scales


def _pair_key(arch: Architecture, index: int) -> str:
    layer = f"{arch.prefix}.{arch.layers}.{index}"
    return f"{layer}.{arch.mlp_pair[0]}->{layer}.{arch.mlp_pair[1]}"


def _resolve(layer: nn.Module, path: str) -> nn.Module | nn.Parameter | None:
    try:
        return layer.get_submodule(path)
    except AttributeError:
        pass
    try:
        return layer.get_parameter(path)
    except AttributeError:
        return None


def scaled_weights(model: nn.Module, arch: Architecture, plan: Plan, dtype: torch.dtype, *,
                   only: set[str] | None = None, scales: dict[str, _Scale] | None = None) -> dict[str, torch.Tensor]:
    """Every floating parameter of `model` (or those named in `only`), scaled by `plan` and cast
    to `dtype`; the model is untouched. `scales`: `scale_factors`' result, if already computed."""
    scales = scale_factors(model, arch, plan) if scales is None else scales
    return {
        name: scaled_tensor(name, param.detach(), scales.get(name), dtype)
        for name, param in model.named_parameters()
        if param.is_floating_point() and (only is None or name in only)
    }


def scaled_tensor(name: str, tensor: torch.Tensor, entry: _Scale | None, dtype: torch.dtype) -> torch.Tensor:
    """One parameter scaled (float64 arithmetic, a slice of rows at a time, since an embedding can
    be gigabytes wide), cast once to `dtype` and checked finite."""
    if entry is None or entry.factor == 1.0:
        return tensor.to(dtype)
    new = torch.empty(tensor.shape, dtype=dtype, device=tensor.device)
    for source, target in zip(tensor.split(_ROWS), new.split(_ROWS), strict=True):
        target.copy_((source.to(torch.float64) + entry.offset) * entry.factor - entry.offset)
    if not bool(torch.isfinite(new).all()):
        raise HalfsafeError(
            f"scaling {name} by {entry.factor:g} gives non-finite {dtype} values; "
            "lower --margin or use --strategy keep-fp32"
        )
    return new


def norm_eps_settings(model: nn.Module, arch: Architecture, plan: Plan) -> list[tuple[object, str, float]]:
    """(object, attribute, new value) for the config's eps and every RMSNorm that took it: eps * s^2."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    eps = getattr(config, arch.eps_field, None)
    if plan.residual_scale == 1.0 or eps is None:
        return []
    new = eps * plan.residual_scale**2
    settings = [(config, arch.eps_field, new)]
    for module in model.modules():
        if getattr(module, arch.norm_eps_attr, None) == eps:
            settings.append((module, arch.norm_eps_attr, new))
    return settings


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
