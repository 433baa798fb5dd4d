"""Plans are plain values: testable without a model."""

import json
import math

import pytest
import torch

from halfsafe.errors import HalfsafeError
from halfsafe.fixing.observe import ATTN_LOGITS, EMBEDDING, INTERIOR, RESIDUAL, SUBLAYER, SiteStat
from halfsafe.fixing.plan import Plan, make_plan, power_of_two_scale
from tests.handwritten import ARCHITECTURES, site_roles

LLAMA = ARCHITECTURES["LlamaForCausalLM"]
GEMMA3 = ARCHITECTURES["Gemma3ForCausalLM"]


def plan_for(sites, arch, layers, *, tied=False, **kwargs):
    """`make_plan` with the hand-written entry's site roles (the fix derives the same from the model)."""
    return make_plan(sites, site_roles(arch, layers, tied), architecture=arch.name, **kwargs)


def site(name, kind, layer, value):
    return SiteStat(name, kind, layer, value, 0, 0, 0)


def observation(residual=20.0, interior=10.0, qk=50.0, final_norm=30.0):
    sites = [site("model.embed_tokens", EMBEDDING, None, 1.0)]
    for i in range(2):
        sites += [
            site(f"model.layers.{i}.self_attn.o_proj", SUBLAYER, i, 5.0),
            site(f"model.layers.{i}.mlp.up_proj", SUBLAYER, i, interior / 4 if i == 1 else 1.0),
            site(f"model.layers.{i}.mlp.down_proj:input", INTERIOR, i, interior if i == 1 else 1.0),
            site(f"model.layers.{i}.mlp.down_proj", SUBLAYER, i, 5.0),
            site(f"model.layers.{i}.self_attn:qk", ATTN_LOGITS, i, qk),
            site(f"model.layers.{i}", RESIDUAL, i, residual if i == 1 else 10.0),
        ]
    sites.append(site("model.norm", SUBLAYER, None, final_norm))
    return sites


@pytest.mark.parametrize(
    "value, target, expected",
    [(1e5, 65504 / 4, 2**-3), (16376.0, 16376.0, 1.0), (16377.0, 16376.0, 0.5), (10.0, 16376.0, 1.0),
     (3e6, 16376.0, 2**-8)],
)
def test_power_of_two_scale_is_the_largest_that_fits(value, target, expected):
    scale = power_of_two_scale(value, target)
    assert scale == expected
    assert value * scale <= target < value * scale * 2 or scale == 1.0


def test_residual_of_1e5_gets_an_eighth_with_margin_4():
    plan = plan_for(observation(residual=1e5), LLAMA, 2, dtype=torch.float16, margin=4)
    assert plan.residual_scale == 2**-3 and plan.mlp_scales == {}
    assert plan.max_before == 1e5 and plan.site_before == "model.layers.1"
    assert plan.max_after == pytest.approx(12_500) and plan.unfixable == []


def test_no_overflow_gives_scale_one_and_says_so():
    plan = plan_for(observation(), LLAMA, 2, dtype=torch.float16)
    assert plan.is_identity
    assert plan.describe().startswith("no rescaling needed")


def test_interior_overflow_scales_only_that_layer():
    plan = plan_for(observation(interior=1.5e5), LLAMA, 2, dtype=torch.float16, margin=4)
    assert plan.residual_scale == 1.0
    assert plan.mlp_scales == {"model.layers.1.mlp.up_proj->model.layers.1.mlp.down_proj": 2**-4}
    assert plan.max_after < 65504 / 4


def test_tied_final_norm_grows_by_the_inverse_scale():
    sites = observation(residual=1e5, final_norm=5000.0)
    assert plan_for(sites, GEMMA3, 2, dtype=torch.float16, tied=False).unfixable == []
    tied = plan_for(sites, GEMMA3, 2, dtype=torch.float16, tied=True)
    assert tied.site_after == "model.norm" and tied.max_after == 40_000


def test_eager_attention_overflow_requires_sdpa():
    sites = observation(qk=1e5)
    assert plan_for(sites, LLAMA, 2, dtype=torch.float16, attn_implementation="eager").attn_implementation == "sdpa"
    assert plan_for(sites, LLAMA, 2, dtype=torch.float16, attn_implementation="sdpa").attn_implementation is None


def test_bfloat16_needs_no_scaling():
    assert plan_for(observation(residual=1e5), LLAMA, 2, dtype=torch.bfloat16).is_identity


def test_plan_round_trips_through_json():
    plan = plan_for(observation(residual=1e5, interior=1.5e5), LLAMA, 2, dtype=torch.float16)
    again = Plan.from_json(json.loads(plan.dumps()))
    assert again == plan
    assert math.log2(again.residual_scale).is_integer()


def test_margin_below_one_is_refused():
    with pytest.raises(HalfsafeError, match="margin 0.5 must be at least 1"):
        plan_for(observation(), LLAMA, 2, dtype=torch.float16, margin=0.5)


def test_a_non_finite_observation_is_a_halfsafe_error():
    with pytest.raises(HalfsafeError, match=r"cannot scale a non-finite observation \(inf\)"):
        plan_for(observation(residual=float("inf")), LLAMA, 2, dtype=torch.float16)
