"""The nine architectures halfsafe once knew by hand: the tests' independent cross-check.

`fix` derives who writes into the residual stream and who reads it from the model itself
(halfsafe/roles/) and proves it exact; what cannot be derived is data in
halfsafe/data/overrides.json. These entries, written from the modeling code before derivation
existed, stay here so the derived roles can be compared with a second, independent answer
(tests/test_roles.py: equal scales and eps on every entry and on the real demo model).

In a pre-norm transformer every reader of the residual stream is an RMSNorm, and
`rms(s * x) = s * rms(x)`: multiplying every *writer* by `s` scales the stream by `s` and
changes nothing downstream (docs/numerics.md, section 3). An entry lists, per decoder layer, the
writers (a linear layer, a norm that sits after a sublayer, or a stacked expert parameter) and
the MLP's internal (up, down) pair. A reader sees `s^2 * mean(x^2) + eps`, so eps scales by s^2;
the norms that do not read the stream (q/k norms, Gemma's post-norms) share the config's eps, so
the linear layers feeding them (`eps_companions`) scale by s as well.

Paths are relative to the decoder layer, except `embedding` and `final_norm`, which are relative
to `prefix`. A role may list several candidates (a MoE model mixes dense and expert layers).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from halfsafe.errors import HalfsafeError
from halfsafe.fixing.apply import _Scale
from halfsafe.fixing.plan import Plan, SiteRoles
from tests.support.models import is_tied


@dataclass(frozen=True)
class Architecture:
    name: str
    prefix: str  # the base model, which holds `layers`, the embedding and the final norm
    attn_writers: tuple[str, ...]  # what adds the attention sublayer's output into the stream
    mlp_writers: tuple[str, ...]  # what adds the MLP's output into the stream
    mlp_pair: tuple[str, str] | None  # (up, down): the interior `act(gate) * up` is scaled inside
    readers: tuple[str, ...]  # the norms that read the stream (unchanged; listed for checking)
    eps_companions: tuple[str, ...] = ()  # linear layers feeding a norm that is not a reader
    norm_offset: float = 0.0  # the norm multiplies by (offset + w): 0 for Llama, 1 for Gemma
    norm_eps_attr: str = "variance_epsilon"  # where an RMSNorm module keeps its eps
    eps_field: str = "rms_norm_eps"  # the config field every RMSNorm's eps comes from
    layers: str = "layers"
    embedding: str = "embed_tokens"
    final_norm: str = "norm"


_LLAMA_LIKE = dict(
    prefix="model",
    attn_writers=("self_attn.o_proj",),
    mlp_writers=("mlp.down_proj",),
    mlp_pair=("mlp.up_proj", "mlp.down_proj"),
    readers=("input_layernorm", "post_attention_layernorm"),
)

# Gemma 2 and 3 normalise each sublayer's output before adding it: the post-norm is the writer,
# and its effective gain (1 + w) is what gets scaled.
_GEMMA_SANDWICH = dict(
    attn_writers=("post_attention_layernorm",),
    mlp_writers=("post_feedforward_layernorm",),
    mlp_pair=("mlp.up_proj", "mlp.down_proj"),
    readers=("input_layernorm", "pre_feedforward_layernorm"),
    norm_offset=1.0,
    norm_eps_attr="eps",
    eps_companions=("self_attn.o_proj", "mlp.down_proj"),  # feed the post-norms
)

_QK = ("self_attn.q_proj", "self_attn.k_proj")  # feed q_norm / k_norm
_GEMMA3 = dict(_GEMMA_SANDWICH, eps_companions=_GEMMA_SANDWICH["eps_companions"] + _QK)

ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("llama", **_LLAMA_LIKE),
    "MistralForCausalLM": Architecture("mistral", **_LLAMA_LIKE),
    "Qwen2ForCausalLM": Architecture("qwen2", **_LLAMA_LIKE),
    "Qwen3ForCausalLM": Architecture("qwen3", **dict(_LLAMA_LIKE, eps_companions=_QK)),
    # Sparse layers stack their experts' down projections in one [E, H, I] parameter; dense
    # layers (`mlp_only_layers`) keep a plain MLP. The interior pair applies to dense layers.
    "Qwen3MoeForCausalLM": Architecture(
        "qwen3_moe", **dict(_LLAMA_LIKE, eps_companions=_QK, mlp_writers=("mlp.experts.down_proj", "mlp.down_proj"))
    ),
    "GemmaForCausalLM": Architecture("gemma", **dict(_LLAMA_LIKE, norm_offset=1.0, norm_eps_attr="eps")),
    "Gemma2ForCausalLM": Architecture("gemma2", prefix="model", **_GEMMA_SANDWICH),
    "Gemma3ForCausalLM": Architecture("gemma3_text", prefix="model", **_GEMMA3),
    "Gemma3ForConditionalGeneration": Architecture("gemma3", prefix="model.language_model", **_GEMMA3),
}


def architecture_of(model) -> Architecture:
    """The registry entry for `model`'s class, or a clear error naming what is supported."""
    name = type(model).__name__
    entry = ARCHITECTURES.get(name)
    if entry is None:
        supported = ", ".join(sorted({a.name for a in ARCHITECTURES.values()}))
        raise HalfsafeError(
            f"{name} is not in halfsafe's architecture registry (supported: {supported}); rescaling an "
            "unknown architecture could silently change its function. Use --strategy keep-fp32, which works "
            "for any model"
        )
    return entry


def scale_factors(model: nn.Module, arch: Architecture, plan: Plan) -> dict[str, _Scale]:
    """Parameter name -> how to scale it, by the entry. Parameters not listed are unchanged."""
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


def norm_eps_settings(model: nn.Module, arch: Architecture, plan: Plan) -> list[tuple[object, str, float]]:
    """(object, attribute, new value) for the config's eps and every RMSNorm whose eps equals it:
    eps * s^2. Matching by value is this reference's simplification; the fix links each eps to
    its config field by rebuilding the model (halfsafe/roles/provenance.py)."""
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


def site_roles(arch: Architecture, num_layers: int, tied: bool) -> SiteRoles:
    """A registry entry's answer to which sites scale with the residual scale ('s'), its inverse
    ('1/s') or their pair's scale ('t'); the fix asks the derived roles (`Roles.site_roles`).

    Returns (role by site name, pair 'producer->consumer' by site name for 't' sites). Every other site is
    unchanged by the plan: readers' outputs, q/k/v, gate, logits. With a tied embedding the
    final norm's gain is divided by s to keep the logits, so its output grows by 1/s.
    """
    roles: dict[str, str] = {}
    if tied:
        roles[f"{arch.prefix}.{arch.final_norm}"] = "1/s"
    pairs: dict[str, str] = {}
    base = f"{arch.prefix}.{arch.layers}"
    for index in range(num_layers):
        layer = f"{base}.{index}"
        for writer in arch.attn_writers + arch.mlp_writers + arch.eps_companions:
            roles[f"{layer}.{writer}"] = "s"
        if arch.mlp_pair:
            up, down = arch.mlp_pair
            for name in (f"{layer}.{up}", f"{layer}.{down}:input"):
                roles[name], pairs[name] = "t", f"{layer}.{up}->{layer}.{down}"
    return roles, pairs
