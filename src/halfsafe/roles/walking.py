"""Walk a trace backwards from a value to the parameters that scale it.

`scalers(trace, node)` answers: which parameters, each multiplied by s, multiply this value by
s (and change nothing else)? The walk goes back through ops that are linear in one operand -
shape changes, casts, sums, products with something independent, additions (all terms), a
MoE's scatter of expert outputs into a zero buffer - and stops at the first op where a
parameter enters linearly:
- `linear(x, W, b)`, `addmm(b, x, W)`, a matmul or einsum with a parameter: W (and b) * s;
- `embedding(ids, W)`: W * s (a token or learned position embedding);
- a gain, `g * y` or `(c + g) * y` (RMSNorm, Gemma's `1 + w`, a layer scale): the effective gain
  `c + g` * s, so `g' = s * (c + g) - c` (the convention is read from the traced ops, not the class);
- `layer_norm(x, w, b)`: w and b * s;
- attention, `softmax(q k^T) v`, is linear in v: the walk continues into v.
A value that no parameter scales (a constant added, a norm without a gain, an op not listed)
raises `Unscalable` naming the op and its module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tracing import ADD, CAT, DIV, MUL, SHAPE, Trace, first_tensor

ZEROS = {"zeros", "zeros_like", "new_zeros", "empty", "empty_like", "new_empty", "zero"}
LINEAR = {"linear", "addmm", "matmul", "mm", "bmm", "einsum", "grouped_mm", "baddbmm"}
EMBED = {"embedding"}
NORM = {"layer_norm", "rms_norm", "group_norm"}
# Linear in their first argument (for scaling purposes: sums and means keep the scale).
BACK_PASS = SHAPE | {"sum", "mean", "neg", "index_select", "gather", "masked_fill", "pad", "repeat_interleave"}
# Writes into an existing buffer: the old contents and the new values must all scale.
ASSIGN = {"setitem", "index_add", "index_copy", "index_put", "scatter_add", "masked_scatter", "scatter", "copy"}
ATTENTION = {"scaled_dot_product_attention"}


class Unscalable(Exception):
    def __init__(self, reason: str, module: str):
        super().__init__(f"{reason} (in {module or 'the model'})")
        self.reason = reason
        self.module = module


@dataclass(frozen=True)
class Scaling:
    param: str  # a parameter name, as in named_parameters()
    offset: float  # the gain convention: the op uses (offset + param)
    op: int  # the node that consumes the parameter (its use is accounted for)


def param_of(trace: Trace, n: int) -> tuple[str, list[int]] | None:
    """The parameter a value is (through shape changes and casts), and the nodes in between."""
    chain = []
    while n not in trace.params:
        node = trace.nodes[n]
        if node.op not in SHAPE | {"index_select"} or not node.inputs:
            return None
        chain.append(n)
        n = node.inputs[0]
    return trace.params[n], chain


def gain_of(trace: Trace, n: int) -> tuple[str, float, list[int]] | None:
    """A parameter used as a gain: `g` or `c + g` with a number c (Gemma's `1 + w`)."""
    found = param_of(trace, n)
    if found:
        return found[0], 0.0, found[1]
    node = trace.nodes[n]
    if node.op in {"add", "radd"} and len(node.inputs) == 1:
        numbers = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        found = param_of(trace, node.inputs[0])
        if found and len(numbers) == 1:
            return found[0], float(numbers[0]), found[1] + [n]
    return None


def _floating(trace: Trace, n: int) -> bool:
    out = first_tensor(trace.nodes[n].out)  # split / chunk give a tuple
    return out is not None and out.is_floating_point()


def exclusive_scalers(trace: Trace, n: int, reader: str) -> list[Scaling]:
    """`scalers`, but only if nothing else reads what gets scaled: Qwen3.5's q_proj gives both
    the query (into q_norm) and an output gate (into a sigmoid), so scaling it for the query's
    sake would change the gate; DeepSeek's kv_a_proj gives the latent (into kv_a_layernorm)
    and the rotary key. `reader`: the module the value is scaled for, whose own ops may read it.
    Raises Unscalable naming the other reader."""
    visited: set[int] = set()
    found = scalers(trace, n, top=False, visited=visited)
    mine = {c for c in trace.consumers.get(n, [])
            if trace.nodes[c].module == reader or trace.nodes[c].module.startswith(reader + ".")}
    other = read_outside(trace, visited - mine, visited | mine)
    if other is not None:
        raise Unscalable(f"'{trace.nodes[other[0]].op}' output is also read by '{trace.nodes[other[1]].op}'",
                         trace.nodes[other[1]].module)
    return found


def read_outside(trace: Trace, values: set[int], allowed: set[int]) -> tuple[int, int] | None:
    """(value, reader): the first read of one of `values` (or a view of it) by a node outside
    `allowed`, or None. `y.type_as(u)` reads only u's metadata and does not count."""
    return next(((v, c) for v, c, _ in reads_outside(trace, values, allowed)), None)


def reads_outside(trace: Trace, values: set[int], allowed: set[int]) -> list[tuple[int, int, int]]:
    """(value, reader, what it read: the value or a view of it) for every read of `values` by a
    node outside `allowed`."""
    found = []
    for v in sorted(values):
        frontier, seen = [v], set()
        while frontier:
            u = frontier.pop()
            for c in trace.consumers.get(u, []):
                node = trace.nodes[c]
                if c in allowed or c in seen or (node.op in SHAPE and node.inputs[:1] != [u]):
                    continue
                seen.add(c)
                if node.op in SHAPE:
                    frontier.append(c)  # a view of the value: whoever reads it reads the value
                else:
                    found.append((v, c, u))
    return found


def scalers(trace: Trace, n: int, *, top: bool = True, memo: dict | None = None,
            visited: set | None = None, reads_checked: bool = False) -> list[Scaling]:
    """The scalings that multiply node `n`'s value by s. `top`: `n` may itself be tagged as
    the stream (a layer's input whose producer is being looked for). `visited` collects the
    nodes the walk went through. `reads_checked`: the caller compensates or refuses every other
    read of the visited nodes, so a product may scale a factor that the other is computed from."""
    memo = {} if memo is None else memo
    if visited is not None:
        visited.add(n)
        memo = {}  # every node on the path must be seen
    if n in memo:
        return memo[n]
    if not top and n in trace.stream:
        raise Unscalable("the value loops back to the residual stream", trace.nodes[n].module)
    result = _scalers(trace, n, memo, visited, reads_checked)
    memo[n] = result
    return result


def _linear_params(trace: Trace, node, n: int) -> list[Scaling] | None:
    """The parameter operands of a linear op (weight, then bias), or None if the weight is not one."""
    tensors = [i for i in node.inputs if _floating(trace, i)]
    if node.op == "linear":
        weight_bias = tensors[1:]
    elif node.op in {"addmm", "baddbmm"}:
        weight_bias = tensors[2:] + tensors[:1]
    else:
        weight_bias = [i for i in tensors if param_of(trace, i)][:1]
    if not weight_bias or not param_of(trace, weight_bias[0]):
        return None
    found = [param_of(trace, i) for i in weight_bias]
    if not all(found):
        return None
    return [Scaling(name, 0.0, n) for name, _ in found]


def _scalers(trace: Trace, n: int, memo: dict, visited: set | None = None,
             reads_checked: bool = False) -> list[Scaling]:
    if n in trace.params:
        return [Scaling(trace.params[n], 0.0, n)]
    node = trace.nodes[n]
    op, module = node.op, node.module
    inputs = [i for i in node.inputs if _floating(trace, i)]

    def walk(i: int, into: set | None = visited) -> list[Scaling]:
        return scalers(trace, i, top=False, memo=memo, visited=into, reads_checked=reads_checked)

    def first_of(candidates: list[int], into: set | None = visited) -> list[Scaling]:
        errors = []
        for i in candidates:
            try:
                return walk(i, into)
            except Unscalable as error:
                errors.append(error)
        raise errors[0] if errors else Unscalable(f"'{op}' has no operand to scale", module)

    if op == "leaf":
        raise Unscalable("a constant or buffer that no parameter scales", module)
    if op in ZEROS or (op == "fill" and node.args[1:2] == (0,)):
        return []
    if op in EMBED:
        found = param_of(trace, inputs[0]) if inputs else None
        if not found:
            raise Unscalable("an embedding whose table is not a parameter", module)
        return [Scaling(found[0], 0.0, n)]
    if op in LINEAR:
        params = _linear_params(trace, node, n)
        if params is not None:
            return params
        return first_of(inputs[::-1])  # e.g. probs @ v: the value side
    if op in NORM:
        params = [param_of(trace, i) for i in inputs[1:]]
        if not params or not all(params):
            raise Unscalable(f"'{op}' has no gain parameter to scale", module)
        return [Scaling(name, 0.0, n) for name, _ in params]
    if op in MUL:
        if len(inputs) == 1:
            return walk(inputs[0])
        for i in inputs:
            gain = gain_of(trace, i)
            if gain:  # the op that uses the parameter: this product, or the `c + g` before it
                return [Scaling(gain[0], gain[1], gain[2][-1] if gain[1] else n)]
        # x * rsqrt(mean(x^2)) does not scale with x: walk into a factor only if the other
        # factor does not depend on it.
        independent = [i for i in inputs if not any(_depends(trace, j, i) for j in inputs if j != i)]
        if not independent:
            raise Unscalable(f"'{op}' multiplies a value by a function of itself (a norm without a gain)", module)
        if not reads_checked or visited is None:
            return first_of(independent)
        trial: set[int] = set()  # a failed walk's nodes must not join the path
        try:
            found = first_of(independent, trial)
            visited |= trial
            return found
        except Unscalable:
            # x * w(x), w a routing weight computed from x (LongCat-Flash's identity experts, transformers
            # >= 5.25): x scales and w keeps its value if what w reads of x is compensated. The caller
            # checks every read of the visited nodes and refuses any it cannot compensate.
            dependent = [i for i in inputs if i not in independent]
            if not dependent:
                raise
            return first_of(dependent)
    if op in DIV and inputs and isinstance(node.args[0], torch.Tensor) and node.inputs[0] == inputs[0]:
        return walk(inputs[0])
    if op in ADD:
        numbers = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool) and a != 0]
        if numbers:
            raise Unscalable(f"'{op}' adds a constant ({numbers[0]}), which does not scale", module)
        return [s for i in inputs for s in walk(i)]
    if op in CAT:
        return [s for i in inputs for s in walk(i)]
    if op in ASSIGN:
        parts = inputs[1:] if op == "copy" else inputs
        return [s for i in parts for s in walk(i)]
    if op in BACK_PASS and inputs:
        return walk(inputs[0])
    if op in ATTENTION and len(inputs) >= 3:
        return walk(inputs[2])  # softmax(q k^T) v is linear in v
    raise Unscalable(f"'{op}' is not linear in a parameter", module)


