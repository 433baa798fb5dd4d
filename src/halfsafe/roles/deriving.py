"""Derive who writes into the residual stream and who reads it, from a traced fp32 forward.

Phases (each a small function below), for a rescaling of the stream by s = 2^-k:
1. `_writers`: every value added into the stream, and what starts it before the first layer,
   is walked back to the parameters that scale it (walking.py): exponent +1.
2. `_readers`: every module that consumes the stream. A linear map (OLMo 2's q/k/v and
   gate/up, Gemma 4's per-layer input gate) gets its weight * 1/s (exponent -1; its bias is
   added after the product and stays). Anything else is probed on its recorded input: is it
   scale-invariant once one of its float attributes (the eps) is multiplied by s^2? That finds
   RMSNorm with w or 1 + w, LayerNorm with or without bias, norms without a weight, and their
   eps attribute whatever it is called. A reader that is neither is a refusal naming it.
3. `_companions`: a checkpoint stores one eps per config field, and reloading gives it to
   every norm built from that field. So a norm that does not read the stream (a q/k norm, a
   post-sublayer norm) but shares a field with the readers gets eps * s^2 too, and its input
   is scaled by s (walked back like a writer) so that it computes exactly what it did.
4. `_side_uses`: a scaled parameter used by another op as well (a tied embedding read by the
   LM head) scales that op's output; a linear op is compensated on its input side (the final
   norm's gain * 1/s), anything else is a refusal.
5. Parameters the trace never touched (experts no token was routed to) follow their analogues.

Every parameter's exponent must be the same for all the ops that use it; where it cannot be,
the roles carry a refusal. A derived role is a hypothesis: the exactness gate (gate.py) checks
it on the model itself.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn

from ..model.layers import find_decoder_layers
from .probing import depends_on, probe_invariance
from .provenance import eps_fields
from .roles import Roles
from .tracing import SHAPE, Trace, trace_model
from .walking import (
    LINEAR,
    Scaling,
    Unscalable,
    _linear_params,
    exclusive_scalers,
    only_read_along,
    param_of,
    producer,
    reads_outside,
    scalers,
)


def derive_roles(model: nn.Module, input_ids: torch.Tensor | None = None) -> Roles:
    """The roles of `model` (fp32, unchanged) from forward passes on `input_ids` ([B, T];
    default: 16 distinct low token ids): one, or two when something leads into the first layer."""

    layers_path, layers = find_decoder_layers(model)
    if input_ids is None:
        input_ids = default_probe_ids(model)
    trace = trace_model(model, input_ids, layers)
    roles = Roles(model_class=type(model).__name__)
    starts = _start_scalings(trace, roles)
    if starts:
        # What leads to the first layer (the embedding times Gemma's normaliser, plus position
        # embeddings) scales too; other ops may read it before the first layer (Gemma 4's
        # per-layer projection reads the embeddings). A second run tags that path as the
        # stream from where it is made, so those readers are found like any other.
        seeds = frozenset(n for _, path in starts for n in path)
        trace = trace_model(model, input_ids, layers, seeds=seeds)
    needs: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))  # param -> op -> exponent
    offsets: dict[str, float] = {}

    uses = _uses(trace)

    def use_of(scaling: Scaling, along: set[int] | None) -> int:
        """The op that consumes the parameter, past any cast or view the walk stopped at; with
        `along` (the walk's nodes), the one on that path: Gemma 4 reads a row of its embedding
        table into the stream by `where` as well as through the embedding op."""
        if scaling.op in uses[scaling.param]:
            return scaling.op
        frontier = [scaling.op]
        while frontier:
            n = frontier.pop()
            for c in trace.consumers.get(n, []):
                if along is not None and c not in along:
                    continue
                if c in uses[scaling.param]:
                    return c
                if trace.nodes[c].op in SHAPE:
                    frontier.append(c)
        return scaling.op

    def require(scalings: list[Scaling], exponent: int, why: str, along: set[int] | None = None) -> bool:
        scalings = [Scaling(x.param, x.offset, use_of(x, along)) for x in scalings]
        for s in {(x.param, x.op): x for x in scalings}.values():
            if offsets.setdefault(s.param, s.offset) != s.offset:
                roles.refusals.append(f"{s.param} is used as a gain with offsets {offsets[s.param]:g} and "
                                      f"{s.offset:g} ({why})")
                return False
            needs[s.param][s.op] += exponent
        return True

    containers = {layers_path, ""} | {f"{layers_path}.{i}" for i in range(len(layers))}
    containers |= {layers_path.rsplit(".", i)[0] for i in range(1, layers_path.count(".") + 1)}
    reading = {module for _, module in trace.reads} - containers
    for found, _ in starts:
        require(found, 1, "stream start")
        roles.writers += [m for m in dict.fromkeys(s.param.rsplit(".", 1)[0] for s in found) if m not in roles.writers]
    _writers(trace, roles, require, reading)
    _readers(model, trace, roles, require, containers)
    _companions(model, trace, roles, require)
    _side_uses(trace, roles, needs, require)
    exponents = _settle(trace, roles, needs)
    _follow_analogues(model, trace, exponents, offsets, roles, layers_path)
    roles.scales = {p: [e, offsets.get(p, 0.0)] for p, e in sorted(exponents.items()) if e}
    roles.pairs, roles.interior = _pairs(trace, roles.companions)
    return roles


def default_probe_ids(model: nn.Module, tokens: int = 16) -> torch.Tensor:
    """[1, tokens]: distinct ids from the low end of the vocabulary (MoE routes them widely)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    return (torch.arange(tokens, device=device) * 7 + 1).remainder(vocab)[None]


def _start_scalings(trace: Trace, roles: Roles) -> list[tuple[list[Scaling], set[int]]]:
    """For each value that enters a decoder layer untagged (the first layer's input): the
    parameters that scale it, and the nodes on the way (the values that scale with it)."""
    found = []
    for node, layer in trace.starts:
        visited: set[int] = set()
        try:
            scalings = scalers(trace, node, top=True, visited=visited)
        except Unscalable as error:
            roles.refusals.append(f"what enters {layer} cannot be scaled: {error}")
            continue
        found.append((scalings, {n for n in visited if n not in trace.params}))
    return found


def _writers(trace: Trace, roles: Roles, require, reading: set[str]) -> None:
    """Walk every write back to its parameters. An addition inside a module that itself reads
    the stream (LayerNorm's `x - mean(x)`) is part of that reader, probed as a whole, not a write.
    What a walk goes through gets scaled by s, so anything else that reads it must be compensated
    (below) or refused: LongCat-Flash's identity experts add a norm's output into the stream while
    its dense MLP, router and routed experts read it."""
    sources = [(add, operand, False) for add, operand in trace.writes if trace.nodes[add].module not in reading]
    sources += [(None, node, True) for node, _ in trace.starts]  # none after the second run, unless a later layer
    paths: set[int] = {add for add, _ in trace.writes}
    for add, operand, is_start in sources:
        visited: set[int] = set()
        try:
            found = scalers(trace, operand, top=is_start, visited=visited, reads_checked=not is_start)
        except Unscalable as error:
            what = "what enters the first layer" if is_start else "a value added into the residual stream"
            roles.refusals.append(f"{what} cannot be scaled: {error}")
            continue
        if not is_start:
            paths |= {n for n in visited if n not in trace.params}
        require(found, 1, "writer", along=None if is_start else visited | {add})
        for s in found:
            module = s.param.rsplit(".", 1)[0]
            if module not in roles.writers:
                roles.writers.append(module)
    # A value on a writer's path read by a linear op as its input: the op's weight x 1/s keeps
    # what it computes. Any other reader would see the scale: a refusal naming it.
    for v, c, u in reads_outside(trace, paths - {add for add, _ in trace.writes}, paths | trace.stream):
        value, reader = trace.nodes[v], trace.nodes[c]
        weight = _linear_params(trace, reader, c) if reader.op in LINEAR and reader.op != "einsum" else None
        if weight and reader.inputs[:1] == [u]:
            require(weight[:1], -1, f"compensation for {reader.module}")
            roles.readers.setdefault(reader.module, "linear: weight x 1/s")
            continue
        roles.refusals.append(f"a value added into the residual stream ('{value.op}' in {value.module or 'the model'}) "
                              f"is also read by '{reader.op}' in {reader.module or 'the model'}: scaling it for the "
                              "stream would change that reader")
        break


def _readers(model: nn.Module, trace: Trace, roles: Roles, require, containers: set[str]) -> None:
    reads: dict[str, list[int]] = defaultdict(list)
    for node, module in trace.reads:
        reads[module].append(node)
    for module, nodes in reads.items():
        ops = sorted({trace.nodes[n].op for n in nodes})
        if module in containers:
            roles.refusals.append(f"{module or type(model).__name__} reads the residual stream inline "
                                  f"({', '.join(ops)}), outside any module halfsafe can compensate")
            continue
        linear = [_linear_params(trace, trace.nodes[n], n) for n in nodes if trace.nodes[n].op in LINEAR]
        if len(linear) == len(nodes) and all(linear):
            require([params[0] for params in linear], -1, f"linear reader {module}")
            roles.readers[module] = "linear: weight x 1/s"
            continue
        found = probe_invariance(model.get_submodule(module), trace, module)
        if found is None:
            roles.refusals.append(f"{module} ({type(model.get_submodule(module)).__name__}) reads the residual "
                                  f"stream ({', '.join(ops)}) and is neither linear nor scale-invariant (no float "
                                  "attribute of it, such as an eps, makes it so)")
        elif found:
            roles.readers[module] = f"scale-invariant: {found} x s^2"
            roles.eps.append((module, found) if "." not in found else (f"{module}.{found.rsplit('.', 1)[0]}",
                                                                       found.rsplit(".", 1)[1]))
        else:
            roles.readers[module] = "scale-invariant"


def _companions(model: nn.Module, trace: Trace, roles: Roles, require) -> None:
    """Link the readers' eps to config fields (provenance.py: by rebuilding the model, never by
    equal values), then give every other norm built from those fields its input times s."""
    values = {getattr(model.get_submodule(m), a) for m, a in roles.eps}
    fields = eps_fields(model, values) if roles.eps else {}
    if isinstance(fields, str):
        roles.export_blockers.append(fields)
        roles.export_refusals.append(fields)
        return
    roles.config_eps = sorted({fields[e] for e in roles.eps if e in fields})
    readers = tuple(roles.readers)
    for (name, attr), field_name in sorted(fields.items()):
        if field_name not in roles.config_eps or name in roles.readers or name.startswith(
                tuple(r + "." for r in readers)) or name not in trace.call_inputs:
            continue  # a reader (already listed), or a module the forward never ran
        if not depends_on(model.get_submodule(name), trace, name, attr):
            continue  # kept only to build a child (a mixer's `layer_norm_epsilon`), never read
        try:
            found = exclusive_scalers(trace, trace.call_inputs[name], name)
        except Unscalable as error:
            # In memory each module keeps its own eps, so the rescaled model stays exact; a
            # checkpoint has one value per field, so an export cannot be.
            roles.export_blockers.append(f"{name} shares the config's {field_name} with the stream's readers but its "
                                         f"input cannot scale: {error}")
            roles.kept_eps.append((name, attr))
            continue
        require(found, 1, f"eps companion {name}")
        roles.eps.append((name, attr))
        roles.companions.append(name)
    roles.eps_source = {f"{m}:{a}": fields[m, a] for m, a in [*roles.eps, *roles.kept_eps] if (m, a) in fields}
    if roles.export_blockers:
        roles.config_eps = []
    missing = [f"{m}.{a}" for m, a in roles.eps if (m, a) not in fields]
    if missing:
        roles.export_blockers.append(f"eps not stored in the config (an exported checkpoint would reload it "
                                     f"unscaled): {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")


def _uses(trace: Trace) -> dict[str, list[int]]:
    """Parameter -> the ops that consume it (through shape changes and casts)."""
    consumers: dict[int, list[int]] = defaultdict(list)
    for index, node in enumerate(trace.nodes):
        for i in node.inputs:
            consumers[i].append(index)
    trace.consumers = consumers
    uses: dict[str, list[int]] = defaultdict(list)
    for leaf, name in trace.params.items():
        frontier = [leaf]
        while frontier:
            n = frontier.pop()
            for c in consumers[n]:
                if trace.nodes[c].op in SHAPE and trace.nodes[c].inputs[:1] == [n]:
                    frontier.append(c)
                elif c not in uses[name]:
                    uses[name].append(c)
    return uses


def _side_uses(trace: Trace, roles: Roles, needs, require, rounds: int = 3) -> None:
    uses = _uses(trace)
    for _ in range(rounds):
        pending = []
        for param, per_op in list(needs.items()):
            exponent = next(iter(per_op.values())) if len(set(per_op.values())) == 1 else None
            if exponent in (None, 0):
                continue
            for op in uses.get(param, []):
                if op not in per_op:
                    pending.append((param, op, exponent))
        if not pending:
            return
        for param, op, exponent in pending:
            node = trace.nodes[op]
            if node.op in LINEAR and node.op != "einsum":
                params = _linear_params(trace, node, op)
                if params and params[0].param == param:
                    try:
                        found = exclusive_scalers(trace, node.inputs[0], node.module)
                    except Unscalable as error:
                        roles.refusals.append(f"{param} is scaled as a writer and also read by "
                                              f"{node.module or 'the model'}, which cannot be compensated: {error}")
                        needs[param][op] = exponent
                        continue
                    needs[param][op] += exponent  # the op sees the scaled weight ...
                    require(found, -exponent, f"compensation for {node.module}")  # ... and an input / s
                    roles.readers.setdefault(node.module, f"uses {param}: input x 1/s")
                    continue
            roles.refusals.append(f"{param} is scaled but {node.module or 'the model'} also uses it ('{node.op}')")
            needs[param][op] = exponent


def _settle(trace: Trace, roles: Roles, needs) -> dict[str, int]:
    exponents = {}
    for param, per_op in needs.items():
        distinct = set(per_op.values())
        if len(distinct) > 1:
            modules = ", ".join(f"{trace.nodes[op].module} (s^{e})" for op, e in per_op.items())
            roles.refusals.append(f"{param} would need different scales in its uses: {modules}")
            continue
        exponents[param] = distinct.pop()
    return exponents


_INDEX = re.compile(r"\.(\d+)\.")


def _follow_analogues(model: nn.Module, trace: Trace, exponents: dict[str, int], offsets: dict[str, float],
                      roles: Roles, layers_path: str) -> None:
    """A parameter no op used (an expert no token was routed to) takes the scale its analogues
    - the same name with one index changed - agree on. One in the layer stack with no analogue
    to follow has an unknown role, which the gate cannot check either: a refusal naming it."""
    params = dict(model.named_parameters())
    names = list(params)
    known = {n: exponents.get(n, 0) for n in names if n in trace.used}
    for name in names:
        if name in trace.used:
            continue
        votes = set()
        for match in _INDEX.finditer(name):
            pattern = re.escape(name[: match.start()]) + r"\.\d+\." + re.escape(name[match.end():])
            votes |= {(known[other], offsets.get(other, 0.0)) for other in known if re.fullmatch(pattern, other)}
        if len(votes) == 1:
            exponent, offset = votes.pop()
            if exponent:
                exponents[name] = exponent
                offsets[name] = offset
        elif name.startswith(layers_path + ".") and params[name].is_floating_point():
            roles.refusals.append(f"{name} was never used by the probe's forward pass and has no used analogue, so "
                                  "its role is unknown (a routed expert no probe token reached, or a branch a forward "
                                  "pass on token ids alone does not take)")


def _pairs(trace: Trace, companions: list[str]) -> tuple[list[tuple[str, str]], dict[str, dict[str, int]]]:
    """(producer, consumer) linear pairs inside a sublayer: the consumer writes the stream and
    the producer's output reaches it linearly and nowhere else (MLP up -> down, attention
    v -> o). Scaling the producer (weight and bias) by t and the consumer's weight by 1/t keeps
    the function and shrinks everything in between: the interior fix. Returns the pairs and,
    per pair 'producer->consumer', the exponent of t for each parameter."""
    pairs, exponents = [], {}
    # A consumer writes the stream, or feeds a norm that does (Gemma's o_proj -> post-norm).
    sources = [operand for _, operand in trace.writes] + [trace.call_inputs[c] for c in companions]
    for operand in sources:
        try:
            found = scalers(trace, operand, top=False)
        except Unscalable:
            continue
        for s in found:
            node = trace.nodes[s.op]
            params = _linear_params(trace, node, s.op) if node.op in LINEAR else None
            if not params or params[0].param != s.param or not node.inputs:
                continue
            path: list[int] = []
            source = producer(trace, node.inputs[0], path=path)
            if source is None or not only_read_along(trace, path):
                continue
            made = _linear_params(trace, trace.nodes[source], source)
            pair = (made[0].param.rsplit(".", 1)[0], s.param.rsplit(".", 1)[0])
            if pair not in pairs and pair[0] != pair[1]:
                pairs.append(pair)
                exponents[f"{pair[0]}->{pair[1]}"] = {**{p.param: 1 for p in made}, s.param: -1}
    return pairs, exponents


__all__ = ["derive_roles", "param_of"]
