"""One fp32 forward pass recorded op by op, with the residual stream tagged as it flows.

Why a trace of torch functions rather than a module list or an FX graph: the residual
additions are inline code (`residual + hidden_states`), not modules, so no module hook sees
them; FX cannot trace most transformers decoder layers (data-dependent control flow, MoE
routing loops, cache objects). A `TorchFunctionMode` sees every tensor operation the real
forward makes, in order, including the inline ones, and the module hooks tell which module
was running when each op happened. The whole model runs once on a few tokens, so every kind
of layer a hybrid model mixes (attention, Mamba, linear attention, dense and MoE MLPs) is seen.

The stream is tagged forwards while the model runs:
- each decoder layer's hidden-state input is a stream value (if it is not one already, it is a
  *stream start*: what produced it - the embedding, a position embedding, an embedding norm -
  is found later by walking back from it);
- `stream + x` is a stream value, and `x` is a *write*: its producer is a writer;
- shape changes, casts, dropout and multiplication by a value that does not depend on the
  stream (Gemma's sqrt(hidden) normaliser, a residual multiplier, a padding mask) keep the tag;
- any other op that consumes a stream value is a *read*, charged to the innermost running
  module (RMSNorm's `pow`, a q/k/v projection in OLMo 2); its result depends on the stream
  (`derived`), so a later `stream * derived` is a read too, not a scaling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..model.hooks import HookSet

# Op names are normalised: underscores stripped, so `__add__`, `add_` and `add` are one name.
ADD = {"add", "radd", "iadd", "sub", "rsub", "isub"}
MUL = {"mul", "rmul", "imul", "multiply"}
DIV = {"div", "truediv", "itruediv", "true_divide", "divide"}
CAT = {"cat", "concat", "concatenate", "stack"}
# Ops that keep a value's scale (linear in their first tensor argument, no mixing of positions
# that would matter): the stream stays the stream through them.
SHAPE = {
    "view", "reshape", "contiguous", "to", "float", "half", "bfloat16", "double", "type", "type_as", "clone",
    "dropout", "getitem", "transpose", "permute", "squeeze", "unsqueeze", "flatten", "unflatten", "expand",
    "expand_as", "narrow", "view_as", "reshape_as", "select", "movedim", "swapaxes", "split", "chunk", "unbind",
    "tensor_split", "alias", "get", "t", "repeat", "roll", "detach", "requires_grad", "cpu", "cuda",
}


_INPLACE_DUNDER = {"__iadd__", "__isub__", "__imul__", "__itruediv__"}


def op_name(func) -> str:
    name = getattr(func, "__name__", str(func))
    return name.strip("_")


@dataclass
class Node:
    """One recorded op: `inputs` are node ids (in argument order, tensors only), `out` its result."""

    op: str
    args: tuple
    kwargs: dict
    inputs: list[int]
    module: str
    out: object = None
    inplace: bool = False


@dataclass
class Trace:
    nodes: list[Node] = field(default_factory=list)
    stream: set[int] = field(default_factory=set)  # node ids whose value is the residual stream
    derived: set[int] = field(default_factory=set)  # node ids computed from the stream (not scaled with it)
    writes: list[tuple[int, int]] = field(default_factory=list)  # (add node, written operand node)
    starts: list[tuple[int, str]] = field(default_factory=list)  # (node entering a layer untagged, layer)
    reads: list[tuple[int, str]] = field(default_factory=list)  # (reading node, innermost module)
    calls: dict[str, tuple[tuple, dict]] = field(default_factory=dict)  # module -> first call's (args, kwargs)
    call_inputs: dict[str, int] = field(default_factory=dict)  # module -> node of its first call's first tensor
    outputs: dict[str, object] = field(default_factory=dict)  # module -> first call's output
    params: dict[int, str] = field(default_factory=dict)  # node id -> parameter name (leaf nodes)
    used: set[str] = field(default_factory=set)  # parameter names some op consumed
    latest: dict[int, int] = field(default_factory=dict)  # id(tensor) -> node id of its current value
    keep: list = field(default_factory=list)  # holds every tensor seen, so ids are never reused
    consumers: dict[int, list[int]] = field(default_factory=dict)  # node -> nodes using it (after the run)

    def node_of(self, tensor) -> int | None:
        return self.latest.get(id(tensor))


class _Recorder(TorchFunctionMode):
    def __init__(self, trace: Trace, param_names: dict[int, str], module_stack: list[str], seeds=frozenset()):
        super().__init__()
        self.seeds = seeds
        self.trace = trace
        self.param_names = param_names
        self.stack = module_stack

    def _node_for(self, tensor) -> int:
        trace = self.trace
        index = trace.latest.get(id(tensor))
        if index is None:  # a leaf: a parameter, a buffer, an input, a constant made outside the mode
            index = len(trace.nodes)
            trace.nodes.append(Node("leaf", (), {}, [], self.stack[-1] if self.stack else "", tensor))
            trace.latest[id(tensor)] = index
            trace.keep.append(tensor)
            name = self.param_names.get(id(tensor))
            if name is not None:
                trace.params[index] = name
                trace.used.add(name)
        return index

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = op_name(func)
        tensors = [t for t in _flatten((args, kwargs)) if isinstance(t, torch.Tensor)]
        if name == "get" and not isinstance(out, torch.Tensor):
            return out  # .shape, .dtype, .device: metadata, not a use of the values
        if not isinstance(out, torch.Tensor) and first_tensor(out) is None and name != "setitem":
            return out  # .item(), .tolist(), a comparison to a number: nothing flows on
        inputs = [self._node_for(t) for t in tensors]
        trace = self.trace
        raw = getattr(func, "__name__", "")
        inplace = raw == "__setitem__" or raw in _INPLACE_DUNDER or (raw.endswith("_") and not raw.startswith("__"))
        module = self.stack[-1] if self.stack else ""
        results = [out] if isinstance(out, torch.Tensor) else [t for t in _flatten(out) if isinstance(t, torch.Tensor)]
        if inplace and tensors:
            results = [tensors[0]]
        index = len(trace.nodes)
        trace.nodes.append(Node(name, args, kwargs, inputs, module, out, inplace))
        for result in results:
            trace.latest[id(result)] = index
            trace.keep.append(result)
        self._tag(index, name, args, inputs, results)
        if index in self.seeds:
            trace.stream.add(index)
        return out

    def _tag(self, index: int, name: str, args, inputs: list[int], results) -> None:
        trace = self.trace
        if name in SHAPE and inputs:
            inputs = inputs[:1]  # `y.type_as(x)`, `y.view_as(x)`: the second tensor lends only metadata
        streamed = [i for i in inputs if i in trace.stream]
        derived = any(i in trace.derived for i in inputs)
        if not streamed:
            if derived:
                trace.derived.add(index)
            return
        floating = any(r.is_floating_point() for r in results)
        if not floating:
            return  # isfinite(...), a boolean mask: no value flows on
        others = [i for i in inputs if i not in trace.stream]
        module = self.stack[-1] if self.stack else ""
        if name == "where" and len(streamed) == 1 and len(inputs) == 3 and not derived:
            trace.stream.add(index)  # some positions replaced (a multimodal model's image features)
            if others[1:]:
                trace.writes.append((index, others[-1]))
        elif name in SHAPE or (name in CAT and not others):
            trace.stream.add(index)
        elif name in ADD and len(inputs) == 2:
            trace.stream.add(index)
            if others:
                trace.writes.append((index, others[0]))
        elif name in ADD and _scalar_is_zero(args):
            trace.stream.add(index)
        elif (name in MUL or (name in DIV and inputs[0] in trace.stream)) and not derived and len(streamed) == 1:
            trace.stream.add(index)  # scaled by something independent of the stream
        else:
            trace.reads.append((index, module))
            trace.derived.add(index)


def _scalar_is_zero(args) -> bool:
    numbers = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
    return bool(numbers) and all(a == 0 for a in numbers)


def _flatten(value):
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _flatten(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _flatten(item)
    else:
        yield value


def first_tensor(value):
    for item in _flatten(value):
        if isinstance(item, torch.Tensor):
            return item
    return None


def trace_model(model: nn.Module, input_ids: torch.Tensor, layers: nn.ModuleList, seeds=frozenset()) -> Trace:
    """Run `model` once on `input_ids` ([B, T]) under the recorder; hooks removed on exit.
    `seeds`: node ids (of an earlier trace of the same input) to tag as the stream when made."""
    trace = Trace()
    param_names = {id(p): n for n, p in model.named_parameters()}
    names = {id(m): n for n, m in model.named_modules()}
    layer_names = {id(layer): names[id(layer)] for layer in layers}
    stack: list[str] = []
    recorder = _Recorder(trace, param_names, stack, seeds)

    def enter(module, args, kwargs):
        name = names.get(id(module), "")
        if id(module) in layer_names:
            hidden = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor):
                node = recorder._node_for(hidden)
                if node not in trace.stream:
                    trace.starts.append((node, name))
                    trace.stream.add(node)
        if name not in trace.calls:
            trace.calls[name] = (args, dict(kwargs))
            tensor = first_tensor((args, kwargs))
            if tensor is not None:
                trace.call_inputs[name] = recorder._node_for(tensor)
        stack.append(name)

    def leave(module, args, kwargs, output):
        name = names.get(id(module), "")
        if stack and stack[-1] == name:
            stack.pop()
        trace.outputs.setdefault(name, output)

    with HookSet() as hooks:
        for module in model.modules():
            hooks.pre_forward(module, enter, with_kwargs=True)
            hooks.forward(module, leave, with_kwargs=True, always_call=True)
        with torch.no_grad(), recorder:
            output = model(input_ids=input_ids, use_cache=False)
        trace.outputs["<logits>"] = output.logits
        logits_node = trace.latest.get(id(output.logits))
        trace.keep.append(output)
        trace.logits = logits_node
    return trace
