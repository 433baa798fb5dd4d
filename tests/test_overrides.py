"""What cannot be derived is data (halfsafe/data/overrides.json), and which config field an eps
comes from is found by rebuilding the model, never by equal values."""

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from halfsafe.errors import HalfsafeError
from halfsafe.model.layers import find_decoder_layers
from halfsafe.model.overrides import extra_overrides, overrides, parse, resolve
from halfsafe.roles import apply_roles, derive_roles, exactness_gate
from halfsafe.roles.provenance import eps_fields
from tests.support.planted import BOS, tiny_model

S = 2.0**-3
PROMPTS = [torch.tensor([[BOS, 50, 60, 70, 80, 90, 100]]), torch.tensor([[BOS, 33, 44, 55]])]


def test_every_override_says_why_and_names_a_class_transformers_has():
    import transformers

    for name, entry in overrides().items():
        assert len(entry.why) > 40, name
        assert hasattr(transformers, name), name


def test_a_malformed_override_is_refused_naming_the_entry():
    with pytest.raises(HalfsafeError, match=r"override 'X' must give 'why'.*unknown key\(s\): layer$"):
        parse({"X": {"why": "a reason", "layer": "model.layers"}})
    with pytest.raises(HalfsafeError, match=r"override 'X' must give 'why'"):
        parse({"X": {"layers": "model.layers"}})


def test_an_override_is_resolved_to_the_models_own_module_list():
    """LongCat-Flash's config counts sublayers (num_hidden_layers = 2 x num_layers): the stack is
    found only through its override, and it is the model's own object."""
    model = tiny_model("longcat_flash")
    path, layers = find_decoder_layers(model)
    assert path == "model.layers" and layers is model.model.layers
    assert model.config.num_hidden_layers != len(layers)
    assert resolve(model) is resolve(model)  # once per model


def test_a_subclass_takes_its_base_class_entry_and_a_wrong_path_is_an_error():
    model = tiny_model("llama")
    table = parse({"LlamaForCausalLM": {"why": "a test entry naming the stack", "layers": "model.layers"}})

    class MyLlama(type(model)):
        pass

    model.__class__ = MyLlama
    assert resolve(model, table).layers[1] is model.model.layers
    wrong = parse({"LlamaForCausalLM": {"why": "a test entry naming a missing stack", "layers": "model.blocks"}})
    with pytest.raises(HalfsafeError, match=r"override for LlamaForCausalLM says the decoder layers are "
                                            r"'model.blocks'.*keep-fp32"):
        resolve(model, wrong)


def test_a_users_entries_take_precedence_inside_the_block_only():
    """`--overrides FILE`: a user's entry for a class replaces halfsafe's while the command runs."""
    model = tiny_model("longcat_flash")
    wrong = parse({"LongcatFlashForCausalLM": {"why": "a user's entry, naming a missing stack",
                                               "layers": "model.stack"}})
    with extra_overrides(wrong):
        with pytest.raises(HalfsafeError, match="'model.stack'"):
            find_decoder_layers(model)
    assert find_decoder_layers(model)[1] is model.model.layers  # halfsafe's own entry again


def test_a_value_the_stream_writes_and_linear_ops_read_is_compensated_at_those_ops():
    """LongCat-Flash's identity experts add the post-attention norm's output into the stream, so
    that norm's gain is a writer (x s); its other readers, the dense MLP's gate and up projections,
    the router and the routed experts, are linear in it and get their weights x 1/s. Bit-exact;
    without one of those compensations the gate fails."""
    model = tiny_model("longcat_flash")
    roles = derive_roles(model)
    assert not roles.refused, roles.refusals
    assert roles.scales["model.layers.0.post_attention_layernorm.0.weight"] == [1, 0.0]
    for reader in ("mlps.0.gate_proj", "mlps.0.up_proj", "mlp.router"):
        assert roles.readers[f"model.layers.0.{reader}"] == "linear: weight x 1/s"
    assert roles.scales["model.layers.0.mlp.experts.gate_up_proj"] == [-1, 0.0]
    gate = exactness_gate(model, roles, PROMPTS)
    assert gate.passed and gate.equal, gate.describe()
    assert not exactness_gate(model, roles.without("model.layers.0.mlps.0.gate_proj"), PROMPTS).passed


