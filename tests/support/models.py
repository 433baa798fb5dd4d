"""Tiny real checkpoints with planted overflow, for tests and benchmarks.

Each model is built from a real transformers config class, given random weights, then edited
the way real models are: a "massive activation" (Sun et al. 2024) is one MLP neuron that
fires only on the BOS token and writes ~1e5 into one residual channel, which every later
layer carries on. `plant="attention"` instead gives Qwen2's q/k projections large biases so
that eager attention's `q @ k^T` passes float16's maximum before the 1/sqrt(d) scaling.

Everything is written to disk as a normal Hugging Face directory (config, safetensors,
byte-level tokenizer that prepends BOS), so tests exercise the same loading path users do.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from halfsafe.errors import HalfsafeError

PAD, BOS, EOS = 0, 1, 2
VOCAB = 320  # 3 specials + 256 byte symbols, rounded up
MASSIVE = 1.0e5  # the planted residual value on BOS, past float16's 65,504
CHANNEL = 5  # the residual channel that carries it
PLANT_LAYER = 1
SHORT_PROMPTS = ["The capital of France is", "上海有个非常出名的地方，", "def add(a, b):"]
# Held-out texts for a tiny model's verification, disjoint from SHORT_PROMPTS: the bundled sets
# (37 + 16 texts) cost a tiny-model test minutes and add nothing a random model can show.
SHORT_HELDOUT = ["1 + 1 = 2, and 2 + 2 =", "東京は日本の首都です。", "Once upon a time"]

# 2,048 positions, as real models have at least: the bundled long passage is 1,160 byte tokens,
# and a prompt past the model's positions is truncated (command line) or refused (library).
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
)

# Per-architecture fixture data: the config class, its extra fields, and, for the planting,
# the norm that post-processes the MLP output (Gemma) and its gain convention.
ARCHITECTURES = {
    "llama": dict(config="LlamaConfig", extra=dict(tie_word_embeddings=False), post_mlp_norm=None),
    "mistral": dict(config="MistralConfig", extra=dict(tie_word_embeddings=False, sliding_window=32),
                    post_mlp_norm=None),
    "qwen2": dict(config="Qwen2Config", extra=dict(tie_word_embeddings=True), post_mlp_norm=None),
    "qwen3": dict(config="Qwen3Config", extra=dict(head_dim=16, tie_word_embeddings=True), post_mlp_norm=None),
    # Layer 1 (the planted one) is dense; the others route through stacked experts.
    "qwen3_moe": dict(
        config="Qwen3MoeConfig",
        extra=dict(head_dim=16, tie_word_embeddings=True, num_experts=4, num_experts_per_tok=2,
                   moe_intermediate_size=64, mlp_only_layers=[PLANT_LAYER]),
        post_mlp_norm=None,
    ),
    "gemma": dict(config="GemmaConfig", extra=dict(head_dim=16, tie_word_embeddings=True), post_mlp_norm=None),
    "gemma2": dict(
        config="Gemma2Config",
        extra=dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=32, tie_word_embeddings=True,
                   attn_logit_softcapping=None, final_logit_softcapping=30.0),
        post_mlp_norm="post_feedforward_layernorm",
    ),
    "gemma3_text": dict(
        config="Gemma3TextConfig",
        extra=dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=32, tie_word_embeddings=True,
                   layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]),
        post_mlp_norm="post_feedforward_layernorm",  # Gemma applies (1 + w)
    ),
    # Gemma 3 with its vision tower: AutoModelForCausalLM gives Gemma3ForConditionalGeneration.
    "gemma3": dict(
        config="Gemma3Config", text="gemma3_text",
        extra=dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, image_size=32, patch_size=16),
                   mm_tokens_per_image=4, image_token_index=300, boi_token_index=301, eoi_token_index=302),
        post_mlp_norm="post_feedforward_layernorm",
    ),
}


def tiny_config(arch: str, **overrides):
    import transformers

    spec = ARCHITECTURES[arch]
    if "text" in spec:  # a multimodal config around a tiny text config
        text = tiny_config(spec["text"]).to_dict()
        return getattr(transformers, spec["config"])(text_config=text, **spec["extra"], **overrides)
    fields = dict(_COMMON, **spec["extra"], **overrides)
    return getattr(transformers, spec["config"])(**fields)


def byte_tokenizer():
    """A byte-level tokenizer with <pad>=0, <bos>=1, <eos>=2 that prepends <bos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def build_tiny_model(arch: str, *, plant: str | None = "residual", seed: int = 0, attn_implementation=None,
                     **config_overrides):
    """A tiny fp32 model of `arch`; `plant` is 'residual', 'attention' or None; `config_overrides`
    change its shape (e.g. hidden_size)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, **config_overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn_implementation)
    model.eval()
    with torch.no_grad():
        if plant == "residual":
            plant_massive_activation(model, ARCHITECTURES[arch]["post_mlp_norm"])
        elif plant == "interior":
            _plant_interior(model)
        elif plant == "attention":
            _plant_attention_logits(model)
        elif plant is not None:
            raise HalfsafeError(f"plant must be 'residual', 'interior', 'attention' or None, not {plant!r}")
    return model


def save_tiny_model(arch: str, directory: str | Path, **kwargs) -> Path:
    """Build and write a tiny checkpoint (safetensors, config, tokenizer) to `directory`."""
    directory = Path(directory)
    model = build_tiny_model(arch, **kwargs)
    model.save_pretrained(str(directory))
    byte_tokenizer().save_pretrained(str(directory))
    return directory


def save_unregistered_model(directory: str | Path, *, n_positions: int = 64, vocab_size: int = VOCAB) -> Path:
    """A tiny GPT-2 checkpoint: a real transformers architecture outside the hand-written
    reference (tests/handwritten.py), with a learned position table of `n_positions` rows (a
    prompt longer than that has no position embedding) and `vocab_size` embedding rows (below
    259 the byte tokenizer's ids overrun it)."""
    from transformers import AutoModelForCausalLM, GPT2Config

    directory = Path(directory)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=64, n_layer=2, n_head=4,
                        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(directory))
    byte_tokenizer().save_pretrained(str(directory))
    return directory


