"""Diagnose: where and by how much a model overflows a dtype, confirmed by running it there.

Two steps per dtype:
1. *Predict* from the fp32 observation: headroom = dtype max / observed max |value|, per site
   and per layer. Sites whose headroom is below 1 overflow; below `margin`, they are at risk.
2. *Confirm* by running the same prompts in the dtype: is every module's output finite, which
   one went non-finite first, and what does a short greedy continuation print.

The result is a plain value (`Diagnosis`), rendered elsewhere as a table, JSON or a plot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import __version__
from .dtypes import dtype_max, dtype_name
from .errors import HalfsafeError
from .fixing.observe import (
    ATTN_LOGITS,
    EMBEDDING,
    RESIDUAL,
    SiteStat,
    observe,
)
from .model.hooks import HookSet
from .model.layers import encode, find_decoder_layers, last_logits_only
from .model.precision import cast_temporarily
from .prompts import check_prompt_lengths

SCHEMA_VERSION = 1
# diagnose: a site whose headroom is below this factor is `at-risk` (a warning, not a change).
AT_RISK_MARGIN = 2.0
CONTINUATION_TOKENS = 12


@dataclass
class LayerSummary:
    """One decoder layer: the residual stream after it and the largest value inside it."""

    layer: int
    residual_max: float
    residual_channel: int | None
    residual_position: int | None
    sublayer_max: float  # largest non-residual site in the layer (attention logits excluded)
    sublayer_site: str | None
    attn_logits_max: float | None


@dataclass
class DtypeVerdict:
    dtype: str
    dtype_max: float
    status: str  # "safe", "at-risk" or "unsafe"
    max_abs: float  # over the sites that hold values in this dtype
    max_site: str
    headroom: float
    overflowing: list[str]  # sites predicted to exceed the dtype's maximum
    at_risk: list[str]  # sites within `margin` of it
    all_finite: bool  # confirmed: every module output finite on every prompt in this dtype
    nonfinite_prompts: int
    first_nonfinite: str | None  # first module (in execution order) with a non-finite output
    continuation: str  # greedy continuation of the first prompt in this dtype
    summary: str = ""

    @property
    def safe(self) -> bool:
        return self.status != "unsafe"


@dataclass
class Diagnosis:
    model: str
    architecture: str
    dtype: str  # the target dtype; its verdict is `verdicts[0]`
    margin: float
    attn_implementation: str
    num_layers: int
    num_prompts: int
    reference_continuation: str  # fp32 greedy continuation of the first prompt
    sites: list[SiteStat]
    layers: list[LayerSummary]
    verdicts: list[DtypeVerdict]
    tool_version: str = __version__
    schema_version: int = SCHEMA_VERSION
    notes: list[str] = field(default_factory=list)

    @property
    def target(self) -> DtypeVerdict:
        return self.verdicts[0]

    @property
    def safe(self) -> bool:
        return self.target.safe

    def to_json(self) -> dict:
        """The documented schema (docs/diagnose-json.md): the target verdict's fields at top level."""
        target = self.target
        return {
            "schema_version": self.schema_version,
            "tool_version": self.tool_version,
            "model": self.model,
            "architecture": self.architecture,
            "dtype": self.dtype,
            "safe": target.safe,
            "status": target.status,
            "summary": target.summary,
            "max_abs": target.max_abs,
            "max_site": target.max_site,
            "headroom": target.headroom,
            "first_nonfinite": target.first_nonfinite,
            "all_finite": target.all_finite,
            "margin": self.margin,
            "attn_implementation": self.attn_implementation,
            "num_layers": self.num_layers,
            "num_prompts": self.num_prompts,
            "reference_continuation": self.reference_continuation,
            "verdicts": [dict(asdict(v), safe=v.safe) for v in self.verdicts],
            "layers": [asdict(layer) for layer in self.layers],
            "sites": [s.to_dict() for s in self.sites],
            "notes": self.notes,
        }


