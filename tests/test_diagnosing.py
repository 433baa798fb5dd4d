import pytest
import torch

from halfsafe.diagnosing import diagnose
from halfsafe.errors import HalfsafeError
from halfsafe.model.loading import load_model
from halfsafe.model.precision import cast_temporarily
from tests.support.models import ARCHITECTURES, CHANNEL, MASSIVE, SHORT_PROMPTS, build_tiny_model, byte_tokenizer


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_planted_overflow_is_unsafe_in_float16_and_safe_in_bfloat16(tiny_dirs, arch):
    loaded = load_model(str(tiny_dirs[arch, "residual"]))
    result = diagnose(loaded.model, loaded.tokenizer, SHORT_PROMPTS, name=arch)
    fp16, bf16 = result.verdicts
    assert (fp16.dtype, bf16.dtype) == ("float16", "bfloat16")
    assert fp16.status == "unsafe" and not result.safe
    assert fp16.max_abs == pytest.approx(MASSIVE, rel=0.05)
    assert fp16.headroom == pytest.approx(65504 / fp16.max_abs)
    assert not fp16.all_finite and fp16.nonfinite_prompts == len(SHORT_PROMPTS)
    assert ".layers.1." in fp16.first_nonfinite  # the planted layer
    assert fp16.continuation.startswith("<pad><pad><pad>")  # argmax of NaN is token 0
    assert fp16.summary.startswith("float16: UNSAFE - ")
    assert bf16.status == "safe" and bf16.all_finite
    layer = result.layers[1]
    assert layer.residual_channel == CHANNEL and layer.residual_position == 0


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_model_without_overflow_is_safe(tiny_dirs, arch):
    loaded = load_model(str(tiny_dirs[arch, None]))
    result = diagnose(loaded.model, loaded.tokenizer, SHORT_PROMPTS, name=arch)
    assert result.safe and result.target.status == "safe"
    assert result.target.all_finite and result.target.first_nonfinite is None
    assert result.target.summary.startswith("float16: safe - headroom ")
    assert result.target.continuation == result.reference_continuation


def test_attention_logit_overflow_counts_only_in_eager_attention(tiny_dirs):
    path = str(tiny_dirs["qwen2", "attention"])
    eager = load_model(path, attn_implementation="eager")
    result = diagnose(eager.model, eager.tokenizer, SHORT_PROMPTS)
    assert result.target.status == "unsafe"
    assert result.target.max_site == "model.layers.0.self_attn:qk"
    assert "attention logits (q.k before scaling) reach" in result.target.summary
    assert result.target.first_nonfinite.startswith("model.layers.0.self_attn")

    sdpa = load_model(path, attn_implementation="sdpa")
    result = diagnose(sdpa.model, sdpa.tokenizer, SHORT_PROMPTS)
    assert result.target.status == "safe"
    assert any("would overflow float16 in eager attention" in note for note in result.notes)


def test_margin_flags_sites_close_to_the_limit(tiny_dirs):
    loaded = load_model(str(tiny_dirs["llama", None]))
    strict = diagnose(loaded.model, loaded.tokenizer, SHORT_PROMPTS, margin=1e6)
    assert strict.target.status == "at-risk" and strict.target.at_risk
    assert strict.safe  # at risk is a warning, not an unsafe verdict


def test_cast_temporarily_restores_the_exact_fp32_weights():
    model = build_tiny_model("gemma3_text", plant="residual")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with cast_temporarily(model, torch.float16):
        assert model.lm_head.weight.dtype == torch.float16
        assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
        model(**byte_tokenizer()("abc", return_tensors="pt"))
    for key, value in model.state_dict().items():
        assert value.dtype == before[key].dtype and torch.equal(value, before[key]), key


def test_non_decoder_model_is_a_clear_error():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64))
    model.config.num_hidden_layers = 3  # no module list of that length
    with pytest.raises(HalfsafeError, match="cannot find the decoder layers"):
        diagnose(model, byte_tokenizer(), SHORT_PROMPTS)


def test_a_half_precision_model_is_refused_with_a_halfsafe_error():
    model = build_tiny_model("llama", plant=None).to(torch.float16)
    with pytest.raises(HalfsafeError, match="diagnose observes in float32; load the model with dtype=torch.float32"):
        diagnose(model, byte_tokenizer(), SHORT_PROMPTS[:1])