def _depends(trace: Trace, later: int, earlier: int) -> bool:
    """Is node `later` computed from node `earlier`? Nodes are in execution order, so the
    search never goes below `earlier`."""
    if later == earlier:
        return True
    seen, frontier = set(), [later]
    while frontier:
        n = frontier.pop()
        for i in trace.nodes[n].inputs:
            if i == earlier:
                return True
            if i > earlier and i not in seen:
                seen.add(i)
                frontier.append(i)
    return False


def producer(trace: Trace, n: int, depth: int = 0, path: list | None = None) -> int | None:
    """The linear op (with a parameter weight) whose output reaches node `n` through ops that
    are linear in it: for `down_proj`'s input `act(gate) * up`, the `up` projection; for
    `o_proj`'s input `softmax(q k^T) v`, the `v` projection. None if there is none. `path`
    collects the nodes from `n` back to it."""
    if depth > 64 or n in trace.stream or n in trace.params:
        return None
    node = trace.nodes[n]
    inputs = [i for i in node.inputs if _floating(trace, i)]
    if node.op in LINEAR and _linear_params(trace, node, n) is not None:
        if path is not None:
            path.append(n)
        return n
    if node.op in ATTENTION and len(inputs) >= 3:
        candidates = [inputs[2]]
    elif node.op in MUL | LINEAR:
        candidates = inputs
    elif node.op in BACK_PASS | DIV | CAT and inputs:
        candidates = inputs[:1]
    else:
        return None
    for i in candidates:
        tail: list = []
        found = producer(trace, i, depth + 1, tail)
        if found is not None:
            if path is not None:
                path.extend([n] + tail)
            return found
    return None


def only_read_along(trace: Trace, path: list[int]) -> bool:
    """Is every value on `path` (but its first, the consumer's input) read only by the next
    node on it? A fused gate_up projection fails: its gate half goes to the activation."""
    on_path = set(path)
    for v in path[1:]:
        frontier = [v]
        while frontier:
            u = frontier.pop()
            for c in trace.consumers.get(u, []):
                node = trace.nodes[c]
                if c in on_path or (node.op in SHAPE and node.inputs[:1] != [u]):
                    continue
                if node.op in SHAPE:
                    frontier.append(c)
                else:
                    return False
    return True