def _bos_neuron(model) -> tuple[torch.nn.Module, int]:
    """Wire MLP neuron 0 of the plant layer to fire on BOS only; return (layer, neuron)."""
    embed = model.get_input_embeddings().weight  # [V, H]
    detector = embed.shape[1] - 1  # an embedding channel that only BOS uses
    embed[:, detector] = 0.0
    embed[BOS, detector] = embed[BOS].abs().max() * 4
    # No earlier writer touches the detector channel, so it is exactly 0 for every other token.
    layers = _layers(model)
    for index, earlier in enumerate(layers[: PLANT_LAYER + 1]):
        earlier.self_attn.o_proj.weight[detector] = 0.0
        if index < PLANT_LAYER:
            _zero_mlp_row(earlier.mlp, detector)
    layer = layers[PLANT_LAYER]
    neuron = 0
    for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
        proj.weight[neuron] = 0.0
        proj.weight[neuron, detector] = 1.0
    # Only the planted neuron writes the massive channel, so other tokens leave it near 0.
    layer.mlp.down_proj.weight[CHANNEL] = 0.0
    layer.mlp.down_proj.weight[CHANNEL, neuron] = 1.0
    return layer, neuron


def _zero_mlp_row(mlp, row: int) -> None:
    experts = getattr(mlp, "experts", None)
    if experts is not None and isinstance(getattr(experts, "down_proj", None), torch.nn.Parameter):
        experts.down_proj[:, row] = 0.0  # stacked experts: [E, H, I]
        shared = getattr(mlp, "shared_expert", None)
        if shared is not None:
            shared.down_proj.weight[row] = 0.0
    else:
        mlp.down_proj.weight[row] = 0.0


