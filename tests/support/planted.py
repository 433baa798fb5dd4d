"""A tiny model of any transformers causal-LM type (its config shrunk by `halfsafe.shrinking`), with
a planted massive activation: for the coverage measurement and the tests of derived roles.

The plant: one output row of a first-layer writer is scaled up until the residual stream leaving
that layer carries MASSIVE (1e5) in one channel, at its largest over the prompts given
(docs/numerics.md section 1: the real gemma-3-270m peaks at 103,795, on `<bos>`). Plain float16
overflows; rescaled by 2^-3 it does not.
"""

from __future__ import annotations

import torch
from torch import nn

from halfsafe.model.hooks import HookSet
from halfsafe.roles import Roles
from halfsafe.roles.bounded import export_settings
from halfsafe.roles.gate import apply_roles
from halfsafe.shrinking import shrink_config

BOS = 1
MASSIVE = 1.0e5
CHANNEL = 5


def tiny_model(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny fp32 causal LM of `model_type` with random weights (raises what transformers raises)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = shrink_config(CONFIG_MAPPING[model_type]())
    for name, value in overrides.items():
        setattr(config, name, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def plant_massive_activation(model: nn.Module, layers: nn.ModuleList, layers_path: str, roles,
                             ids: torch.Tensor | list[torch.Tensor] | None = None) -> float:
    """Make the stream leaving the first layer reach MASSIVE in CHANNEL: one output row of a
    writer of that layer (a projection's row, or a post-norm's gain entry, `roles` tell which
    and its gain convention) is scaled up. The embedding is left alone: a tied embedding is the
    LM head too, and a giant entry there would make the logits themselves overflow, which no
    real model does. `ids` ([1, T] or a list of them, default BOS and three tokens): the prompts
    it must overflow on; MASSIVE is the largest value over all of them (a routed MoE writes the
    channel from other experts on other prompts: planted on one prompt, tiny Qwen 3.5 MoE reached
    194,844 on the next). Returns the value reached (0 if no writer of the first layer has a row)."""
    ids = [torch.tensor([[BOS, 7, 8, 9]])] if ids is None else [ids] if torch.is_tensor(ids) else list(ids)
    hidden = model.get_input_embeddings().weight.shape[1]
    params = dict(model.named_parameters())
    rows = [(name, offset) for name, (exponent, offset) in roles.scales.items()
            if exponent == 1 and name.startswith(f"{layers_path}.0.") and params[name].shape[0] == hidden
            and name.rsplit(".", 1)[0] in roles.writers]
    if not rows:
        return 0.0
    # A trained model reads its massive channel weakly (Sun et al. 2024: it acts as a fixed
    # bias); random weights would not, and a projection reading the raw stream (OLMo 2's
    # q/k/v, gate/up) would then overflow float16 by itself, whatever the residual scale.
    linear = {m for m, how in roles.readers.items() if how.startswith("linear")}
    with torch.no_grad():
        for name, (exponent, _) in roles.scales.items():
            weight = params[name]
            if exponent != -1 or name.rsplit(".", 1)[0] not in linear or weight.dim() not in (2, 3):
                continue  # the weights a linear reader multiplies the stream by: [out, in] or stacked experts'
            if weight.shape[-1] == hidden:  # [out, in], as nn.Linear stores it; [E, out, in]
                weight[..., CHANNEL] *= 2.0**-8
            elif weight.shape[-2] == hidden:  # [in, out], as GPT-2's Conv1D stores it; [E, in, out]
                weight[..., CHANNEL, :] *= 2.0**-8
    for name, offset in reversed(rows):  # the last writers first: the MLP (or its post-norm)
        reached = _scale_row(model, layers[1], params[name], offset, ids)
        if reached > 65504:
            return reached
    return reached


def _scale_row(model: nn.Module, probe: nn.Module, param: torch.Tensor, offset: float,
               prompts: list[torch.Tensor]) -> float:
    """Scale entry CHANNEL of `param` (a gain, a bias, or a weight row) until the stream entering
    `probe` reaches MASSIVE there, at its largest over `prompts`; returns the value reached."""
    seen = []
    with HookSet() as hooks:
        hooks.pre_forward(probe, lambda m, args, kwargs: seen.append(
            (args[0] if args else kwargs["hidden_states"])[..., CHANNEL].abs().max().item()), with_kwargs=True)
        with torch.no_grad():
            if not bool((param[CHANNEL] + offset).abs().max() > 0):
                param[CHANNEL] = 1.0 - offset  # a zero-initialised bias: give it something to scale
            for _ in range(3):
                seen.clear()
                for ids in prompts:
                    model(input_ids=ids, use_cache=False)
                if not seen or max(seen) == 0:
                    return 0.0
                factor = MASSIVE / max(seen)
                if abs(factor - 1) < 0.05:
                    break
                param[CHANNEL] = (param[CHANNEL] + offset) * factor - offset
    return max(seen) if seen else 0.0


def apply_as_exported(model: nn.Module, roles: Roles, s: float, scaled_fields, interior=None) -> nn.Module:
    """Rescale `model` (fp32) in place by s, every eps set as a checkpoint stored with
    `scaled_fields` x s^2 will reload it: what `benchmarks/arch_coverage.py` saves and reloads."""
    return apply_roles(model, roles, s, interior, settings=export_settings(model, roles, s, scaled_fields))
