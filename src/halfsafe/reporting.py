"""Render a Diagnosis: rich tables for the terminal, JSON for machines, a PNG for people.

Files are written to a temporary name beside the target and renamed, so a failed run never
leaves a half-written report.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from .diagnosing import Diagnosis
from .errors import HalfsafeError
from .observing import ATTN_LOGITS
from .workdirs import make_work_dir

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


def check_output_path(path: str | Path, what: str) -> Path:
    """Refuse an output file that cannot be written, before any work is done."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise HalfsafeError(f"{what} path '{path}' is a directory; give a file name")
    check_parent_writable(path, f"{what} path")
    return path


def check_parent_writable(path: Path, label: str) -> None:
    """The directory an output is created in must exist and take a new entry.

    Tried for real (a directory made and removed) rather than asked of `os.access`, which
    answers yes for root on /proc and /sys, where creating anything fails.
    """
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise HalfsafeError(f"{label} '{path}': '{parent}' is a file, not a directory; choose another location")
    if not parent.is_dir():
        raise HalfsafeError(f"{label} '{path}': directory '{parent}' does not exist; create it first")
    try:
        os.rmdir(make_work_dir(parent, f".{path.name}.halfsafe"))
    except OSError as exc:
        raise HalfsafeError(f"{label} '{path}': nothing can be created in '{parent}' ({exc.strerror}); "
                            "choose a directory you can write to") from exc


def _atomic_write(path: Path, write) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(data: dict, path: str | Path) -> Path:
    path = check_output_path(path, "JSON")

    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(_finite_json(data), handle, indent=2, ensure_ascii=False)
            handle.write("\n")

    _atomic_write(path, write)
    return path


def write_json_lines(rows: list[dict], path: str | Path) -> Path:
    """One JSON object per line (events for a log pipeline), written atomically."""
    path = check_output_path(path, "JSON lines")

    def write(temporary):
        with open(temporary, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(_finite_json(row), ensure_ascii=False) + "\n")

    _atomic_write(path, write)
    return path


def _finite_json(value):
    """JSON has no inf/nan: write them as the strings 'inf', '-inf', 'nan'."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def plot_diagnosis(diagnosis: Diagnosis, path: str | Path) -> Path:
    """PNG: per-layer max |activation| on a log scale against the dtype's limit."""
    path = check_output_path(path, "plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    layers = [layer.layer for layer in diagnosis.layers]
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    ax.plot(layers, [layer.residual_max for layer in diagnosis.layers], "o-", color="tab:blue",
            linewidth=2, label="residual stream (after layer)")
    ax.plot(layers, [layer.sublayer_max for layer in diagnosis.layers], "s", color="tab:orange",
            label="largest sublayer output or interior")
    qk = [(layer.layer, layer.attn_logits_max) for layer in diagnosis.layers if layer.attn_logits_max]
    if qk:
        eager = diagnosis.attn_implementation == "eager"
        ax.plot(*zip(*qk, strict=True), "^", color="tab:purple", alpha=1.0 if eager else 0.45,
                label="attention q.k (eager only)" if not eager else "attention q.k (before scaling)")
    limit = diagnosis.target.dtype_max
    ax.axhline(limit, color="tab:red", linestyle="--", label=f"{diagnosis.dtype} max ({limit:,.0f})")
    ax.axhline(limit / diagnosis.margin, color="tab:red", linestyle=":", alpha=0.5,
               label=f"margin ({diagnosis.margin:g}x)")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("max |activation| (fp32 run)")
    ax.set_title(f"{diagnosis.model}\n{diagnosis.target.summary}", fontsize=8, wrap=True)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _atomic_write(path, lambda temporary: fig.savefig(temporary, format="png"))
    plt.close(fig)
    return path


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


def _sci(value: float) -> str:
    return f"{value:.1e}" if math.isfinite(value) else str(value)


def render_fix(report, console: Console) -> None:
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


def plot_comparison(results, path: str | Path, title: str) -> Path:
    """PNG: the distribution of per-position KL(fp32 || variant), log x axis, one line per variant."""
    path = check_output_path(path, "plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    bins = np.logspace(-10, 1, 56)
    for result in results:
        name, fidelity = result.variant, result.fidelity
        values = np.asarray(fidelity.kl_values, dtype=float)
        if name == "fp32" or values.size == 0:
            continue
        if not np.isfinite(values).all():
            ax.plot([], [], " ", label=f"{name}: non-finite at {fidelity.nonfinite_share:.0%} of positions")
            continue
        ax.hist(np.clip(values, bins[0], bins[-1]), bins=bins, histtype="step", linewidth=1.8,
                label=f"{name} (mean {fidelity.kl_mean:.1e})")
    ax.set_xscale("log")
    ax.set_xlabel("KL(fp32 || variant) per token position")
    ax.set_ylabel("positions")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _atomic_write(path, lambda temporary: fig.savefig(temporary, format="png"))
    plt.close(fig)
    return path


# -- generation ----------------------------------------------------------------------------


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
