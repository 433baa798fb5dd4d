"""Observe a model's activations with hooks that record statistics and never mutate.

A *site* is one place a tensor can overflow:
- `embedding`: the token embedding's output (the residual stream before layer 0);
- `residual`: a decoder layer's output, the residual stream after that layer;
- `sublayer`: any other leaf module's output (projections, norms, activations);
- `interior`: the input of a linear layer that reads something narrower or wider than the
  residual stream, i.e. a value computed inside a sublayer (`act(gate) * up` entering
  `down_proj`, the attention output entering `o_proj`);
- `attn_logits`: `q @ k^T` before the 1/sqrt(d) scaling, which eager attention materialises
  in the model's dtype (the Qwen2-style overflow of docs/numerics.md, section 1);
- `logits`: the output embedding's output, at the last position (the one `generate` uses).

Architecture-agnostic on purpose: the decoder layers are found as the module list whose length
is the config's `num_hidden_layers`, so `diagnose` works on any causal LM.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import HalfsafeError
from ..model.hooks import HookSet
from ..model.layers import encode, find_decoder_layers, last_logits_only

EMBEDDING, RESIDUAL, SUBLAYER, INTERIOR, ATTN_LOGITS, LOGITS = (
    "embedding", "residual", "sublayer", "interior", "attn_logits", "logits",
)


@dataclass
class SiteStat:
    """The largest |value| seen at one site, and where it was."""

    name: str
    kind: str
    layer: int | None  # decoder layer index; None before the first and after the last layer
    max_abs: float
    channel: int | None  # last-dim index (the head, for attention logits)
    position: int | None  # token position in its prompt (the query position for attention logits)
    prompt: int | None  # index of the prompt that produced it

    def to_dict(self) -> dict:
        return asdict(self)


class ActivationRecorder:
    """Owns the hooks that record per-site maxima; removes them on exit, even on error.

    Statistics stay on the model's device as small tensors until `sites()` is called, so
    recording adds no host synchronisation per module.
    """

    def __init__(self, model: nn.Module, *, attention_logits: bool = True):
        self.model = model
        self.attention_logits = attention_logits
        self.prompt_index = 0
        self.layers_path, layers = find_decoder_layers(model)
        self.num_layers = len(layers)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.hidden_size = getattr(config, "hidden_size", None)
        self.attn_implementation = model.config._attn_implementation or "eager"
        self._calls: dict[str, list] = {}  # site -> [(prompt, amax, argmax, shape)]
        self._kinds: dict[str, tuple[str, int | None]] = {}
        self._hooks: HookSet | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> ActivationRecorder:
        hooks = HookSet()
        try:
            self._register_hooks(hooks)
            if self.attention_logits:
                _observe_attention_logits(self.model, self, hooks)
        except BaseException:
            hooks.remove()
            raise
        self._hooks = hooks
        return self

    def __exit__(self, *exc) -> None:
        hooks, self._hooks = self._hooks, None
        if hooks is not None:
            hooks.remove()

    def _register_hooks(self, hooks: HookSet) -> None:
        embedding = self.model.get_input_embeddings()
        output_embedding = self.model.get_output_embeddings()
        layer_prefix = self.layers_path + "."
        for name, module in self.model.named_modules():
            layer = _layer_index(name, layer_prefix)
            if name.startswith(layer_prefix) and name.count(".") == layer_prefix.count("."):
                kind = RESIDUAL
            elif module is embedding:
                kind = EMBEDDING
            elif module is output_embedding:
                kind = LOGITS
            elif not any(True for _ in module.children()):
                kind = SUBLAYER
            else:
                continue
            hooks.forward(module, self._output_hook(name, kind, layer))
            if kind == SUBLAYER and isinstance(module, nn.Linear) and module.in_features != self.hidden_size:
                hooks.pre_forward(module, self._input_hook(name + ":input", layer))

    # -- recording --------------------------------------------------------------------------
    def _output_hook(self, name: str, kind: str, layer: int | None):
        def hook(module, args, output):
            # Decoder layers may return (hidden_states, ...); a leaf returning a tuple (rotary
            # embeddings' cos/sin) holds no activation.
            tensor = output[0] if kind == RESIDUAL and isinstance(output, (tuple, list)) else output
            if torch.is_tensor(tensor) and tensor.is_floating_point():
                self.record(name, kind, layer, tensor)

        return hook

    def _input_hook(self, name: str, layer: int | None):
        def hook(module, args):
            if args and torch.is_tensor(args[0]):
                self.record(name, INTERIOR, layer, args[0])

        return hook

    def record(self, name: str, kind: str, layer: int | None, tensor: torch.Tensor) -> None:
        if tensor.numel() == 0:
            return
        # One temporary the size of the tensor (the full-vocabulary logits can be hundreds of
        # MB); `max` propagates NaN, which `sites()` reports as inf.
        amax, argmax = tensor.detach().abs().reshape(-1).max(dim=0)
        self._kinds.setdefault(name, (kind, layer))
        self._calls.setdefault(name, []).append((self.prompt_index, amax, argmax, tuple(tensor.shape)))

    # -- state, for a run that resumes -------------------------------------------------------
    def state(self) -> dict:
        """What has been recorded so far (small tensors), to save and `restore` later."""
        return {"calls": self._calls, "kinds": self._kinds}

    def restore(self, state: dict) -> None:
        self._calls = {name: list(calls) for name, calls in state["calls"].items()}
        self._kinds = dict(state["kinds"])

    # -- results ----------------------------------------------------------------------------
    def sites(self) -> list[SiteStat]:
        """One SiteStat per site, in the order the sites first ran."""
        result = []
        for name, calls in self._calls.items():
            kind, layer = self._kinds[name]
            # NaN counts as the largest value, so a non-finite site is never reported as small.
            maxima = torch.nan_to_num(torch.stack([c[1].float() for c in calls]).cpu(), nan=float("inf"))
            best = int(maxima.argmax())
            prompt, _, argmax, shape = calls[best]
            channel, position = _locate(int(argmax), shape, kind)
            result.append(SiteStat(name, kind, layer, float(maxima[best]), channel, position, prompt))
        return result


def _layer_index(name: str, layer_prefix: str) -> int | None:
    if not name.startswith(layer_prefix):
        return None
    head = name[len(layer_prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _locate(flat_index: int, shape: tuple, kind: str) -> tuple[int | None, int | None]:
    if kind == ATTN_LOGITS:  # [B, H, Tq, Tk]
        _, heads, tq, tk = shape
        return (flat_index // (tq * tk)) % heads, (flat_index // tk) % tq
    channels = shape[-1]
    positions = shape[-2] if len(shape) >= 2 else 1
    return flat_index % channels, (flat_index // channels) % positions


# -- attention logits ---------------------------------------------------------------------


def _observe_attention_logits(model: nn.Module, recorder: ActivationRecorder, hooks: HookSet) -> None:
    """Route attention through a wrapper that records max |q @ k^T| before scaling.

    transformers' attention modules look their kernel up by `config._attn_implementation`
    on every call, so a registered wrapper around the current kernel sees `query` and `key`
    after projections, q/k norms and RoPE, exactly as the kernel does, for any architecture.
    The wrapper's registry entries and the configs are restored when `hooks` is removed.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = model.config._attn_implementation or "eager"
    if original != "eager" and original not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        return  # an exotic kernel without a mask convention: leave it alone
    names = {id(m): n for n, m in model.named_modules()}

    def observed_attention(module, query, key, value, attention_mask, **kwargs):
        # query: [B, Hq, Tq, D]; key: [B, Hkv, Tk, D]
        groups = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(groups, dim=1) if groups > 1 else key
        logits = torch.matmul(query.float(), k.float().transpose(-1, -2))  # [B, Hq, Tq, Tk]
        name = names.get(id(module), type(module).__name__) + ":qk"
        recorder.record(name, ATTN_LOGITS, getattr(module, "layer_idx", None), logits)
        if original == "eager":
            kernel = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
            if kernel is None:
                raise HalfsafeError(f"{type(module).__name__} has no eager_attention_forward to observe")
        else:
            kernel = ALL_ATTENTION_FUNCTIONS[original]
        return kernel(module, query, key, value, attention_mask, **kwargs)

    wrapper_name = hooks.attention(f"halfsafe_observe_{original}", observed_attention,
                                   ALL_MASK_ATTENTION_FUNCTIONS[original])
    for config in {id(c): c for c in _configs(model)}.values():
        hooks.callback(lambda config=config, value=config._attn_implementation_internal:
                       setattr(config, "_attn_implementation_internal", value))
        config._attn_implementation_internal = wrapper_name


def _configs(model: nn.Module):
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            yield config


# -- running prompts ----------------------------------------------------------------------


def observe(model: nn.Module, tokenizer, prompts: list[str], *, progress=None) -> ActivationRecorder:
    """Run every prompt through the model (one at a time, so no padding enters the statistics).

    Logits are computed for the last position only, as `generate` does: the full-vocabulary
    logits of a long prompt would otherwise dominate memory (262,144 x T floats for Gemma 3).
    """
    device = next(model.parameters()).device
    extra = last_logits_only(model)
    with ActivationRecorder(model) as recorder, torch.inference_mode():
        for index, prompt in enumerate(prompts):
            recorder.prompt_index = index
            model(**encode(tokenizer, prompt, device), use_cache=False, **extra)
            if progress is not None:
                progress()
    return recorder
