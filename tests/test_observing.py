import pytest
import torch

from halfsafe.fixing.observe import ATTN_LOGITS, EMBEDDING, INTERIOR, RESIDUAL, ActivationRecorder, observe
from halfsafe.model.loading import load_model
from tests.support.models import CHANNEL, MASSIVE, PLANT_LAYER, SHORT_PROMPTS, build_tiny_model, byte_tokenizer


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_observation_finds_the_planted_channel_on_the_first_token():
    model = build_tiny_model("qwen3", plant="residual")
    recorder = observe(model, byte_tokenizer(), SHORT_PROMPTS)
    sites = {s.name: s for s in recorder.sites()}
    residual = sites[f"model.layers.{PLANT_LAYER}"]
    assert residual.kind == RESIDUAL
    assert residual.max_abs == pytest.approx(MASSIVE, rel=0.05)
    assert (residual.channel, residual.position) == (CHANNEL, 0)
    assert sites["model.embed_tokens"].kind == EMBEDDING
    # The interior of the MLP (act(gate) * up entering down_proj) is observed too.
    assert sites[f"model.layers.{PLANT_LAYER}.mlp.down_proj:input"].kind == INTERIOR
    # Every layer is a residual site, in order.
    assert [s.layer for s in recorder.sites() if s.kind == RESIDUAL] == list(range(model.config.num_hidden_layers))


def test_attention_logits_are_recorded_before_scaling():
    model = build_tiny_model("qwen2", plant="attention", attn_implementation="eager")
    recorder = observe(model, byte_tokenizer(), SHORT_PROMPTS)
    qk = {s.name: s for s in recorder.sites() if s.kind == ATTN_LOGITS}
    assert set(qk) == {f"model.layers.{i}.self_attn:qk" for i in range(4)}
    # 16 dims x 80 x 80 from the planted biases, plus the small weight terms.
    assert qk["model.layers.0.self_attn:qk"].max_abs == pytest.approx(102_400, rel=0.01)


def test_observing_never_mutates_and_always_removes_its_hooks():
    model = build_tiny_model("gemma3_text", plant="residual")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hook_count(model)
    implementation = model.config._attn_implementation
    tokens = byte_tokenizer()("abc", return_tensors="pt")
    with pytest.raises(RuntimeError, match="boom"):
        with ActivationRecorder(model):
            assert _hook_count(model) > hooks
            assert model.config._attn_implementation != implementation  # routed through the observer
            model(**tokens)
            raise RuntimeError("boom")
    assert _hook_count(model) == hooks
    assert model.config._attn_implementation == implementation
    observe(model, byte_tokenizer(), SHORT_PROMPTS)
    assert _hook_count(model) == hooks
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_observed_model_output_is_unchanged(tiny_dirs):
    loaded = load_model(str(tiny_dirs["llama", "residual"]))
    batch = loaded.tokenizer(SHORT_PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        plain = loaded.model(**batch).logits
        with ActivationRecorder(loaded.model):
            watched = loaded.model(**batch).logits
    assert torch.equal(plain, watched)
