"""`halfsafe generate`: guarded text generation from prompts, as a library call.

The command line streams one prompt's tokens as they come; the library returns a plain value
(`Generation`) whose JSON is what `--json` writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..advising import generation_advice
from ..dtypes import dtype_name
from ..errors import HalfsafeError
from ..guarding import GuardedGenerator, GuardReport
from ..timing import now

DEFAULT_NEW_TOKENS = 64


@dataclass
class Generation:
    prompts: list[str]
    texts: list[str]  # the new text of each prompt
    tokens: list[list[int]]  # the new token ids of each prompt
    dtype: str
    report: GuardReport
    seconds: float
    advice: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "schema_version": 1,
            "text": self.texts[0] if len(self.texts) == 1 else self.texts,
            "tokens": self.tokens[0] if len(self.tokens) == 1 else self.tokens,
            "prompts": self.prompts,
            "dtype": self.dtype,
            "seconds": self.seconds,
            "steps": self.report.steps,
            "recovered_steps": self.report.recovered_steps,
            "events": [e.to_json() for e in self.report.events],
            "advice": self.advice,
        }


def check_generation_args(*, max_new_tokens: int = DEFAULT_NEW_TOKENS, temperature: float | None = None,
                          top_p: float | None = None, top_k: int | None = None,
                          repetition_penalty: float | None = None, seed: int | None = None) -> None:
    """Refuse an out-of-range argument before anything loads, as transformers' own processors
    would after (`top_k` has to be a strictly positive integer ...), but with the fix."""
    def finite(x) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise HalfsafeError(f"--max-new-tokens {max_new_tokens} has to be an integer of at least 1: it is the number "
                            "of tokens to generate; pass e.g. 64")
    if temperature is not None and not (finite(temperature) and temperature >= 0):
        raise HalfsafeError(f"--temperature {temperature} has to be a finite number of at least 0: the logits are "
                            "divided by it before sampling; pass e.g. 0.7, or 0 (or --greedy) for greedy decoding")
    if top_p is not None and not (finite(top_p) and 0 < top_p <= 1):
        raise HalfsafeError(f"--top-p {top_p} has to be in (0, 1]: it is the probability mass kept for sampling, and "
                            "0 keeps no token; pass e.g. 0.9, or 1 to keep every token")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 0):
        raise HalfsafeError(f"--top-k {top_k} has to be an integer of at least 0: it is the number of most likely "
                            "tokens sampling keeps; pass e.g. 50, or 0 to keep every token")
    if repetition_penalty is not None and not (finite(repetition_penalty) and repetition_penalty > 0):
        raise HalfsafeError(f"--repetition-penalty {repetition_penalty} has to be a finite number above 0: the "
                            "logits of tokens already present are divided by it; pass e.g. 1.1, or 1.0 for none")
    if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**64):
        raise HalfsafeError(f"--seed {seed} has to be an integer from 0 to 2**64 - 1 (torch's seed range); "
                            "pass e.g. 0")


def chat_prompt(tokenizer, text: str, name: str) -> str:
    """`text` as one user turn in the model's chat template, ready for generation."""
    if not getattr(tokenizer, "chat_template", None):
        raise HalfsafeError(
            f"'{name}' has no chat template, so it is a base model that continues text; use its instruct "
            "variant for chat (often named -it or -Instruct), or drop --chat"
        )
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=False)


def generate_text(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    *,
    name: str = "",
    chat: bool = False,
    greedy: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
    seed: int | None = None,
    on_nonfinite: str = "recover",
    stop_on_degeneration: bool = False,
    streamer=None,
    notify=None,
) -> Generation:
    """Generate a continuation of every prompt (one batch, left-padded) under the guard.
    `notify(line)` hears each piece of advice before generation starts."""
    check_generation_args(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                          repetition_penalty=repetition_penalty, seed=seed)
    config = model.generation_config
    sampling = dict(
        do_sample=not greedy,
        temperature=None if greedy else (temperature if temperature is not None else config.temperature),
        top_p=None if greedy else (top_p if top_p is not None else config.top_p),
        top_k=None if greedy else (top_k if top_k is not None else config.top_k),
        repetition_penalty=repetition_penalty if repetition_penalty is not None else config.repetition_penalty,
    )
    advice = generation_advice(name, tokenizer, do_sample=sampling["do_sample"], temperature=sampling["temperature"],
                               repetition_penalty=sampling["repetition_penalty"], chat=chat)
    texts = [chat_prompt(tokenizer, p, name) for p in prompts] if chat else prompts
    if notify is not None:
        for line in advice:
            notify(line)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        # A chat template writes its own BOS; the tokenizer must not add a second one.
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not chat)
    finally:
        tokenizer.padding_side = side
    batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    max_new_tokens = _fit_new_tokens(model, batch["input_ids"].shape[1], max_new_tokens, advice, notify)
    if seed is not None:
        torch.manual_seed(seed)
    guarded = GuardedGenerator(model, on_nonfinite=on_nonfinite, stop_on_degeneration=stop_on_degeneration)
    started = now()
    with torch.inference_mode():
        out = guarded.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                               streamer=streamer, **sampling)
    seconds = now() - started
    new = out[:, batch["input_ids"].shape[1]:].cpu()
    tokens = [_trim(row.tolist(), tokenizer) for row in new]
    return Generation(
        prompts=prompts,
        texts=[tokenizer.decode(t, skip_special_tokens=True) for t in tokens],
        tokens=tokens,
        dtype=dtype_name(next(model.parameters()).dtype),
        report=guarded.report,
        seconds=seconds,
        advice=advice + guarded.report.advice,
    )


def _fit_new_tokens(model: nn.Module, prompt_tokens: int, max_new_tokens: int, advice: list[str], notify) -> int:
    """A prompt past the model's positions is refused (cutting it would change what is being
    continued); a generation that would run past them is shortened, with a notice."""
    from ..prompts import max_positions

    positions = max_positions(model)
    if positions is None or prompt_tokens + max_new_tokens <= positions:
        return max_new_tokens
    if prompt_tokens >= positions:
        raise HalfsafeError(f"the prompt has {prompt_tokens:,} tokens and the model only {positions:,} positions, so "
                            "nothing could be generated after it; shorten the prompt")
    room = positions - prompt_tokens
    line = (f"--max-new-tokens {max_new_tokens} shortened to {room}: the prompt takes {prompt_tokens:,} of the "
            f"model's {positions:,} positions")
    advice.append(line)
    if notify is not None:
        notify(line)
    return room


def _trim(ids: list[int], tokenizer) -> list[int]:
    """Cut after the end-of-sequence token: generate pads a finished row to the batch's length."""
    eos = tokenizer.eos_token_id
    return ids[: ids.index(eos) + 1] if eos is not None and eos in ids else ids
