"""Roles for a model that is never whole in memory (layer-wise mode): derive them on a stand-in.

Roles name parameters, eps attributes and config fields; none depends on a width or on the
weights' values. So a model built from the same config with every width shrunk (hidden 64,
intermediate 128...) but the same depth, layer kinds, expert counts and tying has the same
parameter names and the same roles, and costs megabytes to trace. `roles_from_config` builds
that stand-in with random weights, derives its roles, and checks that every name they use
exists in the real checkpoint.
"""

from __future__ import annotations

import copy

import torch

from ..errors import HalfsafeError
from .deriving import derive_roles
from .roles import Roles

# What names or structure depend on: never shrunk.
_KEEP = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "layer_types", "num_experts", "num_local_experts",
         "n_routed_experts", "moe_num_experts", "n_shared_experts", "num_shared_experts", "first_k_dense_replace",
         "mlp_only_layers", "decoder_sparse_step", "moe_layer_freq", "num_kv_shared_layers", "tie_word_embeddings",
         "num_nextn_predict_layers", "layers_block_type", "hybrid_override_pattern", "attn_layer_indices")


def roles_from_config(config, parameter_names: set[str] | None = None, seed: int = 0) -> Roles:
    """The roles of the model `config` describes, derived on a narrow stand-in. `parameter_names`:
    the real checkpoint's, to check the roles against (a mismatch is an error naming it)."""
    return roles_of_standin(standin_model(config, seed), parameter_names)


def roles_of_standin(model, parameter_names: set[str] | None = None) -> Roles:
    """`derive_roles` on a stand-in, checked against the real checkpoint's `parameter_names`."""
    roles = derive_roles(model)
    if parameter_names is not None:
        missing = sorted(set(roles.scales) - set(parameter_names))
        if missing:
            raise HalfsafeError(f"the roles derived on a narrow stand-in name {missing[0]}, which the checkpoint does "
                                f"not have ({len(missing)} such name(s)); use --strategy keep-fp32")
    return roles


def standin_model(config, seed: int = 0):
    """The narrow stand-in (fp32, random weights, eval mode) of the model `config` describes."""
    from transformers import AutoModelForCausalLM

    from ..shrinking import shrink_config

    narrow = copy.deepcopy(config)
    kept = {name: copy.deepcopy(value) for name, value in vars(config).items() if name in _KEEP}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kept_text = {name: copy.deepcopy(value) for name, value in vars(text).items() if name in _KEEP}
    depth = kept_text.get("num_hidden_layers", kept.get("num_hidden_layers", 2))
    shrink_config(narrow, depth=depth)
    for name, value in kept.items():
        setattr(narrow, name, value)
    narrow_text = narrow.get_text_config() if hasattr(narrow, "get_text_config") else narrow
    for name, value in kept_text.items():
        setattr(narrow_text, name, value)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(narrow, dtype=torch.float32).eval()
