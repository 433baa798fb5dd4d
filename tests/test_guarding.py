"""Guarded generation on tiny real-config models: fault injection, planted overflow, policies."""

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from halfsafe.errors import HalfsafeError
from halfsafe.guarding import (
    INF_LOGIT,
    NONFINITE,
    RECOVERED,
    STOPPED,
    DegenerationMonitor,
    NonFiniteLogits,
    SanitizeLogits,
    guard,
)
from halfsafe.model.loading import load_model
from halfsafe.model.precision import compute_in
from tests.support.models import BOS, EOS, PAD, PLANT_LAYER, SHORT_PROMPTS, NanFault, build_tiny_model, byte_tokenizer

GREEDY = dict(do_sample=False, top_p=None, top_k=None, temperature=None, pad_token_id=PAD)
NEW = 12


@pytest.fixture(scope="module")
def healthy():
    return build_tiny_model("qwen3", plant=None)


def _batch(prompts, device="cpu"):
    tokenizer = byte_tokenizer()
    tokenizer.padding_side = "left"
    return {k: v.to(device) for k, v in tokenizer(prompts, return_tensors="pt", padding=True).items()
            if k in ("input_ids", "attention_mask")}


def test_fault_at_step_k_is_recovered_exactly_with_one_event(healthy):
    batch = _batch(SHORT_PROMPTS[:1])
    clean = healthy.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    with NanFault(healthy, step=5):
        broken = healthy.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert not torch.equal(broken, clean)  # the fault does break plain generate

    guarded = guard(healthy)
    with NanFault(healthy, step=5):
        out = guarded.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert torch.equal(out, clean)
    report = guarded.report
    assert [(e.step, e.row) for e in report.of_kind(NONFINITE)] == [(5, 0)]
    assert report.recovered_steps == [5] and report.steps == NEW
    assert "recomputed in float32" in report.of_kind(RECOVERED)[0].detail
    assert "not repaired" not in report.of_kind(RECOVERED)[0].detail


def test_batch_of_four_only_the_broken_row_is_recovered_others_untouched(healthy):
    batch = _batch(["The capital of France is", "def add(a, b):", "上海有个非常出名的地方，", "1 + 1 ="])
    clean = healthy.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    guarded = guard(healthy)
    with NanFault(healthy, step=3, rows=[2]):
        out = guarded.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert torch.equal(out, clean)
    assert {(e.step, e.row, e.kind) for e in guarded.report.events if e.kind in (NONFINITE, RECOVERED)} == {
        (3, 2, NONFINITE), (3, 2, RECOVERED)}


def test_two_threads_through_one_guard_get_separate_correct_reports():
    """One thread's row faults at step 3, the other's never: each report holds its own steps and
    events, each output is its prompt's clean one, and the fp32 recovery in one thread (which
    swaps a float16 model's weights module by module) never leaks into the other's forwards."""
    healthy = build_tiny_model("qwen3", plant=None).to(torch.float16)
    prompts = {"faulted": SHORT_PROMPTS[:1], "healthy": SHORT_PROMPTS[2:3]}
    new = {"faulted": NEW, "healthy": 4 * NEW}
    clean = {k: healthy.generate(**_batch(p), max_new_tokens=new[k], min_new_tokens=new[k], **GREEDY)
             for k, p in prompts.items()}
    guarded = guard(healthy)
    # The faulted row's step 3 is recomputed in fp32 and its later steps read fp32's cache
    # entries, so its tokens need not be plain float16's (a near-tie may fall the other way on
    # another CPU): its reference is the same guarded generation, alone in one thread.
    with NanFault(healthy, step=3):
        clean["faulted"] = guarded.generate(**_batch(prompts["faulted"]), max_new_tokens=new["faulted"],
                                            min_new_tokens=new["faulted"], **GREEDY)
    start = threading.Barrier(2)
    results, errors = {}, []

    def work(kind: str) -> None:
        try:
            batch = _batch(prompts[kind])
            start.wait()
            if kind == "faulted":
                with NanFault(healthy, step=3, thread=threading.get_ident()):
                    out, report = guarded.generate_with_report(**batch, max_new_tokens=new[kind],
                                                               min_new_tokens=new[kind], **GREEDY)
            else:
                out, report = guarded.generate_with_report(**batch, max_new_tokens=new[kind],
                                                           min_new_tokens=new[kind], **GREEDY)
            results[kind] = out, report, guarded.report
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(kind,)) for kind in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for kind in prompts:
        out, report, own = results[kind]
        assert own is report  # `report` is the calling thread's
        assert torch.equal(out, clean[kind]), kind
        assert report.steps == new[kind], kind
    faulted, healthy_report = results["faulted"][1], results["healthy"][1]
    assert {(e.step, e.row, e.kind) for e in faulted.events} == {(3, 0, NONFINITE), (3, 0, RECOVERED)}
    assert not healthy_report.of_kind(NONFINITE, RECOVERED)  # (the tiny random model may repeat itself)
    assert guarded.counters.generations == 3 and guarded.counters.steps == 6 * NEW
    assert guarded.counters.recovered_rows == 2


