"""The checkpoint on disk: safetensors files read one tensor at a time (memory-mapped), and the map
from the model's parameter names to the names the files store."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import HalfsafeError


class Checkpoint:
    """A safetensors checkpoint directory, read one tensor at a time.

    Each read opens its file and closes it again: a file kept open stays memory-mapped, and the
    pages a run has read would then count as resident until the end of the run.
    """

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.directory = directory
        self.files = sorted(directory.glob("*.safetensors"))
        if not self.files:
            raise HalfsafeError(f"'{directory}' has no *.safetensors files; layer-wise mode reads safetensors only")
        self._where = {}
        for path in self.files:
            with safe_open(str(path), framework="pt") as handle:
                self._where.update((name, path) for name in handle.keys())

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def keys(self) -> list[str]:
        return list(self._where)

    def load(self, name: str, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._where[name]), framework="pt") as handle:
            tensor = handle.get_tensor(name)
        return tensor.to(device=device, dtype=dtype)

    def fingerprint(self) -> str:
        """Names, sizes and times of the weight files: what a resumed run must find unchanged."""
        stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in self.files]
        return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]



def _checkpoint_keys(model: nn.Module, checkpoint: Checkpoint) -> dict[str, str]:
    """Parameter name -> the checkpoint's tensor name, through transformers' own renaming rules
    (e.g. Gemma 3's `language_model.model.*` on disk is `model.language_model.*` in memory).
    A tensor that transformers would convert (fuse per-expert weights into one stacked tensor)
    cannot be read one tensor at a time: refused."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    keys = {}
    for key in checkpoint.keys():
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if converted is not None:
            raise HalfsafeError(
                f"'{checkpoint.directory}' stores {key} in a layout transformers converts when loading "
                f"({type(model).__name__} fuses such tensors); layer-wise mode reads one tensor at a time and "
                "cannot do that; use the in-memory path"
            )
        keys[name] = key
    return keys
