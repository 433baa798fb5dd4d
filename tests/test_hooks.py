"""Hooks with one owner: nothing halfsafe attaches outlives the call that attached it."""

import gc
import weakref

import pytest
import torch

from halfsafe.diagnosing import diagnose
from halfsafe.fixing.fix import fix
from halfsafe.fixing.observe import ActivationRecorder
from halfsafe.model.hooks import HookSet
from tests.support.models import BOS, SHORT_PROMPTS, build_tiny_model, byte_tokenizer


def attention_registry_names(prefix: str = "halfsafe") -> list[str]:
    """The names in transformers' global attention registries that start with `prefix` (what the
    tests check nothing was left behind in)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    return sorted(name for registry in (AttentionInterface, AttentionMaskInterface)
                  for name in registry._global_mapping if name.startswith(prefix))

TOKENIZER = byte_tokenizer()


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("strategy", ["rescale", "keep-fp32"])
def test_diagnose_and_fix_leave_nothing_behind_and_the_model_is_freed(attn, strategy):
    before = attention_registry_names()
    model = build_tiny_model("qwen3", attn_implementation=attn)
    result = diagnose(model, TOKENIZER, SHORT_PROMPTS[:1])
    assert not result.safe  # the planted overflow: every recorder and watch really ran
    fixed, report = fix(model, TOKENIZER, strategy=strategy, calibration=SHORT_PROMPTS[:1],
                        heldout=SHORT_PROMPTS[:1])
    assert fixed is model and report.fixed.nonfinite_share == 0
    assert attention_registry_names() == before  # no observing kernel left registered
    if strategy == "keep-fp32":
        assert _hook_count(model) > 0  # the casts, owned by the model...
        model.halfsafe_hooks.remove()  # ...and removable by its owner
    assert _hook_count(model) == 0
    assert model.config._attn_implementation in ("eager", "sdpa")

    alive = weakref.ref(model)
    del model, fixed, result, report
    gc.collect()
    assert alive() is None


def test_recorder_removes_hooks_registry_entries_and_config_even_when_the_forward_raises():
    model = build_tiny_model("llama", plant=None, attn_implementation="sdpa")
    before = attention_registry_names()
    with pytest.raises(IndexError):
        with ActivationRecorder(model) as recorder:
            assert len(attention_registry_names()) == len(before) + 2  # kernel and mask function
            assert model.config._attn_implementation.startswith("halfsafe_observe_sdpa")
            model(input_ids=torch.tensor([[BOS, 10_000]]))  # an id past the vocabulary
    assert recorder._hooks is None
    assert _hook_count(model) == 0 and attention_registry_names() == before
    assert model.config._attn_implementation == "sdpa"


def test_two_recorders_at_once_register_under_different_names():
    model = build_tiny_model("llama", plant=None, attn_implementation="sdpa")
    other = build_tiny_model("llama", plant=None, attn_implementation="sdpa")
    with ActivationRecorder(model), ActivationRecorder(other):
        assert model.config._attn_implementation != other.config._attn_implementation
        assert len(attention_registry_names()) == 4
    assert attention_registry_names() == []


def test_hookset_runs_every_undo_step_even_when_one_raises():
    layer = torch.nn.Linear(2, 2)
    done = []
    hooks = HookSet()
    hooks.forward(layer, lambda m, a, o: None)
    hooks.callback(lambda: (_ for _ in ()).throw(RuntimeError("undo failed")))
    hooks.pre_forward(layer, lambda m, a: None)
    hooks.callback(lambda: done.append("last registered, first undone"))
    with pytest.raises(RuntimeError, match="undo failed"):
        hooks.remove()
    assert done == ["last registered, first undone"]
    assert not layer._forward_hooks and not layer._forward_pre_hooks and len(hooks) == 0