def diagnose(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    *,
    dtype: torch.dtype = torch.float16,
    also: tuple[torch.dtype, ...] = (torch.bfloat16,),
    margin: float = AT_RISK_MARGIN,
    name: str | None = None,
    progress=None,
) -> Diagnosis:
    """Observe `model` (fp32) on `prompts`, then judge and confirm each dtype.

    `progress`, if given, is called once per forward pass (for a progress bar).
    """
    if next(model.parameters()).dtype != torch.float32:
        raise HalfsafeError("diagnose observes in float32; load the model with dtype=torch.float32")
    check_prompt_lengths(model, tokenizer, prompts, reserve=CONTINUATION_TOKENS, what="prompt")
    recorder = observe(model, tokenizer, prompts, progress=progress)
    reference = greedy_continuation(model, tokenizer, prompts[0])
    confirmations = {target: confirm(model, tokenizer, prompts, target, progress=progress)
                     for target in (dtype, *[d for d in also if d != dtype])}
    return assemble_diagnosis(
        recorder.sites(), confirmations, dtype=dtype, margin=margin, attn_implementation=recorder.attn_implementation,
        num_layers=recorder.num_layers, num_prompts=len(prompts), model_name=name or type(model).__name__,
        architecture=type(model).__name__, reference_continuation=reference,
    )


def assemble_diagnosis(sites: list[SiteStat], confirmations: dict, *, dtype: torch.dtype, margin: float,
                       attn_implementation: str, num_layers: int, num_prompts: int, model_name: str,
                       architecture: str, reference_continuation: str, notes: list[str] | None = None) -> Diagnosis:
    """Verdicts from an observation and one confirmation per dtype (the first is the target)."""
    eager = attn_implementation == "eager"
    counted = [s for s in sites if s.kind != ATTN_LOGITS or eager]  # q.k exists only in eager attention
    verdicts = [_verdict(counted, target, margin, confirmed) for target, confirmed in confirmations.items()]
    notes = list(notes or [])
    qk = max((s for s in sites if s.kind == ATTN_LOGITS), key=lambda s: s.max_abs, default=None)
    if qk is not None and not eager and qk.max_abs > dtype_max(dtype):
        notes.append(
            f"attention logits reach {qk.max_abs:,.0f} at {qk.name}: they would overflow {dtype_name(dtype)} "
            f"in eager attention; this model runs {attn_implementation}, which does not materialise them"
        )
    return Diagnosis(
        model=model_name,
        architecture=architecture,
        dtype=dtype_name(dtype),
        margin=margin,
        attn_implementation=attn_implementation,
        num_layers=num_layers,
        num_prompts=num_prompts,
        reference_continuation=reference_continuation,
        sites=sites,
        layers=summarise_layers(sites, num_layers),
        verdicts=verdicts,
        notes=notes,
    )


def summarise_layers(sites: list[SiteStat], num_layers: int) -> list[LayerSummary]:
    layers = []
    for index in range(num_layers):
        own = [s for s in sites if s.layer == index]
        residual = next((s for s in own if s.kind == RESIDUAL), None)
        inner = [s for s in own if s.kind not in (RESIDUAL, ATTN_LOGITS)]
        biggest = max(inner, key=lambda s: s.max_abs, default=None)
        qk = [s.max_abs for s in own if s.kind == ATTN_LOGITS]
        layers.append(
            LayerSummary(
                layer=index,
                residual_max=residual.max_abs if residual else float("nan"),
                residual_channel=residual.channel if residual else None,
                residual_position=residual.position if residual else None,
                sublayer_max=biggest.max_abs if biggest else float("nan"),
                sublayer_site=biggest.name if biggest else None,
                attn_logits_max=max(qk) if qk else None,
            )
        )
    return layers


@dataclass
class Confirmation:
    nonfinite_prompts: int
    first_nonfinite: str | None
    continuation: str


def confirm(model: nn.Module, tokenizer, prompts: list[str], dtype: torch.dtype, *, progress=None) -> Confirmation:
    """Run the prompts with the model cast to `dtype`: finite logits? first non-finite module?"""
    device = next(model.parameters()).device
    nonfinite_prompts = 0
    first = None
    # Only the last position's logits: the vocabulary projection dominates a small model's
    # cost, and a non-finite value anywhere earlier is caught by the watch on every module.
    extra = last_logits_only(model)
    with cast_temporarily(model, dtype), torch.inference_mode():
        for prompt in prompts:
            with FiniteWatch(model) as watch:
                model(**encode(tokenizer, prompt, device), use_cache=False, **extra)
            bad = watch.first_nonfinite()
            if bad is not None:
                nonfinite_prompts += 1
                first = first or bad
            if progress is not None:
                progress()
        continuation = greedy_continuation(model, tokenizer, prompts[0])
    return Confirmation(nonfinite_prompts, first, continuation)


def greedy_continuation(model: nn.Module, tokenizer, prompt: str, tokens: int = CONTINUATION_TOKENS) -> str:
    device = next(model.parameters()).device
    batch = encode(tokenizer, prompt, device)
    with torch.inference_mode():
        out = model.generate(
            **batch, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            top_p=None, top_k=None, temperature=None,
        )
    return tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=False)


