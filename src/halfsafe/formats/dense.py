"""Dense weights: each parameter is stored as itself, in the checkpoint's floating dtype."""

from __future__ import annotations

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


DENSE = DenseFormat()
