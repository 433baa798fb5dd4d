"""compressed-tensors (llm-compressor's format), weight-only integer quantization: W4A16, W8A16.

A quantized Linear is stored as `weight_packed` (int4/int8 values packed into int32),
`weight_scale` (per group, channel or tensor, in a floating dtype), `weight_shape` and, when
asymmetric, `weight_zero_point`; the fix moves `weight_scale` only (`packed`). Reading goes
through compressed-tensors' own decompression (`CompressedTensorsDequantizer`, the model-free
path of its `convert` entry point), never a re-implementation of its packing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import HalfsafeError
from .packed import PackedFormat

# What halfsafe can write: weights-only integer schemes whose scale multiplies the whole
# dequantized weight. Activation quantization (W8A8, FP8, NVFP4) rounds the activations on a grid
# that a rescaled stream would move across, so it is refused rather than approximated.
WRITABLE_FORMATS = ("pack-quantized",)
WRITABLE_STRATEGIES = ("group", "channel", "tensor")


def _refuse(directory: Path, what: str) -> HalfsafeError:
    return HalfsafeError(
        f"'{directory}' is a compressed-tensors checkpoint with {what}, which halfsafe cannot write yet (it writes "
        f"weight-only integer schemes, {', '.join(WRITABLE_FORMATS)}, strategies {', '.join(WRITABLE_STRATEGIES)}: "
        "W4A16, W8A16); fix the dense model it came from with 'halfsafe fix', then quantize the fixed checkpoint"
    )


def describe_scheme(config: dict) -> str:
    """'W4A16 (int4, group 128, symmetric)' for a quantization_config that `check_writable` accepted."""
    parts = []
    for group in (config.get("config_groups") or {}).values():
        weights = group["weights"]
        strategy = weights["strategy"] + (f" {weights['group_size']}" if weights["strategy"] == "group" else "")
        parts.append(f"W{weights['num_bits']}A16 (int{weights['num_bits']}, {strategy}, "
                     f"{'symmetric' if weights.get('symmetric', True) else 'asymmetric'})")
    return ", ".join(sorted(set(parts)))


def check_writable(directory: Path, config: dict) -> None:
    """Refuse, naming what, a compressed-tensors config this module cannot rescale exactly."""
    groups = config.get("config_groups") or {}
    if not groups:
        raise _refuse(directory, "no config_groups")
    for extra in ("kv_cache_scheme", "transform_config", "sparsity_config"):
        if config.get(extra):
            raise _refuse(directory, f"a {extra}")
    for name, group in groups.items():
        if group.get("input_activations") or group.get("output_activations"):
            raise _refuse(directory, f"activation quantization in config group '{name}'")
        form = group.get("format") or config.get("format")
        if form not in WRITABLE_FORMATS:
            raise _refuse(directory, f"format '{form}' in config group '{name}'")
        weights = group.get("weights") or {}
        if weights.get("type") != "int" or weights.get("dynamic"):
            raise _refuse(directory, f"{weights.get('type')} weights in config group '{name}'")
        if weights.get("strategy") not in WRITABLE_STRATEGIES:
            raise _refuse(directory, f"strategy '{weights.get('strategy')}' in config group '{name}'")


class CompressedTensorsFormat(PackedFormat):
    PACKED, SCALE = "weight_packed", "weight_scale"
    LEAVES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
    label = "compressed-tensors"

    def __init__(self, directory: Path, config: dict, dequantizer):
        self._dequantizer = dequantizer
        super().__init__(directory, config)

    def describe(self) -> str:
        return describe_scheme(self.config)

    @classmethod
    def open(cls, directory: Path, config: dict) -> CompressedTensorsFormat:
        check_writable(directory, config)
        try:
            from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (
                CompressedTensorsDequantizer,
            )
        except ImportError as exc:
            raise HalfsafeError(f"'{directory}' is a compressed-tensors checkpoint; reading it needs the package "
                                "compressed-tensors: pip install 'halfsafe[quantized]'") from exc
        try:
            dequantizer = CompressedTensorsDequantizer(directory, dtype=torch.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise HalfsafeError(f"compressed-tensors cannot read the quantization_config of '{directory}': "
                                f"{str(exc).splitlines()[0]}; restore config.json from where the model came from"
                                ) from exc
        return cls(directory, config, dequantizer)

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        try:
            return self._dequantizer.validate(dict(tensors))
        except (ValueError, KeyError, RuntimeError) as exc:
            raise self._failed(exc) from exc
