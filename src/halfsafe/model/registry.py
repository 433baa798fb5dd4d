"""Per-architecture knowledge, as data: who writes into the residual stream, who reads it.

The fix no longer reads this file: `fix` derives the roles from the model (`roles/`) and
proves them exact. These nine hand-written entries stay as the tests' independent cross-check
(tests/test_roles.py: the derived scales and eps equal these on every entry and on the real
demo model), and as the place for overrides of what cannot be derived (issue 13, item 2).

In a pre-norm transformer every reader of the residual stream is an RMSNorm, and
`rms(s * x) = s * rms(x)`: multiplying every *writer* by `s` scales the stream by `s` and
changes nothing downstream (docs/numerics.md, section 3). An entry therefore lists, per decoder
layer, the writers (a linear layer, a norm that sits after a sublayer, or a stacked expert
parameter) and the MLP's internal (up, down) pair; generic code never branches on the model.

A reader sees `s^2 * mean(x^2) + eps`; the fix scales eps by s^2 too, which makes the
readers exact rather than approximately invariant (docs/numerics.md, section 3, "The eps"). Every
RMSNorm shares the config's eps, so the norms that do not read the stream (q/k norms, Gemma's
post-norms) get their input scaled by s as well: `eps_companions` are the linear layers that
feed them. Each such norm then sees s * y against s^2 * eps and returns exactly what it did.

Paths are relative to the decoder layer, except `embedding` and `final_norm`, which are
relative to `prefix`. A role may list several candidates (a MoE model mixes dense and expert
layers): each layer uses the ones it has, and must have at least one.

Adding an architecture needs no entry: a tiny planted model of its type in tests/test_roles.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import HalfsafeError


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
            "for any model, or add an entry to halfsafe/registry.py"
        )
    return entry
