"""PNG plots: per-layer max |activation| against the dtype's limit; per-position KL by variant."""

from __future__ import annotations

from pathlib import Path

from ..diagnosing import Diagnosis
from ..outputs import atomic_write, check_output_path


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
    atomic_write(path, lambda temporary: fig.savefig(temporary, format="png"))
    plt.close(fig)
    return path


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
    atomic_write(path, lambda temporary: fig.savefig(temporary, format="png"))
    plt.close(fig)
    return path


# -- generation ----------------------------------------------------------------------------
