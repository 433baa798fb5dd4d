"""AWQ, GEMM packing (AutoAWQ's layout, which vLLM's `awq` method and transformers read).

A quantized Linear is stored as `qweight` (int32 [in, out / 8]: eight uint4 values in AWQ's
interleaved order), `qzeros` (int32 [in / group, out / 8], the same packing) and `scales`
([in / group, out], float16); the layer computes `x @ ((q - zero) * scale)`. The fix moves
`scales` only (`packed`). Reading goes through compressed-tensors' AutoAWQ converter, which
unpacks the GEMM layout into compressed-tensors' pack-quantized tensors, then through
compressed-tensors' own decompression: no packing is re-implemented here.

GEMV, exllama and other AWQ layouts, and bit widths other than 4, are refused in one line.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import HalfsafeError
from .packed import PackedFormat, unwritable


def _refuse(directory: Path, what: str) -> HalfsafeError:
    return unwritable(directory, "an AWQ checkpoint", what,
                      "cannot write yet (it writes AWQ GEMM checkpoints with 4-bit weights)")


class AwqFormat(PackedFormat):
    PACKED, SCALE = "qweight", "scales"
    LEAVES = ("qweight", "qzeros", "scales")
    label = "AWQ"

    def __init__(self, directory: Path, config: dict, converter, dequantizer):
        self._converter, self._dequantizer = converter, dequantizer
        super().__init__(directory, config)

    def describe(self) -> str:
        zero = "zero point" if self.config.get("zero_point", True) else "symmetric"
        return f"GEMM (int{self._converter.bits}, group {self._converter.group_size}, {zero})"

    @classmethod
    def open(cls, directory: Path, config: dict) -> AwqFormat:
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise _refuse(directory, f"version '{config.get('version')}'")
        bits = config.get("bits", config.get("w_bit", 4))
        if bits != 4:
            raise _refuse(directory, f"{bits}-bit weights")
        try:
            from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter
        except ImportError as exc:
            raise HalfsafeError(f"'{directory}' is an AWQ checkpoint; reading it needs the package "
                                "compressed-tensors: pip install 'halfsafe[quantized]'") from exc
        ignore = ["lm_head"] + [f"re:.*{re.escape(m)}.*" for m in config.get("modules_to_not_convert") or []]
        converter = AutoAWQConverter(bits=4, group_size=config.get("group_size", config.get("q_group_size", 128)),
                                     zero_point=config.get("zero_point", True), version="gemm", ignore=ignore)
        return cls(directory, config, converter, _dequantizer(converter.update_config(None)))

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """AutoAWQ's GEMM tensors converted by compressed-tensors to its pack-quantized form,
        then decompressed by it: each quantized module's `weight` in fp32, [out, in]."""
        try:
            return self._dequantizer.validate(self._converter.process(dict(tensors)))
        except (ValueError, KeyError, RuntimeError) as exc:
            raise self._failed(exc) from exc


def _dequantizer(quant_config):
    """compressed-tensors' dequantizer for `quant_config` (it is built from a checkpoint's
    config.json; the AWQ converter gives the config in memory)."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    class FromConfig(CompressedTensorsDequantizer):
        def __init__(self):  # the parent's, less reading config.json
            self.dtype, self.quant_config = torch.float32, quant_config
            for scheme in quant_config.config_groups.values():
                scheme.format = CompressionFormat(infer_module_format(torch.nn.Linear, scheme))

    return FromConfig()
