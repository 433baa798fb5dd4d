"""The fallback strategy: keep the overflowing layers' computation in fp32.

Second best to rescaling, and for any architecture: it needs no derived roles, only the
decoder layer stack and an fp32 observation. It costs memory (those layers' weights stay in
fp32) and speed (fp32 arithmetic there), and it needs halfsafe at load time: the result is an
in-memory model, not a checkpoint that stock transformers or vLLM can load.

Which layers: every layer with a site above `dtype max / margin`, and, since a hidden state
that is too large for the dtype cannot be handed back to a half-precision layer, every layer
after one whose residual output is too large. Kept layers receive their inputs upcast to fp32;
a kept layer whose residual output fits goes back to the model's dtype for the next layer.
When the stream leaves the last layer in fp32, the module that reads it next (the final norm,
found by watching the order of calls) is kept in fp32 too and hands its output back.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..dtypes import dtype_max, dtype_name, format_bytes
from ..errors import HalfsafeError
from ..model.hooks import HookSet
from ..model.layers import find_decoder_layers
from .observe import ATTN_LOGITS, RESIDUAL, SiteStat


@dataclass
class KeepPlan:
    dtype: str
    margin: float
    kept_layers: list[int]  # run in fp32
    fp32_out: list[int]  # kept layers whose output stays fp32 (the next layer is kept too)
    final_module: str | None = None  # runs after the last layer; kept in fp32 if the stream is
    fp32_bytes: int = 0  # extra weight memory against the all-half model
    half_bytes: int = 0  # the all-half model's weights

    @property
    def is_identity(self) -> bool:
        return not self.kept_layers

    def describe(self) -> str:
        if self.is_identity:
            return f"no layer needs fp32: every site is {self.margin:g}x below the {self.dtype} limit"
        return (f"keep {len(self.kept_layers)} layer(s) in fp32 ({_ranges(self.kept_layers)}): "
                f"+{format_bytes(self.fp32_bytes)} over the all-{self.dtype} weights "
                f"({format_bytes(self.half_bytes)}); "
                "second best to rescaling")

    def to_json(self) -> dict:
        return asdict(self)


def _ranges(indices: list[int]) -> str:
    spans, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            spans.append(f"{start}-{index}" if index != start else f"{index}")
            start = None
    return "layers " + ", ".join(spans)


def plan_keep_fp32(model: nn.Module, sites: list[SiteStat], *, dtype: torch.dtype, margin: float) -> KeepPlan:
    _, layers = find_decoder_layers(model)
    eager = (model.config._attn_implementation or "eager") == "eager"
    target = dtype_max(dtype) / margin
    hot = {s.layer for s in sites if s.layer is not None and s.max_abs > target and (s.kind != ATTN_LOGITS or eager)}
    hot_out = {s.layer for s in sites if s.kind == RESIDUAL and s.max_abs > target}
    kept, fp32_out, carrying = [], [], False
    for index in range(len(layers)):
        if carrying or index in hot:
            kept.append(index)
        carrying = index in hot_out
        if carrying:
            fp32_out.append(index)
    final = None
    if fp32_out and fp32_out[-1] == len(layers) - 1:
        final = module_after_layers(model)
    extra = sum(_bytes(layers[i]) for i in kept) // 2  # fp32 is twice a 16-bit dtype
    if final is not None:
        extra += _bytes(model.get_submodule(final)) // 2
    half = sum(p.numel() * torch.finfo(dtype).bits // 8 for p in _unique_params(model))
    return KeepPlan(dtype_name(dtype), margin, kept, fp32_out, final, extra, half)


def module_after_layers(model: nn.Module) -> str:
    """The first module to run after the last decoder layer (the final norm), found by running
    one token through the model and watching the order of calls: no name is assumed."""
    layers_path, layers = find_decoder_layers(model)
    last = f"{layers_path}.{len(layers) - 1}"
    order: list[str] = []
    with HookSet() as hooks:
        for n, m in model.named_modules():
            if n:
                hooks.pre_forward(m, lambda mod, args, name=n: order.append(name))
        token = model.config.get_text_config().bos_token_id or 0
        with torch.inference_mode():
            model(input_ids=torch.tensor([[token]], device=next(model.parameters()).device), use_cache=False)
    start = max(i for i, name in enumerate(order) if name == last)
    after = [n for n in order[start + 1:] if not n.startswith(last + ".")]
    if not after:
        raise HalfsafeError(f"nothing runs after {last}; keep-fp32 cannot hand the stream back")
    return after[0]


def _unique_params(module: nn.Module):
    return {id(p): p for p in module.parameters()}.values()


def _bytes(module: nn.Module) -> int:
    return sum(p.numel() * 4 for p in _unique_params(module))


def _to(value, dtype):
    if torch.is_tensor(value) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_to(v, dtype) for v in value)
    return value


def _half_weights(model: nn.Module, plan: KeepPlan, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    layers_path, _ = find_decoder_layers(model)
    kept = tuple(f"{layers_path}.{i}." for i in plan.kept_layers)
    if plan.final_module:
        kept += (plan.final_module + ".",)
    return {
        name: param.data.to(dtype) for name, param in model.named_parameters()
        if param.is_floating_point() and not name.startswith(kept)
    }


def _register_casts(model: nn.Module, plan: KeepPlan, dtype: torch.dtype, hooks: HookSet) -> HookSet:
    _, layers = find_decoder_layers(model)

    def upcast(module, args, kwargs):
        return _to(args, torch.float32), {k: _to(v, torch.float32) for k, v in kwargs.items()}

    def downcast_output(module, args, output):
        return _to(output, dtype) if torch.is_tensor(output) else (_to(output[0], dtype), *output[1:])

    for index in plan.kept_layers:
        hooks.pre_forward(layers[index], upcast, with_kwargs=True)
        if index not in plan.fp32_out:
            hooks.forward(layers[index], downcast_output)
    if plan.final_module:
        # The stream leaves the last layer in fp32; the final norm reads it there, in fp32,
        # and hands its (small) output back in the model's dtype.
        final = model.get_submodule(plan.final_module)
        hooks.pre_forward(final, upcast, with_kwargs=True)
        hooks.forward(final, downcast_output)
    return hooks


@contextmanager
def use_keep_fp32(model: nn.Module, plan: KeepPlan, dtype: torch.dtype):
    """Run the model in `dtype` with `plan.kept_layers` in fp32; restore everything on exit."""
    from ..model.precision import use_weights

    with use_weights(model, _half_weights(model, plan, dtype)), HookSet() as hooks:
        _register_casts(model, plan, dtype, hooks)
        yield model


def apply_keep_fp32(model: nn.Module, plan: KeepPlan, dtype: torch.dtype) -> nn.Module:
    """Make it permanent: the other weights become `dtype`, the casts stay registered.

    The casts are owned by the model, as `model.halfsafe_hooks` (a `HookSet`):
    `model.halfsafe_hooks.remove()` takes them off again (the weights keep their new dtypes, so
    the kept layers then compute in fp32 on whatever they are given). Applying twice is refused.
    """
    if getattr(model, "halfsafe_hooks", None):
        raise HalfsafeError("keep-fp32 is already applied to this model; call model.halfsafe_hooks.remove() first")
    params = dict(model.named_parameters())
    for name, tensor in _half_weights(model, plan, dtype).items():
        params[name].data = tensor
    model.halfsafe_hooks = _register_casts(model, plan, dtype, HookSet())
    return model