class FiniteWatch:
    """Hooks that note, per module call, whether the output is finite; removed on exit."""

    def __init__(self, model: nn.Module):
        self.model = model
        _, layers = find_decoder_layers(model)
        wanted = {id(m) for m in layers}
        self.modules = [
            (n, m) for n, m in model.named_modules()
            if n and (id(m) in wanted or not any(True for _ in m.children()))
        ]
        self.calls: list[tuple[str, torch.Tensor]] = []
        self.hooks = HookSet()

    def __enter__(self) -> FiniteWatch:
        try:
            for name, module in self.modules:
                self.hooks.forward(module, self._hook(name))
        except BaseException:
            self.hooks.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.remove()

    def _hook(self, name: str):
        def hook(module, args, output):
            tensor = output[0] if isinstance(output, (tuple, list)) and output else output
            if torch.is_tensor(tensor) and tensor.is_floating_point():
                self.calls.append((name, torch.isfinite(tensor).all()))

        return hook

    def first_nonfinite(self) -> str | None:
        if not self.calls:
            return None
        finite = torch.stack([ok for _, ok in self.calls]).cpu()  # one sync for the whole pass
        bad = (~finite).nonzero()
        return self.calls[int(bad[0])][0] if len(bad) else None


def _verdict(sites: list[SiteStat], dtype: torch.dtype, margin: float, confirmed: Confirmation) -> DtypeVerdict:
    limit = dtype_max(dtype)
    top = max(sites, key=lambda s: s.max_abs)
    overflowing = [s.name for s in sites if s.max_abs > limit]
    at_risk = [s.name for s in sites if limit / margin < s.max_abs <= limit]
    finite = confirmed.nonfinite_prompts == 0
    if overflowing or not finite:
        status = "unsafe"
    elif at_risk:
        status = "at-risk"
    else:
        status = "safe"
    verdict = DtypeVerdict(
        dtype=dtype_name(dtype),
        dtype_max=limit,
        status=status,
        max_abs=top.max_abs,
        max_site=top.name,
        headroom=limit / top.max_abs if top.max_abs > 0 else float("inf"),
        overflowing=overflowing,
        at_risk=at_risk,
        all_finite=finite,
        nonfinite_prompts=confirmed.nonfinite_prompts,
        first_nonfinite=confirmed.first_nonfinite,
        continuation=confirmed.continuation,
    )
    verdict.summary = verdict_line(verdict, sites)
    return verdict


def describe_site(site: SiteStat) -> str:
    if site.kind == RESIDUAL:
        return f"residual stream reaches {site.max_abs:,.0f} after layer {site.layer}"
    if site.kind == EMBEDDING:
        return f"embedding output reaches {site.max_abs:,.0f}"
    if site.kind == ATTN_LOGITS:
        return f"attention logits (q.k before scaling) reach {site.max_abs:,.0f} at {site.name}"
    return f"{site.name} reaches {site.max_abs:,.0f}"


def verdict_line(verdict: DtypeVerdict, sites: list[SiteStat]) -> str:
    """One line a user can act on."""
    top = next(s for s in sites if s.name == verdict.max_site)
    limit = f"{verdict.dtype_max:,.0f}" if verdict.dtype_max < 1e6 else f"{verdict.dtype_max:.3g}"
    if verdict.status == "unsafe":
        if verdict.overflowing:
            what = f"{describe_site(top)} ({1 / verdict.headroom:.2f}x over {limit})"
        else:
            what = f"largest value {top.max_abs:,.0f} at {top.name} (headroom {verdict.headroom:.2f}x)"
        if not verdict.all_finite:
            first = verdict.first_nonfinite or "unknown"
            what += f"; non-finite outputs on {verdict.nonfinite_prompts} prompt(s), first: {first}"
        return f"{verdict.dtype}: UNSAFE - {what}; run 'halfsafe fix'"
    if verdict.status == "at-risk":
        return (
            f"{verdict.dtype}: at risk - headroom {verdict.headroom:.2f}x ({describe_site(top)}); "
            "longer or other prompts may overflow; consider 'halfsafe fix'"
        )
    return f"{verdict.dtype}: safe - headroom {_headroom_text(verdict.headroom)}"


def _headroom_text(headroom: float) -> str:
    return f"{headroom:.1f}x" if headroom < 1e4 else f"{headroom:.2g}x"
