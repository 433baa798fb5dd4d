"""Calibration and held-out prompts: the bundled sets, or a user's file."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

from .errors import HalfsafeError

# The sets are disjoint: `fix` calibrates on one and verifies on the other.
CALIBRATION = "calibration"
HELDOUT = "heldout"


def bundled_prompts(name: str = CALIBRATION) -> list[str]:
    """A bundled set: English, Chinese, Japanese, code, arithmetic and a long passage."""
    text = files("halfsafe").joinpath("data", f"{name}.jsonl").read_text(encoding="utf-8")
    return _parse_jsonl(text.splitlines(), f"bundled set '{name}'")


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: JSONL with a `text` field (`.jsonl`), else plain text, one per line."""
    path = Path(path)
    if not path.exists():
        raise HalfsafeError(f"prompts file '{path}' does not exist; pass a text file (one prompt per line) or JSONL")
    if not path.is_file():
        raise HalfsafeError(f"prompts file '{path}' is not a regular file; pass a text file (one prompt per line) "
                            "or JSONL")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise HalfsafeError(f"prompts file '{path}' is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    if path.suffix.lower() == ".jsonl":
        prompts = _parse_jsonl(lines, f"'{path}'")
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise HalfsafeError(f"prompts file '{path}' has no prompts; write one prompt per line (or JSONL with 'text')")
    return prompts


def _parse_jsonl(lines: list[str], where: str) -> list[str]:
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise HalfsafeError(f"{where} line {number} is not valid JSON ({exc.msg}); "
                                "use one JSON object per line") from exc
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise HalfsafeError(f"{where} line {number} has no non-empty string field 'text'")
        prompts.append(text)
    return prompts


# -- prompts that fit the model ---------------------------------------------------------------


def max_positions(model) -> int | None:
    """The number of positions the model was built for (`max_position_embeddings`; GPT-2's
    `n_positions`), or None when its config does not say. Past it a learned position table has
    no row (`IndexError: index out of range in self`) and rotary models leave their training."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def _room(model, reserve: int, what: str) -> int | None:
    """Tokens a prompt may take: the model's positions less the `reserve` generated after it."""
    positions = max_positions(model)
    if positions is None:
        return None
    if positions - reserve < 2:  # BOS and one token at least
        raise HalfsafeError(f"the model has {positions:,} positions and {reserve:,} are generated after each of the "
                            f"{what}, which leaves no room for a prompt; generate fewer tokens")
    return positions - reserve


def _length(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])  # as `model.layers.encode` tokenizes: with BOS where the model wants it


def check_prompt_lengths(model, tokenizer, prompts: list[str], *, reserve: int = 0, what: str = "prompts") -> None:
    """Refuse a prompt longer than the model's positions (less `reserve` generated tokens),
    before any work; `fit_prompts` truncates instead."""
    limit = _room(model, reserve, what)
    if limit is None:
        return
    for index, prompt in enumerate(prompts):
        if (length := _length(tokenizer, prompt)) > limit:
            raise HalfsafeError(
                f"{what} {index} has {length:,} tokens, more than the {limit:,} the model has room for "
                f"({max_positions(model):,} positions less {reserve} generated); shorten it, or truncate the "
                "prompts with halfsafe.prompts.fit_prompts"
            )


def fit_prompts(model, tokenizer, prompts: list[str], *, reserve: int = 0,
                what: str = "prompts") -> tuple[list[str], str | None]:
    """Every prompt cut to its longest prefix that fits the model's positions (less `reserve`
    generated tokens); returns the prompts and a one-line notice when any was cut.

    The cut is made in the text, so the prompts stay strings that every later step tokenizes
    as before; a prefix of a prompt is still a valid calibration or evaluation text."""
    limit = _room(model, reserve, what)
    if limit is None:
        return prompts, None
    fitted, cut = [], []
    for index, prompt in enumerate(prompts):
        if _length(tokenizer, prompt) <= limit:
            fitted.append(prompt)
            continue
        low, high = 0, len(prompt)  # the longest prefix of at most `limit` tokens: low fits, high does not
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if _length(tokenizer, prompt[:middle]) <= limit else (low, middle)
        if not prompt[:low].strip():
            raise HalfsafeError(f"{what} {index} does not fit the model's {limit:,} tokens even in part; shorten it")
        fitted.append(prompt[:low])
        cut.append(index)
    if not cut:
        return fitted, None
    which = ", ".join(map(str, cut[:5])) + (", ..." if len(cut) > 5 else "")
    generated = f" less {reserve} generated after them" if reserve else ""
    return fitted, (f"{len(cut)} of {len(prompts)} {what} ({which}) longer than the model's "
                    f"{max_positions(model):,} positions{generated}: truncated to their first {limit:,} tokens")
