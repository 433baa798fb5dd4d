"""The model card (README.md) that `fix` writes into an exported checkpoint.

Generated from the checkpoint's own config.json (its `halfsafe` block: plan and verification),
so the in-memory and the layer-wise exports get the same card. Hub front matter: the base model
and license when the source tells them (a hub snapshot's path, the demo, or the source's own
README front matter), tags always.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

DEMO_BASE = "google/gemma-3-270m"
DEMO_LICENSE = "gemma"
_SNAPSHOT = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/")
_FRONT_KEY = re.compile(r"^(license|license_name|license_link|language)\s*:\s*(.*)$")


def write_model_card(directory: Path, source: str | Path | None = None) -> Path | None:
    """Write directory/README.md for a fixed checkpoint; None (nothing written) when its config
    has no `halfsafe` block. `source`: where the model was loaded from (path or hub id)."""
    config = json.loads((Path(directory) / "config.json").read_text())
    block = config.get("halfsafe")
    if not isinstance(block, dict):
        return None
    base, carried = _source_facts(source)
    path = Path(directory) / "README.md"
    path.write_text(model_card(config, base_model=base, carried=carried))
    return path


def model_card(config: dict, *, base_model: str | None = None, carried: dict | None = None) -> str:
    """config: a fixed checkpoint's config.json (with its `halfsafe` block) -> the card's text."""
    block = config["halfsafe"]
    plan = block.get("plan", {})
    dtype = plan.get("dtype", "float16")
    arch = plan.get("architecture") or config.get("model_type", "")
    front = {**(carried or {})}
    if base_model:
        front["base_model"] = base_model
    lines = ["---"]
    lines += [f"{key}: {value}" for key, value in front.items()]
    lines += ["library_name: transformers", "tags:", "- halfsafe", f"- {dtype}", "- overflow-fixed"]
    if arch:
        lines.append(f"- {arch}")
    lines += ["---", ""]
    title = base_model or "this model"
    lines += [
        f"# {title}, fixed for {dtype} by halfsafe",
        "",
        f"The weights of {title} rescaled by exact powers of two so that it runs in {dtype} without overflow "
        "(no residual-stream activation past the dtype's maximum), then verified against float32. "
        "Shapes, names and config fields are those of the original: it is an ordinary checkpoint.",
        *_quantized_lines(config),
        "",
        "## Plan",
        "",
        *_plan_lines(block),
        "",
        "## Exactness",
        "",
        *_exactness_lines(block),
        "",
        "## Verification against float32",
        "",
        *_verification_lines(block),
        "",
        "## Load it in transformers",
        "",
        "```python",
        "import torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("THIS_DIRECTORY", dtype=torch.float16)',
        'tokenizer = AutoTokenizer.from_pretrained("THIS_DIRECTORY")',
        "```",
        "",
        "## Serve it in vLLM",
        "",
        "```bash",
        "pip install 'halfsafe[vllm]'",
        f"vllm serve THIS_DIRECTORY --dtype {dtype}",
        "```",
        "",
        "vLLM refuses float16 for model types whose weights overflow it (gemma2, gemma3, gemma3_text, glm4, "
        "plamo2). halfsafe's vLLM plugin, installed with the line above, lifts that refusal for a fixed checkpoint "
        "alone, because its config carries the verification above; every other "
        "checkpoint keeps vLLM's behaviour. Add `--logits-processors halfsafe.vllm.processor:SanitizeLogits` "
        "to also guard sampling.",
        "",
        f"Made by halfsafe {block.get('version', '')}.".replace(" .", "."),
        "",
    ]
    return "\n".join(lines)


def _quantized_lines(config: dict) -> list[str]:
    """A quantized checkpoint says how it was rescaled and what it was verified against."""
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict):
        return []
    return ["", f"Its weights stay quantized ({quantization.get('quant_method', 'unknown')}, as the input stored "
            "them): the packed integer weights are the input's, byte for byte, and the rescaled layers' quantization "
            "scales are the input's times the power of two. \"float32\" below is the quantized model's own fp32 run "
            "(its weights dequantized), not the dense model it was quantized from."]


def _plan_lines(block: dict) -> list[str]:
    plan = block.get("plan", {})
    strategy = block.get("strategy", "rescale")
    lines = [f"- strategy: {strategy}, margin {plan.get('margin')}x below the dtype's maximum"]
    if plan.get("residual_scale") is not None:
        lines.append(f"- residual stream scaled by {plan['residual_scale']:g}")
    for name, scale in sorted((plan.get("mlp_scales") or {}).items()):
        lines.append(f"- {name}: MLP output scaled by {scale:g}")
    if plan.get("max_before") is not None:
        lines.append(f"- largest activation in float32: {plan['max_before']:,.0f} at {plan.get('site_before')}; "
                     f"after the fix: {plan.get('max_after', 0):,.0f} at {plan.get('site_after')}")
    lines.append(f"- calibration prompts: {block.get('calibration_prompts')}")
    return lines


def _exactness_lines(block: dict) -> list[str]:
    exactness = block.get("exactness")
    if not isinstance(exactness, dict):
        return ["Not proven exact (this strategy keeps layers in float32 instead of rescaling)."]
    proof = (f"max |delta logit| {exactness.get('max_delta', float('nan')):.1e}"
             f"{' (bit-identical)' if exactness.get('equal') else ''} on {exactness.get('prompts')} prompt(s)")
    bounded = exactness.get("bounded")
    if exactness.get("exact") not in (True, False):
        return [f"Not proven exact: this checkpoint's `halfsafe` block records no `exact` result ({proof} was "
                "measured, but not recorded as a proof of these files). Re-run `halfsafe fix MODEL --out DIR`."]
    if exactness["exact"]:
        return [f"exact: true. The rescaled weights, run in float32, reproduce the original's float32 logits: {proof}."]
    if not isinstance(bounded, dict):
        return [f"exact: false. The rescaling is exact in memory ({proof}), but a checkpoint cannot store every eps "
                "it needs, and this one was written without `halfsafe fix --out`'s bounded measurement: its distance "
                "from the original is unknown. Write it with `halfsafe fix MODEL --out DIR`."]
    stored = ", ".join(bounded.get("scaled_fields") or []) or "no config field"
    kept, unstored = bounded.get("kept_norms") or [], bounded.get("unstored_eps") or []
    lines = [
        f"exact: false (bounded). The rescaling is exact in memory ({proof}), but this checkpoint stores one eps "
        "per config field, so as reloaded it differs from the original by a change of eps on one side:",
        "",
        f"- eps x s^2 (s = {bounded['s']:g}) is stored in: {stored}",
    ]
    if kept:
        side = ("see eps x s^2 instead of eps" if bounded.get("scaled_fields")
                else "keep eps; the stream's readers see it unscaled")
        lines.append(f"- {len(kept)} norm(s) built from that field whose input does not move with the stream {side}: "
                     f"{', '.join(kept[:4])}{' ...' if len(kept) > 4 else ''}")
    if unstored:
        lines.append(f"- {len(unstored)} eps no config field holds reload at their class default (unscaled): "
                     f"{', '.join(unstored[:3])}{' ...' if len(unstored) > 3 else ''}")
    lines += [
        f"- measured in float32, this checkpoint against the original: max |delta logit| {bounded['max_delta']:.2e} "
        f"({bounded['relative']:.1e} of the largest logit) on the calibration prompts"
        + (f"; on the held-out prompts mean KL {bounded['heldout_kl_mean']:.2e} and max |delta logit| "
           f"{bounded['heldout_max_delta']:.2e}, against float16's own rounding error (the exact fix in float16) "
           f"{bounded['float16_kl_mean']:.2e} and {bounded['float16_max_delta']:.2e} (bounds: "
           f"{bounded['kl_share_bound']:g}x its KL, {bounded['max_share_bound']:g}x its max)"
           if bounded.get("heldout_kl_mean") is not None else ""),
        "- both ways of storing each shared field were measured; the one closer to the original was written:",
        "",
        "| eps x s^2 stored in | max abs delta logit (fp32, calibration prompts) | mean KL (fp32) |",
        "|---|---|---|",
    ]
    lines += [f"| {', '.join(c['scaled_fields']) or '(none)'} | {c['max_delta']:.2e} | {c['kl_mean']:.2e} |"
              for c in bounded.get("candidates", [])]
    return lines


def _verification_lines(block: dict) -> list[str]:
    verification = block.get("verification", {})
    rows = [(name, f) for name, f in verification.items() if isinstance(f, dict)]
    if not rows:
        return ["Not verified (exported with --no-verify)."]
    lines = [
        f"{verification.get('prompts')} held-out prompts, reference float32; gate: no non-finite logit and "
        f"mean KL at most {verification.get('max_kl', 0):.3g}.",
        "",
        "| variant | non-finite | KL mean | KL p99 | KL max | top-1 | perplexity | greedy match / identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, f in rows:
        greedy = "-"
        if f.get("greedy_match_mean") is not None:
            greedy = f"{f['greedy_match_mean']:.1f} of {f['new_tokens']} / {f['greedy_identical']:.0%}"
        label = "fixed (this checkpoint)" if name == "fixed" else name
        lines.append(f"| {label} | {f['nonfinite_share']:.0%} | {f['kl_mean']:.2g} | {f['kl_p99']:.2g} | "
                     f"{f['kl_max']:.2g} | {f['top1']:.2%} | {f['perplexity']:.3f} | {greedy} |")
    return lines


def _source_facts(source: str | Path | None) -> tuple[str | None, dict]:
    """(base model hub id or None, front-matter keys carried over from the source's card)."""
    if source is None:
        return None, {}
    from ..model.loading import demo_cache_dir

    text = str(source)
    path = Path(text).expanduser()
    if text == "demo" or (path.exists() and path.resolve() == demo_cache_dir().resolve()):
        return DEMO_BASE, {"license": DEMO_LICENSE}
    snapshot = _SNAPSHOT.search(str(path.resolve()) if path.exists() else text)
    base = f"{snapshot[1]}/{snapshot[2]}" if snapshot else None
    carried = {}
    card = path / "README.md" if path.is_dir() else None
    if card is not None and card.is_file():
        carried = _front_matter(card.read_text(errors="replace"))
    return base, carried


def _front_matter(text: str) -> dict:
    """The scalar license/language keys of a card's YAML front matter (no YAML parser needed)."""
    if not text.startswith("---"):
        return {}
    found = {}
    for line in text.splitlines()[1:]:
        if line.strip() == "---":
            break
        match = _FRONT_KEY.match(line)
        if match and match[2].strip():
            found[match[1]] = match[2].strip()
    return found
