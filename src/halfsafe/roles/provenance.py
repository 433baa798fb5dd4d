"""Which config field each module's eps comes from, found by building the model again.

A checkpoint stores one eps per config field, and reloading it gives that value to every module
built from the field. Which modules those are is a fact of the modeling code, not of the values:
two fields often hold the same number (Gemma 3's text `rms_norm_eps` and its vision tower's
`layer_norm_eps` are both 1e-6), and a norm may take a constant written in its class. So each
candidate field is set to a sentinel in a copy of the config, the model's class is built from it
on the meta device (no memory, no weights: 0.02 s for a Llama-8B-shaped config on a 2-core AMD
EPYC), and the float attributes that moved are that field's. Only the text config's fields
count: the exported config carries the stream's eps there.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

Attribute = tuple[str, str]  # (module name, attribute name)


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def float_attributes(model: nn.Module) -> dict[Attribute, float]:
    return {(name, attr): value for name, module in model.named_modules() for attr, value in vars(module).items()
            if isinstance(value, float) and not isinstance(value, bool)}


def candidate_fields(model: nn.Module, values: set[float]) -> list[str]:
    """The text config's float fields that may hold an eps: named so, or equal to one found. Equal
    values only nominate a field; building the model decides."""
    return sorted(f for f, v in vars(text_config(model.config)).items()
                  if isinstance(v, float) and not isinstance(v, bool) and ("eps" in f.lower() or v in values))


def eps_fields(model: nn.Module, values: set[float]) -> dict[Attribute, str] | str:
    """(module, attribute) -> the text config field it is built from, for every float attribute
    some candidate field sets; or, when the class cannot be built from its config on the meta
    device, the reason (one line)."""
    found: dict[Attribute, str] = {}
    try:
        baseline = float_attributes(_build(model, model.config))
        for name in candidate_fields(model, values):
            config = copy.deepcopy(model.config)
            text = text_config(config)
            setattr(text, name, getattr(text, name) * 3.0 + 1e-3)  # a value no other field holds
            for key, value in float_attributes(_build(model, config)).items():
                if key in baseline and value != baseline[key]:
                    found[key] = name
    except Exception as error:  # noqa: BLE001 - any failure to rebuild means the provenance is unknown
        return f"{type(model).__name__} could not be rebuilt from its config to find its eps fields " \
               f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    return found


def _build(model: nn.Module, config) -> nn.Module:
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return type(model)._from_config(copy.deepcopy(config))
