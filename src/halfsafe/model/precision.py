"""Run a model with other weights (another dtype, a fixed variant) without losing its own."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..errors import HalfsafeError
from .hooks import HookSet
from .layers import find_decoder_layers


@contextmanager
def use_weights(model: nn.Module, weights: dict[str, torch.Tensor]):
    """Swap in `weights` (names as in `named_parameters()`); put the originals back on exit.

    The original tensors are kept by reference and restored exactly: casting fp32 -> fp16 ->
    fp32 instead would round every weight. Tied parameters are one Parameter object, listed
    once, so they stay tied.

    Some of transformers' models do not run in every dtype (xLSTM's chunked recurrence mixes an
    fp32 gate into a float16 product for inputs longer than a chunk): such a failure inside the
    block is one HalfsafeError naming the model and dtype, not a traceback.
    """
    params = dict(model.named_parameters())
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    try:
        for name, tensor in weights.items():
            saved.append((params[name], params[name].data))
            params[name].data = tensor
        yield model
    except RuntimeError as exc:
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in weights.values()} - {"float32"})
        if "out of memory" in str(exc).lower() or not dtypes:
            raise
        raise HalfsafeError(
            f"{type(model).__name__} fails to run with its weights in {', '.join(dtypes)} "
            f"({str(exc).splitlines()[0][:160]}): transformers' implementation of this model does not support that "
            "dtype here, so halfsafe cannot run or measure it in it; use another --dtype (bfloat16) or keep the "
            "model in float32"
        ) from exc
    finally:
        for param, original in saved:
            param.data = original


@contextmanager
def cast_temporarily(model: nn.Module, dtype: torch.dtype):
    """Run in `dtype`: peak memory is the model plus one copy of its weights in `dtype`.

    Buffers keep their dtype, as with `from_pretrained(dtype=...)`, which leaves rotary
    frequencies in fp32.
    """
    weights = {n: p.data.to(dtype) for n, p in model.named_parameters() if p.is_floating_point() and p.dtype != dtype}
    with use_weights(model, weights):
        yield model


@contextmanager
def clamp_residual(model: nn.Module, bound: float = 64_504.0, readers: list[str] | None = None):
    """Clamp the residual stream to +-bound after every addition: the approach of T5 and of
    ONNX exports, kept as a baseline to compare the fix against (it trades overflow for
    distortion).

    The additions are inline code, not modules, so the clamps sit where the sums are read:
    before every norm that reads the stream (in place, so the layer's `residual` variable,
    the same tensor, is clamped too) and on every layer's output. The readers are the model's
    derived scale-invariant ones (`stream_readers`; pass `readers` to derive them once).
    """

    readers = stream_readers(model) if readers is None else readers

    def clamp_input(module, args):
        args[0].clamp_(-bound, bound)

    def clamp_output(module, args, output):
        if torch.is_tensor(output):
            return output.clamp(-bound, bound)
        return (output[0].clamp(-bound, bound), *output[1:])

    _, layers = find_decoder_layers(model)
    with HookSet() as hooks:
        for layer in layers:
            hooks.forward(layer, clamp_output)
        for reader in readers:
            hooks.pre_forward(model.get_submodule(reader), clamp_input)
        yield model


def stream_readers(model: nn.Module) -> list[str]:
    """The modules that read the residual stream and are scale-invariant (its norms), by name,
    from the model's derived roles; refused roles are a HalfsafeError."""
    from ..roles import derive_roles

    roles = derive_roles(model)
    if roles.refused:
        raise HalfsafeError(f"cannot find {roles.model_class}'s residual-stream readers: {roles.refusals[0]}")
    return [name for name, how in roles.readers.items() if how.startswith("scale-invariant")]


@contextmanager
def compute_in(model: nn.Module, dtype: torch.dtype = torch.float32):
    """Run a model held in another dtype with `dtype` weights and arithmetic, holding at most one
    module's `dtype` copy of its own weights at a time.

    Every module that owns parameters gets its weights cast on entering its forward and put
    back on leaving it, so a half-precision model computes in fp32 for the cost of one extra
    forward, not one extra copy of the model. Activations follow the weights: the embedding
    returns `dtype`, and every later module computes in it. Buffers keep their dtype, as with
    `from_pretrained`. Everything is restored on exit, even when the forward raises.
    """
    saved: dict[int, list[tuple[nn.Parameter, torch.Tensor]]] = {}

    def upcast(module, args):
        own = [p for p in module.parameters(recurse=False) if p.is_floating_point() and p.dtype != dtype]
        saved[id(module)] = [(p, p.data) for p in own]
        for param in own:
            param.data = param.data.to(dtype)

    def restore(module, *unused):
        for param, original in saved.pop(id(module), ()):
            param.data = original

    def restore_all():  # a forward that raised before a module's hook ran
        for entries in saved.values():
            for param, original in entries:
                param.data = original

    with HookSet() as hooks:
        hooks.callback(restore_all)  # runs last, after every hook is gone
        for module in model.modules():
            if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters(recurse=False)):
                hooks.pre_forward(module, upcast)
                hooks.forward(module, restore, always_call=True)
        yield model
