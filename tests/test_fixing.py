import json
import os
import subprocess
import sys

import pytest
import torch

from halfsafe.fixing.apply import scaled_weights, use_fix
from halfsafe.fixing.fix import VerificationFailed, fix
from halfsafe.fixing.observe import observe
from halfsafe.fixing.plan import make_plan
from halfsafe.model.precision import cast_temporarily
from tests.handwritten import ARCHITECTURES as REGISTRY
from tests.handwritten import architecture_of, norm_eps_settings, scale_factors, site_roles
from tests.support.models import ARCHITECTURES, SHORT_HELDOUT, SHORT_PROMPTS, build_tiny_model, byte_tokenizer, is_tied

TOKENIZER = byte_tokenizer()
SHORT = dict(calibration=SHORT_PROMPTS, heldout=SHORT_HELDOUT)  # what a tiny model needs; see testing.py
TESTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
          "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe", "GemmaForCausalLM": "gemma",
          "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text", "Gemma3ForConditionalGeneration": "gemma3"}


def logits(model, prompts=SHORT_PROMPTS):
    """[T, V] fp32 logits per prompt, one prompt at a time (no padding)."""
    with torch.inference_mode():
        return [model(**TOKENIZER(p, return_tensors="pt")).logits[0].float() for p in prompts]


def test_every_hand_written_entry_has_a_tiny_model():
    assert set(TESTED) == set(REGISTRY)
    assert set(TESTED.values()) <= set(ARCHITECTURES)


@pytest.mark.parametrize("plant", ["residual", "interior"])
@pytest.mark.parametrize("arch", list(TESTED.values()))
def test_fix_makes_planted_overflow_finite_and_preserves_the_function(arch, plant):
    model = build_tiny_model(arch, plant=plant)
    assert type(model).__name__ in TESTED and architecture_of(model).name
    reference = logits(model)
    with cast_temporarily(model, torch.float16):
        assert not all(torch.isfinite(x).all() for x in logits(model))  # broken before

    # In fp32 the rescaled model is the same function: the scales are powers of two and the
    # norms' eps is scaled with them. Planned here from the hand-written entry: `fix` derives the
    # roles from the model and must reach the same plan.
    arch = architecture_of(model)
    recorder = observe(model, TOKENIZER, SHORT_PROMPTS)
    plan = make_plan(recorder.sites(), site_roles(arch, recorder.num_layers, is_tied(model)),
                     architecture=type(model).__name__, dtype=torch.float16)
    assert not plan.is_identity
    exact = scaled_weights(model, scale_factors(model, arch, plan), torch.float32)
    with use_fix(model, norm_eps_settings(model, arch, plan), plan, exact):
        for ref, out in zip(reference, logits(model), strict=True):
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)

    fixed, report = fix(model, TOKENIZER, **SHORT)
    assert report.plan == plan
    assert next(fixed.parameters()).dtype == torch.float16
    for ref, out in zip(reference, logits(fixed), strict=True):
        assert torch.isfinite(out).all()
        assert (out - ref).abs().max() < 1e-2  # fp16 rounding, at logits of order 1
    assert report.fixed.nonfinite_share == 0 and report.fixed.kl_mean <= report.fidelity["bfloat16"].kl_mean


def test_tied_and_untied_embeddings_are_both_covered():
    assert not is_tied(build_tiny_model("llama", plant=None))
    assert is_tied(build_tiny_model("gemma3_text", plant=None))


def test_model_without_overflow_keeps_scale_one_and_its_weights():
    model = build_tiny_model("qwen3", plant=None)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    fixed, report = fix(model, TOKENIZER, **SHORT)
    assert report.plan.is_identity and "no rescaling needed" in report.plan.describe()
    for key, value in fixed.state_dict().items():
        assert torch.equal(value, original[key].to(value.dtype)), key


def test_eager_attention_overflow_switches_to_sdpa():
    model = build_tiny_model("qwen2", plant="attention", attn_implementation="eager")
    fixed, report = fix(model, TOKENIZER, **SHORT)
    assert report.plan.attn_implementation == "sdpa"
    assert fixed.config._attn_implementation == "sdpa"
    assert all(torch.isfinite(x).all() for x in logits(fixed))


def test_verification_gate_refuses_and_leaves_the_model_untouched():
    model = build_tiny_model("llama", plant="residual")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(VerificationFailed, match="above the bound"):
        fix(model, TOKENIZER, max_kl=1e-30, **SHORT)
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, before[key]), key


def test_a_bfloat16_target_is_gated_against_bfloat16_without_the_fix():
    # A sound plan: power-of-two scales commute with rounding, so the fixed bf16 model is plain
    # bf16 (measured ratio 1.000) and passes under the bound, plain bf16's KL x 1.25.
    _, report = fix(build_tiny_model("gemma3_text"), TOKENIZER, dtype=torch.bfloat16, **SHORT)
    assert report.max_kl == pytest.approx(1.25 * report.fidelity["bfloat16"].kl_mean)
    assert report.fixed.kl_mean <= report.max_kl
    # A margin that scales the stream by 2^-22 leaves Gemma's (1 + w) gains no bf16 bits for w:
    # all finite, yet 9,300x plain bf16's KL (measured). The old bound, the fixed model's own KL,
    # could not fail here.
    with pytest.raises(VerificationFailed, match=r"above the bound \(.*, bfloat16 without the fix\)"):
        fix(build_tiny_model("gemma3_text"), TOKENIZER, dtype=torch.bfloat16, margin=1e40, **SHORT)