def assert_recovered_step_is_fp32s(half, widened, batch, new_tokens, **settings):
    """What recovery guarantees, whatever the CPU: the recovered step's logits are the widened
    model's (the same float16-stored weights computing in fp32, last position only, as the
    recovery runs it), so its token is fp32's; every layer's KV entries for the prompt are the
    widened model's, cast to the cache's dtype; every later step's logits are finite and no token
    is 0. What the later float16 steps choose is not guaranteed: a near-tie can fall either way
    on another CPU's rounding (the statistical claim lives in tests/test_demo_model.py).
    Returns the guarded output and its report."""
    length = batch["input_ids"].shape[1]
    guarded = guard(half)
    with torch.inference_mode():
        out = guarded.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               return_dict_in_generate=True, output_logits=True, **settings)
        fp32 = widened(**batch, use_cache=True, logits_to_keep=1)
    assert guarded.report.recovered_steps[:1] == [0]
    assert torch.equal(out.logits[0].float(), fp32.logits[:, -1].float())  # [B, V]: fp32's, to the bit
    assert torch.equal(out.sequences[:, length], fp32.logits[:, -1].argmax(-1))
    written = out.sequences.shape[1] - 1  # positions the cache has seen; the last token is not in it
    compared = 0
    for ours, theirs in zip(out.past_key_values.layers, fp32.past_key_values.layers, strict=True):
        for name in ("keys", "values"):
            mine, reference = getattr(ours, name), getattr(theirs, name)  # [B, heads, n, head_dim]
            # A sliding-window layer keeps only its last positions: compare the prompt's that both hold.
            mine_from, reference_from = written - mine.shape[-2], length - reference.shape[-2]
            start = max(mine_from, reference_from)
            kept = mine[..., start - mine_from:length - mine_from, :]
            assert torch.equal(kept, reference[..., start - reference_from:, :].to(kept.dtype)), name
            compared += kept.shape[-2]
    assert compared >= length  # a layer that holds the whole prompt
    assert all(torch.isfinite(step).all() for step in out.logits)
    assert not (out.sequences[:, length:] == 0).any()
    return out, guarded.report


def test_planted_overflow_in_float16_recovers_step_0_in_fp32_and_runs_on_finite(tiny_dirs):
    path = str(tiny_dirs["gemma3_text", "residual"])
    fp16 = load_model(path, dtype=torch.float16).model
    widened = load_model(path, dtype=torch.float16).model.to(torch.float32)  # the same rounded weights
    batch = _batch(SHORT_PROMPTS[:1])
    plain = fp16.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY)
    assert (plain[0, -NEW:] == 0).all()  # the failure: token 0 forever

    _, report = assert_recovered_step_is_fp32s(fp16, widened, batch, NEW, **GREEDY)
    first = report.of_kind(NONFINITE)[0]
    assert first.step == 0 and first.module.startswith(f"model.layers.{PLANT_LAYER}")
    assert report.recovered_steps == [e.step for e in report.of_kind(NONFINITE)]  # every broken step recovered
    assert next(fp16.parameters()).dtype == torch.float16  # weights handed back in their dtype


def test_sampling_on_a_nan_model_never_raises_under_any_policy(tiny_dirs):
    model = load_model(str(tiny_dirs["llama", "residual"]), dtype=torch.float16).model
    batch = _batch(SHORT_PROMPTS[:2])
    with pytest.raises(RuntimeError, match="probability tensor"):
        torch.manual_seed(0)
        model.generate(**batch, do_sample=True, temperature=0.8, max_new_tokens=4, pad_token_id=PAD)
    for policy in ("recover", "sanitize"):
        torch.manual_seed(0)
        guarded = guard(model, on_nonfinite=policy)
        out = guarded.generate(**batch, do_sample=True, temperature=0.8, max_new_tokens=NEW, pad_token_id=PAD)
        new = out[:, batch["input_ids"].shape[1]:]
        assert not (new[:, :4] == 0).all(dim=1).any(), policy  # no token-0 flood