def test_a_parameter_the_probe_never_reached_is_a_refusal_not_a_guess():
    """TrOCR's cross-attention reads an encoder's output, which a forward pass on token ids alone
    never computes: its key and value projections have no role the trace can show and no analogue
    to follow, and the gate could not see them either."""
    roles = derive_roles(tiny_model("trocr"))
    assert any(r.startswith("model.decoder.layers.0.encoder_attn.k_proj.weight was never used by the probe")
               for r in roles.refusals), roles.refusals


def test_routed_experts_reached_with_zero_weight_get_their_roles_from_the_trace():
    """With 256 identity experts beside 4 routed ones (LongCat-Flash's ratio at a tiny size), every
    token the router sends to an identity expert also runs a routed expert with weight 0
    (transformers 5.25's `LongcatFlashMoE`): the routed experts are traced, their input projections
    read the scaled stream (x 1/s) and their output projections write it (x s). Bit-exact."""
    model = tiny_model("longcat_flash", zero_expert_num=256)
    roles = derive_roles(model)
    assert not roles.refused, roles.refusals
    assert roles.scales["model.layers.0.mlp.experts.gate_up_proj"] == [-1, 0.0]
    assert roles.scales["model.layers.0.mlp.experts.down_proj"] == [1, 0.0]
    gate = exactness_gate(model, roles, PROMPTS)
    assert gate.passed and gate.equal, gate.describe()


def _reloaded_logits(model, roles, directory):
    fixed = apply_roles(copy.deepcopy(model), roles, S)
    fixed.save_pretrained(directory)
    reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return [reloaded(input_ids=ids, use_cache=False).logits for ids in PROMPTS]


@pytest.mark.parametrize("model_type, exportable", [("deepseek_v3", True), ("jetmoe", False)])
def test_eps_fields_come_from_rebuilding_the_model_and_the_export_shows_it(tmp_path, model_type, exportable):
    """DeepSeek-V3's latent norm and JetMoe's layer norms take their class's default eps, 1e-6,
    which the config's rms_norm_eps equals. Matched by value, DeepSeek-V3 looked unexportable (its
    latent norm seemed to need a scaled input) and JetMoe exportable. Rebuilt, each eps has its
    true field or none; saved and reloaded, the rescaled model agrees."""
    model = tiny_model(model_type)
    config = model.config
    assert any(getattr(m, "variance_epsilon", None) == config.rms_norm_eps for m in model.modules())
    fields = eps_fields(model, {config.rms_norm_eps})
    roles = derive_roles(model)
    assert not roles.refused
    if model_type == "deepseek_v3":
        assert ("model.layers.0.self_attn.kv_a_layernorm", "variance_epsilon") not in fields
        assert fields[("model.norm", "variance_epsilon")] == "rms_norm_eps"
    else:
        assert ("model.layers.0.input_layernorm", "variance_epsilon") not in fields
        assert any("model.layers.0.input_layernorm" in b for b in roles.export_blockers)
    assert (not roles.export_blockers) == exportable
    with torch.no_grad():
        reference = [model(input_ids=ids, use_cache=False).logits for ids in PROMPTS]
    after = _reloaded_logits(model, roles, tmp_path)
    assert all(torch.equal(a, r) for a, r in zip(after, reference, strict=True)) == exportable


def test_a_model_that_cannot_be_rebuilt_has_its_eps_fields_unknown_not_guessed():
    class Unbuildable(nn.Module):
        def __init__(self, config):
            raise RuntimeError("needs a file")

    model = tiny_model("llama")
    model.__class__ = type("Unbuildable", (type(model),), {"__init__": Unbuildable.__init__})
    found = eps_fields(model, {model.config.rms_norm_eps})
    assert isinstance(found, str) and "could not be rebuilt" in found and "needs a file" in found
