"""Fix in memory: the pipeline's stages (`pipeline`) run on a model held whole.

The fix changes weights only (shapes, names and config fields stay), so the result is a normal
checkpoint that stock transformers or vLLM loads and runs at its usual float16 speed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..dtypes import parse_dtype
from ..errors import HalfsafeError
from ..formats import DENSE
from ..model.layers import encode
from ..model.precision import cast_temporarily
from ..prompts import CALIBRATION, HELDOUT, bundled_prompts, check_prompt_lengths
from ..roles import derive_roles, exactness_gate, output_exponents
from ..timing import now
from .apply import put_weights, use_fix
from .bound_gate import AS_EXPORTED, ROUNDING
from .gate import BF16_TARGET_SLACK, FixReport, VerificationFailed, gate  # noqa: F401 (public here)
from .keep_fp32 import KeepPlan, apply_keep_fp32, use_keep_fp32
from .observe import SiteStat, observe
from .pipeline import GATE_TOKENS, STRATEGIES, Fix, Rescaling, check_strategy, finalise, run  # noqa: F401
from .plan import PLANNING_MARGIN
from .verify import measure_fidelity

VERIFY_TOKENS = 32


class InMemory:
    """The pipeline's backend for a model held whole (fp32, changed in place only by `commit`).
    `weights_format`: how the checkpoint stores the weights (`formats`); the fixed variant is
    verified as that format stores it (a quantized layer through its rescaled scales)."""

    reloads_bounded = True

    def __init__(self, model: nn.Module, tokenizer, weights_format=DENSE):
        self.model, self.tokenizer, self.weights_format = model, tokenizer, weights_format

    def _ids(self, prompt: str) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return encode(self.tokenizer, prompt, device)["input_ids"][:, :GATE_TOKENS]

    def roles(self):
        return derive_roles(self.model)

    def prove(self, roles, prompts: list[str]):
        return exactness_gate(self.model, roles, [self._ids(p) for p in prompts])

    def reload_gate(self, fix: Rescaling, prompts: list[str], dtype: torch.dtype):
        """The model as a bounded export will reload it, in fp32, both ways of storing each
        conflicting eps field (`roles.bounded.reload_gate`); the exact fix is run in `dtype` on
        the same prompts too: float16's rounding error, for the bound (`bound_gate.check_bounded`)."""
        from ..roles.bounded import distance, reload_gate

        ids = [self._ids(p) for p in prompts]
        result = reload_gate(self.model, fix.roles, ids, fix.plan.residual_scale, fix.plan.mlp_scales)
        with torch.no_grad():
            reference = [self.model(input_ids=i, use_cache=False).logits.float() for i in ids]
            with self.variant(Rescaling(fix.roles, fix.plan), dtype)() as running:  # exact, in memory
                test = [running(input_ids=i, use_cache=False).logits.float() for i in ids]
        result.target = distance(result.scaled_fields, reference, test)
        return result

    def site_roles(self, roles, prompt: str):
        return roles.site_roles(output_exponents(self.model, roles, self._ids(prompt)))

    def observe(self, prompts: list[str], progress=None) -> list[SiteStat]:
        return observe(self.model, self.tokenizer, prompts, progress=progress).sites()

    def variant(self, fix: Fix, dtype: torch.dtype):
        """A factory of blocks that run the model as fixed, restoring it after."""
        if isinstance(fix, KeepPlan):
            return lambda: use_keep_fp32(self.model, fix, dtype)
        weights = self.weights_format.scaled_weights(self.model, fix.scales(), dtype)
        return lambda: use_fix(self.model, fix.settings(self.model), fix.plan, weights)

    def verify(self, prompts: list[str], fix: Fix, dtype: torch.dtype, progress=None) -> dict:
        """Greedy decoding is compared for the fixed model only (bfloat16's is `compare`'s business)."""
        variants = {"fixed": self.variant(fix, dtype),
                    "bfloat16": lambda: cast_temporarily(self.model, torch.bfloat16)}
        if isinstance(fix, Rescaling) and fix.export is not None:  # a bounded export: its fp32 error, and
            variants[AS_EXPORTED] = self.variant(fix, torch.float32)  # float16's rounding error (exact fix)
            variants[ROUNDING] = self.variant(Rescaling(fix.roles, fix.plan), dtype)
        return measure_fidelity(self.model, self.tokenizer, prompts, variants, new_tokens=VERIFY_TOKENS,
                                greedy=("fixed",), progress=progress)

    def speed_ratio(self, fix: Fix, dtype: torch.dtype, prompt: str) -> float:
        return _speed_ratio(self.model, self.tokenizer, prompt, self.variant(fix, dtype), dtype)

    def commit(self, fix: Fix, dtype: torch.dtype, report: FixReport) -> None:
        if isinstance(fix, KeepPlan):
            apply_keep_fp32(self.model, fix, dtype)
        else:
            put_weights(self.model, self.weights_format.scaled_weights(self.model, fix.scales(), dtype))
        finalise(self.model, fix, dtype, report)


