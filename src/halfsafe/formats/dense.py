"""Dense weights: each parameter is stored as itself, in the checkpoint's floating dtype."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from .scale import Scale, scaled_tensor


class DenseFormat:
    quantized = False
    name = "dense"

    def scaled_weights(self, model: nn.Module, scales: dict[str, Scale], dtype: torch.dtype, *,
                       only: set[str] | None = None) -> dict[str, torch.Tensor]:
        """Every floating parameter of `model` (or those named in `only`) scaled and cast to `dtype`."""
        return {
            name: scaled_tensor(name, param.detach(), scales.get(name), dtype)
            for name, param in model.named_parameters()
            if param.is_floating_point() and (only is None or name in only)
        }

    def write(self, directory: Path, model: nn.Module, tokenizer, scales: dict[str, Scale]) -> None:
        """The model holds the fixed weights already (`put_weights`): transformers writes them."""
        model.save_pretrained(str(directory), max_shard_size="2GB")
        tokenizer.save_pretrained(str(directory))

    # --- layer-wise ----------------------------------------------------------------------

    def composite_parameters(self) -> dict[str, list[str]]:
        """No parameter is made of several stored tensors by the format (transformers' own
        conversions, such as stacked experts, are the layout's business)."""
        return {}

    def output_bytes(self, fp32_bytes: int, dtype: torch.dtype) -> int:
        """The fixed checkpoint's size on disk: every parameter in `dtype`."""
        return fp32_bytes // 4 * (torch.finfo(dtype).bits // 8)

    def streamed_writer(self, source, scales: dict[str, Scale], dtype: torch.dtype) -> DenseStream:
        return DenseStream(source, scales, dtype)


class DenseStream:
    """`write`, one unit at a time, for a model read from disk (`layerwise.LayerwiseModel`, the
    `source`): one shard per unit, its tensors read as stored, scaled (`scaled_tensor`), cast, and
    written as `save_pretrained` writes the in-memory model (names and layout through the source's
    `Layout.stored`: Mixtral's stacked experts go back to one tensor per expert); a shard already
    there (a resumed run) is kept. `finish` writes the index, config, generation config and tokenizer."""

    def __init__(self, source, scales: dict[str, Scale], dtype: torch.dtype):
        self.source, self.scales, self.dtype = source, scales, dtype
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def start(self, target: Path) -> None:
        pass

    def unit(self, target: Path, index: int, count: int, names: list[str]) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        shard = target / f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        if not shard.exists():
            # Read as stored, a set of converted-together tensors at a time: the arithmetic is float64
            # in slices, so no fp32 copy of the unit is needed.
            tensors = {}
            for together in self.source.layout.together(names):
                fixed = {name: scaled_tensor(name, tensor, self.scales.get(name), self.dtype)
                         for name, tensor in self.source.load(together, dtype=None).items()}
                tensors.update((key, tensor.cpu().contiguous())
                               for key, tensor in self.source.layout.stored(fixed).items())
                del fixed
            temporary = shard.with_name(shard.name + ".tmp")
            save_file(tensors, str(temporary), metadata={"format": "pt"})
            os.replace(temporary, shard)
            del tensors
        with safe_open(str(shard), framework="pt") as handle:  # the header only
            for key in handle.keys():
                self.weight_map[key] = shard.name
                self.total += math.prod(handle.get_slice(key).get_shape()) * torch.finfo(self.dtype).bits // 8

    def finish(self, target: Path, model: nn.Module, tokenizer) -> None:
        from transformers import GenerationConfig

        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        model.config.save_pretrained(str(target))
        try:
            GenerationConfig.from_pretrained(str(self.source.path)).save_pretrained(str(target))
        except OSError:
            pass  # the checkpoint has no generation config
        tokenizer.save_pretrained(str(target))


DENSE = DenseFormat()