def test_sanitize_stops_an_all_nan_row_with_its_end_token_never_token_0(tiny_dirs):
    model = load_model(str(tiny_dirs["llama", "residual"]), dtype=torch.float16).model
    batch = _batch(SHORT_PROMPTS[:1])
    guarded = guard(model, on_nonfinite="sanitize")
    out = guarded.generate(**batch, max_new_tokens=NEW, **GREEDY)
    new = out[0, batch["input_ids"].shape[1]:]
    assert new.tolist() == [EOS]  # stopped at once, on the end token
    assert [(e.step, e.kind) for e in guarded.report.events] == [(0, STOPPED)]


def test_raise_names_the_step_the_module_and_the_fix(tiny_dirs):
    model = load_model(str(tiny_dirs["qwen2", "residual"]), dtype=torch.float16).model
    with pytest.raises(NonFiniteLogits) as caught:
        guard(model, on_nonfinite="raise").generate(**_batch(SHORT_PROMPTS[:1]), max_new_tokens=4, **GREEDY)
    message = str(caught.value)
    assert message.startswith("step 0: the logits of row 0 are non-finite in float16")
    assert f"model.layers.{PLANT_LAYER}" in message and "halfsafe fix" in message
    assert caught.value.exit_code == 5 and "\n" not in message


def test_guard_keeps_the_callers_processors_and_criteria_and_counts(healthy):
    from transformers import MaxLengthCriteria

    batch = _batch(SHORT_PROMPTS[:1])
    guarded = guard(healthy)
    length = batch["input_ids"].shape[1] + 3
    out = guarded.generate(**batch, max_new_tokens=NEW, stopping_criteria=[MaxLengthCriteria(length)],
                           logits_processor=LogitsProcessorList([TopKLogitsWarper(1)]), **GREEDY)
    assert out.shape[1] == length
    guarded.generate(**batch, max_new_tokens=2, **GREEDY)
    assert guarded.counters.generations == 2 and guarded.counters.steps == 3 + 2
    assert guarded.counters.nonfinite_rows == 0


def test_temperature_zero_sampling_is_greedy_and_said(healthy):
    batch = _batch(SHORT_PROMPTS[:1])
    guarded = guard(healthy)
    out = guarded.generate(**batch, do_sample=True, temperature=0.0, max_new_tokens=6, pad_token_id=PAD)
    assert torch.equal(out, healthy.generate(**batch, max_new_tokens=6, **GREEDY))
    assert guarded.report.advice == ["temperature=0.0 with sampling is greedy decoding; decoding greedily"]


def test_unknown_policy_is_refused():
    with pytest.raises(HalfsafeError, match="on_nonfinite 'ignore' is not a policy"):
        guard(torch.nn.Linear(1, 1), on_nonfinite="ignore")


# -- the processor: properties ----------------------------------------------------------------

_SPECIAL = st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, 1.0, -1.0, 1e4, -1e4, 65504.0])


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.lists(st.one_of(_SPECIAL, st.floats(-1e30, 1e30)), min_size=8, max_size=8),
                  min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    temperature=st.sampled_from([0.05, 0.7, 1.0, 2.0]),
)
def test_any_logits_through_the_processors_give_a_valid_distribution(rows, dtype, temperature):
    logits = torch.tensor(rows, dtype=torch.float32).to(dtype)  # a model's logits in its dtype
    ids = torch.zeros(len(rows), 2, dtype=torch.long)
    empty = ~((logits.float() > float("-inf")) & ~logits.isnan()).any(-1)  # rows with no usable entry

    # The sanitizer alone, in the logits' own dtype, and never mutating them.
    before = logits.clone()
    alone = SanitizeLogits(stop_token=3)(ids, logits)
    assert torch.equal(logits.isnan(), before.isnan()) and torch.equal(logits.nan_to_num(), before.nan_to_num())
    _assert_valid(alone, empty)

    # As generate runs it: scores in float32, the guard's processor before the sampling warpers.
    sanitizer = SanitizeLogits(stop_token=3)
    chain = LogitsProcessorList([sanitizer, TemperatureLogitsWarper(temperature), TopKLogitsWarper(4),
                                 TopPLogitsWarper(0.9)])
    _assert_valid(chain(ids, logits.to(torch.float32)), empty)
    assert torch.equal(sanitizer.flags[0][1], empty)