def plant_massive_activation(model, post_mlp_norm: str | None = None) -> None:
    """Plant the BOS-only neuron that writes MASSIVE into residual channel CHANNEL."""
    layer, neuron = _bos_neuron(model)
    mlp = layer.mlp
    probe = getattr(layer, post_mlp_norm) if post_mlp_norm else mlp.down_proj
    value = _bos_output(model, probe)[CHANNEL].item()
    if post_mlp_norm:
        gain = getattr(layer, post_mlp_norm).weight
        gain[CHANNEL] = MASSIVE / value - 1.0  # Gemma's norm multiplies by (1 + w)
    else:
        mlp.down_proj.weight[CHANNEL, neuron] = MASSIVE / value


def _plant_interior(model) -> None:
    """`act(gate) * up` reaches MASSIVE inside the MLP; what it writes to the stream stays ~1e4."""
    layer, neuron = _bos_neuron(model)
    mlp = layer.mlp
    value = _bos_input(model, mlp.down_proj)[neuron].item()
    mlp.up_proj.weight[neuron] *= MASSIVE / value
    mlp.down_proj.weight[CHANNEL, neuron] = 1e4 / MASSIVE


def _layers(model):
    from halfsafe.model.layers import find_decoder_layers

    return find_decoder_layers(model)[1]


def _plant_attention_logits(model) -> None:
    attention = _layers(model)[0].self_attn
    # Every q and k element 80 with head_dim 16: q.k = 16 * 6400 = 102,400 > 65,504 on the diagonal.
    attention.q_proj.bias.fill_(80.0)
    attention.k_proj.bias.fill_(80.0)
    attention.q_proj.weight.mul_(0.01)
    attention.k_proj.weight.mul_(0.01)


def _bos_output(model, module) -> torch.Tensor:
    """[H]: `module`'s output at the BOS position."""
    return _at_bos(model, module, output=True)


def _bos_input(model, module) -> torch.Tensor:
    """[I]: `module`'s input at the BOS position."""
    return _at_bos(model, module, output=False)


def _at_bos(model, module, *, output: bool) -> torch.Tensor:
    from halfsafe.model.hooks import HookSet

    captured = []
    with HookSet() as hooks:
        if output:
            hooks.forward(module, lambda m, args, out: captured.append(out))
        else:
            hooks.pre_forward(module, lambda m, args: captured.append(args[0]))
        model(input_ids=torch.tensor([[BOS, 70, 71]], device=next(model.parameters()).device), use_cache=False)
    return captured[0][0, 0]


class NanFault:
    """A forward hook that writes NaN into one decoder layer's output, for some rows (default: all),
    on that layer's `step`-th call only (call 0 is the prompt's forward). A guard's own re-runs
    come after the faulty call: they see no fault. With `thread`, only that thread's forwards are
    counted and faulted. Removed on leaving the `with` block."""

    def __init__(self, model, step: int, rows: list[int] | None = None, layer: int = 2, thread: int | None = None):
        from halfsafe.model.hooks import HookSet
        from halfsafe.model.layers import find_decoder_layers

        self.step, self.rows, self.calls, self.thread = step, rows, 0, thread
        self.hooks = HookSet()
        self.hooks.forward(find_decoder_layers(model)[1][layer], self)

    def __call__(self, module, args, output):
        if self.thread is not None and threading.get_ident() != self.thread:
            return None
        call, self.calls = self.calls, self.calls + 1
        if call != self.step:
            return None
        hidden = (output[0] if isinstance(output, tuple) else output).clone()  # [B, T, H]
        hidden[self.rows if self.rows is not None else slice(None)] = float("nan")
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.hooks.remove()


def is_tied(model) -> bool:
    """Whether the output embedding is the input embedding (the handwritten roles undo the
    embedding's factor in the final norm then)."""
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight
