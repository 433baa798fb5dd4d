"""Rich tables and one-line summaries for the terminal: diagnosis, fix, comparison, generation."""

from __future__ import annotations

import math

from rich import box
from rich.console import Console
from rich.table import Table

from ..diagnosing import Diagnosis
from ..fixing.bound_gate import describe_bounded
from ..fixing.observe import ATTN_LOGITS

RISKIEST = 10


def render_diagnosis(diagnosis: Diagnosis, console: Console) -> None:
    target = diagnosis.target
    limit = target.dtype_max
    table = Table(title=f"{diagnosis.model}: max |activation| per layer (fp32, {diagnosis.num_prompts} prompts)")
    table.add_column("layer", justify="right")
    table.add_column("residual", justify="right")
    table.add_column("chan@pos", justify="right")
    table.add_column(f"{diagnosis.dtype} headroom", justify="right")
    table.add_column("inside max", justify="right")
    table.add_column("at", no_wrap=True, overflow="ellipsis", max_width=28)
    table.add_column("q.k max", justify="right")
    for layer in diagnosis.layers:
        headroom = limit / layer.residual_max if layer.residual_max > 0 else math.inf
        style = "bold red" if headroom < 1 else ("yellow" if headroom < diagnosis.margin else "")
        table.add_row(
            str(layer.layer),
            f"{layer.residual_max:,.0f}",
            f"{layer.residual_channel} @ {layer.residual_position}",
            f"{headroom:.2f}x",
            f"{layer.sublayer_max:,.0f}" if layer.sublayer_site else "-",
            _within_layer(layer.sublayer_site),
            f"{layer.attn_logits_max:,.0f}" if layer.attn_logits_max is not None else "-",
            style=style,
        )
    console.print(table)

    sites = Table(title=f"riskiest sites for {diagnosis.dtype}")
    for column in ("site", "kind", "max |x|", "headroom", "channel @ pos", "prompt"):
        sites.add_column(column, justify="left" if column in ("site", "kind") else "right")
    counted = [s for s in diagnosis.sites if s.kind != ATTN_LOGITS or diagnosis.attn_implementation == "eager"]
    for site in sorted(counted, key=lambda s: -s.max_abs)[:RISKIEST]:
        headroom = limit / site.max_abs if site.max_abs > 0 else math.inf
        sites.add_row(
            site.name, site.kind, f"{site.max_abs:,.0f}", f"{headroom:.2f}x",
            f"{site.channel} @ {site.position}", str(site.prompt),
            style="bold red" if headroom < 1 else ("yellow" if headroom < diagnosis.margin else ""),
        )
    console.print(sites)

    if diagnosis.reference_continuation:  # the layer-wise path generates none
        console.print(f"fp32 continuation of prompt 0: {diagnosis.reference_continuation!r}", markup=False,
                      highlight=False)
        for verdict in diagnosis.verdicts:
            console.print(f"{verdict.dtype} continuation of prompt 0: {verdict.continuation!r}", markup=False,
                          highlight=False)
    for note in diagnosis.notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    for verdict in diagnosis.verdicts:
        colour = {"unsafe": "bold red", "at-risk": "bold yellow"}.get(verdict.status, "bold green")
        console.print(verdict.summary, style=colour, markup=False, highlight=False)


def _within_layer(name: str | None) -> str:
    """`model.layers.7.mlp.down_proj:input` -> `mlp.down_proj:input`."""
    if not name:
        return "-"
    parts = name.split(".")
    digits = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[digits[0] + 1:]) if digits else name


# -- files ---------------------------------------------------------------------------------