def _planted_gpt2():
    """A tiny GPT-2 (outside the hand-written reference) whose residual channel 3 reaches 1e5 at every token."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=320, n_embd=32, n_layer=2, n_head=2, bos_token_id=1,
                                       eos_token_id=2)).eval()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.weight[:, 3] = 0.0
        model.transformer.h[0].mlp.c_proj.bias[3] = 1e5
    return model


def test_an_architecture_outside_the_hand_written_reference_is_rescaled_through_derived_roles():
    """GPT-2 (learned positions, Conv1D writers with biases, LayerNorm readers) is not in the
    hand-written reference: its roles are derived from the model and proven bit-exact before the fix."""
    fixed, report = fix(_planted_gpt2(), TOKENIZER, **SHORT)
    assert report.plan.architecture == "GPT2LMHeadModel" and report.plan.residual_scale < 1
    assert report.exactness["equal"]
    assert all(torch.isfinite(out).all() for out in logits(fixed))
    assert report.fixed.kl_mean <= report.fidelity["bfloat16"].kl_mean


def test_roles_exact_only_in_memory_refuse_an_exact_only_export_before_any_work():
    """Qwen3-Next's gated-delta-net norm shares the config's eps but cannot carry it in a
    checkpoint: `fix` for an exact-only export refuses it up front (a bounded export is
    tests/test_bounded.py's); in memory it stays allowed."""
    from halfsafe.errors import HalfsafeError
    from tests.support.models import VOCAB
    from tests.support.planted import tiny_model

    model = tiny_model("qwen3_next", vocab_size=VOCAB)
    refusal = r"exactly in memory but not as a checkpoint: .*linear_attn\.norm.*drop --exact-only.*load_fixed"
    with pytest.raises(HalfsafeError, match=refusal):
        fix(model, TOKENIZER, for_export=True, exact_only=True, **SHORT)
    assert getattr(model.config, "halfsafe", None) is None


def test_broken_roles_are_refused_by_the_exactness_gate_before_anything_changes():
    """The pipeline's exactness stage can fail: a backend that drops one writer from the derived
    roles is refused with the worst position and the keep-fp32 suggestion, the model untouched."""
    from halfsafe.fixing.fix import InMemory
    from halfsafe.fixing.pipeline import run

    class OneWriterMissing(InMemory):
        def roles(self):
            return super().roles().without("model.layers.1.mlp.down_proj")

    model = build_tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(VerificationFailed, match=r"exactness gate failed.*position \d+.*keep-fp32") as raised:
        run(OneWriterMissing(model, TOKENIZER), dtype=torch.float16, strategy="rescale", margin=4.0,
            calibration=SHORT_PROMPTS, heldout=SHORT_HELDOUT, max_kl=None, verify=True)
    assert raised.value.exit_code == 4
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert getattr(model.config, "halfsafe", None) is None


# -- the command and the exported checkpoint ----------------------------------------------------

RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, prompts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16)
tokenizer = AutoTokenizer.from_pretrained(path)
assert next(model.parameters()).dtype == torch.float16
with torch.inference_mode():
    result = [model(**tokenizer(p, return_tensors="pt")).logits[0].float() for p in prompts]
