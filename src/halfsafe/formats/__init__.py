"""Weight formats: how a checkpoint stores the parameters that a fix multiplies.

A fix is said in terms of the model's parameters ("multiply `model.layers.3.mlp.down_proj.weight`
by 2^-3", `Scale`); a format maps that onto the tensors it stores and reads them back in fp32:
- `dense`: a parameter is its stored tensor;
- `packed`, what the weight-only integer formats share: a quantized Linear's weight is
  `(q - zero) * scale` per group, so multiplying it by a power of two is multiplying its scale
  tensor; the packed integers and zero points stay byte-identical. Everything not quantized is
  dense. Its subclasses: `compressed_tensors` (llm-compressor's W4A16 / W8A16), `awq` (GEMM) and
  `gptq` (GPTQModel's format, read through GPTQModel); `bitsandbytes` (4-bit nf4 / fp4, whose
  scale is a block absmax, double-quantized or not) overrides what its naming needs.

`checkpoint_format(directory)` reads config.json's `quantization_config` and returns the format
object, or refuses (one line, before any weight loads) a quantization halfsafe cannot read and
write. Every format offers:
- `quantized` (bool) and `name`;
- `scaled_weights(model, scales, dtype)`: the model's parameters as the format would store them
  scaled, read back in `dtype` (what verification runs; the model is untouched);
- `write(directory, model, tokenizer, scales)`: the fixed checkpoint's files in `directory`.
And, for layer-wise mode (`layerwise`), which never holds the whole checkpoint:
- `composite_parameters()`: parameter -> the stored tensors it is made of, for each parameter the
  format stores as several (a quantized weight), and `read_parameter(name)`, that parameter in
  fp32 from those tensors alone (dense: none; the layout reads each parameter as itself);
- `scaled_weights(..., only=names)` on one materialised unit;
- `streamed_writer(source, scales, dtype)`: `start(target)`, `unit(target, index, count, names)`
  for each unit in turn, `finish(target, model, tokenizer)`; and `output_bytes(fp32_bytes, dtype)`,
  the fixed checkpoint's size, for the free-disk check.
Adding a format is one module here and its tests.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import HalfsafeError
from .dense import DENSE, DenseFormat
from .scale import Scale, scaled_tensor

__all__ = ["DENSE", "DenseFormat", "Scale", "checkpoint_format", "scaled_tensor"]


def quantization_config(directory: Path) -> dict | None:
    """config.json's `quantization_config` (top level, or a multimodal model's text config), or None."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the checkpoint checks say what is wrong with the file
    if not isinstance(config, dict):
        return None
    found = config.get("quantization_config")
    if found is None and isinstance(config.get("text_config"), dict):
        found = config["text_config"].get("quantization_config")
    return found if isinstance(found, dict) else None


def checkpoint_format(directory: Path):
    """The weight format of the checkpoint in `directory`; a HalfsafeError for one halfsafe cannot
    read and write (bitsandbytes 8-bit, FP8, AWQ GEMV, compressed-tensors with activation quantization, ...)."""
    config = quantization_config(directory)
    if config is None:
        return DENSE
    method = str(config.get("quant_method", "unknown"))
    if method == "compressed-tensors":
        from .compressed_tensors import CompressedTensorsFormat

        return CompressedTensorsFormat.open(Path(directory), config)
    if method == "awq":
        from .awq import AwqFormat

        return AwqFormat.open(Path(directory), config)
    if method == "gptq":
        from .gptq import GptqFormat

        return GptqFormat.open(Path(directory), config)
    if method == "bitsandbytes":
        from .bitsandbytes import BitsAndBytesFormat

        return BitsAndBytesFormat.open(Path(directory), config)
    raise HalfsafeError(
        f"'{directory}' holds weights quantized as '{method}' (config.json quantization_config.quant_method), a "
        "format halfsafe cannot read and write yet (it reads dense, compressed-tensors weight-only "
        "(W4A16, W8A16), AWQ GEMM, GPTQ and bitsandbytes 4-bit checkpoints); fix the dense model it came from "
        "with 'halfsafe fix', then quantize the fixed checkpoint"
    )