def fidelity_table(fidelity: dict, title: str) -> Table:
    """One row per variant, in the field's metrics (KL vs fp32, top-1, delta-p, greedy match)."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("variant", "nonfin", "KL mean", "KL p99", "KL max", "top-1", "|dp|", "greedy"):
        table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=True)
    for name, f in fidelity.items():
        table.add_row(
            name, f"{f.nonfinite_share:.0%}", _sci(f.kl_mean), _sci(f.kl_p99), _sci(f.kl_max), f"{f.top1:.2%}",
            _sci(f.delta_p_mean),
            f"{f.greedy_match_mean:.1f} {f.greedy_identical:.0%}" if f.new_tokens else "-",
        )
    return table


def describe_roles(summary: dict, exactness: dict | None) -> str:
    """One line: what was derived, and how exactly the fp32 gate reproduced the model."""
    readers = ", ".join(f"{n} {kind}" for kind, n in sorted(summary["readers"].items()))
    line = (f"roles derived from {summary['model_class']}: {summary['writers']} writer(s), "
            f"{sum(summary['readers'].values())} reader(s) ({readers or 'none'}), "
            f"{summary['interior_pairs']} interior pair(s); eps x s^2 in config "
            f"{', '.join(summary['eps_fields']) or '(none)'}")
    if exactness is not None:
        how = "bit-identical" if exactness["equal"] else f"{exactness['relative']:.1e} of the largest logit"
        line += (f"; proven in fp32 on {exactness.get('prompts', 2)} prompt(s): max |delta logit| "
                 f"{exactness['max_delta']:.1e} ({how})")
    return line


def _sci(value: float) -> str:
    return f"{value:.1e}" if math.isfinite(value) else str(value)


def render_fix(report, console: Console) -> None:
    if report.roles is not None:
        console.print(describe_roles(report.roles.summary(), report.exactness), markup=False, highlight=False)
    bounded = describe_bounded(report.exactness)
    if bounded:
        console.print(bounded, markup=False, highlight=False)
    console.print(f"plan ({report.strategy}): {report.plan.describe()}", markup=False, highlight=False)
    if report.speed_ratio is not None:
        console.print(f"speed: {report.speed_ratio:.2f}x the forward throughput of the all-{report.plan.dtype} model",
                      markup=False, highlight=False)
    if not report.fidelity:
        return
    console.print(fidelity_table(report.fidelity, f"verification on {report.verification_prompts} held-out prompts "
                                                  "vs fp32 (greedy: mean match of 32 tokens, share identical)"))
    fixed, bf16 = report.fixed, report.fidelity.get("bfloat16")
    line = f"{report.plan.dtype} fixed ({report.strategy}): all finite, mean KL {fixed.kl_mean:.2e}"
    if bf16 is not None and fixed.kl_mean > 0:
        line += f" ({bf16.kl_mean / fixed.kl_mean:.0f}x closer to fp32 than bfloat16's {bf16.kl_mean:.2e})"
    console.print(line + f", top-1 {fixed.top1:.2%}", style="bold green", markup=False, highlight=False)


def render_comparison(results, console: Console, title: str) -> None:
    console.print(fidelity_table({r.variant: r.fidelity for r in results}, title))
    table = Table(title="perplexity, speed (greedy) and memory", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("variant", "perplexity", "tok/s batch 1", "tok/s batch 8", "weights", "peak GPU"):
        table.add_column(column, justify="left" if column == "variant" else "right", no_wrap=True)
    for r in results:
        table.add_row(
            r.variant, _num(r.fidelity.perplexity, 3), _num(r.tokens_per_s_batch1), _num(r.tokens_per_s_batch8),
            f"{r.weights_bytes / 2**30:.2f} GiB",
            f"{r.peak_gpu_bytes / 2**30:.2f} GiB" if r.peak_gpu_bytes is not None else "-",
        )
    console.print(table)


def _num(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def render_generation(result, console: Console) -> None:
    """One line of report: steps, recoveries, what else happened (advice is printed before)."""
    report = result.report
    recovered = report.recovered_steps
    parts = [f"{result.dtype}", f"{report.steps} steps", f"{result.seconds:.1f} s"]
    if recovered:
        shown = ", ".join(map(str, recovered[:8])) + (", ..." if len(recovered) > 8 else "")
        parts.append(f"recovered {len(recovered)} non-finite step(s) in float32 (step {shown})")
    counts = {}
    for event in report.events:
        if event.kind not in ("nonfinite", "recovered"):
            counts[event.kind] = counts.get(event.kind, 0) + 1
    parts += [f"{n} {kind}" for kind, n in counts.items()]
    first = next((e.module for e in report.events if e.module), None)
    if first:
        parts.append(f"first non-finite module: {first}")
    style = "green" if not report.events else "yellow"
    console.print("guard: " + "; ".join(parts), style=style, markup=False, highlight=False, soft_wrap=True)
