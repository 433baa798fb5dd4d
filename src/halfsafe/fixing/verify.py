"""Fidelity against fp32, with the field's metrics (llama.cpp's `--kl-divergence` conventions).

Per token position, reference = the model in fp32:
- KL(p_ref || p_test) over the full vocabulary; mean, p99 and max over positions;
- top-1 agreement (llama.cpp's "same top p");
- |delta p|: the change in probability of the reference's argmax token;
- non-finite share: positions whose logits hold any NaN or inf (KL counts them as inf);
- perplexity of the prompts themselves, read as text.
Per prompt: greedy-match length, how many of N greedy tokens equal fp32's before the first
difference.

One function measures every variant, so `fix`'s verification gate and `compare` compute the
same numbers the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..model.layers import encode

# A variant is a factory of context managers: entering one yields the model to run (the
# reference model changed in place, or another model), exiting restores the reference.
Variant = Callable[[], AbstractContextManager]


@dataclass
class Fidelity:
    variant: str
    positions: int
    nonfinite_share: float
    kl_mean: float
    kl_p99: float
    kl_max: float
    top1: float
    delta_p_mean: float
    perplexity: float  # on the prompts themselves, as text
    greedy_match_mean: float | None  # tokens equal to fp32's before the first difference, mean over prompts
    greedy_identical: float | None  # share of prompts whose whole continuation equals fp32's
    new_tokens: int  # 0 where greedy decoding was not measured
    kl_values: list[float] = field(default_factory=list, repr=False)  # per position, for plots
    max_delta: float | None = None  # max |delta logit| over every position (inf if any is non-finite)
    max_logit: float | None = None  # the reference's largest |logit| (to read max_delta against)

    def to_json(self) -> dict:
        data = asdict(self)
        del data["kl_values"]
        if data["max_delta"] is None:
            del data["max_delta"], data["max_logit"]
        return data


def position_metrics(reference: torch.Tensor, test: torch.Tensor, targets: torch.Tensor | None = None
                     ) -> dict[str, torch.Tensor]:
    """reference, test: [T, V] logits -> per-position kl, top1, delta_p, finite: [T] each;
    with `targets` ([T - 1], the next tokens), also nll: [T - 1], the test's negative
    log-likelihood of the text (inf where its logits are not finite)."""
    finite = torch.isfinite(test).all(dim=-1)
    ref_logp = torch.log_softmax(reference.double(), dim=-1)
    test_logp = torch.log_softmax(torch.nan_to_num(test.double(), nan=0.0, posinf=0.0, neginf=0.0), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - test_logp)).sum(-1).clamp_min(0.0)
    kl = torch.where(finite, kl, torch.full_like(kl, float("inf")))
    top = reference.argmax(-1)
    top1 = (test.argmax(-1) == top) & finite
    p_ref = ref_logp.exp().gather(-1, top[:, None])[:, 0]
    p_test = test_logp.exp().gather(-1, top[:, None])[:, 0]
    delta_p = torch.where(finite, (p_ref - p_test).abs(), p_ref)
    delta = (reference.double() - test.double()).abs().amax(-1)
    metrics = {"kl": kl, "top1": top1, "delta_p": delta_p, "finite": finite,
               "delta": torch.where(finite, delta, torch.full_like(delta, float("inf"))),
               "logit": reference.abs().amax(-1).double()}
    if targets is not None:
        nll = -test_logp[:-1].gather(-1, targets[:, None].to(test_logp.device))[:, 0]
        metrics["nll"] = torch.where(finite[:-1], nll, torch.full_like(nll, float("inf")))
    return metrics


def measure_fidelity(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    variants: dict[str, Variant],
    *,
    new_tokens: int = 32,
    greedy: tuple[str, ...] | None = None,
    progress=None,
) -> dict[str, Fidelity]:
    """Fidelity of each variant of `model` against `model` as it is (fp32).

    Greedy decoding is measured for the variants named in `greedy` (default: all); on a CPU it
    costs more than everything else together, since half-precision kernels are slow there.
    """
    greedy = tuple(variants) if greedy is None else greedy
    device = next(model.parameters()).device
    collected = {name: {"kl": [], "top1": [], "delta_p": [], "finite": [], "nll": [], "delta": [], "logit": []}
                 for name in variants}
    with torch.inference_mode():
        for prompt in prompts:
            batch = encode(tokenizer, prompt, device)
            reference = model(**batch, use_cache=False).logits[0].float()  # [T, V]
            for name, variant in variants.items():
                with variant() as running:
                    test = running(**batch, use_cache=False).logits[0].float()
                targets = batch["input_ids"][0, 1:]
                for key, value in position_metrics(reference, test, targets).items():
                    collected[name][key].append(value.cpu())
            if progress is not None:
                progress()
        ref_tokens = greedy_tokens(model, tokenizer, prompts, new_tokens) if greedy and new_tokens else None
        results = {}
        for name, variant in variants.items():
            tokens = None
            if ref_tokens is not None and name in greedy:
                with variant() as running:
                    tokens = greedy_tokens(running, tokenizer, prompts, new_tokens)
                if progress is not None:
                    progress()
            results[name] = summarise(name, collected[name], ref_tokens, tokens, new_tokens)
    return results


def greedy_tokens(model: nn.Module, tokenizer, prompts: list[str], new_tokens: int) -> torch.Tensor:
    """[N, new_tokens] greedy continuations, batched with left padding."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
    finally:
        tokenizer.padding_side = side
    out = model.generate(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, top_p=None, top_k=None, temperature=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    return out[:, batch["input_ids"].shape[1]:].cpu()


def match_lengths(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """[N] tokens equal before the first difference."""
    equal = (reference == test).int()
    return equal.cumprod(dim=1).sum(dim=1)


def summarise(name, collected, ref_tokens, tokens, new_tokens) -> Fidelity:
    """A variant's Fidelity from its per-position metrics (and greedy tokens, where measured)."""
    kl = torch.cat(collected["kl"])
    finite = torch.cat(collected["finite"])
    lengths = match_lengths(ref_tokens, tokens) if tokens is not None else None
    return Fidelity(
        variant=name,
        positions=int(kl.numel()),
        nonfinite_share=float((~finite).float().mean()),
        kl_mean=float(kl.mean()),
        kl_p99=float(torch.quantile(kl, 0.99)) if bool(finite.all()) else float("inf"),
        kl_max=float(kl.max()),
        top1=float(torch.cat(collected["top1"]).float().mean()),
        delta_p_mean=float(torch.cat(collected["delta_p"]).mean()),
        perplexity=float(torch.cat(collected["nll"]).mean().exp()),
        greedy_match_mean=float(lengths.float().mean()) if lengths is not None else None,
        greedy_identical=float((lengths == new_tokens).float().mean()) if lengths is not None else None,
        new_tokens=new_tokens if lengths is not None else 0,
        kl_values=kl.tolist(),
        **({"max_delta": float(torch.cat(collected["delta"]).max()),
            "max_logit": float(torch.cat(collected["logit"]).max())} if collected.get("delta") else {}),
    )
