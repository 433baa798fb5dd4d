"""Compare: the fidelity and speed table users decide by.

Variants of one fp32 model, all measured against it by `fixing.verify.measure_fidelity` (the same
function `fix`'s gate uses):
- `fp32`, `bf16`, `fp16`: the model cast;
- `fp16-clamp`: fp16 with every layer's output clamped to +-64,504 (T5, ONNX exports);
- `fp16-fixed`: halfsafe's rescaling, planned on the calibration prompts;
- `fixed:DIR`: a fixed checkpoint someone exported, loaded as it would be, in its own dtype.
Then speed (greedy tokens/s at batch 1 and 8) and the weights' memory per variant.
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import HalfsafeError
from .fixing.plan import PLANNING_MARGIN
from .fixing.verify import Fidelity
from .timing import now

DEFAULT_VARIANTS = ("fp32", "bf16", "fp16", "fp16-fixed")
NAMED = ("fp32", "bf16", "fp16", "fp16-fixed", "fp16-clamp")
SPEED_TOKENS = 16


@dataclass
class VariantResult:
    variant: str
    fidelity: Fidelity
    weights_bytes: int  # the variant's parameters as it holds them
    tokens_per_s_batch1: float | None
    tokens_per_s_batch8: float | None
    peak_gpu_bytes: int | None  # during its generation, on CUDA only

    def to_json(self) -> dict:
        return dict(asdict(self), fidelity=self.fidelity.to_json())


def parse_variants(spec: str) -> list[str]:
    """`fp32,bf16,...,fixed:DIR` -> names, each checked; a `fixed:` directory must be a checkpoint."""
    from .model.checks import check_checkpoint_dir

    names = [part.strip() for part in spec.split(",") if part.strip()]
    if not names:
        raise HalfsafeError("--variants is empty; use e.g. fp32,bf16,fp16,fp16-fixed")
    for name in names:
        if name.startswith("fixed:"):
            directory = Path(name.removeprefix("fixed:")).expanduser()
            if not directory.is_dir():
                raise HalfsafeError(f"variant '{name}': '{directory}' is not a directory; give an exported checkpoint")
            check_checkpoint_dir(directory)
        elif name not in NAMED:
            raise HalfsafeError(f"unknown variant '{name}'; use {', '.join(NAMED)} or fixed:DIR")
    if len(set(names)) != len(names):
        raise HalfsafeError(f"--variants names a variant twice: {spec}")
    return names


def build_variants(model: nn.Module, tokenizer, names: list[str], *, calibration: list[str], margin: float):
    """name -> Variant (a factory of context managers yielding the model to run)."""
    from .fixing.fix import InMemory
    from .fixing.pipeline import rescaling
    from .model.loading import load_model
    from .model.precision import cast_temporarily, clamp_residual, stream_readers

    readers = stream_readers(model) if "fp16-clamp" in names else []

    @contextmanager
    def clamped():
        with cast_temporarily(model, torch.float16), clamp_residual(model, readers=readers):
            yield model

    variants = {}
    for name in names:
        if name == "fp32":
            variants[name] = lambda: nullcontext(model)
        elif name in ("bf16", "fp16"):
            dtype = torch.bfloat16 if name == "bf16" else torch.float16
            variants[name] = lambda dtype=dtype: cast_temporarily(model, dtype)
        elif name == "fp16-clamp":
            variants[name] = clamped
        elif name == "fp16-fixed":
            # The pipeline's stages up to the plan (roles, exactness, observation), run as `fix` would.
            backend = InMemory(model, tokenizer)
            fix, _, _ = rescaling(backend, calibration, dtype=torch.float16, margin=margin)
            variants[name] = backend.variant(fix, torch.float16)
        else:  # fixed:DIR, as a user of that checkpoint would load it
            path = name.removeprefix("fixed:")
            config = json.loads((Path(path) / "config.json").read_text())
            dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(config.get("dtype"), torch.float16)
            other = load_model(path, dtype=dtype).model.to(next(model.parameters()).device)
            variants[name] = lambda other=other: nullcontext(other)
    return variants


def compare(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    names: list[str] | tuple[str, ...] = DEFAULT_VARIANTS,
    *,
    calibration: list[str] | None = None,
    margin: float = PLANNING_MARGIN,
    new_tokens: int = 32,
    speed: bool = True,
    progress=None,
) -> list[VariantResult]:
    """Every variant against `model` (fp32) on `texts`."""
    from .fixing.verify import measure_fidelity
    from .prompts import bundled_prompts, check_prompt_lengths

    if next(model.parameters()).dtype != torch.float32:
        raise HalfsafeError("compare's reference is float32; load the model with dtype=torch.float32")
    calibration = calibration or bundled_prompts()
    check_prompt_lengths(model, tokenizer, texts, reserve=new_tokens, what="text")
    check_prompt_lengths(model, tokenizer, calibration, what="calibration prompt")
    variants = build_variants(model, tokenizer, names, calibration=calibration, margin=margin)
    fidelity = measure_fidelity(model, tokenizer, texts, variants, new_tokens=new_tokens, progress=progress)
    results = []
    for name, variant in variants.items():
        with variant() as running:
            weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in running.parameters()}.values())
            one, eight, peak = _speed(running, tokenizer, texts) if speed else (None, None, None)
        results.append(VariantResult(name, fidelity[name], weights, one, eight, peak))
    return results


def _speed(model: nn.Module, tokenizer, texts: list[str]) -> tuple[float, float, int | None]:
    """Greedy tokens/s at batch 1 and 8 (best of two runs each), and peak CUDA memory."""
    from .fixing.verify import greedy_tokens

    cuda = next(model.parameters()).device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rates = []
    for batch in (1, 8):
        prompts = (texts * 8)[:batch]
        best = float("inf")
        for _ in range(2):
            started = now()
            with torch.inference_mode():
                greedy_tokens(model, tokenizer, prompts, SPEED_TOKENS)
            best = min(best, now() - started)
        rates.append(batch * SPEED_TOKENS / best)
    return rates[0], rates[1], torch.cuda.max_memory_allocated() if cuda else None