torch.save(result, out)
assert not any(name.startswith("halfsafe") for name in sys.modules)
"""


def reload_in_plain_transformers(path, prompts, tmp_path):
    """Logits from the exported checkpoint, loaded in a fresh process that never imports halfsafe."""
    out = tmp_path / "reloaded.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", RELOAD, str(path), json.dumps(prompts), str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(out)


def _tree(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_cli_fix_exports_a_checkpoint_plain_transformers_runs_in_float16(tiny_dirs, tmp_path, capsys,
                                                                          short_prompt_args):
    from halfsafe.cli import main
    from halfsafe.model.loading import load_model

    source = tiny_dirs["gemma3_text", "residual"]
    untouched = _tree(source)
    out = tmp_path / "fixed"
    assert main(["fix", str(source), "--out", str(out), "--plan-json", str(tmp_path / "plan.json"),
                 *short_prompt_args]) == 0
    printed = capsys.readouterr().out
    assert "residual stream x 2^-3" in printed and "float16 fixed (rescale): all finite" in printed
    # What was derived and how exactly it was proven, before the plan.
    roles_line = " ".join(printed.split()).split(" plan (rescale)")[0]
    assert roles_line.startswith("roles derived from Gemma3ForCausalLM: ")
    assert roles_line.endswith("eps x s^2 in config rms_norm_eps; proven in fp32 on 2 prompt(s): max |delta logit| "
                               "0.0e+00 (bit-identical)")
    assert _tree(source) == untouched  # the input is never modified

    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16"
    block = config["halfsafe"]
    assert block["plan"]["residual_scale"] == 0.125 and block["verification"]["fixed"]["nonfinite_share"] == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["plan"] == block["plan"]
    # The config counts the roles; --plan-json names every one of them.
    assert block["roles"]["eps_fields"] == ["rms_norm_eps"] and block["exactness"]["equal"]
    counts = block["roles"]
    assert f"{counts['writers']} writer(s), {sum(counts['readers'].values())} reader(s)" in roles_line
    # The readers: 4 layers x (input, pre-feedforward norm) and the final norm; the tied head's input.
    assert counts["readers"] == {"scale-invariant": 9, "input x 1/s": 1}
    assert len(plan["roles"]["scales"]) == block["roles"]["scaled_parameters"] > 0
    assert "model.layers.0.post_feedforward_layernorm" in plan["roles"]["writers"]
    assert (out / "generation_config.json").exists() and (out / "tokenizer.json").exists()
    # Readable by others, like any checkpoint.
    assert oct((out / "model.safetensors").stat().st_mode & 0o044) == oct(0o044)

    # Loaded in a process without halfsafe, the checkpoint gives the in-memory fixed model's logits.
    in_memory, _ = fix(load_model(str(source)).model, TOKENIZER, **SHORT)
    reloaded = reload_in_plain_transformers(out, SHORT_PROMPTS, tmp_path)
    for mine, theirs in zip(logits(in_memory), reloaded, strict=True):
        assert torch.isfinite(theirs).all()
        torch.testing.assert_close(theirs, mine, rtol=0, atol=0)


def test_cli_fix_refuses_existing_output_and_writes_nothing_on_a_failed_gate(tiny_dirs, tmp_path, capsys,
                                                                              short_prompt_args):
    from halfsafe.cli import main

    source = str(tiny_dirs["llama", "residual"])
    existing = tmp_path / "taken"
    existing.mkdir()
    assert main(["fix", source, "--out", str(existing)]) == 2
    assert "already exists; choose a new directory or pass --overwrite" in capsys.readouterr().err

    assert main(["fix", source, "--out", str(existing), "--overwrite", *short_prompt_args]) == 0
    assert (existing / "model.safetensors").exists()

    out = tmp_path / "never"
    assert main(["fix", source, "--out", str(out), "--max-kl", "1e-30", *short_prompt_args]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing was written" in err[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]

    assert main(["fix", source, "--out", source]) == 2
    assert "overlaps the input checkpoint" in capsys.readouterr().err


# -- the fallback: keep-fp32 ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_keep_fp32_makes_planted_overflow_finite(arch):
    model = build_tiny_model(arch, plant="residual")
    reference = logits(model)
    fixed, report = fix(model, TOKENIZER, strategy="keep-fp32", **SHORT)
    assert report.strategy == "keep-fp32"
    assert report.plan.kept_layers == [1, 2, 3]  # the planted layer and every layer after it
    assert "second best to rescaling" in report.plan.describe()
    assert report.plan.fp32_bytes > 0 and report.speed_ratio > 0
    dtypes = {name: p.dtype for name, p in fixed.named_parameters()}
    assert dtypes["model.layers.0.mlp.down_proj.weight"] == torch.float16
    assert dtypes["model.layers.1.mlp.down_proj.weight"] == torch.float32
    for ref, out in zip(reference, logits(fixed), strict=True):
        assert torch.isfinite(out).all() and (out - ref).abs().max() < 1e-2
    assert report.fixed.kl_mean <= report.fidelity["bfloat16"].kl_mean


def test_keep_fp32_works_without_roles():
    """keep-fp32 needs no roles at all (GPT-2, outside the hand-written reference)."""
    model = _planted_gpt2()
    reference = logits(model)
    with cast_temporarily(model, torch.float16):
        assert not all(torch.isfinite(x).all() for x in logits(model))
    fixed, report = fix(model, TOKENIZER, strategy="keep-fp32", **SHORT)
    assert report.plan.kept_layers == [0, 1]
    for ref, out in zip(reference, logits(fixed), strict=True):
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)


def test_cli_keep_fp32_reports_without_exporting(tiny_dirs, tmp_path, capsys, short_prompt_args):
    from halfsafe.cli import main

    source = str(tiny_dirs["qwen2", "residual"])
    assert main(["fix", source, "--strategy", "keep-fp32", "--out", str(tmp_path / "x")]) == 2
    assert "cannot be exported" in capsys.readouterr().err
    assert main(["fix", source, "--strategy", "keep-fp32", *short_prompt_args]) == 0
    out = capsys.readouterr().out
    assert "plan (keep-fp32): keep 3 layer(s) in fp32 (layers 1-3)" in out and "speed:" in out
    assert main(["fix", source]) == 2
    assert "--out DIR is required" in capsys.readouterr().err


def test_failed_gate_leaves_the_attention_kernel_as_it_was():
    model = build_tiny_model("qwen2", plant="attention", attn_implementation="eager")
    with pytest.raises(VerificationFailed):
        fix(model, TOKENIZER, max_kl=1e-30, **SHORT)
    assert model.config._attn_implementation == "eager"
