"""Checks made before a checkpoint's weights load: a directory that is a checkpoint, a config that
parses, safetensors files whole, and a tokenizer whose ids the model can embed. Each refusal is one
line that says what is wrong and what to do."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import HalfsafeError


def check_checkpoint_dir(path: Path, allow_pickle: bool = False) -> None:
    """Refuse a directory that is not a loadable safetensors checkpoint, before loading anything."""
    if not (path / "config.json").is_file():
        raise HalfsafeError(f"'{path}' has no config.json, so it is not a Hugging Face checkpoint directory")
    _check_config(path / "config.json")
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        for shard in shards:
            check_safetensors(shard)
        return
    pickles = sorted(p.name for p in path.glob("*.bin"))
    if pickles and not allow_pickle:
        raise HalfsafeError(
            f"'{path}' holds only pickle weights ({pickles[0]}), which can run code when loaded; "
            "convert them to safetensors or pass --allow-pickle if you trust the source"
        )
    if pickles:
        return
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if ggufs:
        raise HalfsafeError(f"'{path}' holds a GGUF file, not safetensors; pass the file itself: {path / ggufs[0]}")
    raise HalfsafeError(f"'{path}' has a config.json but no weights (*.safetensors); it is not a usable checkpoint")


def _check_config(path: Path) -> None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise HalfsafeError(f"'{path}' is not valid JSON ({first_line(exc)}); restore it from where the model came "
                            "from") from exc
    if not isinstance(config, dict):
        raise HalfsafeError(f"'{path}' holds a JSON {type(config).__name__}, not an object of settings; restore it "
                            "from where the model came from")


def check_safetensors(path: Path) -> None:
    """A safetensors file whose header parses and whose tensors all lie inside the file.

    A copy cut short (a full disk, an interrupted download) is refused here with its sizes,
    before transformers reports 'incomplete metadata' from deep inside loading.
    """
    fix = "copy or download it again"
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(length)) if 8 + length <= size else None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise HalfsafeError(f"'{path}' is not a valid safetensors file ({first_line(exc)}); {fix}") from exc
    if size < 8 or header is None:
        raise HalfsafeError(f"'{path}' is truncated: {size:,} bytes, too short for its own header; {fix}")
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError, AttributeError) as exc:
        raise HalfsafeError(f"'{path}' has a malformed safetensors header; {fix}") from exc
    if 8 + length + end > size:
        raise HalfsafeError(f"'{path}' is truncated: {size:,} of {8 + length + end:,} bytes; {fix}")


def check_vocabulary(model: torch.nn.Module, tokenizer, path: Path) -> None:
    """Refuse a tokenizer that produces ids the model has no embedding for.

    Such an id fails inside the embedding lookup (`IndexError: index out of range in self`)
    on the first prompt that contains it; a model with more rows than the tokenizer has ids
    (padded vocabularies) is normal.
    """
    rows = model.get_input_embeddings().num_embeddings
    largest = max(tokenizer.get_vocab().values(), default=-1)
    if largest >= rows:
        raise HalfsafeError(
            f"the tokenizer in '{path}' has ids up to {largest:,} but the model's embedding has {rows:,} rows, so "
            f"any text with a token id of {rows:,} or more would fail inside the model; use the tokenizer that "
            "belongs to this checkpoint (or resize the model's embeddings to the tokenizer)"
        )


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The exception's first line, cut at a sentence's end when it is longer than `limit`."""
    text = (str(exc).strip() or type(exc).__name__).splitlines()[0]
    if len(text) <= limit:
        return text
    end = text.rfind(". ", 0, limit)
    return text[:end] if end > 0 else text[:limit] + "..."