def _assert_valid(scores: torch.Tensor, empty: torch.Tensor) -> None:
    probs = torch.softmax(scores.float(), dim=-1)
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    assert torch.allclose(probs.sum(-1), torch.ones(len(probs)), atol=1e-3)
    torch.multinomial(probs, 1)  # the call that raises on a broken distribution
    assert (probs[empty, 3] == 1).all()  # a row with nothing usable goes to the stop token, never to token 0


def test_healthy_rows_pass_unchanged_and_inf_becomes_certain():
    scores = torch.tensor([[1.0, 2.0, float("-inf"), 0.5], [float("inf"), 1.0, float("nan"), 0.0]])
    out = SanitizeLogits(stop_token=0)(torch.zeros(2, 1, dtype=torch.long), scores)
    assert torch.equal(out[0], scores[0])  # -inf is a legitimate mask
    assert out[1].argmax() == 0 and out[1, 2] == float("-inf")
    assert torch.isclose(out[1].exp().sum(), torch.tensor(1.0))  # renormalised
    assert INF_LOGIT == 65504.0


# -- the monitor ------------------------------------------------------------------------------


def _monitor_codes(sequences, prompt_length=2, **kwargs):
    monitor = DegenerationMonitor([EOS], **kwargs)
    ids = torch.tensor(sequences)
    done = None
    for end in range(prompt_length + 1, ids.shape[1] + 1):
        done = monitor(ids[:, :end], None)
    return monitor, torch.stack(monitor.codes), done


def test_monitor_sees_repeats_loops_and_token0_floods_but_not_ended_rows():
    prompt = [BOS, 70]
    rows = [
        prompt + [50] * 20,  # repeat
        prompt + [60, 61, 62] * 8,  # loop of period 3
        prompt + [0] * 6 + [7] * 18,  # token-0 flood, then a repeat
        prompt + [EOS] + [PAD] * 23,  # ended: padding is not degeneration
        prompt + list(range(100, 124)),  # healthy
    ]
    width = max(map(len, rows))
    rows = [r + [r[-1]] * (width - len(r)) for r in rows]
    monitor, codes, done = _monitor_codes(rows, run=16, flood=4)
    kinds = {1: "repeat", 2: "loop", 3: "token0"}
    first = {}
    for step, row in codes.nonzero().tolist():
        first.setdefault((row, kinds[int(codes[step, row])]), step)
    assert first[0, "repeat"] == 15
    assert (1, "loop") in first and (1, "repeat") not in first
    assert first[2, "token0"] == 3
    assert not any(row in (3, 4) for row, _ in first)
    assert done.tolist() == [False, False, False, True, False]  # without stop, only the ended row


def test_monitor_stops_degenerate_rows_when_asked():
    _, _, done = _monitor_codes([[BOS, 70] + [50] * 20, [BOS, 70] + list(range(100, 120))], stop=True)
    assert done.tolist() == [True, False]


# -- computing in fp32 ------------------------------------------------------------------------


def test_compute_in_float32_matches_an_fp32_copy_and_restores_the_half_weights(tiny_dirs):
    path = str(tiny_dirs["gemma3_text", "residual"])
    half = load_model(path, dtype=torch.float16).model
    widened = load_model(path, dtype=torch.float16).model.to(torch.float32)  # the same rounded weights
    ids = _batch(SHORT_PROMPTS[:1])["input_ids"]
    before = {n: (p.data_ptr(), p.dtype) for n, p in half.named_parameters()}
    with torch.inference_mode():
        assert not torch.isfinite(half(input_ids=ids).logits).all()
        with compute_in(half, torch.float32):
            got = half(input_ids=ids).logits
        expected = widened(input_ids=ids).logits
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert all((p.data_ptr(), p.dtype) == before[n] for n, p in half.named_parameters())


def test_compute_in_restores_weights_when_the_forward_raises():
    model = build_tiny_model("llama", plant=None).to(torch.float16)
    before = {n: (p.data_ptr(), p.dtype) for n, p in model.named_parameters()}
    with pytest.raises(IndexError):
        with compute_in(model, torch.float32):
            model(input_ids=torch.tensor([[BOS, 10_000]]))  # an id past the vocabulary
    assert all((p.data_ptr(), p.dtype) == before[n] for n, p in model.named_parameters())
    assert not model._forward_pre_hooks and not model.model.embed_tokens._forward_pre_hooks
