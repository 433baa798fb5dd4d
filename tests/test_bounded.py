"""Bounded export: roles exact in memory only, written as a checkpoint whose eps are what a plain
reload gives, measured in fp32 both ways, bounded against float16's own error, and said so."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from halfsafe.errors import HalfsafeError
from halfsafe.fixing.bound_gate import KL_SHARE, MAX_SHARE, outside_bound
from halfsafe.fixing.fix import VerificationFailed, fix
from halfsafe.model.layers import find_decoder_layers
from halfsafe.roles import derive_roles, exactness_gate
from halfsafe.roles.bounded import conflicting_fields, distance, export_settings, reload_gate, running_as_exported
from halfsafe.vllm.plugin import verified_for_float16
from tests.support.models import SHORT_HELDOUT, SHORT_PROMPTS, VOCAB, byte_tokenizer
from tests.support.planted import plant_massive_activation, tiny_model

TOKENIZER = byte_tokenizer()
SHORT = dict(calibration=SHORT_PROMPTS, heldout=SHORT_HELDOUT)


def planted(model_type: str):
    """A tiny `model_type` with a massive activation (past float16's maximum) in its stream."""
    model = tiny_model(model_type, vocab_size=VOCAB)
    layers_path, layers = find_decoder_layers(model)
    ids = TOKENIZER(SHORT_PROMPTS[0], return_tensors="pt")["input_ids"]
    assert plant_massive_activation(model, layers, layers_path, derive_roles(model), ids) > 65504
    return model


@pytest.fixture(scope="module")
def granite():
    """Granite 4 (granitemoehybrid): its Mamba mixers' gated norm shares `rms_norm_eps`."""
    return planted("granitemoehybrid")


def ids_of(prompts):
    return [TOKENIZER(p, return_tensors="pt")["input_ids"] for p in prompts]


def test_both_ways_of_storing_the_shared_eps_are_measured_and_the_closer_is_kept(granite):
    roles = derive_roles(granite)
    assert roles.export_blockers and conflicting_fields(roles) == ["rms_norm_eps"]
    assert exactness_gate(granite, roles, ids_of(SHORT_PROMPTS[:2])).equal  # exact in memory
    result = reload_gate(granite, roles, ids_of(SHORT_PROMPTS[:2]), 2.0**-3)
    assert sorted(c.scaled_fields for c in result.candidates) == [[], ["rms_norm_eps"]]
    assert result.chosen.kl_mean == min(c.kl_mean for c in result.candidates)
    # Each candidate is the model run with the eps a reload gives: measured again here, the same.
    with torch.no_grad():
        reference = [granite(input_ids=i).logits for i in ids_of(SHORT_PROMPTS[:2])]
        for candidate in result.candidates:
            with running_as_exported(granite, roles, 2.0**-3, candidate.scaled_fields):
                again = [granite(input_ids=i).logits for i in ids_of(SHORT_PROMPTS[:2])]
            assert distance(candidate.scaled_fields, reference, again) == candidate
    # Not exact as a checkpoint: either way some norm sees another eps, and the logits move.
    assert all(c.max_delta > 0 for c in result.candidates)


def test_the_bound_refuses_an_error_that_float16_does_not_dwarf():
    assert outside_bound(1e-4, 1e-9, 1e-2, 1e-6) is None
    assert "mean KL" in outside_bound(1e-4, 2 * KL_SHARE * 1e-6, 1e-2, 1e-6)
    assert "max |delta logit|" in outside_bound(2 * MAX_SHARE * 1e-2, 1e-9, 1e-2, 1e-6)
    assert outside_bound(1e-4, 1e-9, 1e-2, float("nan")) is not None  # nothing to compare with: refused


RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
paths, ids, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
results = []
for path in paths:
    found = {}
    for dtype in (torch.float32, torch.float16):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        with torch.inference_mode():
            found[str(dtype)] = [model(input_ids=torch.tensor([i])).logits[0].float() for i in ids]
    found["eps"] = {f"{n}:{a}": v for n, m in model.named_modules() for a, v in vars(m).items()
                    if "eps" in a and isinstance(v, float)}
    results.append(found)
torch.save(results, out)
assert not any(name.startswith("halfsafe") for name in sys.modules)
"""


def reload_plainly(paths, ids, tmp_path):
    """Per checkpoint in `paths`: its logits (fp32 and float16) on `ids` and every eps it has,
    loaded by plain transformers in one fresh process that never imports halfsafe."""
    out = tmp_path / "reloaded.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", RELOAD, json.dumps([str(p) for p in paths]),
                           json.dumps([i[0].tolist() for i in ids]), str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return torch.load(out)


# Newly exportable types, one of each family the issue names: Qwen 3.5 (dense and MoE), Qwen3-Next,
# Llama 4, Granite 4; and Dots3, whose tiny config saved no checkpoint until the shrinking met its
# class's validation.
RELOADED = ["qwen3_5_text", "qwen3_5_moe_text", "qwen3_next", "llama4_text", "granitemoehybrid", "dots3_note"]


def test_bounded_checkpoints_reload_in_plain_transformers_with_the_eps_and_delta_recorded(tmp_path):
    """Each type saved as a bounded export would be (fp32 weights, so only the eps differ), then
    reloaded in a process without halfsafe: every eps is what the gate ran with, float16 is
    finite, and the reloaded fp32 logits move by the delta the gate recorded."""
    from tests.support.planted import apply_as_exported

    s, ids, recorded, expected = 2.0**-3, ids_of(SHORT_PROMPTS[:2]), {}, {}
    for model_type in RELOADED:
        model = planted(model_type)
        roles = derive_roles(model)
        result = reload_gate(model, roles, ids, s)
        with torch.no_grad():
            reference = [model(input_ids=i).logits[0] for i in ids]
        names = {id(m): n for n, m in model.named_modules()}
        expected[model_type] = {f"{names[id(obj)]}:{attr}": value for obj, attr, value in
                                export_settings(model, roles, s, result.scaled_fields) if id(obj) in names}
        recorded[model_type] = (result.chosen.max_delta, max(r.abs().max().item() for r in reference), reference)
        apply_as_exported(model, roles, s, result.scaled_fields).save_pretrained(tmp_path / model_type)
    reloaded = reload_plainly([tmp_path / t for t in RELOADED], ids, tmp_path)
    for model_type, found in zip(RELOADED, reloaded, strict=True):
        assert all(torch.isfinite(logits).all() for logits in found[str(torch.float16)]), model_type
        for key, value in expected[model_type].items():
            assert found["eps"][key] == value, (model_type, key)
        delta, top, reference = recorded[model_type]
        again = max((a - b).abs().max().item() for a, b in zip(reference, found[str(torch.float32)], strict=True))
        # the same fp32 computation in another process: equal up to a kernel's summation order
        assert abs(again - delta) <= 1e-6 * top, (model_type, again, delta)
        assert again > 0, model_type  # not exact: some norm has another eps than in memory


def test_exact_only_refuses_a_bounded_export_before_any_work(granite):
    model = copy.deepcopy(granite)
    with pytest.raises(HalfsafeError, match=r"not as a checkpoint: .*mamba\.norm.*drop --exact-only"):
        fix(model, TOKENIZER, for_export=True, exact_only=True, **SHORT)
    assert getattr(model.config, "halfsafe", None) is None


def test_a_bounded_export_needs_its_verification(granite):
    model = copy.deepcopy(granite)
    with pytest.raises(VerificationFailed, match="drop --no-verify"):
        fix(model, TOKENIZER, for_export=True, verify=False, **SHORT)
    assert getattr(model.config, "halfsafe", None) is None


def test_a_fix_not_meant_for_export_says_its_checkpoint_would_not_be_exact(granite):
    """In memory the roles are exact; a checkpoint written from it anyway is not, and says so: the
    vLLM plugin then refuses it (only `fix --out` measures and bounds it)."""
    fixed, report = fix(copy.deepcopy(granite), TOKENIZER, verify=False, **SHORT)
    assert report.exactness["equal"] and report.exactness["exact"] is False and "bounded" not in report.exactness
    verified = {**report.to_json(), "verification": {"max_kl": 1e-3, "fixed": {"nonfinite_share": 0, "kl_mean": 0}}}
    assert verified_for_float16({"halfsafe": {**verified, "exactness": {"exact": True}}})
    assert not verified_for_float16({"halfsafe": verified})  # its own exactness block: not exact, not bounded


def test_the_cli_says_bounded_in_one_line_and_the_card_says_by_how_much(granite, tmp_path, capsys):
    from halfsafe.cli import main

    source = tmp_path / "granite"
    granite.save_pretrained(source)
    TOKENIZER.save_pretrained(source)
    (tmp_path / "c.txt").write_text("\n".join(SHORT_PROMPTS) + "\n")
    (tmp_path / "h.txt").write_text("\n".join(SHORT_HELDOUT) + "\n")
    prompts = ["--prompts", str(tmp_path / "c.txt"), "--heldout", str(tmp_path / "h.txt")]
    assert main(["fix", str(source), "--out", str(tmp_path / "exact"), "--exact-only", *prompts]) != 0
    captured = capsys.readouterr()
    assert "drop --exact-only" in captured.err and len(captured.err.strip().splitlines()) == 1
    assert not (tmp_path / "exact").exists()

    assert main(["fix", str(source), "--out", str(tmp_path / "fixed"), *prompts]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "export bounded" in line]
    assert len(lines) == 1 and "exact: false" in lines[0] and "rms_norm_eps" in lines[0]
    config = json.loads((tmp_path / "fixed" / "config.json").read_text())
    card = (tmp_path / "fixed" / "README.md").read_text()
    bounded = config["halfsafe"]["exactness"]["bounded"]
    assert "exact: false (bounded)" in card and f"{bounded['max_delta']:.2e}" in card
    assert bounded["passed"] and bounded["heldout_kl_mean"] <= KL_SHARE * bounded["float16_kl_mean"]
    assert verified_for_float16(config)
    # The float16 file itself, in plain transformers: finite, and its eps those the bound was measured with.
    (found,) = reload_plainly([tmp_path / "fixed"], ids_of(SHORT_PROMPTS[:2]), tmp_path)
    assert all(torch.isfinite(logits).all() for logits in found[str(torch.float16)])
    stored, s = config["rms_norm_eps"], config["halfsafe"]["plan"]["residual_scale"]
    assert stored == granite.config.rms_norm_eps * (s * s if bounded["scaled_fields"] else 1.0)
    assert found["eps"]["model.layers.0.mamba.norm:variance_epsilon"] == stored


def test_the_vllm_plugin_takes_a_bounded_export_only_with_its_bound_passed():
    block = {"strategy": "rescale", "plan": {"dtype": "float16"},
             "verification": {"max_kl": 1e-3, "fixed": {"nonfinite_share": 0, "kl_mean": 1e-6}}}
    assert not verified_for_float16({"halfsafe": block})  # no exactness: not proven, refused
    assert not verified_for_float16({"halfsafe": {**block, "exactness": {"max_delta": 0.0}}})  # no `exact`
    exact = {**block, "exactness": {"exact": True}}
    assert verified_for_float16({"halfsafe": exact})
    passed = {**block, "exactness": {"exact": False, "bounded": {"passed": True}}}
    assert verified_for_float16({"halfsafe": passed})
    for bounded in ({"passed": False}, {}, None):
        assert not verified_for_float16({"halfsafe": {**block, "exactness": {"exact": False, "bounded": bounded}}})
