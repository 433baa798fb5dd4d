"""The model's shared helpers: where its decoder layers are, how a prompt is put to it, and the
forward option that keeps only the last position's logits. Every stage imports them from here."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..errors import HalfsafeError
from .overrides import resolve


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layer stack: the module list as long as the config's `num_hidden_layers`, or
    the one an override names (model/overrides.py)."""
    resolved = resolve(model)
    if resolved.layers is not None:
        return resolved.layers
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    depth = getattr(config, "num_hidden_layers", None)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and depth and len(m) == depth]
    # A multimodal model may hold a vision stack of the same depth: prefer the list that sits
    # beside the input embedding, i.e. in the language model.
    embedding = model.get_input_embeddings()
    for name, module in found:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if any(child is embedding for child in parent.children()):
            return name, module
    if found:
        return found[0]
    raise HalfsafeError(
        f"cannot find the decoder layers of {type(model).__name__}: no module list of "
        f"num_hidden_layers={depth} entries; this is not a decoder-only causal LM"
    )


def last_logits_only(model: nn.Module) -> dict:
    """Forward kwargs that skip the logits of all but the last position, where supported."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def encode(tokenizer, prompt: str, device: torch.device) -> dict:
    batch = tokenizer(prompt, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
