"""GPTQ (GPTQModel's and AutoGPTQ's format, which vLLM's `gptq` method and transformers read).

A quantized Linear is stored as `qweight` (int32 [in / 8, out]: eight 4-bit values packed along
the input rows), `qzeros` (int32 [groups, out / 8], packed along the output columns), `scales`
([groups, out], float16) and `g_idx` (int32 [in]: each input row's group, a permutation under
act-order); the layer computes `x @ ((q - zero) * scale)[g_idx]`. In `checkpoint_format` "gptq"
(v1) the stored zero is z - 1, in "gptq_v2" it is z. The fix moves `scales` only (`packed`):
`qweight`, `qzeros` and `g_idx` stay byte-identical, so act-order and either zero convention
are carried as they are.

Reading goes through GPTQModel's own model-free dequantizer (`gptqmodel.utils.model_dequant.
convert_gptq_file`, the path of its `dequantize_model`), which applies the v1 zero offset,
`g_idx` and the bit width itself: no packing is re-implemented here. GPTQModel is the only
library that unpacks this layout on a CPU (transformers loads GPTQ through optimum and
GPTQModel; compressed-tensors converts AWQ, not GPTQ), and it pins numpy (7.6: numpy 2.2.6), so
it is an optional dependency that halfsafe imports only when it opens a GPTQ checkpoint.

Refused in one line: per-module bit widths (`dynamic`), packings other than int32 words, and
checkpoint formats other than gptq / gptq_v2 (marlin, bitblas, ...: GPTQModel repacks those).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..errors import HalfsafeError
from .packed import PackedFormat

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
BITS = (2, 3, 4, 8)  # what GPTQModel's dequantizer unpacks from int32 words in these formats


def _refuse(directory: Path, what: str) -> HalfsafeError:
    return HalfsafeError(
        f"'{directory}' is a GPTQ checkpoint with {what}, which halfsafe cannot write yet (it writes GPTQ "
        f"checkpoint formats {', '.join(CHECKPOINT_FORMATS)} with int{'/int'.join(map(str, BITS))} weights packed "
        "in int32); fix the dense model it came from with 'halfsafe fix', then quantize the fixed checkpoint"
    )


def check_writable(directory: Path, config: dict) -> None:
    """Refuse, naming what, a GPTQ config this module cannot read through GPTQModel and rescale exactly."""
    form = str(config.get("checkpoint_format") or config.get("format") or "gptq").lower()
    if form not in CHECKPOINT_FORMATS:
        raise _refuse(directory, f"checkpoint_format '{form}'")
    bits = config.get("bits", 4)
    if bits not in BITS:
        raise _refuse(directory, f"{bits}-bit weights")
    if str(config.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
        raise _refuse(directory, f"pack_dtype '{config.get('pack_dtype')}'")
    if config.get("dynamic"):
        raise _refuse(directory, "per-module quantization settings (dynamic)")


class GptqFormat(PackedFormat):
    PACKED, SCALE = "qweight", "scales"
    LEAVES = ("qweight", "qzeros", "scales", "g_idx")
    label = "GPTQ"

    def __init__(self, directory: Path, config: dict, convert):
        self._convert = convert
        super().__init__(directory, config)

    def describe(self) -> str:
        group = self.config.get("group_size", 128)
        parts = [f"int{self.config.get('bits', 4)}", "per channel" if group in (-1, None) else f"group {group}",
                 "symmetric" if self.config.get("sym", True) else "zero point"]
        if self.config.get("desc_act"):
            parts.append("act-order")
        return f"{self.config.get('checkpoint_format') or 'gptq'} ({', '.join(parts)})"

    @classmethod
    def open(cls, directory: Path, config: dict) -> GptqFormat:
        check_writable(directory, config)
        try:
            from gptqmodel.utils.model_dequant import convert_gptq_file
        except ImportError as exc:
            raise HalfsafeError(f"'{directory}' is a GPTQ checkpoint; reading it needs the package gptqmodel "
                                "(GPTQModel's own dequantizer): pip install 'gptqmodel>=7.6'") from exc
        return cls(directory, config, convert_gptq_file)

    def dequantize(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`tensors` with each quantized module's qweight / qzeros / scales / g_idx replaced by its
        `weight` in fp32, [out, in], by GPTQModel's dequantizer; every other tensor as given.
        GPTQModel reads a safetensors file, so the quantized leaves pass through one on disk."""
        from safetensors.torch import save_file

        modules = {name.rpartition(".")[0] for name in tensors if name.endswith("." + self.PACKED)}
        leaves = {name: tensor.contiguous() for name, tensor in tensors.items()
                  if name.rpartition(".")[0] in modules and name.rpartition(".")[2] in self.LEAVES}
        result = {name: tensor for name, tensor in tensors.items() if name not in leaves}
        if not leaves:
            return result
        with tempfile.TemporaryDirectory(prefix="halfsafe-gptq-") as scratch:
            path = Path(scratch) / "modules.safetensors"
            save_file(leaves, str(path))
            try:
                weights = self._convert(path, torch.float32, self.config, "cpu")
            except (ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
                raise self._failed(exc) from exc
        missing = sorted(f"{module}.weight" for module in modules if f"{module}.weight" not in weights)
        if missing:
            raise HalfsafeError(f"GPTQModel returned no weight for {missing[0]} of '{self.directory}' "
                                f"({len(missing)} modules); copy or download the checkpoint again")
        result.update({f"{module}.weight": weights[f"{module}.weight"] for module in modules})
        return result