def fix(
    model: nn.Module,
    tokenizer,
    *,
    dtype: torch.dtype | str = torch.float16,
    strategy: str = "rescale",
    margin: float = PLANNING_MARGIN,
    calibration: list[str] | None = None,
    heldout: list[str] | None = None,
    max_kl: float | None = None,
    verify: bool = True,
    observation: list[SiteStat] | None = None,
    for_export: bool = False,
    exact_only: bool = False,
    weights_format=DENSE,
    progress=None,
) -> tuple[nn.Module, FixReport]:
    """Make `model` (fp32, changed in place) run in `dtype` without overflow.

    strategy "rescale" (the fix): power-of-two rescaling of the weights along the roles derived
    from the model (any decoder whose roles derive and pass the fp32 exactness gate), then the
    whole model is cast to `dtype`. "keep-fp32" (the fallback, any architecture): the
    overflowing layers keep fp32 weights and arithmetic, through hooks that need halfsafe.

    Verification (unless `verify=False`) compares the result on held-out prompts with the
    fp32 model, next to plain bfloat16: any non-finite logit, or a mean KL above the bound (see
    `fixing.gate.gate`; `max_kl` sets it), raises VerificationFailed and leaves the model untouched.
    The stages are `pipeline`'s.

    `observation`: the sites of an fp32 observation already made on the calibration prompts
    (e.g. `diagnose(...).sites`), to skip observing again. `for_export`: the fix will be
    written as a checkpoint, so roles that are exact in memory only are exported bounded: each eps
    as its config field will reload it, the fp32 distance measured and bounded (`bounded`), and
    `report.exactness['exact']` False; `exact_only` refuses them instead.
    `weights_format`: the checkpoint's (`LoadedModel.weights_format`) when `model` is a quantized
    checkpoint dequantized to fp32: the fix is verified as that format will store it.
    """
    dtype = parse_dtype(dtype)
    check_strategy(strategy)
    if next(model.parameters()).dtype != torch.float32:
        raise HalfsafeError("fix starts from float32 weights; load the model with dtype=torch.float32")
    calibration = calibration or bundled_prompts(CALIBRATION)
    heldout = heldout or bundled_prompts(HELDOUT)
    check_prompt_lengths(model, tokenizer, calibration, what="calibration prompt")
    check_prompt_lengths(model, tokenizer, heldout, reserve=VERIFY_TOKENS if verify else 0, what="held-out prompt")
    backend = InMemory(model, tokenizer, weights_format)
    report = run(backend, dtype=dtype, strategy=strategy, margin=margin, calibration=calibration, heldout=heldout,
                 max_kl=max_kl, verify=verify, sites=observation, for_export=for_export,
                 exact_only=exact_only, progress=progress)
    return model, report


def _speed_ratio(model, tokenizer, prompt: str, variant, dtype: torch.dtype, repeats: int = 3) -> float:
    """Forward throughput of `variant` over the all-`dtype` model (values do not matter here)."""
    batch = encode(tokenizer, prompt, next(model.parameters()).device)

    def best_time() -> float:
        times = []
        for _ in range(repeats):
            started = now()
            model(**batch, use_cache=False)
            times.append(now() - started)
        return min(times)

    with torch.inference_mode():
        with variant():
            kept = best_time()
        with cast_temporarily(model, dtype):
            plain = best_time()
    return plain / kept


def load_fixed(model: str, dtype: torch.dtype | str = torch.float16, *, device: str | None = None, **kwargs):
    """Load MODEL (directory, hub id, .gguf or 'demo'), fix it in memory, return (model, tokenizer).

    For people who never want a second checkpoint. `kwargs` go to `fix` (strategy, margin,
    max_kl, verify, calibration, heldout) or to loading (allow_pickle, trust_remote_code,
    attn_implementation).
    """
    from ..model.loading import load_model

    load_keys = {"allow_pickle", "trust_remote_code", "attn_implementation"}
    loaded = load_model(model, dtype=torch.float32, **{k: v for k, v in kwargs.items() if k in load_keys})
    if device is not None:
        loaded.model.to(device)
    fix_options = {k: v for k, v in kwargs.items() if k not in load_keys}
    fix_options.setdefault("weights_format", loaded.weights_format)
    fixed, _ = fix(loaded.model, loaded.tokenizer, dtype=dtype, **fix_options)
    return fixed, loaded.tokenizer
