"""The practical advice that usually comes with this failure, applied instead of repeated.

- dtype by hardware: bfloat16 needs compute capability 8.0 (A100, L4, RTX 30xx and later).
  `torch.cuda.is_bf16_supported()` answers True on a T4 because it counts emulation, so the
  choice reads the capability instead. T4, V100, P100 and RTX 20xx get float16 with the fix;
  a CPU gets float32 (its half-precision kernels are slower than its fp32 ones).
- base vs instruct: a base model continues text; asked to chat it rambles, and at a low
  temperature or without a repetition penalty it loops. Instruct variants are the better
  choice for open generation.
- `temperature=0` with sampling is greedy decoding; transformers refuses it, so it is treated
  as greedy, and said so.

Every piece of advice is one line, given once per call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

BF16_CAPABILITY = (8, 0)
LOW_TEMPERATURE = 0.3
SUGGESTED = "temperature 0.7-1.0 with repetition_penalty 1.1"
_INSTRUCT = re.compile(r"(instruct|chat|[-_.]it\b|[-_.]it[-_.]|sft|dpo|rlhf)", re.IGNORECASE)


@dataclass
class DtypeChoice:
    dtype: torch.dtype
    fix: bool  # apply halfsafe's rescaling after loading (float16 on an fp16-only GPU)
    reason: str


def choose_dtype(device: torch.device) -> DtypeChoice:
    """The dtype `--dtype auto` runs in on `device`, and why, in one line."""
    if device.type != "cuda":
        return DtypeChoice(torch.float32, False, f"float32 on {device.type}: CPUs run half precision slower than fp32")
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if (major, minor) >= BF16_CAPABILITY:
        return DtypeChoice(torch.bfloat16, False,
                           f"bfloat16 on {name} (compute capability {major}.{minor} has bfloat16 tensor cores)")
    return DtypeChoice(torch.float16, True,
                       f"float16 with halfsafe's fix on {name} (compute capability {major}.{minor} < 8.0 has no "
                       "bfloat16 hardware; float32 would be about 8x slower)")


def is_instruct(name: str, tokenizer) -> bool:
    """An instruct/chat model: its name says so, or its tokenizer has a chat template and its
    name does not say 'base'."""
    if _INSTRUCT.search(name or ""):
        return True
    return bool(getattr(tokenizer, "chat_template", None)) and "base" not in (name or "").lower()


def normalise_generation_kwargs(kwargs: dict) -> tuple[dict, list[str]]:
    """`generate` keywords a careful user would have written, and what was changed.
    Only `temperature=0` with sampling is changed: to greedy decoding."""
    kwargs = dict(kwargs)
    advice = []
    temperature = kwargs.get("temperature")
    if kwargs.get("do_sample") and temperature is not None and temperature <= 0:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        advice.append(f"temperature={temperature} with sampling is greedy decoding; decoding greedily")
    return kwargs, advice


def generation_advice(name: str, tokenizer, *, do_sample: bool, temperature: float | None,
                      repetition_penalty: float | None, chat: bool) -> list[str]:
    """One-line warnings for settings that make a model loop or ramble."""
    advice = []
    instruct = is_instruct(name, tokenizer)
    if chat and not instruct:
        advice.append(f"'{name}' looks like a base model: it continues text rather than answering; "
                      "for chat, use its instruct variant (often named -it or -Instruct)")
    if not instruct and not chat:
        low = do_sample and temperature is not None and temperature < LOW_TEMPERATURE
        if low or not do_sample or not repetition_penalty or repetition_penalty <= 1.0:
            what = (f"temperature {temperature}" if low
                    else "greedy decoding" if not do_sample else "no repetition penalty")
            advice.append(f"base model with {what}: base models tend to loop; try {SUGGESTED}")
    return advice
