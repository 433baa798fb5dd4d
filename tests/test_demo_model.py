"""The real gemma-3-270m base model (from PyPI): the failure the project exists for."""

import torch

from halfsafe.observing import RESIDUAL
from halfsafe.precision import cast_temporarily


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


def test_demo_bfloat16_is_finite_and_agrees_with_fp32(demo_diagnosis):
    bf16 = demo_diagnosis.verdicts[1]
    assert bf16.dtype == "bfloat16" and bf16.status == "safe" and bf16.all_finite
    assert not bf16.continuation.startswith("<pad>")


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
