"""A config of any transformers causal-LM type, its sizes shrunk generically: the narrow stand-in
`roles.standin` derives roles on (tests/support/planted.py builds tiny planted models from it).

The shrinking is data, not code per model: every size-like field a config has is set from
`SIZES` (hidden 64, 2 layers, 4 heads / 2 kv heads, intermediate 128, vocab 256, 4 experts of
which 2 per token...), per-layer lists are cut to the new depth keeping one of each kind (a
hybrid keeps an attention and a Mamba layer), and token ids beyond the vocabulary are moved
into it. Nested configs (a multimodal model's text and vision configs) are shrunk the same way.
What a config class derives from those sizes (Zamba 2's Mamba head width) it derives again; the
few fields a class's defaults leave unset though its model needs them are data (UNSET_FIELDS).
"""

from __future__ import annotations

import copy
import dataclasses

from huggingface_hub.errors import StrictDataclassError

LAYERS = 2

SIZES = {
    "hidden_size": 64, "d_model": 64, "n_embd": 64, "n_embed": 64, "dim": 64, "embed_dim": 64, "model_dim": 64,
    "num_hidden_layers": LAYERS, "n_layer": LAYERS, "n_layers": LAYERS, "num_layers": LAYERS,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4,
    "num_key_value_heads": 2, "n_kv_heads": 2, "kv_n_heads": 2, "num_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 16, "kv_channels": 16, "attention_head_dim": 16, "global_head_dim": 16,
    "intermediate_size": 128, "n_inner": 128, "ffn_dim": 128, "ffn_hidden_size": 128, "d_ff": 128,
    "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "expert_intermediate_size": 64,
    "ffn_dim_multiplier": None,
    "vocab_size": 256, "max_position_embeddings": 256, "n_positions": 256, "n_ctx": 256, "max_seq_len": 256,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "num_shared_experts": 1,
    "n_shared_experts": 1, "moe_num_shared_experts": 1,
    "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2, "moe_top_k": 2, "moe_k": 2, "top_k": 2,
    "n_group": 1, "num_expert_group": 1, "topk_group": 1,
    # LongCat-Flash's identity experts: 256 beside 4 routed ones would take every token
    "zero_expert_num": 2,
    "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "qk_head_dim": 16, "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8,
    # Qwen4-Exp's token indexer, unset by default though its default layers use it; one key head and
    # a budget of whole compressed blocks, as its config requires
    "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
    "indexer_compress_ratio": 4,
    "sliding_window": 32, "window_size": 32, "attention_window_size": 32,
    "mamba_d_state": 16, "mamba_n_heads": 4, "mamba_d_head": 32, "mamba_n_groups": 1, "mamba_d_conv": 4,
    "mamba_head_dim": 32, "mamba_d_ssm": 128, "ssm_state_size": 16, "state_size": 16, "n_groups": 1,
    "time_step_rank": 8,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    # RecurrentGemma's recurrence width, which its class derives as hidden_size when unset: at 64 the
    # planted tiny model's fixed float16 overflows in temporal_block.linear_out, at 128 (or the full
    # 2560 an unshrunk width gave) it does not
    "lru_width": 128,
    "linear_num_heads": 4, "linear_head_dim": 16, "linear_conv_kernel_dim": 4, "conv_L_cache": 3,
    "block_dim": 64, "block_ff_dim": 128,
    "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": 256, "num_kv_shared_layers": 0,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "rotary_dim": 8, "rotary_emb_base": 10000,
    "num_nextn_predict_layers": 0, "image_size": 32, "patch_size": 16,
    "attn_logit_softcapping": None, "initializer_range": 0.2, "use_cache": False, "tie_word_embeddings": None,
}
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")

# Fields a config class leaves unset (None, empty or undeclared) though its model reads them: the
# class's defaults build no model, a checkpoint's config.json supplies them. Set only where unset.
UNSET_FIELDS = {
    # no default layer_types, yet each decoder layer reads its own entry ("conv" or attention)
    "Lfm2MoeConfig": {"layer_types": ["conv", "full_attention"]},
    # DbrxAttention reads attn_config.rope_theta, which the class no longer declares
    # (the rotary embedding itself reads rope_parameters; the value only has to exist), and clamps
    # q/k/v to +-clip_qkv without a guard for its default None (DBRX's checkpoint: 8)
    "DbrxAttentionConfig": {"rope_theta": 500000.0, "clip_qkv": 8.0},
    # rope_parameters default to {}, yet the rotary embedding reads one entry per layer type
    "CohereCompassTextConfig": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}},
}
# Depths below which transformers builds no model of a class. Zamba's hybrid layers share one
# attention block, tied from the first hybrid layer into the others: with a single hybrid layer
# the tie finds no target and transformers refuses, so three layers (Mamba, hybrid, hybrid).
MIN_DEPTH = {"ZambaConfig": 3}
# Values a class's own validation (run when its config is saved) demands, which SIZES' generic
# choice breaks (set after the generic fix-ups below, which they override): ZAYA's router takes one
# expert per token only. Dots3's sliding-window layers need head_dim = qk_nope + qk_rope, and its
# rotary tables span head_dim x partial_rotary_factor (0.25, kept from the full config) = qk_rope:
# the generic latent-attention rule (head_dim = qk_rope, 8) builds a model but saves no config.
REQUIRED_FIELDS = {"ZayaConfig": {"num_experts_per_tok": 1},
                   "Dots3NoteTextConfig": {"head_dim": 16, "qk_nope_head_dim": 12, "qk_rope_head_dim": 4}}
TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
                "image_token_id", "image_token_index", "video_token_id", "boi_token_id", "eoi_token_id")


def _cut(values: list, depth: int) -> list:
    """A per-layer list cut to `depth` entries, keeping one of each kind where it can."""
    kept = []
    for value in values:
        if value not in kept and len(kept) < depth:
            kept.append(value)
    while len(kept) < depth:
        kept.append(values[len(kept) % len(values)])
    return kept


def shrink_config(config, depth: int = LAYERS):
    """`config` shrunk in place (and returned): every size field in SIZES that it has, per-layer
    lists cut to `depth`, nested configs likewise; then the fields its class derives from others
    derived again, and the few fixes below that keep the shrunk sizes consistent."""
    from transformers import PretrainedConfig

    depth = max(depth, MIN_DEPTH.get(type(config).__name__, 0))
    original = {}
    for attr in LAYER_COUNTS:
        if isinstance(getattr(config, attr, None), int):
            original = {"depth": getattr(config, attr)}
            break
    for name, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            shrink_config(value, depth)
        elif isinstance(value, dict) and "model_type" in value:
            setattr(config, name, shrink_config(type(config).sub_configs[name](**value), depth).to_dict()
                    if name in getattr(type(config), "sub_configs", {}) else value)
    for name, value in UNSET_FIELDS.get(type(config).__name__, {}).items():
        if not vars(config).get(name):
            setattr(config, name, copy.deepcopy(value))
    for name, value in SIZES.items():
        if name in vars(config) and name != "tie_word_embeddings":
            current = vars(config)[name]  # not getattr: a per-layer attribute refuses global reads
            if value is None or current is None or isinstance(current, type(value)):
                if isinstance(current, list) and name == "mlp_only_layers":
                    value = []
                setattr(config, name, depth if name in LAYER_COUNTS else value)
    for name, value in list(vars(config).items()):
        if isinstance(value, list) and original and len(value) == original["depth"] and len(value) > depth:
            setattr(config, name, _cut(value, depth))
    fields = vars(config)
    # Mamba 2: heads span the expansion
    if all(f in fields for f in ("expand", "num_heads", "head_dim", "hidden_size")):
        config.head_dim = config.expand * config.hidden_size // config.num_heads
    if "kv_lora_rank" in fields and "num_key_value_heads" in fields:
        # latent attention expands its latent into every head: as many key/value heads as heads
        # (grouping them would repeat the expanded keys past the query heads)
        config.num_key_value_heads = fields["num_attention_heads"]
    if "qk_rope_head_dim" in fields and "head_dim" in fields:
        config.head_dim = config.qk_rope_head_dim  # multi-head latent attention: rotary tables span the rope part
    for name, value in REQUIRED_FIELDS.get(type(config).__name__, {}).items():
        setattr(config, name, value)
    _derive_again(config)
    _trim_per_layer_config(config, depth)
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int):
        for field in TOKEN_FIELDS:
            token = getattr(config, field, None)
            if isinstance(token, int) and token >= vocab:
                setattr(config, field, min(2 + TOKEN_FIELDS.index(field), vocab - 1))
    return config


def _trim_per_layer_config(config, depth: int) -> None:
    """A heterogeneous config (Gemma 4, Dots3's per-layer overrides) keeps the overrides its class
    computed for the full depth (Gemma 4: keys 5, 11, ... 29), which name no layer of the shrunk
    model and make the class refuse to save it; set again from the overrides of the layers kept."""
    if not getattr(config, "is_heterogeneous", False):
        return
    try:
        from transformers.integrations.heterogeneity.configuration_utils import _get_explicit_per_layer_overrides
    except ImportError:  # another transformers: leave it as built
        return
    overrides = _get_explicit_per_layer_overrides(config)
    config.per_layer_config = {k: v for k, v in overrides.items() if k < depth} or None


def _derive_again(config) -> None:
    """The attributes `config`'s class derives in `__post_init__` (Zamba 2's `mamba_headdim` =
    expand * hidden / Mamba heads, Zamba's `attention_hidden_size` = 2 * hidden) recomputed from
    the shrunk fields: the class is built again from its arguments, less the numbers it fills in
    itself when left None and SIZES did not set, and what it derived (SIZES' fields aside: an alias
    of one, like `num_local_experts` of `num_experts`, would come back unshrunk) is copied over."""
    if not dataclasses.is_dataclass(config):
        return
    fields, defaults = vars(config), vars(type(config)())
    filled = {f.name for f in dataclasses.fields(config)
              if f.default is None and isinstance(defaults.get(f.name), (int, float)) and f.name not in SIZES}
    arguments = {f.name: copy.deepcopy(fields[f.name]) for f in dataclasses.fields(config)
                 if f.init and f.name in fields and f.name not in filled}
    try:
        rebuilt = type(config)(**arguments)
    except StrictDataclassError:
        # a validator refusing a field the shrinking leaves as is (Dots3's audio adapter width, which must
        # equal a hidden size no text forward reads): nothing derived to copy, the model build decides
        return
    for name, value in vars(rebuilt).items():
        if name not in arguments and name not in SIZES and name in fields and not name.startswith("_") \
                and fields[name] != value:
            setattr(config, name, value)
